"""Does a nearest-neighbour vote over the training images help a run's model?

On the Alzheimer data a raw-thumbnail 1-NN gets 67.7% of the grouped held-out split and
73.3% of test, more than the DenseNet121 runs trained so far: held-out and test images are
other slices of training subjects, and a neighbour vote reads that directly. This measures,
side by side in one run, the model alone, a k-NN vote over the audit's normalised 64x64
thumbnails (correlation, the same measure that builds the groups) and their blend
(1 - w) * model + w * vote. k and w are chosen on the held-out split (the rule) and the test
split is only reported.

It is a measurement, not a shipped feature: a vote needs the training thumbnails on the
device (5121 x 4096 values for Alzheimer, about 20 MB as float32), which also puts
training images into the deployed file.

    python benchmarks/knn_blend.py --run artifacts/runs/alzheimer-96px-grouped [--out DIR]
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
from mri_edge.groups import correlation, read_thumbnails  # noqa: E402
from mri_edge.keras_model import KerasModel  # noqa: E402
from mri_edge.run import RunFolder  # noqa: E402

KS = (1, 3, 5, 10, 20)
WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)
SHARPNESS = 50.0  # vote weight exp(SHARPNESS * correlation): a neighbour at 0.95 outweighs one at 0.90 ~12x


def vote(query: np.ndarray, ref: np.ndarray, ref_labels: np.ndarray, k: int, n_classes: int) -> np.ndarray:
    """Class probabilities from the k most correlated reference thumbnails."""
    out = np.zeros((len(query), n_classes), np.float32)
    for s in range(0, len(query), 512):
        sim = correlation(query[s:s + 512], ref)
        top = np.argpartition(-sim, k - 1, axis=1)[:, :k] if k < sim.shape[1] else np.argsort(-sim, 1)
        w = np.exp(SHARPNESS * (np.take_along_axis(sim, top, 1) - 1.0))
        for c in range(n_classes):
            out[s:s + 512, c] = (w * (ref_labels[top] == c)).sum(1)
    return out / out.sum(1, keepdims=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True)
    ap.add_argument("--out", default=None, help="report folder [default: RUN/knn_blend]")
    args = ap.parse_args()
    run = RunFolder(args.run)
    manifest = run.manifest()
    if (manifest.get("val_split") or {}).get("method") != "grouped":
        sys.exit(f"{run.path}: its validation split is not grouped; k and w would be chosen on twins of training")
    names, root = manifest["class_names"], Path(manifest["root"])
    splits = {s: manifest["splits"][s] for s in ("train", "val", "test")}
    thumbs, labels = {}, {}
    for s, rows in splits.items():
        thumbs[s], ok = read_thumbnails([str(root / rel) for rel, _ in rows], f"{s} thumbnails")
        labels[s] = np.array([k for _, k in rows])
        if not ok.all():
            sys.exit(f"{run.path}: {int((~ok).sum())} {s} image(s) unreadable")
    net = KerasModel(run.model_path)
    model_p = {}
    for s in ("val", "test"):
        images = decode_images(net, root, [rel for rel, _ in splits[s]], f"{s} images")
        model_p[s] = probabilities(net, images, lambda x: [x])[0]
    votes = {(s, k): vote(thumbs[s], thumbs["train"], labels["train"], k, len(names))
             for s in ("val", "test") for k in KS}
    results = []
    for k in KS:
        for w in WEIGHTS:
            row = {"k": k, "w": w}
            for s in ("val", "test"):
                row[s] = scores((1 - w) * model_p[s] + w * votes[(s, k)], labels[s], names)
            results.append(row)
    model_only = next(r for r in results if r["w"] == 0.0)
    knn_only = max((r for r in results if r["w"] == 1.0), key=lambda r: r["val"]["accuracy"])
    # first of equals: smaller k, smaller w (the model with the least vote)
    chosen = max((r for r in results if 0.0 < r["w"] < 1.0), key=lambda r: r["val"]["accuracy"])
    rows = []
    for label, r in (("model alone", model_only), (f"vote alone (k {knn_only['k']})", knn_only),
                     (f"blend (k {chosen['k']}, w {chosen['w']})", chosen)):
        v, t = r["val"], r["test"]
        rows.append([label, f"{v['accuracy']:.2%}", f"{v['macro_f1']:.3f}", f"{t['accuracy']:.2%}",
                     f"{t['macro_f1']:.3f}", " / ".join(str(t["hits"][c]) for c in names), f"{t['ece']:.4f}"])
    text = (f"# Nearest-neighbour vote and blend: {run.path.name}\n\n"
            f"k and w chosen on the grouped held-out split ({len(splits['val'])} images); "
            f"test ({len(splits['test'])} images) only reported.\n\n"
            + report.md_table(["variant", "held-out accuracy", "held-out macro-F1", "test accuracy", "test macro-F1",
                               "test correct per class (" + ", ".join(names) + ")", "test ECE"], rows) + "\n")
    dest = Path(args.out) if args.out else run.path / "knn_blend"
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "knn_blend.json").write_text(json.dumps({"results": results, "chosen": {"k": chosen["k"], "w": chosen["w"]},
                                                     "sharpness": SHARPNESS}, indent=1))
    (dest / "knn_blend.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
