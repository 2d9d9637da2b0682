"""TFLite files: float, fp16, dynamic-range and full-integer int8 conversion, the robust range
pass, I/O details and the metadata ZIP appended to the flatbuffer (the rewrites of a quantized
flatbuffer are in `rewrite`)."""

from __future__ import annotations

import functools
import io
import json
import tempfile
import zipfile
from collections.abc import Collection
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np

from .. import progress, quiet
from ..files import atomic_write_bytes, sha256_bytes
from ..runtime import FEATURES, METADATA_NAME, usable_cores
from . import pool
from .accuracy import Scoring, hybrid_step, recipe, stage_search, store_weights, within_size
from .heldout import HeldOut
from .calibration import CALIB_QUANTILE, per_image_extremes, robust_ranges
from .formats import ExportError, ExportJob
from .rewrite import per_tensor_depthwise, store_float_weights, tflite_add_features
from .stages import stages_from, whole

CALIB_BATCH = 10


def write_saved_model(model, path: str, size: int) -> None:
    """The SavedModel every TFLite conversion starts from."""
    import tensorflow as tf  # noqa: PLC0415

    with quiet.native_stderr():
        model.export(path, format="tf_saved_model", verbose=False, input_signature=[
            tf.TensorSpec([None, size, size, 3], tf.float32, name="image")])


def tighten_ranges(calibrated: bytes, calib: np.ndarray, quantile: float, delegate: bool = True) -> bytes:
    """Replace TFLite's global min/max activation ranges by `robust_ranges`.

    TFLite calibrates each activation to the min and max over *all* calibration images,
    so one unusual image stretches a range and costs every other image resolution.
    Measured on the demo model: top-1 agreement with Keras 95.0% with min/max, 98.75% with
    this. Every range is recomputed here, so the converter's own calibration pass only
    needs a few images (`calibrated_graph`).
    """
    from tensorflow.lite.tools import flatbuffer_utils  # noqa: PLC0415

    from ..interpreters import load_interpreter_class, no_delegate_resolver  # noqa: PLC0415

    model = flatbuffer_utils.convert_bytearray_to_object(calibrated)
    graph = model.subgraphs[0]
    tensors = graph.tensors
    idx = [i for i, t in enumerate(tensors)
           if t.quantization is not None and t.quantization.min is not None and len(t.quantization.min) == 1]
    cls = load_interpreter_class()[0]
    # Every tensor whose range is wanted becomes a graph output, so XNNPACK must write it:
    # its float kernels ran a 224 px batch of 10 in 0.35 s, TFLite's built-in ones (the
    # only way to keep intermediates otherwise) in 1.9 s; 60 of the int8 job's 89 s went
    # there. Same ranges (relative difference 2e-6). Built-in kernels remain the fallback.
    known = {int(i) for i in graph.inputs} | {int(o) for o in graph.outputs}
    probe = flatbuffer_utils.convert_bytearray_to_object(calibrated)
    probe.subgraphs[0].outputs = np.array([int(o) for o in graph.outputs] + [i for i in idx if i not in known],
                                          dtype=np.int32)
    interp = None
    if delegate:
        try:
            interp = cls(model_content=bytes(flatbuffer_utils.convert_object_to_bytearray(probe)),
                         num_threads=usable_cores())
        except (RuntimeError, ValueError):
            pass
    if interp is None:
        interp = cls(model_content=calibrated, experimental_preserve_all_tensors=True, num_threads=usable_cores(),
                     experimental_op_resolver_type=no_delegate_resolver(cls))
    inp = interp.get_input_details()[0]
    lo = np.zeros((len(calib), len(idx)), np.float32)
    hi = np.zeros((len(calib), len(idx)), np.float32)
    batch = None
    for start in range(0, len(calib), CALIB_BATCH):
        x = calib[start:start + CALIB_BATCH].astype(np.float32)
        if len(x) != batch:
            batch = len(x)
            interp.resize_tensor_input(inp["index"], [batch, *inp["shape"][1:]])
            interp.allocate_tensors()
        interp.set_tensor(inp["index"], x)
        interp.invoke()
        for k, i in enumerate(idx):
            # tensor(i)() is a view: get_tensor would copy every activation of the batch first
            lo[start:start + batch, k], hi[start:start + batch, k] = per_image_extremes(interp.tensor(i)(), batch)
    new_lo, new_hi = robust_ranges(lo, hi, quantile)
    for k, i in enumerate(idx):
        q = tensors[i].quantization
        q.min, q.max = [float(new_lo[k])], [float(new_hi[k])]
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def int8_converter(saved_model: str, images: np.ndarray, io_dtype: str = "uint8"):
    import tensorflow as tf  # noqa: PLC0415

    conv = tf.lite.TFLiteConverter.from_saved_model(saved_model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]

    def representative():
        for img in images:
            yield [img[None].astype(np.float32)]

    conv.representative_dataset = representative
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = conv.inference_output_type = getattr(tf, io_dtype)  # one of IO_DTYPES
    return conv


def calibrated_graph(saved_model: str, calib: np.ndarray, io_dtype: str = "uint8") -> bytes:
    """The float graph with its int8 activation ranges (`robust_ranges` over every calibration
    image), before quantization: what the int8 TFLite file is quantized from."""
    # Every range is recomputed from all images afterwards, so the converter's own (slow, one
    # image at a time) calibration pass needs only a few.
    conv = int8_converter(saved_model, calib[:4], io_dtype)
    conv._experimental_calibrate_only = True  # stop after calibration, before quantizing
    return tighten_ranges(conv.convert(), calib, CALIB_QUANTILE)


def head_tensors(calibrated: bytes) -> list[str]:
    """Output tensors of the head that `--float-head` keeps in float: every operation from a
    global pooling (MEAN) on, each member's own in an ensemble (the accuracy-aware search's
    stages). Its softmax in uint8 moves in steps of 1/256, too coarse for an occlusion map or a
    calibrated probability of a confident answer."""
    head = tflite_stages(calibrated).get("head")
    if not head:
        raise ExportError("--float-head: no global pooling (MEAN) in the graph to start the head at")
    return sorted(head["nodes"])


def calibrated_for(saved_model: str, calib: np.ndarray, calib_range: str, io_dtype: str) -> bytes:
    """The calibrated float graph for either range rule (what `quantize_calibrated` quantizes)."""
    if calib_range == "percentile":
        return calibrated_graph(saved_model, calib, io_dtype)
    conv = int8_converter(saved_model, calib, io_dtype)
    conv._experimental_calibrate_only = True
    return conv.convert()


def quantize_calibrated(calibrated: bytes, job: ExportJob, bn_scales: str, float_nodes: list[str] = ()) -> bytes:
    """The int8 flatbuffer of a calibrated graph; the head (--float-head) and float_nodes (the
    accuracy-aware search) stay in float through the MLIR quantizer's denylist, their weights
    stored as job.float_weights says (`store_float_weights`)."""
    import tensorflow as tf  # noqa: PLC0415
    from tensorflow.lite.python import convert as tfl_convert  # noqa: PLC0415

    io = getattr(tf, job.io_dtype)
    denied = (head_tensors(calibrated) if job.float_head else []) + list(float_nodes)
    fb = tfl_convert.mlir_quantize(calibrated, False, input_data_type=io,
                                   output_data_type=tf.float32 if job.float_head else io,
                                   denylisted_nodes=denied or None)
    fb = per_tensor_depthwise(fb) if bn_scales == "per-tensor" else fb
    return store_float_weights(fb, job.float_weights) if denied and job.float_weights != "fp32" else fb


def tflite_bytes(saved_model: str, job: ExportJob, calib: np.ndarray | None, calib_range: str = "percentile",
                  bn_scales: str = "per-tensor") -> bytes:
    import tensorflow as tf  # noqa: PLC0415

    if job.quantize == "int8":
        if calib_range == "percentile" or job.float_head:
            return quantize_calibrated(calibrated_for(saved_model, calib, calib_range, job.io_dtype), job, bn_scales)
        fb = int8_converter(saved_model, calib, job.io_dtype).convert()
        return per_tensor_depthwise(fb) if bn_scales == "per-tensor" else fb
    conv = tf.lite.TFLiteConverter.from_saved_model(saved_model)
    if job.quantize in ("fp16", "dynamic"):
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
    if job.quantize == "fp16":
        conv.target_spec.supported_types = [tf.float16]
    return conv.convert()


def tflite_io(flatbuffer: bytes) -> dict:
    from ..interpreters import load_interpreter_class  # noqa: PLC0415

    interp = load_interpreter_class()[0](model_content=flatbuffer)
    out = {}
    outputs = interp.get_output_details()
    records = [("input", interp.get_input_details()[0]), ("output", outputs[0])]
    records += [(FEATURES, det) for det in outputs[1:] if det["name"] == FEATURES]
    for key, det in records:
        scale, zp = det["quantization"]
        out[key] = {"name": det["name"], "dtype": np.dtype(det["dtype"]).name,
                    "shape": [int(v) for v in det["shape_signature"]], "scale": float(scale), "zero_point": int(zp)}
    return out


def append_tflite_metadata(flatbuffer: bytes, meta: dict) -> bytes:
    """The flatbuffer with a ZIP of the metadata after it; the metadata records the flatbuffer's
    length and hash, so the runtime can tell a modified or damaged file."""
    meta.update({"model_bytes": len(flatbuffer), "model_sha256": sha256_bytes(flatbuffer)})
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:  # a fixed entry date: the same metadata gives the same bytes
        z.writestr(zipfile.ZipInfo(METADATA_NAME, date_time=(1980, 1, 1, 0, 0, 0)), json.dumps(meta, indent=1),
                   compress_type=zipfile.ZIP_DEFLATED)
    return flatbuffer + buf.getvalue()


def tflite_flatbuffer(path: Path, meta: dict) -> bytes:
    """An exported file's flatbuffer (what precedes its metadata ZIP), its recorded hash checked."""
    data = Path(path).read_bytes()
    if "model_bytes" in meta:
        fb = data[: int(meta["model_bytes"])]
    else:  # a file exported before the length was recorded: the flatbuffer ends where the ZIP begins
        name = METADATA_NAME.encode()
        i = data.rfind(b"PK\x03\x04")
        while i >= 0 and data[i + 30:i + 30 + len(name)] != name:
            i = data.rfind(b"PK\x03\x04", 0, i)
        if i < 0:
            raise ExportError(f"{path}: no mri-edge metadata to replace")
        fb = data[:i]
    if sha256_bytes(fb) != meta.get("model_sha256", sha256_bytes(fb)):
        raise ExportError(f"{path}: its model bytes differ from its recorded hash; re-export it")
    return fb


def rewrite_tflite_metadata(path: Path, meta: dict) -> None:
    """Replace the metadata ZIP of an exported file; the flatbuffer before it is kept byte for byte."""
    atomic_write_bytes(path, append_tflite_metadata(tflite_flatbuffer(path, meta), dict(meta)))


def tflite_probs(fb: bytes, meta: dict, x: np.ndarray, workdir: Path, threads: int | None = None) -> np.ndarray:
    """Probabilities of a candidate flatbuffer on uint8 images, through the device runtime."""
    from ..runtime import TFLiteModel  # noqa: PLC0415

    with tempfile.TemporaryDirectory(dir=workdir) as td:
        path = Path(td) / "candidate.tflite"
        path.write_bytes(fb)
        net = TFLiteModel(path, {**meta, "input": {}, "output": {}}, threads=pool.threads_now(threads))
        return net.run(x)


def convert(job: ExportJob, saved_model: str, calib, calib_range: str, meta: dict, target: Path,
            bn_scales: str = "per-tensor", held=None, workdir: Path | None = None, threads: int | None = None,
            max_drop: float | None = None) -> None:
    """Write one TFLite file (flatbuffer + metadata ZIP) to target. held: the validation
    images with their Keras probabilities and labels (accuracy.HeldOut), for --bn-scales auto
    and --max-drop."""
    def probs(fb: bytes, x: np.ndarray | None = None) -> np.ndarray:
        return tflite_probs(fb, meta, held.x if x is None else x, workdir, threads)

    if job.quantize == "int8" and bn_scales == "auto":
        # Which batch-norm scales suit a model differs (the 128 px Alzheimer model wants per
        # channel, its 176 px sibling per tensor): keep the file closer to Keras on validation.
        per_channel = tflite_bytes(saved_model, job, calib, calib_range, "per-channel")
        candidates = {"per-tensor": per_tensor_depthwise(per_channel), "per-channel": per_channel}
        scores = {}
        for k, fb in candidates.items():
            p = probs(fb)
            scores[k] = {"mean_abs_dp": float(np.abs(p - held.ref).mean()), "flips": int((p.argmax(1) != held.top).sum())}
        meta["bn_scales"] = min(scores, key=lambda k: scores[k]["mean_abs_dp"])
        meta["bn_scales_choice"] = {"rule": "lower mean |dp| against Keras on the validation split",
                                    "images": len(held.x), **scores}
        fb = candidates[meta["bn_scales"]]
    elif job.quantize != "int8" or max_drop is None:
        fb = tflite_bytes(saved_model, job, calib, calib_range, bn_scales)
    if job.quantize == "int8" and max_drop is not None:
        scales = meta.get("bn_scales", bn_scales)
        calibrated = calibrated_for(saved_model, calib, calib_range, job.io_dtype)
        fb, meta["accuracy_aware"] = tflite_accuracy_aware(
            calibrated, lambda nodes: quantize_calibrated(calibrated, replace(job, float_weights="fp32"), scales, nodes),
            store_float_weights, held, max_drop, probs, job.float_head, job.float_weights, job.max_size,
            job.hybrid)
    # what the written file stores; absent when nothing stayed in float
    recipe = meta.get("accuracy_aware")
    weights = recipe.get("float_weights") if recipe else job.float_weights if job.float_head else None
    if weights:
        meta["float_weights"] = weights
    if recipe and recipe["weight_only"]:
        from .accuracy import mark_weight_only  # noqa: PLC0415

        mark_weight_only(meta)
    fb = tflite_add_features(fb)
    meta.update(tflite_io(fb))
    atomic_write_bytes(target, append_tflite_metadata(fb, meta))


# ---------------------------------------------------------------- accuracy-aware int8 (accuracy.stage_search)


def tflite_stages(calibrated: bytes) -> dict[str, dict]:
    """The calibrated float graph's operations by stage, each named by its output tensor (what
    the MLIR quantizer's denylisted_nodes takes), with MACs of convolutions and dense layers."""
    from ..interpreters import load_interpreter_class  # noqa: PLC0415

    interp = load_interpreter_class()[0](model_content=calibrated)
    tensors = {d["index"]: d for d in interp.get_tensor_details()}
    nodes = []
    for op in interp._get_ops_details():
        outs = [tensors[t] for t in op["outputs"] if t in tensors]
        if not outs:
            continue
        macs = params = 0
        ins = [tensors[t]["shape"] for t in op["inputs"] if t in tensors]
        if op["op_name"] in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED") and len(ins) > 1:
            params = macs = int(np.prod(ins[1]))
            if op["op_name"] != "FULLY_CONNECTED":
                macs *= int(np.prod(outs[0]["shape"][1:3]))
        nodes.append((op["op_name"], outs[0]["name"], macs, params))
    return stages_from(nodes, ("MEAN",))


def tflite_accuracy_aware(calibrated: bytes, quantize: Callable[[list[str]], bytes],
                          store: Callable[..., bytes], held: HeldOut, max_drop_pts: float,
                          probs: Callable[..., np.ndarray], float_head: bool = False,
                          float_weights: str = "fp32", max_size_mb: float | None = None,
                          hybrid: bool = False) -> tuple[bytes, dict]:
    """(int8 flatbuffer, recipe): the cheapest file found within the budget. quantize(nodes)
    quantizes the calibrated graph with those nodes kept in float (float32 weights);
    store(fb, weights) stores the weights of a file's float operations as `weights`
    (`rewrite.store_float_weights`); probs(fb, x) runs a candidate on images x, by default
    every held-out image. The stages are chosen with float32 weights (searched with rounded
    ones, the choice moved with single held-out answers that the rounding had moved); the chosen
    file's float weights are then stored as float_weights if it stays within the budget
    (`accuracy.store_weights`). The weight-only candidate (`stage_search`) is the all-float
    candidate stored as int8; it also replaces a file over max_size_mb (`accuracy.within_size`).
    hybrid: then the float stages' convolutions run as dynamic-range int8 where the budget
    holds (`accuracy.hybrid_step`)."""
    stages = tflite_stages(calibrated)
    built: dict[frozenset, bytes] = {}

    def build(kept) -> bytes:
        if frozenset(kept) not in built:
            built[frozenset(kept)] = quantize([n for s in kept for n in stages[s]["nodes"]])
        return built[frozenset(kept)]

    scoring = Scoring(held, max_drop_pts)

    def attempt(kept: list[str], mode: str) -> tuple[dict, bytes]:
        fb = build(kept)
        return scoring(lambda x: probs(fb, x), mode), fb

    @functools.cache  # built once: within_size sizes the file before it scores it
    def weight_only_file() -> bytes:
        return store(build(whole(stages)), "int8")

    def weight_only(mode: str | None) -> tuple[dict, bytes]:  # "early" stops once out of the budget; None: no score
        fb = weight_only_file()
        return (scoring(lambda x: probs(fb, x), mode) if mode else {}), fb

    def note(line: str) -> None:
        progress.note(f"  int8 TFLite search: {line}")

    chosen, fb, steps = stage_search(stages, attempt, max_drop_pts, ["head"] if float_head and "head" in stages else [],
                                     weight_only if float_weights == "int8" else None, note)
    out = recipe("TFLite MLIR quantizer with denylisted_nodes, stages searched on held-out images", chosen, steps,
                 stages, held, max_drop_pts)

    def stored(kept: list[str], weights: str,
               hybrid: Collection[str] = ()) -> tuple[bytes, Callable[[np.ndarray], np.ndarray]]:
        nodes = [n for s in hybrid for n in stages[s]["nodes"]]
        fb = store(build(kept), weights, hybrid=nodes) if nodes else store(build(kept), weights)
        return fb, lambda x: probs(fb, x)

    written, out = store_weights(out, chosen, steps, stages, held, max_drop_pts, scoring, float_weights, stored)
    if hybrid:
        as_written = written if written is not None else build(out["float_stages"])  # float32 weights
        hybrid_file, out = hybrid_step(out, as_written, stages, max_drop_pts, scoring,
                                       lambda kept: stored(out["float_stages"], out["float_weights"], kept), note)
        written = hybrid_file or written
    return within_size(fb if written is None else written, out, lambda b: len(b) / 1e6, max_size_mb, weight_only,
                       steps, stages, held, max_drop_pts, note)

