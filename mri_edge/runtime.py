"""On-device inference for exported mri-edge models (.tflite, .onnx).

Allowed imports: the standard library, numpy, one TFLite interpreter
(ai_edge_litert, else tflite_runtime, else tensorflow.lite), onnxruntime for
.onnx files, and an optional image decoder (OpenCV or Pillow, through
`mri_edge.preprocess`). No TensorFlow, Keras, click or scikit-learn: a test
checks `sys.modules` after use.

    from mri_edge.runtime import load
    model = load("model_int8.tflite")
    result = model.predict("scan.jpg")   # label, probabilities, timings
"""

from __future__ import annotations

import json
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import preprocess

METADATA_NAME = "mri_edge_metadata.json"  # file inside the ZIP appended to .tflite files
METADATA_KEY = "mri_edge"  # ONNX metadata_props key


class RuntimeModelError(ValueError):
    """The file is not an mri-edge model this runtime can run."""


def load_interpreter_class(prefer: str | None = None):
    """(Interpreter class, module name): ai_edge_litert, then tflite_runtime, then tensorflow.lite."""
    order = ["ai_edge_litert", "tflite_runtime", "tensorflow"]
    if prefer:
        if prefer not in order:
            raise RuntimeModelError(f"unknown TFLite runtime {prefer!r}; choose one of {', '.join(order)}")
        order = [prefer]
    for name in order:
        try:
            if name == "ai_edge_litert":
                from ai_edge_litert.interpreter import Interpreter  # noqa: PLC0415
            elif name == "tflite_runtime":
                from tflite_runtime.interpreter import Interpreter  # noqa: PLC0415
            else:
                from tensorflow.lite import Interpreter  # noqa: PLC0415
            return Interpreter, name
        except ImportError:
            continue
    raise RuntimeModelError("no TFLite interpreter installed: pip install ai-edge-litert (or tflite-runtime)")


def no_delegate_resolver(interpreter_cls):
    """The op-resolver value that runs built-in kernels only (no XNNPACK), for this interpreter's module."""
    mod = __import__(interpreter_cls.__module__, fromlist=["OpResolverType"])
    return mod.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES


def read_metadata(path: str | Path) -> dict:
    """The metadata that `mri-edge export` embedded in a .tflite or .onnx file."""
    path = Path(path)
    if not path.is_file():
        raise RuntimeModelError(f"model file not found: {path}")
    if path.suffix == ".tflite":
        try:
            with zipfile.ZipFile(path) as z:
                return json.loads(z.read(METADATA_NAME))
        except (zipfile.BadZipFile, KeyError, ValueError):
            raise RuntimeModelError(f"{path}: no mri-edge metadata (not exported by `mri-edge export`?)") from None
    if path.suffix == ".onnx":
        import onnxruntime as ort  # noqa: PLC0415

        try:
            sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as e:
            raise RuntimeModelError(f"{path}: not a loadable ONNX model ({type(e).__name__})") from None
        raw = sess.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        if not raw:
            raise RuntimeModelError(f"{path}: no mri-edge metadata (not exported by `mri-edge export`?)")
        return json.loads(raw)
    raise RuntimeModelError(f"{path}: unsupported model type {path.suffix!r} (expected .tflite or .onnx)")


@dataclass
class Prediction:
    label: str
    index: int
    probabilities: dict[str, float]
    timing_ms: dict[str, float] = field(default_factory=dict)
    source: str = ""

    def top(self, k: int = 3) -> list[tuple[str, float]]:
        return sorted(self.probabilities.items(), key=lambda kv: -kv[1])[:k]


def quantize(x: np.ndarray, dtype: str, scale: float, zero_point: int) -> np.ndarray:
    """Raw pixels -> the model's input dtype, honouring (scale, zero_point)."""
    if dtype == "float32":
        return x.astype(np.float32, copy=False)
    if x.dtype == np.uint8 and dtype == "uint8" and scale == 1.0 and zero_point == 0:
        return x  # the int8 file's default input: decoded pixels go in as they are
    info = np.iinfo(dtype)
    if scale == 0:
        return np.clip(np.rint(x), info.min, info.max).astype(dtype)
    q = np.rint(x.astype(np.float32) / scale + zero_point)
    return np.clip(q, info.min, info.max).astype(dtype)


def dequantize(q: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    if q.dtype == np.float32 or scale == 0:
        return q.astype(np.float32, copy=False)
    return (q.astype(np.float32) - zero_point) * scale


class Model:
    """Common front of the TFLite and ONNX back ends."""

    def __init__(self, path: Path, meta: dict):
        self.path = Path(path)
        self.meta = meta
        self.class_names: list[str] = list(meta["class_names"])
        self.image_size = int(meta["input_size"][0])
        self.input = meta["input"]
        self.output = meta["output"]
        self.runtime_name = ""

    def preprocess(self, source) -> np.ndarray:
        """Path, bytes or array -> (S, S, 3) uint8 under the shared contract."""
        return preprocess.load_image(source, self.image_size)

    def run(self, batch_uint8: np.ndarray) -> np.ndarray:
        """(N, S, S, 3) uint8 raw pixels -> (N, K) float32 probabilities."""
        raise NotImplementedError

    def predict(self, source) -> Prediction:
        t0 = time.perf_counter()
        img = self.preprocess(source)
        t1 = time.perf_counter()
        probs = self.run(img[None])[0]
        t2 = time.perf_counter()
        i = int(np.argmax(probs))
        return Prediction(self.class_names[i], i, {n: float(p) for n, p in zip(self.class_names, probs)},
                          {"preprocess": (t1 - t0) * 1e3, "invoke": (t2 - t1) * 1e3, "total": (t2 - t0) * 1e3},
                          str(source) if isinstance(source, (str, Path)) else "")

    def predict_arrays(self, images: np.ndarray, batch_size: int = 1) -> np.ndarray:
        out = [self.run(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, len(self.class_names)), np.float32)


class TFLiteModel(Model):
    """xnnpack: "default" (the interpreter's XNNPACK delegate), "latest" (XNNPACK with its
    newest kernels enabled) or "off" (built-in kernels only; for comparison)."""

    def __init__(self, path: Path, meta: dict, threads: int | None = None, runtime: str | None = None,
                 xnnpack: str = "default"):
        super().__init__(path, meta)
        cls, self.runtime_name = load_interpreter_class(runtime)
        kwargs = {}
        if xnnpack == "off":
            kwargs["experimental_op_resolver_type"] = no_delegate_resolver(cls)
        elif xnnpack == "latest":
            kwargs["experimental_default_delegate_latest_features"] = True
        elif xnnpack != "default":
            raise RuntimeModelError(f"xnnpack must be default, latest or off, not {xnnpack!r}")
        if xnnpack != "default":
            self.runtime_name += f"[xnnpack={xnnpack}]"
        try:
            self.interp = cls(model_path=str(path), num_threads=threads, **kwargs)
        except Exception as e:
            raise RuntimeModelError(f"{path}: the interpreter cannot load it ({type(e).__name__}: {e})") from None
        self.in_det = self.interp.get_input_details()[0]
        self.out_det = self.interp.get_output_details()[0]
        self._batch = None

    def _ensure_batch(self, n: int) -> None:
        if self._batch is None and int(self.in_det["shape"][0]) == n:
            # resizing to the shape it already has still re-plans the delegate (slower)
            self.interp.allocate_tensors()
            self._batch = n
        if self._batch != n:
            self.interp.resize_tensor_input(self.in_det["index"], [n, self.image_size, self.image_size, 3])
            self.interp.allocate_tensors()
            self.in_det = self.interp.get_input_details()[0]
            self.out_det = self.interp.get_output_details()[0]
            self._batch = n

    def run(self, batch_uint8: np.ndarray) -> np.ndarray:
        self._ensure_batch(len(batch_uint8))
        s, z = self.in_det["quantization"]
        x = quantize(batch_uint8, np.dtype(self.in_det["dtype"]).name, s, z)
        self.interp.set_tensor(self.in_det["index"], x)
        self.interp.invoke()
        q = self.interp.get_tensor(self.out_det["index"])
        s, z = self.out_det["quantization"]
        return dequantize(q, s, z)


class OnnxModel(Model):
    def __init__(self, path: Path, meta: dict, threads: int | None = None, providers: list[str] | None = None,
                 opt_level: str = "all"):
        super().__init__(path, meta)
        import onnxruntime as ort  # noqa: PLC0415

        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
        so.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[opt_level]
        providers = providers or ["CPUExecutionProvider"]
        self.sess = ort.InferenceSession(str(path), so, providers=providers)
        self.runtime_name = f"onnxruntime[{self.sess.get_providers()[0]}]"
        self.in_name = self.sess.get_inputs()[0].name

    def run(self, batch_uint8: np.ndarray) -> np.ndarray:
        return self.sess.run(None, {self.in_name: batch_uint8.astype(np.float32)})[0]


def load(path: str | Path, threads: int | None = None, runtime: str | None = None) -> Model:
    """Open an exported model with its embedded metadata."""
    path = Path(path)
    meta = read_metadata(path)
    if path.suffix == ".tflite":
        return TFLiteModel(path, meta, threads, runtime)
    return OnnxModel(path, meta, threads)
