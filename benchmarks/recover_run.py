"""A run folder back from a shipped folder whose model.keras was not kept: the Keras model is
rebuilt from the run's config and filled with the weights of its float TFLite file.

    python benchmarks/recover_run.py artifacts/alzheimer --out artifacts/runs/alzheimer-128px-noaug
    mri-edge evaluate artifacts/runs/alzheimer-128px-noaug     # its test report, from the recovered model

The recovered model.keras holds the file's weights as they are (float16 kernels from an fp16
file, stored compact as `evaluate --fp16-weights` stores them; float32 from an fp32 file), and
computes what the file computes: checked on validation images (random ones when the data is
not here) to 1e-4 in probability (1e-3 from an fp16 file, which also rounds the input
normalisation's constants) before anything is written. The folder is built beside --out and renamed
into place, so a failure leaves nothing behind. The calibration record (trust.json) is not
copied: it belongs to the shipped files, and `mri-edge calibrate` makes a new one.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

from mri_edge import quiet
from mri_edge.errors import MriEdgeError
from mri_edge.files import atomic_copy, sha256_file
from mri_edge.report import write_json
from mri_edge.run import RunFolder

COPIED = ("labels.json", "split_manifest.json")
FLOAT = ("none", "fp16")  # export's quantization names of the fp32 and fp16 files


def check_images(shipped: RunFolder, size: int, n: int = 16) -> np.ndarray:
    """Up to n validation images of the run, decoded by the device runtime; noise without the data."""
    from mri_edge import preprocess  # noqa: PLC0415

    manifest = shipped.manifest()
    root = Path(manifest.get("root", ""))
    paths = [root / rel for rel, _ in (manifest["splits"].get("val") or [])[:n]]
    if paths and all(p.is_file() for p in paths):
        return np.stack([preprocess.load_image(p, size) for p in paths])
    return np.random.default_rng(0).integers(0, 256, (n, size, size, 3), np.uint8)


def recover(shipped_dir: Path, out: Path, tflite: str) -> dict:
    from mri_edge import model as model_lib, runtime  # noqa: PLC0415
    from mri_edge.config import TrainConfig  # noqa: PLC0415
    from mri_edge.export.recover import keras_from_tflite  # noqa: PLC0415

    shipped, source = RunFolder(shipped_dir), Path(shipped_dir) / tflite
    RunFolder(out).check_new_run()  # a finished or unfinished run, a file, a foreign folder: refused
    if out.exists() and any(out.iterdir()):
        raise MriEdgeError(f"--out {out} is not empty; recover writes a new run folder")
    meta = runtime.read_metadata(source)  # a missing or damaged file: one clear line
    saved, labels = shipped.config(), shipped.labels()
    if meta.get("quantization") not in FLOAT:
        raise MriEdgeError(f"{source.name} is a {meta.get('quantization')} file; recover needs a float "
                           "(fp32 or fp16) TFLite file")
    if saved.get("weights") == "ensemble":
        raise MriEdgeError(f"{shipped_dir} holds an ensemble; recover rebuilds one DenseNet121")
    cfg = TrainConfig.from_saved(saved)
    if list(meta.get("class_names", [])) != list(labels["class_names"]) or \
            list(meta.get("input_size", [])) != [cfg.image_size, cfg.image_size]:
        raise MriEdgeError(f"{source.name} (classes {meta.get('class_names')}, input {meta.get('input_size')}) is "
                           f"not the model of {shipped.config_path} ({cfg.image_size} px)")
    quiet.import_tensorflow()
    net = model_lib.build_model(len(labels["class_names"]), cfg.image_size, "none", cfg.dense_units, cfg.dropout,
                                drop_path=cfg.drop_path)
    layers = keras_from_tflite(source, net)
    compact = meta["quantization"] == "fp16"
    kernels = "float16" if compact else "float32"
    if compact and model_lib.round_kernels_fp16(net):
        raise MriEdgeError(f"{source.name}: kernels that are not float16 in an fp16 file")
    x = check_images(shipped, cfg.image_size)
    diff = float(np.abs(runtime.load(source).run(x) - net.predict(x.astype(np.float32), verbose=0)).max())
    # An fp16 file also rounds the input normalisation's constants (mean 123.675 -> 123.6875);
    # the model keeps the contract's exact ones, as the trained model did: 2.1e-4 apart on
    # the random-carve 128 px Alzheimer model's validation images, whose test report comes back exactly.
    if diff > (1e-3 if compact else 1e-4):
        raise MriEdgeError(f"the recovered model differs from {source.name} by {diff:.2e} in probability; not written")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as td:
        tmp = Path(td) / out.name
        tmp.mkdir()
        for f in COPIED:
            atomic_copy(shipped / f, tmp / f)
        (model_lib.save_compact if compact else model_lib.save_model)(net, tmp / "model.keras")
        write_json(tmp / "config.json", {**saved, "weights_stored": {
            "kernels": kernels,
            "from": {"file": source.name, "sha256": sha256_file(source), "recovered_layers": layers,
                     "shipped_folder": str(shipped_dir)}}})
        if out.exists():
            out.rmdir()  # empty (checked above); the rename needs the name free
        tmp.rename(out)
    return {"layers": layers, "max_abs_diff": diff, "images": len(x), "kernels": kernels}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("shipped", type=Path, help="a shipped folder (artifacts/<task>) or run folder with its TFLite files")
    ap.add_argument("--out", type=Path, required=True, help="new run folder to write")
    ap.add_argument("--tflite", default="model_fp16.tflite", help="the float TFLite file to read (fp16 or fp32)")
    args = ap.parse_args()
    try:
        r = recover(args.shipped, args.out, args.tflite)
    except MriEdgeError as e:
        sys.exit(f"error: {e}")
    print(f"{args.out / 'model.keras'}: {r['layers']} layers from {args.shipped / args.tflite} ({r['kernels']} "
          f"kernels), largest probability difference {r['max_abs_diff']:.1e} on {r['images']} images")


if __name__ == "__main__":
    main()
