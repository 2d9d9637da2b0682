"""`mri-edge predict`: classify image files with any model kind."""

from __future__ import annotations

import glob
import json
import time
from pathlib import Path

import numpy as np

from . import preprocess, runtime


class KerasModel(runtime.Model):
    """A run's model.keras behind the runtime interface (workstation only: needs Keras)."""

    def __init__(self, path: Path):
        import os  # noqa: PLC0415

        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        from .model import load_model  # noqa: PLC0415

        labels_path = path.parent / "labels.json"
        if not labels_path.is_file():
            raise runtime.RuntimeModelError(f"{path}: no labels.json beside it")
        labels = json.loads(labels_path.read_text())
        try:
            self.net = load_model(path)
        except Exception as e:
            raise runtime.RuntimeModelError(f"{path}: not a loadable Keras model ({type(e).__name__})") from None
        size = int(self.net.input_shape[1])
        meta = {"class_names": labels["class_names"], "input_size": [size, size], "format": "keras",
                "quantization": "none", "input": {"dtype": "float32"}, "output": {"dtype": "float32"}}
        super().__init__(path, meta)
        self.runtime_name = "keras"

    def run(self, batch_uint8: np.ndarray) -> np.ndarray:
        import keras  # noqa: PLC0415

        from .model import no_grad  # noqa: PLC0415

        with no_grad():  # torch: no autograd graph (np.asarray refuses a tensor that needs grad)
            return keras.ops.convert_to_numpy(self.net(batch_uint8.astype(np.float32), training=False))


def open_model(path, threads=None) -> runtime.Model:
    p = Path(path)
    if p.is_dir():
        p = p / "model.keras"
    if p.suffix == ".keras":
        if not p.is_file():
            raise runtime.RuntimeModelError(f"{p}: not found")
        return KerasModel(p)
    if p.suffix == ".xml":
        from . import ov  # noqa: PLC0415

        return ov.OpenVINOModel(p, threads=threads)
    return runtime.load(p, threads=threads)


def expand_inputs(items) -> list[Path]:
    out: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            out += sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in preprocess.IMAGE_SUFFIXES)
        elif p.exists():
            out.append(p)
        else:
            matches = sorted(Path(m) for m in glob.glob(item, recursive=True))
            out += [m for m in matches if m.is_file()] if matches else [p]
    return out


def run(model: runtime.Model, paths: list[Path], top_k: int, as_json: bool, emit) -> int:
    """Classify each path; a bad image is reported and skipped. Returns the failure count."""
    failed = 0
    if not as_json:
        emit(f"model: {model.path.name} [{model.runtime_name}], classes: {', '.join(model.class_names)}")
        emit(f"{'image':50s} {'prediction':22s} {'p':>6s}  top-{top_k}")
    t0 = time.perf_counter()
    for p in paths:
        try:
            r = model.predict(p)
        except preprocess.ImageError as e:
            failed += 1
            if as_json:
                emit(json.dumps({"image": str(p), "error": str(e)}))
            else:
                emit(f"{str(p)[-50:]:50s} ERROR: {e}")
            continue
        top = r.top(top_k)
        if as_json:
            emit(json.dumps({"image": str(p), "label": r.label, "index": r.index, "probabilities": r.probabilities,
                             "top_k": top, "timing_ms": {k: round(v, 3) for k, v in r.timing_ms.items()}}))
        else:
            emit(f"{str(p)[-50:]:50s} {r.label:22s} {r.probabilities[r.label]:6.3f}  "
                 + ", ".join(f"{n} {v:.3f}" for n, v in top) + f"  ({r.timing_ms['total']:.1f} ms)")
    if not as_json:
        emit(f"{len(paths) - failed} classified, {failed} failed, {time.perf_counter() - t0:.2f} s")
    return failed
