"""On-device inference for exported mri-edge .tflite files.

Allowed imports: the standard library, numpy, one TFLite interpreter
(ai_edge_litert, else tflite_runtime, else tensorflow.lite) and an optional image
decoder (OpenCV or Pillow, through `mri_edge.preprocess`). Other kinds of file (.onnx,
OpenVINO .xml, .keras) open through `mri_edge.backends.open_model`. No TensorFlow, Keras,
click or scikit-learn: a test checks `sys.modules` after use.

    from mri_edge.runtime import load
    model = load("model_int8.tflite")
    result = model.predict("scan.jpg")   # label, probabilities, timings
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import preprocess, quiet, trust
from .errors import first_line
from .export.formats import file_name
from .integrity import RuntimeModelError, check_integrity, check_kind
from .interpreters import load_interpreter_class, no_delegate_resolver

METADATA_NAME = "mri_edge_metadata.json"  # file inside the ZIP appended to .tflite files
FEATURES = "features"  # the exported files' second output: the pooled features the head reads (trust.distance)


def parse_metadata(raw: str | bytes, path: Path) -> dict:
    """The metadata record that export embedded in a model file, as a dict; one line if damaged
    (every back end's reader parses it here)."""
    try:
        meta = json.loads(raw)
    except ValueError:
        meta = None
    if not isinstance(meta, dict):
        raise RuntimeModelError(f"{path}: its mri-edge metadata is damaged (not a JSON record); export it again")
    return meta


def read_metadata(path: str | Path) -> dict:
    """The metadata that `mri-edge export` appended to a .tflite file (`mri_edge.backends.read_metadata`
    reads every kind of exported file)."""
    path = Path(path)
    if not path.is_file():
        raise RuntimeModelError(f"model file not found: {path}")
    if path.suffix != ".tflite":
        raise RuntimeModelError(f"{path}: unsupported model type {path.suffix!r} here (expected .tflite)")
    check_kind(path)
    try:
        with zipfile.ZipFile(path) as z:
            raw = z.read(METADATA_NAME)
    except (zipfile.BadZipFile, KeyError, ValueError):
        raw = None
    if raw is not None:
        return parse_metadata(raw, path)
    try:
        cls = load_interpreter_class()[0]
        with quiet.native_stderr():
            cls(model_path=str(path))
    except Exception:
        raise RuntimeModelError(f"{path}: a damaged or truncated TFLite file (the interpreter cannot read it)") \
            from None
    raise RuntimeModelError(f"{path}: no mri-edge metadata at its end: an incomplete (truncated) copy, or a "
                            "file not exported by `mri-edge export`") from None


@dataclass
class Prediction:
    label: str
    index: int
    probabilities: dict[str, float]
    timing_ms: dict[str, float] = field(default_factory=dict)
    source: str = ""
    calibrated: bool = False  # probabilities went through the file's stored temperature
    uncertain: bool = False  # refer for review: below the file's abstention threshold, or a `warnings` input
    prediction_set: list[str] | None = None  # conformal set at the file's stored coverage
    set_coverage: float | None = None  # 1 - alpha of that set
    warnings: list[str] = field(default_factory=list)  # an input the model was not made for: referred for review
    distance: float | None = None  # from the training images' features (trust.distance); None: no check

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
    """Common front of the back ends: TFLite here, ONNX, OpenVINO and Keras in their own modules."""

    def __init__(self, path: Path, meta: dict, allow_other_resize: bool = False):
        self.path = Path(path)
        check_integrity(self.path, meta)
        self.meta = meta
        self.class_names: list[str] = list(meta["class_names"])
        self.image_size = int(meta["input_size"][0])
        self.resize_method = preprocess.check_contract(self.path, meta, allow_other_resize)
        self.input = meta["input"]
        self.output = meta["output"]
        self.runtime_name = ""
        self.trust = trust.Trust.from_meta(meta)  # None: the file was never calibrated
        self.has_features = FEATURES in meta  # a second output, the pooled features: trust.distance

    def preprocess(self, source) -> np.ndarray:
        """Path, bytes or array -> (S, S, 3) uint8 under the file's preprocessing contract."""
        return preprocess.load_image(source, self.image_size, self.resize_method)

    chunk = 32  # images per call of the graph: its memory grows with the batch (574 at 128 px: 24 GB in Keras)

    def run(self, batch_uint8: np.ndarray, features: bool = False):
        """(N, S, S, 3) uint8 raw pixels (`preprocess.check_batch`) -> (N, K) float32 probabilities as the
        graph computes them (before the stored temperature; `calibrated` applies it), `chunk` images a call.
        features=True: (probabilities, (N, C) pooled features or None where the file has no such output)."""
        batch_uint8 = preprocess.check_batch(batch_uint8, self.image_size, self.path.name)
        if not len(batch_uint8):  # TFLite cannot plan a batch of 0 (and would stay unplanned)
            if not features:
                return np.zeros((0, len(self.class_names)), np.float32)
            probs, feats = self.run_batch(np.zeros((1, *batch_uint8.shape[1:]), np.uint8), True)  # their widths
            return probs[:0], None if feats is None else feats[:0]
        if (n := len(batch_uint8)) <= self.chunk:
            return self.run_batch(batch_uint8, features)
        # calls of one size, the last padded: a new batch size re-plans TFLite (XNNPACK packs float weights again)
        calls = -(-n // self.chunk)
        m = -(-n // calls)
        x = np.concatenate([batch_uint8, np.repeat(batch_uint8[-1:], calls * m - n, axis=0)])
        parts = [self.run_batch(x[i:i + m], features) for i in range(0, n, m)]
        if not features:
            return np.concatenate(parts)[:n]
        feats = None if parts[0][1] is None else np.concatenate([f for _, f in parts])[:n]
        return np.concatenate([p for p, _ in parts])[:n], feats

    def run_batch(self, batch_uint8: np.ndarray, features: bool = False):
        """`run` for one call of the graph (each back end's own)."""
        raise NotImplementedError

    def calibrated(self, probs: np.ndarray) -> np.ndarray:
        """The graph's probabilities under the file's stored temperature (unchanged if none)."""
        return self.trust.apply(probs) if self.trust else np.asarray(probs, np.float32)

    def predict(self, source) -> Prediction:
        """One image (a path, encoded bytes or a decoded array) classified as `mri-edge predict`
        does: calibrated probabilities when the file carries a calibration record, the prediction
        set, and `uncertain`: below the stored threshold, or for any reason in `warnings` (a blank
        or tiny image, unlike the training images). An unreadable image raises preprocess.ImageError."""
        t0 = time.perf_counter()
        raw = preprocess.load_image(source)  # as decoded, to check what the model is shown
        img = self.preprocess(raw)
        t1 = time.perf_counter()
        probs, feats = self.run(img[None], features=True)
        probs = self.calibrated(probs)
        t2 = time.perf_counter()
        i = int(np.argmax(probs[0]))
        out = Prediction(self.class_names[i], i, {n: float(p) for n, p in zip(self.class_names, probs[0])},
                         {"preprocess": (t1 - t0) * 1e3, "invoke": (t2 - t1) * 1e3, "total": (t2 - t0) * 1e3},
                         str(source) if isinstance(source, (str, Path)) else "", calibrated=self.trust is not None)
        if self.trust:
            out.uncertain = bool(self.trust.uncertain(probs)[0])
            sets = self.trust.sets(probs)
            if sets is not None:
                out.prediction_set = [self.class_names[k] for k in sets[0]]
                out.set_coverage = 1 - self.trust.alpha
        # Any answer is confident-looking noise for these; a reviewer should see the image.
        if min(raw.shape[:2]) * 4 < self.image_size:
            out.warnings.append(f"small image ({raw.shape[1]}x{raw.shape[0]} px) enlarged to {self.image_size} px")
        if float(img.reshape(-1, img.shape[-1]).std(0).max()) < 2.0:  # per channel: a solid colour is blank too
            out.warnings.append("blank image (no contrast)")
        if self.trust and (d := self.trust.distances(feats)) is not None:
            out.distance = float(d[0])
            if self.trust.unfamiliar(distances=d)[0]:
                out.warnings.append(f"unlike the training images (feature distance {out.distance:.2f} > limit "
                                    f"{self.trust.familiarity['limit']:.2f})")
        out.uncertain = out.uncertain or bool(out.warnings)
        return out

    def predict_arrays(self, images: np.ndarray, batch_size: int = 1, calibrated: bool = True,
                       label: str | None = None, features: bool = False):
        """(N, K) probabilities of decoded images, under the stored temperature unless
        calibrated=False; with a label, a progress line on stderr. features=True: (probabilities,
        pooled features or None), as `run`."""
        from .progress import Progress  # noqa: PLC0415

        out, feats = [], []
        with Progress(len(images), label) if label else contextlib.nullcontext() as bar:
            for i in range(0, max(len(images), 1), batch_size):  # (an empty batch: one call, empty answers)
                probs, f = self.run(images[i : i + batch_size], features=True) if features else \
                    (self.run(images[i : i + batch_size]), None)
                out.append(probs)
                feats.append(f)
                if bar is not None:
                    bar.update(len(probs))
        probs = np.concatenate(out)
        probs = self.calibrated(probs) if calibrated else probs
        if not features:
            return probs
        return probs, None if feats[0] is None else np.concatenate(feats)


def slow_kernels(meta: dict, runtime_name: str) -> str | None:
    """Why an int8 file runs slowly on this interpreter, or None. tflite-runtime (2.14, the last
    release) hands no int8 operation to XNNPACK: static int8 runs on its built-in kernels and
    dynamic-range int8 (`export --hybrid`) on reference ones. Measured on an AMD EPYC, 2 threads:
    the shipped tumor file 53 ms against 3.6 ms with ai-edge-litert, the Alzheimer file 54-71 ms
    against 3.8-4.1 ms, both slower than their fp32 files; the answers stay within the files'
    gates (docs/int8.md)."""
    if meta.get("quantization") != "int8" or not runtime_name.startswith("tflite_runtime"):
        return None
    stages = (meta.get("accuracy_aware") or {}).get("hybrid_stages")
    what = (f"{', '.join(stages)} of this file run as dynamic-range int8, which tflite-runtime runs on reference "
            "kernels" if stages else "tflite-runtime runs int8 operations on its built-in kernels, not XNNPACK")
    return f"{what} (about 15x slower, slower than the fp32 file); install ai-edge-litert: pip install 'mri-edge[device]'"


class TFLiteModel(Model):
    """xnnpack: "default" (the interpreter's XNNPACK delegate), "latest" (XNNPACK with its
    newest kernels enabled) or "off" (built-in kernels only; for comparison)."""

    def __init__(self, path: Path, meta: dict, threads: int | None = None, runtime: str | None = None,
                 xnnpack: str = "default", allow_other_resize: bool = False):
        super().__init__(path, meta, allow_other_resize)
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
            with quiet.native_stderr():  # XNNPACK announces itself on stderr
                # the interpreters' own default is one thread; the other runtimes take every core
                self.interp = cls(model_path=str(path), num_threads=threads or usable_cores(), **kwargs)
                self.interp.allocate_tensors()
        except Exception as e:
            raise RuntimeModelError(f"{path}: the interpreter cannot load it ({type(e).__name__}: "
                                    f"{first_line(e)})") from None
        self._details()
        if why := slow_kernels(meta, self.runtime_name):
            warnings.warn(f"{path.name}: {why}", RuntimeWarning, stacklevel=outside_this_package())
        if list(self.in_det["shape"][1:3]) != [self.image_size, self.image_size]:
            raise RuntimeModelError(f"{path}: its graph takes {list(self.in_det['shape'][1:3])} px, its metadata "
                                    f"says {self.image_size}; the file is inconsistent")
        self._batch = None

    def _ensure_batch(self, n: int) -> None:
        if self._batch is None and int(self.in_det["shape"][0]) == n:
            # resizing to the shape it already has still re-plans the delegate (slower);
            # the tensors were allocated when the file was opened
            self._batch = n
        if self._batch != n:
            self.interp.resize_tensor_input(self.in_det["index"], [n, self.image_size, self.image_size, 3])
            with quiet.native_stderr():
                self.interp.allocate_tensors()
            self._details()
            self._batch = n

    def _details(self) -> None:
        self.in_det = self.interp.get_input_details()[0]
        outputs = self.interp.get_output_details()
        self.out_det = outputs[0]
        self.feat_det = next((d for d in outputs[1:] if d["name"] == FEATURES), None)

    def run_batch(self, batch_uint8: np.ndarray, features: bool = False):
        self._ensure_batch(len(batch_uint8))
        s, z = self.in_det["quantization"]
        x = quantize(batch_uint8, np.dtype(self.in_det["dtype"]).name, s, z)
        self.interp.set_tensor(self.in_det["index"], x)
        self.interp.invoke()

        def read(det):
            return dequantize(self.interp.get_tensor(det["index"]), *det["quantization"])

        if not features:
            return read(self.out_det)
        return read(self.out_det), None if self.feat_det is None else read(self.feat_det).reshape(len(x), -1)


def usable_cores() -> int:
    """The cores this process may run on: its affinity where the OS has one, at most a
    container's CPU quota (cgroup v2 cpu.max or v1 cpu.cfs_quota_us), so a container given 2 CPUs
    on a large host does not start a thread per host core."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    for quota_file, period_file in (("/sys/fs/cgroup/cpu.max", None),
                                    ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_period_us")):
        try:
            fields = Path(quota_file).read_text().split()
            quota, period = fields[0], fields[1] if period_file is None else Path(period_file).read_text().strip()
            if quota not in ("max", "-1"):
                return max(1, min(cores, -(-int(quota) // int(period))))
        except (OSError, ValueError, IndexError):
            continue
    return cores


def outside_this_package() -> int:
    """warnings.warn's stacklevel that names the first caller outside mri_edge (called where warn is)."""
    frame, level, here = sys._getframe(1), 1, str(Path(__file__).parent) + os.sep
    while frame is not None and frame.f_code.co_filename.startswith(here):
        frame, level = frame.f_back, level + 1
    return level


def load(path: str | Path, threads: int | None = None, runtime: str | None = None,
         allow_other_resize: bool = False, xnnpack: str = "default") -> TFLiteModel:
    """Open an exported .tflite file with its embedded metadata (the device path; other kinds
    of file open through `mri_edge.backends.open_model`)."""
    path = Path(path)
    if path.is_dir():
        found = sorted((q.name for q in path.glob("*.tflite")), key=lambda n: (n != file_name("tflite", "int8"), n))
        raise RuntimeModelError(f"{path}: a folder; give one model file in it" + (f", e.g. {path / found[0]}" if found else
                                                                                 " (it holds no .tflite file)"))
    if path.suffix != ".tflite":
        raise RuntimeModelError(f"{path}: unsupported model type {path.suffix!r} here (expected .tflite; "
                                "mri_edge.backends.open_model opens every kind)")
    return TFLiteModel(path, read_metadata(path), threads, runtime, xnnpack, allow_other_resize=allow_other_resize)
