"""ONNX files: fp32 through tf2onnx, int8 through onnxruntime's static quantizer with the same
robust ranges as TFLite, I/O details and metadata_props (with the content hash); the ONNX
side of the accuracy-aware search (`onnx_accuracy_aware`, over `accuracy.stage_search`)."""

from __future__ import annotations

import functools
import json
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from .. import progress
from ..errors import first_line
from ..files import atomic_write_bytes
from ..integrity import onnx_content_sha256
from ..onnx_model import METADATA_KEY
from ..runtime import FEATURES, usable_cores
from . import pool
from .accuracy import Scoring, mark_weight_only, recipe, stage_search, store_weights, within_size
from .heldout import HeldOut
from .calibration import robust_ranges
from .formats import ExportError, ExportJob, file_name
from .rewrite import onnx_add_features, onnx_store_weights
from .stages import stages_from

# The float parts' weights of an OpenVINO file converted from an int8 ONNX file that stores them
# as float16: OpenVINO folds each Cast into a float32 constant (the values stay the rounded ones).
FP16_AS_FP32 = "fp32 (fp16 values)"


def onnx_fp32(model, size: int, opset: int):
    import tensorflow as tf  # noqa: PLC0415
    import tf2onnx  # noqa: PLC0415

    spec = [tf.TensorSpec([None, size, size, 3], tf.float32, name="image")]
    # tf2onnx numbers the nodes it adds from a counter global to the process: restarted, the same
    # model gives the same bytes whatever the worker converted before (else every export of it
    # is a new file to verify and calibrate again); after the modules that take a number when
    # first imported (during the first conversion)
    import tf2onnx.rewriter.loop_rewriter_base  # noqa: F401, PLC0415

    tf2onnx.utils.INTERNAL_NAME = 1
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=opset)
    return proto


def onnx_ranges(model_path: Path, calib: np.ndarray, cache: Path, workdir: Path, threads: int | None = None) -> None:
    """Per-image activation extremes through onnxruntime's min/max-augmented graph (each
    tensor gets a ReduceMin/ReduceMax output), reduced by `robust_ranges` - the same rule
    as the TFLite file - and written as an onnxruntime calibration cache."""
    import onnxruntime as ort  # noqa: PLC0415
    from onnxruntime.quantization.calibrate import (  # noqa: PLC0415
        CalibrationMethod, MinMaxCalibrater, TensorData, TensorsData, save_tensors_data)

    # Only the augmented graph is taken from onnxruntime (create_calibrator would also open a
    # session with default, spinning threads, to be replaced by this one).
    cal = MinMaxCalibrater(model_path, None, str(workdir / "augmented.onnx"))
    cal.augment_graph()
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # as onnxruntime's calibrator
    # Worker processes pass cores / workers (and no spin-waiting): onnxruntime's spinning
    # 2-thread pool slowed the TFLite worker beside it (ONNX int8 84-92 s -> 63 s at 224 px).
    so.intra_op_num_threads = threads or usable_cores()
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    cal.infer_session = ort.InferenceSession(cal.augmented_model_path, so, providers=["CPUExecutionProvider"])
    names = [o.name for o in cal.infer_session.get_outputs()][cal.num_model_outputs:]
    mins, maxs = names[0::2], names[1::2]
    assert all(a.endswith("_ReduceMin") for a in mins) and all(b.endswith("_ReduceMax") for b in maxs)
    lo = np.zeros((len(calib), len(mins)), np.float32)
    hi = np.zeros((len(calib), len(mins)), np.float32)
    for n, img in enumerate(calib):
        out = cal.infer_session.run(names, {"image": img[None].astype(np.float32)})
        lo[n], hi[n] = np.ravel(out[0::2]), np.ravel(out[1::2])
    new_lo, new_hi = robust_ranges(lo, hi)
    save_tensors_data(TensorsData(CalibrationMethod.MinMax, {
        m.rpartition("_")[0]: TensorData(lowest=np.float32(a), highest=np.float32(b))
        for m, a, b in zip(mins, new_lo, new_hi)}), cache)


def pre_process(fp32_path: Path, dst: Path) -> Path:
    """onnxruntime's quant_pre_process (shape inference, batch norms folded, MatMul + Add as
    Gemm): the graph, and the node names, that its quantizer and the weight-only rewrite work
    on. Returns dst, or fp32_path if it failed (pre-processing is an optimisation only; the
    failure is logged, as the quantized file then differs from the usual one)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process  # noqa: PLC0415

    try:
        quant_pre_process(str(fp32_path), str(dst), skip_symbolic_shape=True)
        return dst
    except Exception as e:
        progress.note(f"ONNX pre-processing failed ({first_line(e)}); quantizing the graph as converted")
        return fp32_path


def onnx_int8(fp32_path: Path, out_path: Path, calib: np.ndarray, calib_range: str = "percentile",
              activations: str = "uint8", quant_format: str = "qdq", threads: int | None = None,
              workdir: Path | None = None, nodes_to_exclude: list[str] | None = None,
              float_head: bool = False, ranges: Path | None = None, pre_processed: bool = False,
              weights: str = "int8", reduce_range: bool = True) -> None:
    """activations / quant_format: the defaults are the fastest here (benchmarks/tune_cpu.py).
    weights / reduce_range: what export writes (7-bit int8, below); other pairings are for
    benchmarks/onnx_weight_bits.py.
    nodes_to_exclude: nodes of the pre-processed graph that stay in float (accuracy-aware export).
    ranges: where the robust ranges of this fp32 file and calibration set are kept, so that the
    candidates of one search compute them once (they do not depend on what stays in float).
    pre_processed: fp32_path is `pre_process`'s output already (the search's candidates share
    one; a second pass gives the same graph)."""
    from onnxruntime.quantization import (  # noqa: PLC0415
        CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.set_range(0, len(calib))

        def __len__(self):
            return len(calib)

        def set_range(self, start_index, end_index):
            self.it = iter(calib[start_index:end_index])

        def get_next(self):
            img = next(self.it, None)
            return None if img is None else {"image": img[None].astype(np.float32)}

    # in the export's work folder (when given), which the parent removes even if it kills this worker
    with tempfile.TemporaryDirectory(dir=workdir) as td:
        src = fp32_path if pre_processed else pre_process(fp32_path, Path(td) / "pre.onnx")
        if float_head:
            head = onnx_stages(src).get("head")
            if not head:
                raise ExportError("--float-head: no global pooling in the graph to start the head at")
            nodes_to_exclude = list(nodes_to_exclude or []) + head["nodes"]
        options = {}
        if calib_range == "percentile":
            # Robust ranges (demo model: 91% top-1 agreement with plain min/max, 100% robust).
            # onnxruntime's own percentile calibrator kept every activation of every image
            # (over 20 GB at 224 px: OOM-killed) and its histograms took 176 s.
            cache = ranges or Path(td) / "ranges.json"
            if not cache.is_file():
                onnx_ranges(src, calib, cache, Path(td), threads)
            reader, kwargs = None, {"calibration_cache_path": str(cache)}
        else:
            # fed a slice at a time, for the same memory reason
            reader, kwargs = Reader(), {}
            options["CalibStridedMinMax"] = max(d for d in range(1, min(10, len(calib)) + 1) if len(calib) % d == 0)
        # uint8 activations x int8 weights (U8S8) is the pairing onnxruntime's x86 VNNI
        # kernels run natively: 224 px, 2 threads, p50 32.8 ms with int8 activations,
        # 15.8 ms with uint8 (QOperator format: 20.2 ms).
        # reduce_range: 7-bit weights. Without VNNI (AVX2, AVX-512 without VNNI: an AMD EPYC Zen 3
        # here) onnxruntime's U8S8 kernels add pairs of u8 x s8 products in int16 and saturate, so a
        # file with 8-bit weights computes other numbers on those CPUs than on VNNI ones (measured:
        # the micro test model's agreement with Keras 100% -> 18.75%, the shipped tumor file 98.9%
        # against its fp16 sibling). 7-bit weights cannot saturate: the same answers on every CPU.
        quantize_static(str(src), str(out_path), reader, per_channel=True, reduce_range=reduce_range,
                        quant_format={"qdq": QuantFormat.QDQ, "qoperator": QuantFormat.QOperator}[quant_format],
                        activation_type={"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}[activations],
                        weight_type={"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}[weights],
                        calibrate_method=CalibrationMethod.MinMax, extra_options=options,
                        nodes_to_exclude=list(nodes_to_exclude or []), **kwargs)


def onnx_io(path_or_bytes) -> dict:
    import onnxruntime as ort  # noqa: PLC0415

    s = ort.InferenceSession(path_or_bytes, providers=["CPUExecutionProvider"])
    def record(port) -> dict:
        return {"name": port.name, "dtype": "float32", "scale": 0.0, "zero_point": 0,
                "shape": [d if isinstance(d, int) else -1 for d in port.shape or []]}

    out = {"input": record(s.get_inputs()[0]), "output": record(s.get_outputs()[0])}
    out.update({FEATURES: record(o) for o in s.get_outputs()[1:] if o.name == FEATURES})
    return out


def set_onnx_metadata(proto, meta: dict) -> None:
    for p in list(proto.metadata_props):
        if p.key == METADATA_KEY:
            proto.metadata_props.remove(p)
    meta["model_sha256"] = onnx_content_sha256(proto.SerializeToString())
    entry = proto.metadata_props.add()
    entry.key = METADATA_KEY
    entry.value = json.dumps(meta)


def rewrite_onnx_metadata(path: Path, meta: dict) -> None:
    """Replace an exported file's metadata_props entry; every other field is kept as stored."""
    import onnx  # noqa: PLC0415

    proto = onnx.load(str(path))
    want = meta.get("model_sha256")
    meta = dict(meta)
    set_onnx_metadata(proto, meta)
    if want and meta["model_sha256"] != want:
        raise ExportError(f"{path}: its model bytes differ from its recorded hash; re-export it")
    atomic_write_bytes(path, onnx_bytes(proto))


def onnx_bytes(proto) -> bytes:
    """The serialised file; refuses to write one whose recorded hash would not match."""
    data = proto.SerializeToString()
    meta = json.loads(next(p.value for p in proto.metadata_props if p.key == METADATA_KEY))
    if onnx_content_sha256(data) != meta["model_sha256"]:
        raise ExportError("the ONNX serialisation changed when its metadata was added; the hash would not match")
    return data


def convert_chain(jobs: list[ExportJob], model, size: int, opset: int, calib, calib_range: str, metas: list[dict],
                  targets: list[Path], workdir: Path, outcome, threads: int | None = None, held=None,
                  max_drop: float | None = None) -> None:
    """fp32 ONNX first (ONNX int8 and the OpenVINO files are made from it), then the requested
    files, each reported through outcome()."""
    import onnx  # noqa: PLC0415

    fp32_path, q_path = workdir / "fp32.onnx", workdir / "int8.onnx"
    int8_onnx_meta: dict = {}  # the int8 ONNX file's metadata, once it is made (--openvino-int8 onnx reuses it)
    for job, meta, target in zip(jobs, metas, targets):
        t = time.time()
        try:
            if not fp32_path.exists():
                proto = onnx_fp32(model, size, opset)
                onnx_add_features(proto)  # every ONNX and OpenVINO file is made from this one
                atomic_write_bytes(fp32_path, proto.SerializeToString())
            if job.fmt == "openvino":
                from . import openvino  # noqa: PLC0415

                if job.from_onnx:
                    if not int8_onnx_meta:
                        raise ExportError("the int8 ONNX file failed, so there is nothing to convert")
                    # OpenVINO runs the QDQ graph in int8: the ONNX file's ranges, float parts and weights
                    net = openvino.from_int8_onnx(q_path)
                    meta.update({k: int8_onnx_meta[k] for k in ("accuracy_aware", "float_head", "weight_bits")
                                 if k in int8_onnx_meta})
                    if "size_mb" in meta.get("accuracy_aware", {}):  # measured on the ONNX file, not on this one
                        meta["accuracy_aware"] = {**{k: v for k, v in meta["accuracy_aware"].items()
                                                     if k not in ("size_mb", "within_size", "weight_only_size_mb")},
                                                  "size_checked_on": file_name("onnx", "int8")}
                    if int8_onnx_meta.get("float_weights") == "fp16":  # OpenVINO folds the Casts into float32
                        meta["float_weights"] = FP16_AS_FP32
                        if "float_weights" in meta.get("accuracy_aware", {}):
                            meta["accuracy_aware"] = {**meta["accuracy_aware"], "float_weights": FP16_AS_FP32}
                    meta["int8_from"] = f"{file_name('onnx', 'int8')} (its QDQ graph, converted by OpenVINO)"
                    if int8_onnx_meta.get("weight_only"):
                        mark_weight_only(meta)
                        meta["int8_from"] = f"{file_name('onnx', 'int8')} (its weight-only int8 graph, converted by OpenVINO)"
                elif job.quantize == "int8" and max_drop is not None:
                    net, meta["accuracy_aware"] = openvino.openvino_accuracy_aware(fp32_path, calib, held, max_drop)
                else:
                    net = openvino.quantize_int8(fp32_path, calib) if job.quantize == "int8" else \
                        openvino.from_onnx(fp32_path)
                meta.update(openvino.io_details(net))
                if job.quantize == "int8" and not job.from_onnx:
                    meta["calibration_range"] = "NNCF post-training quantization, its default ranges"
                openvino.save(net, target, meta)
                outcome(job, meta, target, t, None)
                continue
            if job.quantize == "int8":
                meta["weight_bits"] = 7  # reduce_range (onnx_int8): the runtime checks for it on CPUs without VNNI
                if max_drop is not None:
                    meta["accuracy_aware"] = onnx_accuracy_aware(fp32_path, q_path, calib, held, max_drop, calib_range,
                                                                 threads, workdir, job.float_head, job.float_weights,
                                                                 job.max_size)
                    if meta["accuracy_aware"]["weight_only"]:
                        mark_weight_only(meta)
                        meta["weight_bits"] = 8  # no int8 kernel: full range, folded to float32 at load
                    elif "float_weights" in meta["accuracy_aware"]:
                        meta["float_weights"] = meta["accuracy_aware"]["float_weights"]
                else:
                    onnx_int8(fp32_path, q_path, calib, calib_range, threads=threads, workdir=workdir,
                              float_head=job.float_head)
                    if job.float_head:  # float16 for int8 too: see onnx_store_weights
                        stored = job.float_weights != "fp32" and onnx_store_weights(q_path, q_path, "fp16")
                        meta["float_weights"] = "fp16" if stored else "fp32"
                proto = onnx.load(str(q_path))
            else:
                proto = onnx.load(str(fp32_path))
            onnx.checker.check_model(proto)
            meta.update(onnx_io(proto.SerializeToString()))
            meta["opset"] = opset
            set_onnx_metadata(proto, meta)
            atomic_write_bytes(target, onnx_bytes(proto))
            if job.quantize == "int8":
                int8_onnx_meta = dict(meta)
            outcome(job, meta, target, t, None)
        except Exception as e:
            outcome(job, meta, target, t, e)


# ---------------------------------------------------------------- accuracy-aware int8 (export --max-drop)


def onnx_runner(path: Path, threads: int | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """A function from uint8 images to an ONNX file's probabilities (one session)."""
    import onnxruntime as ort  # noqa: PLC0415

    so = ort.SessionOptions()
    threads = pool.threads_now(threads)
    if threads:
        so.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda x: np.concatenate([sess.run(None, {name: x[i:i + 64].astype(np.float32)})[0]
                                     for i in range(0, len(x), 64)])


def onnx_stages(model_path: Path) -> dict[str, dict]:
    """The graph's nodes grouped by stage (`stage_names`), with each stage's share of the
    multiply-accumulates of convolutions and dense layers."""
    import onnx  # noqa: PLC0415
    from onnx import numpy_helper, shape_inference  # noqa: PLC0415

    model = shape_inference.infer_shapes(onnx.load(str(model_path)))
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in list(model.graph.value_info) + list(model.graph.output)}
    weights = {t.name: numpy_helper.to_array(t).shape for t in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        macs = params = 0
        if node.op_type in ("Conv", "Gemm", "MatMul") and len(node.input) > 1 and node.input[1] in weights:
            params = macs = int(np.prod(weights[node.input[1]]))
            out = shapes.get(node.output[0]) or []
            if node.op_type == "Conv" and len(out) > 2 and all(out[2:]):
                macs *= int(np.prod(out[2:]))
        nodes.append((node.op_type, node.name, macs, params))
    return stages_from(nodes, ("GlobalAveragePool", "ReduceMean"))


def onnx_accuracy_aware(fp32_path: Path, out_path: Path, calib: np.ndarray, held: HeldOut, max_drop_pts: float,
                        calib_range: str, threads: int | None, workdir: Path, float_head: bool = False,
                        float_weights: str = "fp32", max_size_mb: float | None = None) -> dict:
    """Write the cheapest int8 file found within the budget to out_path; returns its recipe.
    float_head: the head is in float in every candidate (`--float-head`). float_weights "int8":
    the weight-only int8 file is the last resort (`stage_search`). The float stages of a file that also
    runs int8 operations store float16 weights for fp16 and int8 alike (`onnx_store_weights`),
    fp32 ones for fp32, within the budget (`accuracy.store_weights`). A file over max_size_mb gives way
    to the weight-only file where that one holds the budget and the limit (`accuracy.within_size`)."""
    pre = pre_process(fp32_path, workdir / "aware_pre.onnx")  # node names as the quantizer sees them
    stages = onnx_stages(pre)
    built: set[Path] = set()

    scoring = Scoring(held, max_drop_pts)

    def build(kept: list[str]) -> Path:
        path = workdir / f"aware_{'_'.join(kept) or 'plain'}.onnx"
        if path not in built:  # a score completed later runs the file already built
            built.add(path)
            onnx_int8(pre, path, calib, calib_range, threads=threads, workdir=workdir,
                      nodes_to_exclude=[n for s in kept for n in stages[s]["nodes"]],
                      ranges=workdir / "aware_ranges.json", pre_processed=True)
        return path

    def attempt(kept: list[str], mode: str) -> tuple[dict, Path]:
        path = build(kept)
        return scoring(onnx_runner(path, threads), mode), path

    @functools.cache  # written once: within_size sizes the file before it scores it
    def weight_only_file() -> tuple[Path, dict]:
        path = workdir / "aware_weight_only.onnx"
        return path, onnx_store_weights(pre, path, "int8")

    def weight_only(mode: str | None) -> tuple[dict, Path]:  # "early" stops once out of the budget; None: no score
        path, stored = weight_only_file()
        return ({**scoring(onnx_runner(path, threads), mode), "int8_weights": stored} if mode else {}), path

    def note(line: str) -> None:
        progress.note(f"  int8 ONNX search: {line}")

    chosen, path, steps = stage_search(stages, attempt, max_drop_pts,
                                       ["head"] if float_head and "head" in stages else [],
                                       weight_only if float_weights == "int8" else None, note)
    out = recipe("onnxruntime quantize_static with nodes_to_exclude, stages searched on held-out images", chosen,
                 steps, stages, held, max_drop_pts)

    def stored(kept: list[str], weights: str) -> tuple[Path, Callable[[np.ndarray], np.ndarray]]:
        dst = workdir / f"aware_{'_'.join(kept)}_{weights}.onnx"
        onnx_store_weights(build(kept), dst, weights)
        return dst, onnx_runner(dst, threads)

    written, out = store_weights(out, chosen, steps, stages, held, max_drop_pts, scoring,
                                 "fp16" if float_weights == "int8" else float_weights, stored)
    written, out = within_size(Path(written or path), out, lambda p: p.stat().st_size / 1e6, max_size_mb, weight_only,
                               steps, stages, held, max_drop_pts, note)
    written.replace(out_path)
    return out
