"""Calibration of the shipped int8 files on the official test splits, through the device runtime.

    python benchmarks/shipped_calibration.py [--data ../shared/data]

Prints accuracy, mean confidence, ECE (15 bins), Brier and NLL per task (about 16 s on 2 cores).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from mri_edge import data, metrics, runtime

SHIPPED = {"tumor": "brain-tumor-mri", "alzheimer": "alzheimer-mri"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data", help="folder with the two datasets")
    args = ap.parse_args()
    for task, folder in SHIPPED.items():
        model = runtime.load(Path("artifacts") / task / "model_int8.tflite")
        test = data.discover(Path(args.data) / folder, task).splits["test"]
        x = np.stack([model.preprocess(p) for p in test.paths])
        probs = model.run(x)
        c = metrics.calibration_metrics(test.labels, probs)
        print(f"{task}: {len(x)} test images, accuracy {c['accuracy']:.4f}, mean confidence "
              f"{c['mean_confidence']:.4f}, ECE {c['ece']:.4f}, Brier {c['brier']:.4f}, NLL {c['nll']:.4f}")


if __name__ == "__main__":
    main()
