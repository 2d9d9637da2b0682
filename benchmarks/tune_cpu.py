"""Try the CPU knobs of each runtime on one run's exports and print p50 latencies side by side.

LiteRT: XNNPACK default / XNNPACK latest features / no XNNPACK; onnxruntime: graph
optimisation levels, and its int8 kernels (the run's fp32 ONNX quantized again with uint8
or int8 activations, QDQ or QOperator format, on 32 calibration images); 1 and 2 threads;
batch 1. Each row is a fresh process.

    python benchmarks/tune_cpu.py RUN_DIR
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from mri_edge import bench


def int8_variants(run_dir: Path, out: Path) -> list[tuple[Path, str]]:
    """The run's fp32 ONNX quantized with each activation type / format onnxruntime offers."""
    import onnx

    from mri_edge import export
    from mri_edge.onnx_model import METADATA_KEY

    cfg = json.loads((run_dir / "config.json").read_text())
    calib, _ = export.calibration_set(run_dir, cfg, 32)
    meta = {p.key: p.value for p in onnx.load(str(run_dir / "exports" / "model_int8.onnx")).metadata_props}
    made = []
    for acts, fmt in (("uint8", "qdq"), ("int8", "qdq"), ("uint8", "qoperator")):
        path = out / f"int8_{acts}_{fmt}.onnx"
        export.onnx_int8(run_dir / "exports" / "model_fp32.onnx", path, calib, activations=acts, quant_format=fmt)
        proto = onnx.load(str(path))
        export.set_onnx_metadata(proto, json.loads(meta[METADATA_KEY]))
        onnx.save(proto, str(path))
        made.append((path, f"int8 ONNX activations={acts} format={fmt}"))
    return made


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("--runs", type=int, default=30)
    args = ap.parse_args()
    ex = Path(args.run_dir) / "exports"
    rows = []
    for name in ("model_fp32.tflite", "model_int8.tflite"):
        for xnn in ("default", "latest", "off"):
            for t in (1, 2):
                rows.append(({"model": str(ex / name), "runtime": "litert", "xnnpack": xnn, "threads": t},
                             f"{name} litert xnnpack={xnn}"))
    for name in ("model_fp32.onnx", "model_int8.onnx"):
        for level in ("disable", "basic", "extended", "all"):
            for t in (1, 2):
                rows.append(({"model": str(ex / name), "runtime": "onnxruntime", "ort_opt_level": level, "threads": t},
                             f"{name} onnxruntime opt={level}"))
    for path, label in int8_variants(Path(args.run_dir), Path(tempfile.mkdtemp(prefix="tune-cpu-"))):
        for t in (1, 2):
            rows.append(({"model": str(path), "runtime": "onnxruntime", "threads": t}, label))
    print(f"{'configuration':52s} {'thr':>3s} {'p50 ms':>8s} {'p90 ms':>8s}")
    for spec, label in rows:
        spec = {"device": "cpu", "batch": 1, "warmup": 5, "runs": args.runs, "seconds": None, "image": None, **spec}
        r = bench.run_row(spec)
        if "error" in r:
            print(f"{label:52s} {spec['threads']:3d}  ERROR {r['error']}")
        else:
            print(f"{label:52s} {spec['threads']:3d} {r['p50_ms']:8.2f} {r['p90_ms']:8.2f}")


if __name__ == "__main__":
    main()
