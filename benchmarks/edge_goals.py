"""Export and latency goals of a 224 px DenseNet121, measured side by side in one run.

1. Export all six files (TFLite fp32/fp16/dynamic/int8, ONNX fp32/int8): total time
   <= 180 s on 2 cores; int8 TFLite <= 8 MB; fp16 TFLite <= 15 MB.
2. Batch-1 latency at 2 threads, each row in a fresh process: the best int8
   artifact >= 6x faster than Keras.
3. The machine's int8 compute limit: theoretical (cores x clock x MACs/cycle for
   AVX-512 VNNI and for AMX) and measured (onnxruntime int8 GEMM), and how far the
   best int8 artifact is from it (goal: within 2.5x). DenseNet121 = 2.87 GMAC at 224 px.

    python benchmarks/edge_goals.py                 # trains a 1-epoch 224 px run on phantoms
    python benchmarks/edge_goals.py --run RUN_DIR   # an existing 224 px run (exports are redone)
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

DENSENET121_GMAC_224 = 2.87


def make_run(tmp: Path) -> Path:
    from mri_edge.synth import write_dataset
    from mri_edge.train import TrainConfig, train

    # 84 per class: after the 10% validation carve the training split still holds the
    # 300 images that int8 calibration reads, so export does the same work as on real data.
    data = write_dataset(tmp / "data", "tumor", n_train=84, n_test=2, size=224)
    cfg = TrainConfig(task="tumor", data_dir=str(data), out=str(tmp / "run"), weights="none", image_size=224,
                      batch_size=8, epochs_head=0, epochs_finetune=1, eager=True, cache_dir=str(tmp / "cache"))
    return train(cfg, log=lambda *_: None)


def int8_gemm_peak(threads: int = 2, n: int = 2048, reps: int = 10) -> float:
    """Measured int8 GEMM rate (GMAC/s) of onnxruntime's MLAS kernels on this CPU."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    a = helper.make_tensor_value_info("A", TensorProto.UINT8, [n, n])
    b = helper.make_tensor_value_info("B", TensorProto.INT8, [n, n])
    y = helper.make_tensor_value_info("Y", TensorProto.INT32, [n, n])
    g = helper.make_graph([helper.make_node("MatMulInteger", ["A", "B"], ["Y"])], "g", [a, b], [y])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    A = np.random.randint(0, 255, (n, n), dtype=np.uint8)
    B = np.random.randint(-127, 127, (n, n), dtype=np.int8)
    s.run(None, {"A": A, "B": B})
    t = time.perf_counter()
    for _ in range(reps):
        s.run(None, {"A": A, "B": B})
    return n**3 * reps / (time.perf_counter() - t) / 1e9


def cpu_clock_ghz() -> float:
    for p in ("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq",):
        try:
            return int(open(p).read()) / 1e6
        except OSError:
            pass
    for line in open("/proc/cpuinfo"):
        if line.startswith("cpu MHz"):
            return float(line.split(":")[1]) / 1e3
    return 2.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    from mri_edge import bench
    from mri_edge.export import export_run

    tmp = Path(tempfile.mkdtemp(prefix="edge-goals-"))
    run = Path(args.run) if args.run else make_run(tmp)
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["image_size"] == 224, "edge goals are defined at 224 px"

    t = time.perf_counter()
    results, failures = export_run(run, ("all",), (), "uint8", calib_size=300, log=lambda *_: None)
    export_s = time.perf_counter() - t
    assert not failures, failures
    sizes = {r["file"]: r["size_mb"] for r in results}
    workers = json.loads((run / "exports" / "exports.json").read_text())["last_export"]["workers"]
    print("== export (all six files, one 224 px model)")
    for r in results:
        print(f"  {r['file']:24s} {r['size_mb']:7.2f} MB {r['seconds']:6.1f} s")
    print(f"  total export time {export_s:.0f} s with {workers} worker processes "
          f"(goal <= 180 s: {'MET' if export_s <= 180 else 'MISSED'})")
    print(f"  int8 TFLite {sizes['model_int8.tflite']:.2f} MB (goal <= 8: {'MET' if sizes['model_int8.tflite'] <= 8 else 'MISSED'}); "
          f"fp16 TFLite {sizes['model_fp16.tflite']:.2f} MB (goal <= 15: {'MET' if sizes['model_fp16.tflite'] <= 15 else 'MISSED'})")

    print(f"== batch-1 latency, {args.threads} threads, each row in a fresh process, "
          f"{args.rounds} interleaved rounds (median of the rounds' p50s: this shared host drifts by 10-20%)")
    targets = (("model.keras", "keras"), ("exports/model_fp32.tflite", "litert"),
               ("exports/model_int8.tflite", "litert"), ("exports/model_fp32.onnx", "onnxruntime"),
               ("exports/model_int8.onnx", "onnxruntime"))
    p50s = {t: [] for t in targets}
    errors = {}
    for _ in range(args.rounds):
        for name, rt in targets:
            spec = {"model": str(run / name), "runtime": rt, "device": "cpu", "threads": args.threads, "batch": 1,
                    "warmup": 10, "runs": args.runs, "seconds": None, "image": None}
            r = bench.run_row(spec)
            if "p50_ms" in r:
                p50s[(name, rt)].append(r["p50_ms"])
            else:
                errors[(name, rt)] = r.get("error", "failed")
    rows = {}
    for t in targets:
        if p50s[t]:
            rows[t] = {"p50_ms": float(np.median(p50s[t]))}
            print(f"  {t[0]:28s} {t[1]:12s} p50 {rows[t]['p50_ms']:8.2f} ms  "
                  f"(rounds: {', '.join(f'{v:.2f}' for v in p50s[t])})")
        else:
            rows[t] = {"error": errors.get(t)}
            print(f"  {t[0]:28s} {t[1]:12s} {errors.get(t)}")
    keras_p50 = rows[("model.keras", "keras")]["p50_ms"]
    int8 = {k: v for k, v in rows.items() if "int8" in k[0] and "p50_ms" in v}
    best_key = min(int8, key=lambda k: int8[k]["p50_ms"])
    best = int8[best_key]["p50_ms"]
    for k, v in rows.items():
        if "p50_ms" in v:
            print(f"  speed-up vs Keras: {k[0]:28s} {keras_p50 / v['p50_ms']:6.2f}x")
    print(f"  best int8 ({best_key[0]}, {best_key[1]}): {keras_p50 / best:.2f}x faster than Keras "
          f"(goal >= 6x: {'MET' if keras_p50 / best >= 6 else 'MISSED'})")

    info = bench.machine_info()
    ghz = cpu_clock_ghz()
    cores = min(args.threads, os.cpu_count() or 1)
    vnni = cores * ghz * 128  # 2 x 512-bit VPDPBUSD per cycle = 2 x 64 int8 MACs
    amx = cores * ghz * 1024  # TDPBUSD: 16x16x64 MACs per 16 cycles
    measured = int8_gemm_peak(args.threads)
    print("== int8 compute limit")
    print(f"  CPU {info['cpu']}, {cores} cores used at {ghz:.2f} GHz, flags {[f for f in info['cpu_flags'] if 'vnni' in f or 'amx' in f]}")
    print(f"  AVX-512 VNNI theoretical {vnni:7.0f} GMAC/s -> DenseNet121 floor {DENSENET121_GMAC_224 / vnni * 1e3:6.2f} ms")
    print(f"  AMX theoretical          {amx:7.0f} GMAC/s -> floor {DENSENET121_GMAC_224 / amx * 1e3:6.2f} ms")
    print(f"  measured int8 GEMM (onnxruntime MLAS, 2048^3) {measured:7.0f} GMAC/s -> floor "
          f"{DENSENET121_GMAC_224 / measured * 1e3:6.2f} ms")
    achieved = DENSENET121_GMAC_224 / (best / 1e3)
    print(f"  best int8 artifact: {best:.2f} ms = {achieved:.0f} GMAC/s")
    for name, peak in (("VNNI theoretical", vnni), ("measured GEMM peak", measured), ("AMX theoretical", amx)):
        ratio = peak / achieved
        print(f"  {name:20s}: {ratio:5.2f}x from the limit (goal <= 2.5x: {'MET' if ratio <= 2.5 else 'MISSED'})")


if __name__ == "__main__":
    main()
