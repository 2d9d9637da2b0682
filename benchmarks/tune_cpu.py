"""Try the CPU knobs of each runtime on one run's exports and print p50 latencies side by side.

LiteRT: XNNPACK default / XNNPACK latest features / no XNNPACK; onnxruntime: graph
optimisation levels; 1 and 2 threads; batch 1. Each row is a fresh process.

    python benchmarks/tune_cpu.py RUN_DIR
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mri_edge import bench


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
