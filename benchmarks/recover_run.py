"""A run folder back from a shipped folder whose model.keras was not kept: the Keras model is
rebuilt from the run's config and filled with the weights of its float TFLite file.

    python benchmarks/recover_run.py artifacts/alzheimer --out artifacts/runs/alzheimer-128px-noaug
    mri-edge evaluate artifacts/runs/alzheimer-128px-noaug     # its test report, from the recovered model

The recovered model.keras computes what the TFLite file computes (checked here on random
images, to 1e-4); with an fp16 file its kernels are float16, as `evaluate --fp16-weights`
stores them. export, verify, calibrate and explain then work on the folder as on any run.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np

from mri_edge import quiet
from mri_edge.errors import MriEdgeError
from mri_edge.files import read_json, sha256_file
from mri_edge.report import write_json

COPIED = ("config.json", "labels.json", "split_manifest.json")


def recover(shipped: Path, out: Path, tflite: str, check_images: int = 16) -> dict:
    from mri_edge import model as model_lib, runtime  # noqa: PLC0415
    from mri_edge.export.recover import keras_from_tflite  # noqa: PLC0415

    source = shipped / tflite
    missing = [p for p in (source, *(shipped / f for f in COPIED)) if not p.is_file()]
    if missing:
        raise MriEdgeError(f"{missing[0]}: not there; recover needs {', '.join(COPIED)} and the float TFLite file")
    if (out / "model.keras").exists():
        raise MriEdgeError(f"{out / 'model.keras'} exists; recover writes only into a folder without a model")
    cfg = read_json(shipped / "config.json")
    quiet.import_tensorflow()
    net = model_lib.build_model(len(cfg["class_names"]), cfg["image_size"], "none", cfg["dense_units"], cfg["dropout"])
    layers = keras_from_tflite(source, net)
    x = np.random.default_rng(0).integers(0, 256, (check_images, cfg["image_size"], cfg["image_size"], 3), np.uint8)
    diff = float(np.abs(runtime.load(source).run(x) - net.predict(x.astype(np.float32), verbose=0)).max())
    if diff > 1e-4:
        raise MriEdgeError(f"the recovered model differs from {source.name} by {diff:.2e} in probability; not written")
    rounded = model_lib.round_kernels_fp16(net)
    out.mkdir(parents=True, exist_ok=True)
    for f in COPIED[1:]:
        shutil.copy2(shipped / f, out / f)
    model_lib.save_compact(net, out / "model.keras")
    # config.json last: a folder with a config but no model would look like a run to resume
    write_json(out / "config.json", {**cfg, "weights_stored": {
        "kernels": "float16", "rounded_values": rounded,
        "from": {"file": str(source), "sha256": sha256_file(source), "recovered_layers": layers}}})
    return {"layers": layers, "max_abs_diff": diff, "rounded_values": rounded}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("shipped", type=Path, help="a shipped folder (artifacts/<task>) or run folder with its TFLite files")
    ap.add_argument("--out", type=Path, required=True, help="run folder to write (no model.keras in it yet)")
    ap.add_argument("--tflite", default="model_fp16.tflite", help="the float TFLite file to read (fp16 or fp32)")
    args = ap.parse_args()
    try:
        r = recover(args.shipped, args.out, args.tflite)
    except MriEdgeError as e:
        sys.exit(f"error: {e}")
    print(f"{args.out / 'model.keras'}: {r['layers']} layers from {args.shipped / args.tflite}, largest probability "
          f"difference {r['max_abs_diff']:.1e} on 16 random images; {r['rounded_values']} kernel values rounded to fp16")


if __name__ == "__main__":
    main()
