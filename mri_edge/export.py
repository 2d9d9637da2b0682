"""Export a trained run to TFLite (fp32, fp16, dynamic-range, full-integer int8), ONNX (fp32, int8)
and, where OpenVINO is installed, OpenVINO IR (fp32, int8).

Every file carries its own metadata (class names, preprocessing contract, quantization
parameters, source model hash, calibration manifest hash): TFLite files get a ZIP
appended after the flatbuffer (the interpreter ignores trailing bytes, the same
mechanism TFLite's "associated files" use); ONNX files get `metadata_props`, OpenVINO
files an `rt_info` entry.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import os
import shutil
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import __version__, preprocess, quiet, report
from .errors import MriEdgeError
from .files import atomic_write_bytes, sha256_bytes, sha256_file
from .run import RunFolder
from .runtime import METADATA_KEY, METADATA_NAME, first_line, onnx_content_sha256, sniff

# One table for every format: suffix and the quantizations it supports.
FORMATS = {
    "tflite": {"suffix": ".tflite", "quantize": ("none", "fp16", "dynamic", "int8")},
    "onnx": {"suffix": ".onnx", "quantize": ("none", "int8")},
    "openvino": {"suffix": ".xml", "quantize": ("none", "int8")},
}
IO_DTYPES = ("uint8", "int8", "float32")
CALIB_RANGES = ("percentile", "minmax")
BN_SCALES = ("per-tensor", "per-channel", "auto")
VAL_CHOICE_IMAGES = 512
CALIB_QUANTILE = 0.99


class ExportError(MriEdgeError):
    pass


@dataclass
class ExportJob:
    fmt: str
    quantize: str
    io_dtype: str

    @property
    def filename(self) -> str:
        q = {"none": "fp32"}.get(self.quantize, self.quantize)
        tail = f"_{self.io_dtype}io" if self.quantize == "int8" and self.fmt == "tflite" and self.io_dtype != "uint8" else ""
        return f"model_{q}{tail}{FORMATS[self.fmt]['suffix']}"


def plan(formats: tuple[str, ...], quantize: tuple[str, ...], io_dtype: str) -> list[ExportJob]:
    """Expand --format/--quantize into jobs; unsupported combinations are refused up front."""
    if io_dtype not in IO_DTYPES:
        raise ExportError(f"--io-dtype must be one of {', '.join(IO_DTYPES)}")
    from . import ov  # noqa: PLC0415

    if not formats or "all" in formats:  # "all" means every format whose converter is installed
        fmts = [f for f in FORMATS if f != "openvino" or ov.available(for_export=True)]
    else:
        fmts = list(dict.fromkeys(formats))
    for f in fmts:
        if f not in FORMATS:
            raise ExportError(f"unknown --format {f!r}; choose {', '.join(FORMATS)} or all")
        if f == "openvino" and not ov.available(for_export=True):
            raise ExportError("--format openvino needs OpenVINO and NNCF (pip install 'mri-edge[full]')")
    jobs = []
    for f in fmts:
        qs = FORMATS[f]["quantize"] if not quantize else quantize
        for q in dict.fromkeys(qs):
            if q not in FORMATS[f]["quantize"]:
                if quantize and len(fmts) > 1:
                    continue  # e.g. --format all --quantize fp16 means "wherever fp16 exists"
                raise ExportError(f"--format {f} does not support --quantize {q} "
                                  f"(supported: {', '.join(FORMATS[f]['quantize'])})")
            jobs.append(ExportJob(f, q, io_dtype if q == "int8" else "float32"))
    if not jobs:
        raise ExportError("nothing to export for that --format/--quantize combination")
    return jobs


def load_run(run_dir: Path):
    """(keras model, config dict, labels dict); one-line errors for missing or corrupt files."""
    run = RunFolder(run_dir)
    model_path = run.require_model()
    cfg, labels = run.config(), run.labels()
    run.manifest()  # calibration and the validation choice read it: damage is reported before any conversion
    quiet.import_tensorflow()
    from .model import load_model  # noqa: PLC0415

    if sniff(model_path) != "keras":
        raise ExportError(f"{model_path}: not a Keras model file (damaged, truncated or renamed)")
    try:
        with quiet.native_stderr():
            model = load_model(model_path)
    except Exception as e:
        raise ExportError(f"{model_path}: not a loadable Keras model ({type(e).__name__}: {first_line(e)})") from None
    return model, cfg, labels


def calibration_set(run_dir: Path, cfg: dict, n: int, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """Up to n training images, stratified by class, decoded by the training contract.

    Only the training split of the run's manifest is read: calibrating on validation
    or test images would leak them into the deployed file.
    """
    manifest = RunFolder(run_dir).manifest()
    root = Path(manifest["root"])
    rows = manifest["splits"].get("train") or []
    if not rows:
        raise ExportError("int8 calibration needs the run's training split, and its manifest has none")
    labels = np.array([y for _, y in rows])
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    per = max(1, n // len(classes))
    pick = []
    for c in classes:
        idx = np.flatnonzero(labels == c)
        pick += rng.permutation(idx)[:per].tolist()
    rest = np.setdiff1d(np.arange(len(rows)), pick)
    pick += rng.permutation(rest)[: max(0, n - len(pick))].tolist()
    size = int(cfg["image_size"])
    images, used = [], []
    for i in sorted(pick):
        rel = rows[i][0]
        try:
            images.append(preprocess.load_image(root / rel, size))
            used.append(rel)
        except preprocess.ImageError:
            continue
    if not images:
        raise ExportError("no readable training image for int8 calibration")
    return np.stack(images), used


def validation_reference(run_dir: Path, model, size: int, n: int = VAL_CHOICE_IMAGES) -> tuple[np.ndarray, np.ndarray]:
    """Up to n validation images and the Keras model's probabilities on them, for choosing
    between int8 variants (`--bn-scales auto`), as training chooses its epoch: the test split
    is never read."""
    manifest = RunFolder(run_dir).manifest()
    rows = manifest["splits"].get("val") or []
    if not rows:
        raise ExportError("--bn-scales auto needs the run's validation split, and its manifest has none")
    root = Path(manifest["root"])
    images = []
    for i in sorted(np.random.default_rng(0).permutation(len(rows))[:n]):
        try:
            images.append(preprocess.load_image(root / rows[i][0], size))
        except preprocess.ImageError:
            continue
    if not images:
        raise ExportError("--bn-scales auto: no validation image can be read (was the dataset moved?)")
    x = np.stack(images)
    return x, np.asarray(model.predict(x.astype(np.float32), batch_size=32, verbose=0), np.float32)


CALIB_BATCH = 10
# Threads of onnxruntime's calibration session. Worker processes get cores / workers (and no
# spin-waiting): its spinning 2-thread pool slowed the TFLite worker beside it (ONNX int8
# 84-92 s -> 63 s at 224 px). The TFLite range pass, the longest job, keeps every core.
CALIB_THREADS = os.cpu_count() or 1


def robust_ranges(lo: np.ndarray, hi: np.ndarray, quantile: float = CALIB_QUANTILE) -> tuple[np.ndarray, np.ndarray]:
    """Activation ranges from per-image extremes (images x tensors): the `quantile` of the
    per-image maxima and the 1-quantile of the minima, so the most extreme 1% of calibration
    images saturate instead of stretching every range. A range that touched zero keeps zero."""
    new_lo = np.quantile(lo, 1 - quantile, axis=0)
    new_hi = np.quantile(hi, quantile, axis=0)
    new_lo = np.where(lo.min(axis=0) <= 0, np.minimum(new_lo, 0.0), new_lo)
    return new_lo, np.maximum(new_hi, new_lo + 1e-6)


def _per_image_extremes(a: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    if a.ndim and a.shape[0] == n:
        flat = a.reshape(n, -1)
        return flat.min(axis=1), flat.max(axis=1)
    return np.full(n, a.min()), np.full(n, a.max())  # not batched (a constant): same for every image


def _tighten_ranges(calibrated: bytes, calib: np.ndarray, quantile: float, delegate: bool = True) -> bytes:
    """Replace TFLite's global min/max activation ranges by `robust_ranges`.

    TFLite calibrates each activation to the min and max over *all* calibration images,
    so one unusual image stretches a range and costs every other image resolution.
    Measured on the demo model: top-1 agreement with Keras 95.0% with min/max, 98.75% with
    this. Every range is recomputed here, so the converter's own calibration pass only
    needs a few images (`calibrated_graph`).
    """
    from tensorflow.lite.tools import flatbuffer_utils  # noqa: PLC0415

    from .runtime import load_interpreter_class, no_delegate_resolver  # noqa: PLC0415

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
                         num_threads=os.cpu_count())
        except (RuntimeError, ValueError):
            pass
    if interp is None:
        interp = cls(model_content=calibrated, experimental_preserve_all_tensors=True, num_threads=os.cpu_count(),
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
            lo[start:start + batch, k], hi[start:start + batch, k] = _per_image_extremes(interp.tensor(i)(), batch)
    new_lo, new_hi = robust_ranges(lo, hi, quantile)
    for k, i in enumerate(idx):
        q = tensors[i].quantization
        q.min, q.max = [float(new_lo[k])], [float(new_hi[k])]
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def _affine_batchnorms(net) -> dict:
    """BatchNormalization layers whose input is not a convolution's output.

    The converters fold a BN that follows a convolution into its weights, but DenseNet's
    pre-activation BNs follow a concatenation, and each became a MUL and an ADD: two int8
    passes with requantization over the whole concatenated feature map, 62 times.
    """
    import keras  # noqa: PLC0415

    found = {}
    for layer in net.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            parents = [n.operation for n in layer._inbound_nodes[0].parent_nodes]
            if not any(isinstance(p, keras.layers.Conv2D) for p in parents):
                found[layer.name] = layer
        elif hasattr(layer, "layers"):
            found.update(_affine_batchnorms(layer))
    return found


def _pooled_linear_convs(net) -> dict:
    """{1x1 linear Conv2D name: the AveragePooling2D right after it} (DenseNet's transitions)."""
    import keras  # noqa: PLC0415

    found = {}
    for layer in net.layers:
        if isinstance(layer, keras.layers.AveragePooling2D) and layer.padding == "valid" \
                and tuple(layer.pool_size) == tuple(layer.strides):
            parents = [n.operation for n in layer._inbound_nodes[0].parent_nodes]
            conv = parents[0] if len(parents) == 1 else None
            if (isinstance(conv, keras.layers.Conv2D) and not isinstance(conv, keras.layers.DepthwiseConv2D)
                    and tuple(conv.kernel_size) == (1, 1) and tuple(conv.strides) == (1, 1)
                    and conv.activation is keras.activations.linear and len(conv._outbound_nodes) == 1):
                found[conv.name] = layer
        elif hasattr(layer, "layers"):
            found.update(_pooled_linear_convs(layer))
    return found


def deployment_graph(model):
    """The same function as `model`, rearranged for integer inference on a CPU.

    1. Each unfoldable BN becomes a 1x1 depthwise convolution: one fused int8 op
       (per-channel weights, int32 bias, ReLU fused) instead of MUL + ADD. Measured at
       224 px, 2 threads, full-int8 LiteRT p50 12.4 -> 11.0 ms, and the conversion got
       faster (26 -> 16 s).
    2. A 1x1 convolution followed by 2x2 average pooling (DenseNet's transitions) becomes
       pooling then convolution: both are linear, so the result is the same, but the
       convolution runs on a quarter of the pixels (308 -> 77 MMAC), and the pooling is a
       2x2/2 depthwise convolution with weights 1/4, which XNNPACK runs in int8 (int8
       AVERAGE_POOL_2D fell back to TFLite's own kernel and split the graph in four).
    """
    import keras  # noqa: PLC0415

    bns = _affine_batchnorms(model)
    swaps = _pooled_linear_convs(model)
    pools = {p.name for p in swaps.values()}
    if not bns and not swaps:
        return model

    class BNAsDepthwise(keras.layers.DepthwiseConv2D):
        def call(self, inputs, training=None, mask=None):  # BN's call signature
            return super().call(inputs)

    class PoolThenConv(keras.layers.Layer):
        def __init__(self, conv_config: dict, pool_size, **kwargs):
            super().__init__(name=conv_config["name"], **kwargs)
            self.pool = keras.layers.DepthwiseConv2D(pool_size, strides=pool_size, use_bias=False,
                                                     name=conv_config["name"] + "_avgpool")
            self.conv = keras.layers.Conv2D.from_config({**conv_config, "name": conv_config["name"] + "_1x1"})

        def build(self, input_shape):
            self.pool.build(input_shape)
            self.conv.build(self.pool.compute_output_shape(input_shape))

        def compute_output_shape(self, input_shape):
            return self.conv.compute_output_shape(self.pool.compute_output_shape(input_shape))

        def call(self, inputs, training=None, mask=None):
            return self.conv(self.pool(inputs))

    def clone(layer):
        if layer.name in bns:
            return BNAsDepthwise(1, use_bias=True, name=layer.name)
        if layer.name in swaps:
            return PoolThenConv(layer.get_config(), tuple(swaps[layer.name].pool_size))
        if layer.name in pools:
            return keras.layers.Identity(name=layer.name)
        return layer.__class__.from_config(layer.get_config())

    out = keras.models.clone_model(model, clone_function=clone, recursive=True)

    def copy(src, dst):
        for a, b in zip(src.layers, dst.layers):
            if hasattr(a, "layers"):
                copy(a, b)
            elif a.name in bns:
                c = a.moving_mean.shape[0]
                gamma = np.asarray(a.gamma) if a.scale else np.ones(c, np.float32)
                beta = np.asarray(a.beta) if a.center else np.zeros(c, np.float32)
                scale = gamma / np.sqrt(np.asarray(a.moving_variance) + a.epsilon)
                b.set_weights([scale.reshape(1, 1, c, 1), beta - np.asarray(a.moving_mean) * scale])
            elif a.name in swaps:
                ph, pw = swaps[a.name].pool_size
                c = a.get_weights()[0].shape[2]
                b.pool.set_weights([np.full((ph, pw, c, 1), 1.0 / (ph * pw), np.float32)])
                b.conv.set_weights(a.get_weights())
            elif a.name not in pools:
                b.set_weights(a.get_weights())

    copy(model, out)
    return out


def _per_tensor_depthwise(flatbuffer: bytes) -> bytes:
    """Requantize the 1x1 depthwise convolutions that stand for batch norms per tensor.

    Their weights are one value per channel, so per-channel quantization stores a float32
    scale and an int64 zero point for every single weight: 0.9 MB on DenseNet121, which
    pushed the int8 file from 7.65 to 8.57 MB. One shared scale (the precision the MUL these
    layers replaced had) keeps the file at its old size; the int32 biases stay exact.
    The price is precision where channel scales differ widely: on the 128 px Alzheimer model
    the worst validation |dp| fell from 0.31 to 0.17 with per-channel scales, at the same
    latency, while its 176 px sibling got worse. `--bn-scales auto` writes both and keeps the
    one closer to Keras on the validation split; per tensor stays the default because it
    keeps DenseNet121's int8 file under 8 MB.
    """
    from tensorflow.lite.python import schema_py_generated as schema  # noqa: PLC0415
    from tensorflow.lite.tools import flatbuffer_utils  # noqa: PLC0415

    model = flatbuffer_utils.convert_bytearray_to_object(flatbuffer)
    depthwise = [i for i, c in enumerate(model.operatorCodes)
                 if max(c.builtinCode, c.deprecatedBuiltinCode) == schema.BuiltinOperator.DEPTHWISE_CONV_2D]
    for sg in model.subgraphs:
        for op in sg.operators:
            if op.opcodeIndex not in depthwise or len(op.inputs) < 3 or op.inputs[2] < 0:
                continue
            x, w, b = (sg.tensors[i] for i in op.inputs[:3])
            if (list(w.shape[:3]) != [1, 1, 1] or w.type != schema.TensorType.INT8
                    or b.type != schema.TensorType.INT32 or x.quantization is None
                    or w.quantization is None or len(w.quantization.scale) < 2):
                continue
            scales = np.asarray(w.quantization.scale, np.float64)
            weights = np.frombuffer(bytes(model.buffers[w.buffer].data), np.int8) * scales
            bias = np.frombuffer(bytes(model.buffers[b.buffer].data), np.int32) * scales * x.quantization.scale[0]
            scale = max(float(np.abs(weights).max()) / 127.0, 1e-12)
            b_scale = scale * x.quantization.scale[0]
            # New buffers: per channel every weight quantizes to +-127, so the converter
            # deduplicated those buffers and several layers may share one.
            for t, data, sc in ((w, np.clip(np.round(weights / scale), -127, 127).astype(np.int8), scale),
                                (b, np.clip(np.round(bias / b_scale), -2**31, 2**31 - 1).astype(np.int32), b_scale)):
                buf = schema.BufferT()
                buf.data = data.view(np.uint8)
                model.buffers.append(buf)
                t.buffer = len(model.buffers) - 1
                t.quantization.scale, t.quantization.zeroPoint = [float(sc)], [0]
                t.quantization.quantizedDimension = 0
    used = {t.buffer for sg in model.subgraphs for t in sg.tensors}
    for i, buf in enumerate(model.buffers):
        if i and i not in used:
            buf.data = None  # orphaned by the rewrite; indices stay valid
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def _int8_converter(saved_model: str, images: np.ndarray, io_dtype: str = "uint8"):
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
    conv = _int8_converter(saved_model, calib[:4], io_dtype)
    conv._experimental_calibrate_only = True  # stop after calibration, before quantizing
    return _tighten_ranges(conv.convert(), calib, CALIB_QUANTILE)


def _tflite_bytes(saved_model: str, job: ExportJob, calib: np.ndarray | None, calib_range: str = "percentile",
                  bn_scales: str = "per-tensor") -> bytes:
    import tensorflow as tf  # noqa: PLC0415

    if job.quantize == "int8":
        if calib_range == "percentile":
            from tensorflow.lite.python import convert as tfl_convert  # noqa: PLC0415

            io = getattr(tf, job.io_dtype)
            fb = tfl_convert.mlir_quantize(calibrated_graph(saved_model, calib, job.io_dtype), False,
                                           input_data_type=io, output_data_type=io)
        else:
            fb = _int8_converter(saved_model, calib, job.io_dtype).convert()
        return _per_tensor_depthwise(fb) if bn_scales == "per-tensor" else fb
    conv = tf.lite.TFLiteConverter.from_saved_model(saved_model)
    if job.quantize in ("fp16", "dynamic"):
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
    if job.quantize == "fp16":
        conv.target_spec.supported_types = [tf.float16]
    return conv.convert()


def _tflite_io(flatbuffer: bytes) -> dict:
    from .runtime import load_interpreter_class  # noqa: PLC0415

    interp = load_interpreter_class()[0](model_content=flatbuffer)
    out = {}
    for key, det in (("input", interp.get_input_details()[0]), ("output", interp.get_output_details()[0])):
        scale, zp = det["quantization"]
        out[key] = {"name": det["name"], "dtype": np.dtype(det["dtype"]).name,
                    "shape": [int(v) for v in det["shape_signature"]], "scale": float(scale), "zero_point": int(zp)}
    return out


def _onnx_fp32(model, size: int, opset: int):
    import tensorflow as tf  # noqa: PLC0415
    import tf2onnx  # noqa: PLC0415

    spec = [tf.TensorSpec([None, size, size, 3], tf.float32, name="image")]
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=opset)
    return proto


def _onnx_ranges(model_path: Path, calib: np.ndarray, cache: Path, workdir: Path) -> None:
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
    so.intra_op_num_threads = CALIB_THREADS
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


def _onnx_int8(fp32_path: Path, out_path: Path, calib: np.ndarray, calib_range: str = "percentile",
               activations: str = "uint8", quant_format: str = "qdq") -> None:
    """activations / quant_format: the defaults are the fastest here (benchmarks/tune_cpu.py)."""
    from onnxruntime.quantization import (  # noqa: PLC0415
        CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process  # noqa: PLC0415

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

    with tempfile.TemporaryDirectory() as td:
        pre = Path(td) / "pre.onnx"
        try:
            quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
            src = pre
        except Exception:
            src = fp32_path  # pre-processing is an optimisation only
        options = {}
        if calib_range == "percentile":
            # Robust ranges (demo model: 91% top-1 agreement with plain min/max, 100% robust).
            # onnxruntime's own percentile calibrator kept every activation of every image
            # (over 20 GB at 224 px: OOM-killed) and its histograms took 176 s.
            cache = Path(td) / "ranges.json"
            _onnx_ranges(src, calib, cache, Path(td))
            reader, kwargs = None, {"calibration_cache_path": str(cache)}
        else:
            # fed a slice at a time, for the same memory reason
            reader, kwargs = Reader(), {}
            options["CalibStridedMinMax"] = max(d for d in range(1, min(10, len(calib)) + 1) if len(calib) % d == 0)
        # uint8 activations x int8 weights (U8S8) is the pairing onnxruntime's x86 VNNI
        # kernels run natively: 224 px, 2 threads, p50 32.8 ms with int8 activations,
        # 15.8 ms with uint8 (QOperator format: 20.2 ms).
        quantize_static(str(src), str(out_path), reader, per_channel=True,
                        quant_format={"qdq": QuantFormat.QDQ, "qoperator": QuantFormat.QOperator}[quant_format],
                        activation_type={"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}[activations],
                        weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, extra_options=options, **kwargs)


def _onnx_io(path_or_bytes) -> dict:
    import onnxruntime as ort  # noqa: PLC0415

    s = ort.InferenceSession(path_or_bytes, providers=["CPUExecutionProvider"])
    i, o = s.get_inputs()[0], s.get_outputs()[0]
    return {"input": {"name": i.name, "dtype": "float32", "shape": [d if isinstance(d, int) else -1 for d in i.shape],
                      "scale": 0.0, "zero_point": 0},
            "output": {"name": o.name, "dtype": "float32", "shape": [d if isinstance(d, int) else -1 for d in o.shape],
                       "scale": 0.0, "zero_point": 0}}


def _set_onnx_metadata(proto, meta: dict) -> None:
    for p in list(proto.metadata_props):
        if p.key == METADATA_KEY:
            proto.metadata_props.remove(p)
    meta["model_sha256"] = onnx_content_sha256(proto.SerializeToString())
    entry = proto.metadata_props.add()
    entry.key = METADATA_KEY
    entry.value = json.dumps(meta)


def onnx_bytes(proto) -> bytes:
    """The serialised file; refuses to write one whose recorded hash would not match."""
    data = proto.SerializeToString()
    meta = json.loads(next(p.value for p in proto.metadata_props if p.key == METADATA_KEY))
    if onnx_content_sha256(data) != meta["model_sha256"]:
        raise ExportError("the ONNX serialisation changed when its metadata was added; the hash would not match")
    return data


def append_tflite_metadata(flatbuffer: bytes, meta: dict) -> bytes:
    """The flatbuffer with a ZIP of the metadata after it; the metadata records the flatbuffer's
    length and hash, so the runtime can tell a modified or damaged file."""
    meta.update({"model_bytes": len(flatbuffer), "model_sha256": sha256_bytes(flatbuffer)})
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(METADATA_NAME, json.dumps(meta, indent=1))
    return flatbuffer + buf.getvalue()


def _distance_to_keras(fb: bytes, meta: dict, val: tuple[np.ndarray, np.ndarray], workdir: Path) -> dict:
    from .runtime import TFLiteModel  # noqa: PLC0415

    x, ref = val
    with tempfile.TemporaryDirectory(dir=workdir) as td:
        path = Path(td) / "candidate.tflite"
        path.write_bytes(fb)
        net = TFLiteModel(path, {**meta, "input": {}, "output": {}}, threads=CALIB_THREADS)
        probs = np.concatenate([net.run(x[i:i + 32]) for i in range(0, len(x), 32)])
    return {"mean_abs_dp": float(np.abs(probs - ref).mean()), "flips": int((probs.argmax(1) != ref.argmax(1)).sum())}


def _tflite_job(job: ExportJob, saved_model: str, calib, calib_range: str, meta: dict, target: Path,
                bn_scales: str = "per-tensor", val=None, workdir: Path | None = None) -> None:
    if job.quantize == "int8" and bn_scales == "auto":
        # Which batch-norm scales suit a model differs (the 128 px Alzheimer model wants per
        # channel, its 176 px sibling per tensor): keep the file closer to Keras on validation.
        per_channel = _tflite_bytes(saved_model, job, calib, calib_range, "per-channel")
        candidates = {"per-tensor": _per_tensor_depthwise(per_channel), "per-channel": per_channel}
        scores = {k: _distance_to_keras(fb, meta, val, workdir) for k, fb in candidates.items()}
        meta["bn_scales"] = min(scores, key=lambda k: scores[k]["mean_abs_dp"])
        meta["bn_scales_choice"] = {"rule": "lower mean |dp| against Keras on the validation split",
                                    "images": len(val[0]), **scores}
        fb = candidates[meta["bn_scales"]]
    else:
        fb = _tflite_bytes(saved_model, job, calib, calib_range, bn_scales)
    meta.update(_tflite_io(fb))
    atomic_write_bytes(target, append_tflite_metadata(fb, meta))


def _onnx_jobs(jobs: list[ExportJob], model, size: int, opset: int, calib, calib_range: str, metas: list[dict],
               targets: list[Path], workdir: Path, outcome) -> None:
    """fp32 ONNX first (ONNX int8 and the OpenVINO files are made from it), then the requested
    files, each reported through outcome()."""
    import onnx  # noqa: PLC0415

    fp32_path = workdir / "fp32.onnx"
    for job, meta, target in zip(jobs, metas, targets):
        t = time.time()
        try:
            if not fp32_path.exists():
                fp32_path.write_bytes(_onnx_fp32(model, size, opset).SerializeToString())
            if job.fmt == "openvino":
                from . import ov  # noqa: PLC0415

                net = ov.quantize_int8(fp32_path, calib) if job.quantize == "int8" else ov.from_onnx(fp32_path)
                meta.update(ov.io_details(net))
                if job.quantize == "int8":
                    meta["calibration_range"] = "NNCF post-training quantization, its default ranges"
                ov.save(net, target, meta)
                outcome(job, meta, target, t, None)
                continue
            if job.quantize == "int8":
                q_path = workdir / "int8.onnx"
                _onnx_int8(fp32_path, q_path, calib, calib_range)
                proto = onnx.load(str(q_path))
            else:
                proto = onnx.load(str(fp32_path))
            onnx.checker.check_model(proto)
            meta.update(_onnx_io(proto.SerializeToString()))
            meta["opset"] = opset
            _set_onnx_metadata(proto, meta)
            atomic_write_bytes(target, onnx_bytes(proto))
            outcome(job, meta, target, t, None)
        except Exception as e:
            outcome(job, meta, target, t, e)


def _record(job: ExportJob, meta: dict, target: Path, started: float, error: Exception | None) -> dict:
    if error is not None:
        msg = f"{type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error).strip() else ''}"[:300]
        return {"file": job.filename, "format": job.fmt, "quantization": job.quantize, "error": msg}
    from .ov import size_on_disk  # noqa: PLC0415

    # An OpenVINO model is two files: its size counts both, its hash is that of the weights.
    data = target.with_suffix(".bin") if job.fmt == "openvino" else target
    return {"file": job.filename, "format": job.fmt, "quantization": job.quantize,
            "io_dtype": meta["input"]["dtype"], "size_mb": size_on_disk(target) / 1e6,
            "seconds": time.time() - started, "sha256": sha256_file(data),
            **({"bn_scales": meta["bn_scales"]} if "bn_scales" in meta else {})}


def _run_group(group: dict, model=None) -> list[dict]:
    """One unit of work: a single TFLite file, or the ONNX chain (fp32, then int8 from it).

    Runs in a worker process (model=None: it loads model.keras itself) or in-process.
    Every failure is caught and returned, so one broken format never stops the others.
    """
    global CALIB_THREADS
    if group.get("threads"):
        CALIB_THREADS = group["threads"]
    jobs = [ExportJob(**j) for j in group["jobs"]]
    calib = np.load(group["calib"]) if group.get("calib") else None
    val = None
    if group.get("val"):
        with np.load(group["val"]) as z:
            val = (z["x"], z["ref"])
    targets = [Path(t) for t in group["targets"]]
    out = []

    def outcome(job, meta, target, started, error):
        out.append(_record(job, meta, target, started, error))

    if jobs[0].fmt == "tflite":  # else the ONNX chain (ONNX and OpenVINO files)
        for job, meta, target in zip(jobs, group["metas"], targets):
            t = time.time()
            try:
                with quiet.native_stderr():  # the converter's debug lines
                    _tflite_job(job, group["saved_model"], calib, group["calib_range"], meta, target,
                                group["bn_scales"], val, Path(group["workdir"]))
                outcome(job, meta, target, t, None)
            except Exception as e:
                outcome(job, meta, target, t, e)
        return out
    t = time.time()
    try:
        if model is None:
            model = deployment_graph(load_run(Path(group["run_dir"]))[0])
    except Exception as e:
        return [_record(job, {}, target, t, e) for job, target in zip(jobs, targets)]
    workdir = Path(group["workdir"]) / "onnx"
    workdir.mkdir(exist_ok=True)
    with quiet.native_stderr():  # tf2onnx, onnxruntime and NNCF log freely
        _onnx_jobs(jobs, model, group["size"], group["opset"], calib, group["calib_range"], group["metas"],
                   targets, workdir, outcome)
    return out


def _groups(jobs: list[ExportJob]) -> list[list[ExportJob]]:
    """Independent units of work, longest first: full-integer TFLite and the ONNX chain
    (conversion + int8 calibration) take the longest, the float TFLite files least."""
    onnx_jobs = [j for j in jobs if j.fmt in ("onnx", "openvino")]
    tfl = [j for j in jobs if j.fmt == "tflite"]
    cost = {"int8": 0, "none": 1, "fp16": 2, "dynamic": 3}
    groups = [[j] for j in sorted(tfl, key=lambda j: cost[j.quantize])]
    if onnx_jobs:
        groups.insert(1 if tfl and tfl[0].quantize == "int8" else 0,
                      sorted(onnx_jobs, key=lambda j: (j.fmt != "onnx", j.quantize != "none")))
    return groups


def default_workers(n_groups: int) -> int:
    """Each converter keeps about one core busy, so run as many as there are cores (at most 2:
    beyond that the memory of several TensorFlow processes outweighs the gain)."""
    return max(1, min(2, os.cpu_count() or 1, n_groups))


def _kill_pool(pool) -> None:
    """Stop a process pool now: its workers would otherwise finish (or, after a SIGTERM to the
    parent, outlive it) while the run's index no longer describes what they write."""
    for p in list(getattr(pool, "_processes", {}).values()):
        if p.is_alive():
            p.kill()
    for p in list(getattr(pool, "_processes", {}).values()):
        p.join(5)
    pool.shutdown(wait=False, cancel_futures=True)


def _land(staged: Path, out_dir: Path, fmt: str) -> None:
    """Move a finished file from the work folder into exports/ (an OpenVINO pair: .bin first, so
    the .xml that names it never appears without it)."""
    if fmt == "openvino":
        os.replace(staged.with_suffix(".bin"), out_dir / staged.with_suffix(".bin").name)
    os.replace(staged, out_dir / staged.name)


def _write_index(run: RunFolder, previous: dict, model_sha: str, failures: list[dict], started: float,
                 workers: int) -> None:
    report.write_json(run.exports_index_path, {
        "run_dir": str(run.path), "source_model_sha256": model_sha,
        "exports": sorted(previous.values(), key=lambda r: r["file"]), "last_failures": failures,
        "last_export": {"seconds": round(time.time() - started, 1), "workers": workers}})


def export_run(run_dir, formats=("all",), quantize=(), io_dtype="uint8", calib_size=300, opset=17,
               log=print, calib_range: str = "percentile", workers: int | None = None,
               bn_scales: str = "per-tensor") -> tuple[list[dict], list[dict]]:
    """Run every export job; returns (successes, failures). Earlier files survive a failure.

    With workers > 1 the independent conversions (each TFLite file; the ONNX chain) run in
    that many fresh processes, since each TensorFlow converter uses about one core. Files are
    written in a work folder and moved into exports/ one by one, each move followed by an
    update of exports.json, so an interrupt (Ctrl-C, SIGTERM) leaves the index matching the
    files: each file is either the old one with its old record or the new one with its new.
    """
    run = RunFolder(run_dir)
    run_dir = run.path
    jobs = plan(tuple(formats), tuple(quantize), io_dtype)
    if calib_size < 1:
        raise ExportError("--calib-size must be at least 1")
    if calib_range not in CALIB_RANGES:
        raise ExportError(f"--calib-range must be one of {', '.join(CALIB_RANGES)}")
    if bn_scales not in BN_SCALES:
        raise ExportError(f"--bn-scales must be one of {', '.join(BN_SCALES)}")
    if not 13 <= opset <= 21:
        raise ExportError("--opset must be between 13 and 21")
    if workers is not None and workers < 1:
        raise ExportError("--workers must be at least 1")
    started = time.time()
    model, cfg, labels = load_run(run_dir)
    model = deployment_graph(model)
    size = int(cfg["image_size"])
    out_dir = run.exports_dir
    out_dir.mkdir(exist_ok=True)
    model_sha = sha256_file(run.model_path)
    base_meta = {
        "mri_edge_version": __version__,
        "task": labels.get("task", cfg["task"]),
        "class_names": labels["class_names"],
        "input_size": [size, size],
        "preprocessing": cfg.get("preprocessing") or preprocess.contract(size),
        "source_model_sha256": model_sha,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    groups = _groups(jobs)
    workers = default_workers(len(groups)) if workers is None else min(workers, len(groups))
    workdir = Path(tempfile.mkdtemp(prefix="mri-edge-export-"))
    staging = workdir / "out"
    staging.mkdir()
    previous = {r["file"]: r for r in run.exports_index().get("exports", []) if isinstance(r, dict) and "file" in r}
    results, failures = [], []
    try:
        calib_path = None
        calib_meta = {}
        if any(j.quantize == "int8" for j in jobs):
            t = time.time()
            calib, used = calibration_set(run_dir, cfg, calib_size)
            calib_path = str(workdir / "calib.npy")
            np.save(calib_path, calib)
            manifest = {"split": "train", "n": len(used), "image_size": size, "files": used}
            # lands in exports/ with the first int8 file it describes
            report.write_json(staging / "calibration_manifest.json", manifest)
            calib_meta = {"calibration_manifest_sha256": hashlib.sha256(json.dumps(manifest).encode()).hexdigest(),
                          "calibration_images": len(used),
                          "calibration_range": "min/max over all images" if calib_range == "minmax" else
                          f"{CALIB_QUANTILE:.0%} quantile of per-image activation extremes (TFLite and ONNX)"}
            log(f"calibration: {len(used)} training images ({time.time() - t:.1f} s)")
        val_path = None
        if bn_scales == "auto" and any(j.fmt == "tflite" and j.quantize == "int8" for j in jobs):
            t = time.time()
            x_val, ref = validation_reference(run_dir, model, size)
            val_path = str(workdir / "val.npz")
            np.savez(val_path, x=x_val, ref=ref)
            log(f"Keras reference on {len(x_val)} validation images, to choose batch-norm scales ({time.time() - t:.1f} s)")

        def spec(group: list[ExportJob]) -> dict:
            return {"jobs": [vars(j) for j in group], "targets": [str(staging / j.filename) for j in group],
                    "metas": [{**base_meta, "format": j.fmt, "quantization": j.quantize,
                               **(calib_meta if j.quantize == "int8" else {}),
                               **({"bn_scales": bn_scales} if j.quantize == "int8" and j.fmt == "tflite" else {})}
                              for j in group],
                    "calib": calib_path if any(j.quantize == "int8" for j in group) else None, "val": val_path,
                    "calib_range": calib_range, "bn_scales": bn_scales, "saved_model": str(workdir / "saved_model"),
                    "run_dir": str(run_dir), "workdir": str(workdir), "size": size, "opset": opset,
                    "threads": max(1, (os.cpu_count() or 1) // workers)}

        def saved_model() -> None:
            import tensorflow as tf  # noqa: PLC0415

            with quiet.native_stderr():
                model.export(str(workdir / "saved_model"), format="tf_saved_model", verbose=False, input_signature=[
                    tf.TensorSpec([None, size, size, 3], tf.float32, name="image")])

        def collect(outcomes: list[dict]) -> None:
            for r in outcomes:
                if "error" in r:
                    failures.append(r)
                    log(f"  {r['file']} FAILED: {r['error']}")
                    continue
                if r["quantization"] == "int8" and (staging / "calibration_manifest.json").exists():
                    os.replace(staging / "calibration_manifest.json", out_dir / "calibration_manifest.json")
                _land(staging / r["file"], out_dir, r["format"])
                previous[r["file"]] = r
                _write_index(run, previous, model_sha, failures, started, workers)
                results.append(r)
                scales = f", batch-norm scales {r['bn_scales']}" if "bn_scales" in r else ""
                log(f"  {r['file']}: {r['size_mb']:.2f} MB in {r['seconds']:.1f} s{scales}")

        has_tflite = any(j.fmt == "tflite" for j in jobs)
        if workers == 1:
            if has_tflite:
                saved_model()
            for g in groups:
                log(f"exporting {', '.join(j.filename for j in g)} ...")
                collect(_run_group(spec(g), model))
        else:
            import multiprocessing as mp  # noqa: PLC0415
            from concurrent.futures import ProcessPoolExecutor, as_completed  # noqa: PLC0415

            log(f"exporting {len(jobs)} files with {workers} worker processes ...")
            # spawn, not fork: forking a process that has TensorFlow loaded is unsafe.
            pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=quiet.quiet_worker)
            try:
                # The ONNX chain needs only model.keras: start it while the SavedModel is written.
                futures = {pool.submit(_run_group, spec(g)): g for g in groups if g[0].fmt != "tflite"}
                if has_tflite:
                    saved_model()
                futures.update({pool.submit(_run_group, spec(g)): g for g in groups if g[0].fmt == "tflite"})
                for fut in as_completed(futures):
                    try:
                        collect(fut.result())
                    except Exception as e:  # e.g. BrokenProcessPool: a converter crashed its process
                        collect([_record(j, {}, staging / j.filename, 0.0, e) for j in futures[fut]])
            except BaseException:
                _kill_pool(pool)
                raise
            pool.shutdown()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    order = {j.filename: i for i, j in enumerate(jobs)}
    results.sort(key=lambda r: order[r["file"]])
    failures.sort(key=lambda r: order[r["file"]])
    total_s = time.time() - started
    log(f"{len(results)} file(s) in {total_s:.0f} s ({workers} worker{'s' if workers > 1 else ''})")
    _write_index(run, previous, model_sha, failures, started, workers)
    run.write_index()
    return results, failures


def table(results: list[dict]) -> str:
    return report.md_table(
        ["file", "format", "quantization", "I/O dtype", "size MB", "seconds"],
        [[r["file"], r["format"], r["quantization"], r["io_dtype"], round(r["size_mb"], 2), round(r["seconds"], 1)]
         for r in results])
