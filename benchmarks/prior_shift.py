"""Does undoing the class weights after training help accuracy? (post-hoc logit adjustment)

A run trained with balanced class weights answers as if every class were equally common. The
Bayes rule for accuracy on images drawn like the training set adds tau * log(prior) to the
log-probabilities (prior: the training split's class shares; tau 1 undoes the weights, tau 0
leaves the model as it is). This measures tau from 0 to 1.5 side by side on the run's
held-out split (which would choose tau) and on its test split (reported only): accuracy,
macro-F1 and the hits of the smallest class.

    python benchmarks/prior_shift.py artifacts/alzheimer [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from tta import probabilities, scores  # noqa: E402

from mri_edge import report  # noqa: E402
from mri_edge.data import decode_images  # noqa: E402
from mri_edge.keras_model import KerasModel  # noqa: E402
from mri_edge.run import RunFolder  # noqa: E402

TAUS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)


def adjusted(probs: np.ndarray, prior: np.ndarray, tau: float) -> np.ndarray:
    """Probabilities with tau * log(prior) added to their logarithms, renormalised."""
    z = np.log(np.clip(probs, 1e-12, 1.0)) + tau * np.log(prior)
    z = np.exp(z - z.max(1, keepdims=True))
    return z / z.sum(1, keepdims=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--out", default=None, help="report folder [default: RUN/prior_shift]")
    args = ap.parse_args()
    run = RunFolder(args.run)
    manifest = run.manifest()
    names = manifest["class_names"]
    prior = np.bincount([k for _, k in manifest["splits"]["train"]], minlength=len(names)).astype(float)
    prior /= prior.sum()
    net = KerasModel(run.model_path)
    held = manifest["splits"]["val"]
    images = decode_images(net, Path(manifest["root"]), [rel for rel, _ in held], "held-out images")
    val_probs, _ = probabilities(net, images, lambda x: [x])
    preds = run.test_predictions()  # the run's own test answers (train's report), not recomputed
    splits = {"held-out (chooses)": (val_probs, np.array([k for _, k in held])),
              "test (reported)": (np.asarray(preds["probs"], np.float32), np.asarray(preds["labels"]))}
    smallest = names[int(np.argmin(prior))]
    out, rows = {"run": str(run.path), "prior": dict(zip(names, prior.round(4).tolist())), "splits": {}}, []
    for split, (probs, labels) in splits.items():
        out["splits"][split] = {}
        for tau in TAUS:
            s = scores(adjusted(probs, prior, tau), labels, names)
            out["splits"][split][str(tau)] = s
            rows.append([split, tau, f"{s['accuracy']:.2%}", f"{s['macro_f1']:.3f}",
                         f"{s['hits'][smallest]}/{int((labels == names.index(smallest)).sum())}"])
    val = out["splits"]["held-out (chooses)"]
    out["chosen_tau"] = max(TAUS, key=lambda t: (val[str(t)]["accuracy"], -t))  # ties: the smaller change
    text = (f"# Prior shift: {run.path.name}\n\nTraining class shares: "
            + ", ".join(f"{n} {p:.1%}" for n, p in zip(names, prior)) + "\n\n"
            + report.md_table(["split", "tau", "accuracy", "macro-F1", smallest], rows)
            + f"\n\nThe held-out split chooses tau = {out['chosen_tau']} (ties go to the smaller change).\n")
    dest = Path(args.out) if args.out else run.path / "prior_shift"
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "prior_shift.json").write_text(json.dumps(out, indent=1))
    (dest / "prior_shift.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
