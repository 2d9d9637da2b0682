"""One row of `mri-edge bench`, measured in a fresh process of its own:

    python -m mri_edge.bench_worker '{"model": ..., "runtime": ..., "threads": ..., "batch": ...}'

prints one JSON line: the timings, or {"error": "<the line that names the cause>"}.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from . import ov

# bench's runtimes of .tflite and .onnx files: the package (TFLite) or execution providers (ONNX) of each
TFLITE_RUNTIMES = {"litert": "ai_edge_litert", "tflite_runtime": "tflite_runtime", "tf.lite": "tensorflow"}
ONNX_RUNTIMES = {"onnxruntime": ["CPUExecutionProvider"], "onnxruntime-cuda": ["CUDAExecutionProvider"],
                 "onnxruntime-tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider"]}


def _rss_kb(field: str = "VmRSS") -> int:
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    import resource  # noqa: PLC0415

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _open(spec: dict):
    """(runner(batch)->probs, image_size, runtime label) for one artifact/runtime pair."""
    path = Path(spec["model"])
    rt = spec["runtime"]
    threads = spec["threads"]
    if rt == "keras":
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        if spec.get("keras_backend"):
            os.environ["KERAS_BACKEND"] = spec["keras_backend"]
        if os.environ.get("KERAS_BACKEND", "tensorflow") == "tensorflow":
            import tensorflow as tf  # noqa: PLC0415

            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(1)
        elif os.environ.get("KERAS_BACKEND") == "torch":
            import torch  # noqa: PLC0415

            torch.set_num_threads(threads)
        import keras  # noqa: PLC0415

        from .model import load_model  # noqa: PLC0415

        net = load_model(path)
        size = int(net.input_shape[1])
        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf  # noqa: PLC0415

            fn = tf.function(lambda x: net(x, training=False), reduce_retracing=True)
        else:
            from .model import no_grad  # noqa: PLC0415

            def fn(x):
                with no_grad():
                    return net(x, training=False)

        def run(batch):
            return keras.ops.convert_to_numpy(fn(batch.astype(np.float32)))

        return run, size, f"keras[{keras.backend.backend()}]"
    from . import runtime  # noqa: PLC0415

    if rt == "openvino":
        m = ov.OpenVINOModel(path, threads)
        return m.run_batch, m.image_size, m.runtime_name  # one call of the graph, whatever the batch
    if path.suffix == ".tflite":
        m = runtime.TFLiteModel(path, runtime.read_metadata(path), threads, TFLITE_RUNTIMES[rt],
                                spec.get("xnnpack", "default"))
    else:
        from .onnx_model import OnnxModel, read_metadata  # noqa: PLC0415

        m = OnnxModel(path, read_metadata(path), threads, ONNX_RUNTIMES[rt], spec.get("ort_opt_level", "all"))
    return m.run_batch, m.image_size, m.runtime_name


def worker(spec: dict) -> dict:
    """Measure one row. Called in a fresh process."""
    from . import preprocess  # noqa: PLC0415

    base_rss = _rss_kb()
    t0 = time.perf_counter()
    run, size, label = _open(spec)
    load_s = time.perf_counter() - t0
    batch = int(spec["batch"])
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    t0 = time.perf_counter()
    run(x)
    first_ms = (time.perf_counter() - t0) * 1e3
    for _ in range(int(spec["warmup"])):
        run(x)
    lat = []
    deadline = time.perf_counter() + float(spec.get("seconds") or 0)
    n_runs = int(spec["runs"])
    while len(lat) < n_runs or (spec.get("seconds") and time.perf_counter() < deadline):
        t = time.perf_counter()
        run(x)
        lat.append((time.perf_counter() - t) * 1e3)
    e2e = []
    image = spec.get("image")
    if image and batch == 1:
        for _ in range(max(5, min(30, n_runs))):
            t = time.perf_counter()
            run(preprocess.load_image(image, size)[None])
            e2e.append((time.perf_counter() - t) * 1e3)
    lat_a = np.asarray(lat)
    return {
        "runtime_label": label,
        "load_s": load_s,
        "first_inference_ms": first_ms,
        "runs": len(lat),
        "p50_ms": float(np.percentile(lat_a, 50)), "p90_ms": float(np.percentile(lat_a, 90)),
        "p99_ms": float(np.percentile(lat_a, 99)), "mean_ms": float(lat_a.mean()), "std_ms": float(lat_a.std()),
        "throughput_img_s": float(batch * 1e3 / np.median(lat_a)),
        "e2e_p50_ms": float(np.median(e2e)) if e2e else None,
        "peak_rss_added_mb": max(0, _rss_kb("VmHWM") - base_rss) / 1024,
        **_gpu_memory(spec),
    }


def _gpu_memory(spec: dict) -> dict:
    """Peak GPU memory of a Keras-on-torch GPU row (CPU memory alone says little there)."""
    if spec.get("device") != "gpu" or spec.get("keras_backend") != "torch":
        return {}
    import torch  # noqa: PLC0415

    return {"gpu_peak_mb": torch.cuda.max_memory_allocated() / 1e6, "gpu_name": torch.cuda.get_device_name(0)}


def _main(arg: str) -> None:
    from .quiet import orphan_proof_child  # noqa: PLC0415
    from .errors import first_line  # noqa: PLC0415

    orphan_proof_child()
    try:
        result = worker(json.loads(arg))
    except Exception as e:  # a runtime that cannot run this file: its own words, one line
        result = {"error": f"{type(e).__name__}: {first_line(e)}"}
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    _main(sys.argv[1])
