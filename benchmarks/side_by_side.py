"""Scoring and timing of several model files side by side in one process, for the benchmark
scripts that compare variants of one run's files (float_weights.py, onnx_weight_only.py):
agreement with Keras on a split, then p50 latency at batch 1 with the files timed in turn,
round by round, so that they share the machine's state."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from mri_edge import data, keras_model
from mri_edge.bench import machine_info
from mri_edge.run import RunFolder


def arguments(doc: str) -> argparse.ArgumentParser:
    """The options every side-by-side script takes: the run, the split, threads, timing rounds,
    calibration images and --verbose (the converters' log lines)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--split", choices=("val", "test"), default="val")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--calib-size", type=int, default=300)
    ap.add_argument("--verbose", action="store_true", help="Show the converters' log lines")
    return ap


def split_images(run_dir: Path, split: str, net) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images, Keras probabilities, labels) of the run's validation or test split."""
    if split == "val":
        ref, x = keras_model.validation_reference(run_dir, print, with_images=True)
        return x, np.asarray(ref["probs"]), np.asarray(ref["labels"])
    pred = json.loads((run_dir / "test_predictions.json").read_text())
    x = data.decode_images(net, RunFolder(run_dir).manifest()["root"], pred["paths"], "test images")
    return x, np.asarray(pred["probs"]), np.asarray(pred["labels"])


def onnx_run(args: argparse.Namespace):
    """(path, opened file, split images, Keras probabilities, labels, calibration images) of the
    run's exports/model_fp32.onnx, from which the ONNX scripts make their variants; exits with
    a hint where the run has no such file."""
    from mri_edge import export  # noqa: PLC0415
    from mri_edge.export.calibration import calibration_set  # noqa: PLC0415
    from mri_edge.backends import open_model  # noqa: PLC0415

    fp32_path = args.run / "exports" / "model_fp32.onnx"
    if not fp32_path.is_file():
        raise SystemExit(f"{fp32_path} not found: export the run with --format onnx first")
    fp32 = open_model(fp32_path)
    x, probs, labels = split_images(args.run, args.split, fp32)
    _, cfg, _ = export.load_run(args.run)
    return fp32_path, fp32, x, probs, labels, calibration_set(args.run, cfg, args.calib_size)[0]


def tflite_candidates(run_dir: Path, shipped, calib_size: int, work: Path):
    """quantize(kept, hybrid=()) -> an int8 TFLite file of the run as `mri-edge export` builds it
    (the calibration range and batch-norm scales of its shipped file; the float graph is written
    to work/sm) with those stages in float and float32 weights (names as the search gives them,
    "conv2.1-3" included; the head only if "head" is among them), and the hybrid stages as
    dynamic-range int8 (`export --hybrid`)."""
    from mri_edge import export  # noqa: PLC0415
    from mri_edge.export.stages import part  # noqa: PLC0415
    from mri_edge.export.calibration import calibration_set  # noqa: PLC0415
    from mri_edge.export.formats import ExportJob  # noqa: PLC0415
    from mri_edge.export.rewrite import store_float_weights  # noqa: PLC0415
    from mri_edge.export.tflite import calibrated_for, quantize_calibrated, tflite_stages, write_saved_model  # noqa: PLC0415

    model, cfg, _ = export.load_run(run_dir)
    write_saved_model(export.deployment_graph(model), str(work / "sm"), int(cfg["image_size"]))
    calib, _ = calibration_set(run_dir, cfg, calib_size)
    minmax = shipped.meta.get("calibration_range", "").startswith("min/max")
    calibrated = calibrated_for(str(work / "sm"), calib, "minmax" if minmax else "percentile", "uint8")
    stages = tflite_stages(calibrated)
    scales = shipped.meta.get("bn_scales", "per-tensor")

    def quantize(kept: list[str], hybrid: list[str] = ()) -> bytes:
        unknown = [s for s in [*kept, *hybrid] if s.split(".")[0] not in stages]
        if unknown:
            raise SystemExit(f"no stage {unknown[0]!r} in this graph (stages: {', '.join(stages)})")
        kept, hybrid = [part(stages, s) for s in kept], [part(stages, s) for s in hybrid]
        nodes = [n for s in kept + hybrid if s != "head" for n in stages[s]["nodes"]]
        fb = quantize_calibrated(calibrated, ExportJob("tflite", "int8", "uint8", "head" in kept,
                                                       float_weights="fp32"), scales, nodes)
        return store_float_weights(fb, "fp32", hybrid=[n for s in hybrid for n in stages[s]["nodes"]]) if hybrid else fb

    return quantize


def onnx_meta(fp32) -> dict:
    """The run's fp32 ONNX file's metadata for an OnnxModel over other bytes of the same run
    (without the file's hash and calibration record; each variant adds what marks it)."""
    return {k: v for k, v in fp32.meta.items() if k not in ("model_sha256", "trust")}


def bare_meta(shipped) -> dict:
    """The shipped file's metadata for a TFLiteModel over other bytes of the same run."""
    meta = {**shipped.meta, "input": {}, "output": {}}
    meta.pop("model_bytes", None)
    meta.pop("model_sha256", None)
    return meta


def compare(nets: dict, sizes: dict, x: np.ndarray, probs: np.ndarray, labels: np.ndarray, rounds: int,
            threads: int, split: str, fp32: str) -> None:
    """Print one row per file (the first is the baseline): size, agreement with Keras, accuracy
    and p50 latency, as ratios to the first file and to the `fp32` one."""
    top = probs.argmax(1)
    rows = []
    for name, net in nets.items():
        p = net.run(x)
        rows.append({"file": name, "size_mb": sizes[name], "flips": int((p.argmax(1) != top).sum()),
                     "agreement": float((p.argmax(1) == top).mean()),
                     "accuracy": float((p.argmax(1) == labels).mean()), "times": []})
    one = x[:1]
    for net in nets.values():
        net.run(one)  # warm-up
    for _ in range(rounds):
        for row, net in zip(rows, nets.values()):
            for _ in range(10):
                t = time.perf_counter()
                net.run(one)
                row["times"].append((time.perf_counter() - t) * 1000)
    base = rows[0]
    base_p50 = float(np.median(base["times"]))
    fp32_p50 = float(np.median(next(r for r in rows if r["file"] == fp32)["times"]))
    print(f"\n{machine_info()['cpu']}, {threads} threads, batch 1, {rounds * 10} runs per file; {split} split, "
          f"{len(x)} images")
    print("| file | size MB | size x plain | agreement (flips) | accuracy | p50 ms | p50 x plain | p50 x fp32 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        p50 = float(np.median(r["times"]))
        print(f"| {r['file']} | {r['size_mb']:.2f} | {r['size_mb'] / base['size_mb']:.2f} | {r['agreement']:.2%} "
              f"({r['flips']}) | {r['accuracy']:.2%} | {p50:.2f} | {p50 / base_p50:.2f} | {p50 / fp32_p50:.2f} |")
