"""Abstention thresholds by estimate and by test, side by side, for a shipped folder or run.

For each --max-risk target it picks the threshold twice on the held-out images the folder's
calibration used, with its stored temperature: the estimate ((errors + 1) / (accepted + 1),
`calibrate --max-risk`) and the binomial tests in fixed sequence (`calibrate --max-risk
--risk-confidence`). It prints each threshold's coverage and error on held-out images and on
the official test split through the int8 TFLite file, and where the tests stop: the ranks of
the most confident held-out errors.

    python benchmarks/tested_threshold.py artifacts/alzheimer --data ../shared/data/alzheimer-mri \
        --max-risk 0.15 --max-risk 0.3      # 40 s on 2 cores
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from mri_edge import trust
from mri_edge.calibrate import held_out_rows
from mri_edge.config import CalibrateConfig
from mri_edge.data import decode_images
from mri_edge.backends import open_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path, help="shipped folder or run: model.keras, split_manifest.json, trust.json")
    ap.add_argument("--data", type=Path, help="where the dataset is now [default: the manifest's root]")
    ap.add_argument("--int8", type=Path, help="int8 file scored on test [default: FOLDER/model_int8.tflite, "
                                              "else FOLDER/exports/model_int8.tflite]")
    ap.add_argument("--max-risk", type=float, action="append", help="targets (repeatable) [default: 0.01]")
    ap.add_argument("--confidence", type=float, default=0.95)
    args = ap.parse_args()
    manifest = json.loads((args.folder / "split_manifest.json").read_text())
    root = args.data or Path(manifest["root"])
    record = json.loads((args.folder / "trust.json").read_text())
    keep, held = held_out_rows(manifest, CalibrateConfig(), log=print)
    val = [manifest["splits"]["val"][i] for i in keep]
    test = manifest["splits"]["test"]
    int8 = args.int8 or next(p for p in (args.folder / "model_int8.tflite", args.folder / "exports" / "model_int8.tflite")
                             if p.is_file())
    keras, quant = open_model(args.folder / "model.keras"), open_model(int8)
    t = record["temperature"]
    held_p = trust.scale(keras.predict_arrays(decode_images(keras, root, [r for r, _ in val], "held-out"), 32,
                                              calibrated=False, label="Keras on held-out images"), t)
    test_p = trust.scale(quant.predict_arrays(decode_images(quant, root, [r for r, _ in test], "test"), 32,
                                              calibrated=False, label=f"{int8.name} on test images"), t)
    y_held, y_test = np.array([y for _, y in val]), np.array([y for _, y in test])
    curve = trust.coverage_risk(held_p, y_held)
    first = (np.flatnonzero(np.diff(curve["errors"], prepend=0)) + 1)[:8].tolist()  # ranks of the errors
    print(f"\n{len(val)} held-out images ({held['rule']}), accuracy {(held_p.argmax(1) == y_held).mean():.2%}, "
          f"temperature {t:.3f}; most confident errors at ranks {first}")
    print(f"| max risk | rule | threshold | held-out coverage / error | test coverage / error ({int8.name}) |")
    print("|---|---|---|---|---|")
    for r in args.max_risk or [0.01]:
        for conf in (None, args.confidence):
            thr = trust.choose_threshold(held_p, y_held, max_risk=r, confidence=conf)
            h, x = trust.at_threshold(held_p, y_held, thr), trust.at_threshold(test_p, y_test, thr)
            rule = "estimate" if conf is None else f"test at {conf:.0%}"
            shown = "refer all" if thr == trust.REFER_ALL else f"{thr:.4f}"
            print(f"| {r} | {rule} | {shown} | {trust.coverage_risk_text(h, percent=True)} | "
                  f"{trust.coverage_risk_text(x, percent=True)} |")


if __name__ == "__main__":
    main()
