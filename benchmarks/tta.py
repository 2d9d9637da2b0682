"""Test-time augmentation: does averaging over a left-right flip help a run's model?

Scores the run's model.keras on its held-out split (the grouped validation split is the
rule that chooses) and on the test split (reported, never used to choose), without and with
the flip, side by side in one run: accuracy, macro-F1, recall per class, ECE, and the
wall time of each pass (the flip doubles the work per image).

    python benchmarks/tta.py --run artifacts/runs/alzheimer-96px-grouped [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mri_edge import metrics, report  # noqa: E402
from mri_edge.data import decode_images  # noqa: E402
from mri_edge.keras_model import KerasModel  # noqa: E402
from mri_edge.run import RunFolder  # noqa: E402

VARIANTS = {
    "none": lambda x: [x],
    "flip": lambda x: [x, x[:, :, ::-1]],  # left-right: brain slices are near mirror images
}


def probabilities(net: KerasModel, images: np.ndarray, views, batch: int = 32) -> tuple[np.ndarray, float]:
    t0 = time.perf_counter()
    out = [np.mean([net.run(np.ascontiguousarray(v)) for v in views(images[i:i + batch])], axis=0)
           for i in range(0, len(images), batch)]
    return np.concatenate(out), time.perf_counter() - t0


def scores(probs: np.ndarray, labels: np.ndarray, class_names: list[str]) -> dict:
    m = metrics.classification_metrics(labels, probs.argmax(1), class_names)
    return {"accuracy": m["accuracy"], "macro_f1": m["macro"]["f1"],
            "recall": {c: m["per_class"][c]["recall"] for c in class_names},
            "hits": {c: int(m["confusion_matrix"][i][i]) for i, c in enumerate(class_names)},
            "ece": metrics.calibration_metrics(labels, probs)["ece"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True)
    ap.add_argument("--out", default=None, help="report folder [default: RUN/tta]")
    args = ap.parse_args()
    run = RunFolder(args.run)
    manifest = run.manifest()
    names = manifest["class_names"]
    net = KerasModel(run.model_path)
    out = {"run": str(run.path), "val_split": manifest.get("val_split", {}).get("method"), "splits": {}}
    for split in ("val", "test"):
        rows = manifest["splits"][split]
        images = decode_images(net, Path(manifest["root"]), [r for r, _ in rows], f"{split} images")
        labels = np.array([k for _, k in rows])
        out["splits"][split] = {}
        for name, views in VARIANTS.items():
            probs, secs = probabilities(net, images, views)
            out["splits"][split][name] = {**scores(probs, labels, names), "seconds": round(secs, 1), "n": len(rows)}
    dest = Path(args.out) if args.out else run.path / "tta"
    dest.mkdir(parents=True, exist_ok=True)
    rows = []
    for split, label in (("val", "held-out (chooses)"), ("test", "test (reported)")):
        for name, s in out["splits"][split].items():
            rows.append([label, name, s["n"], f"{s['accuracy']:.2%}", f"{s['macro_f1']:.3f}",
                         " / ".join(f"{s['hits'][c]}" for c in names), f"{s['ece']:.4f}", f"{s['seconds']:.0f} s"])
    val = out["splits"]["val"]
    out["chosen"] = max(val, key=lambda v: val[v]["accuracy"])  # first of equals: VARIANTS runs cheapest first
    text = (f"# Test-time augmentation: {run.path.name}\n\n"
            + report.md_table(["split", "views", "images", "accuracy", "macro-F1",
                               "correct per class (" + ", ".join(names) + ")", "ECE (uncalibrated)", "time"], rows)
            + f"\n\nThe held-out split chooses: **{out['chosen']}** (ties go to fewer views).\n")
    (dest / "tta.json").write_text(json.dumps(out, indent=1))
    (dest / "tta.md").write_text(text)
    print(text)
    print(f"test accuracy ratio flip/none: "
          f"{out['splits']['test']['flip']['accuracy'] / max(out['splits']['test']['none']['accuracy'], 1e-9):.4f}; "
          f"time ratio: {out['splits']['test']['flip']['seconds'] / max(out['splits']['test']['none']['seconds'], 1e-9):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
