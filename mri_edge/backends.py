"""The one suffix -> backend registry: which module opens each kind of model file, and the
two functions that go through it (`read_metadata`, `open_model`).

A backend's module is imported only when a file of its kind is opened, so a host with just
a TFLite interpreter never imports onnxruntime, OpenVINO or Keras; a device needs only
`mri_edge.runtime`."""

from __future__ import annotations

import importlib
from pathlib import Path

from .export.formats import FORMATS
from .integrity import RuntimeModelError

# suffix -> (module, class); the modules of exported files also have read_metadata(path).
# What installs each runtime is said by each module's own error (RuntimeMissingError).
BACKENDS = {
    ".tflite": ("mri_edge.runtime", "TFLiteModel"),
    ".onnx": ("mri_edge.onnx_model", "OnnxModel"),
    ".xml": ("mri_edge.ov", "OpenVINOModel"),
    ".keras": ("mri_edge.keras_model", "KerasModel"),
}
EXPORT_SUFFIXES = tuple(f.suffix for f in FORMATS.values())  # the files export writes
MODEL_SUFFIXES = tuple(BACKENDS)


def read_metadata(path: str | Path) -> dict:
    """The metadata that `mri-edge export` embedded in a .tflite, .onnx or OpenVINO .xml file
    (read by the file's backend module, which needs its runtime)."""
    path = Path(path)
    if not path.is_file():
        raise RuntimeModelError(f"model file not found: {path}")
    if path.suffix not in EXPORT_SUFFIXES:
        raise RuntimeModelError(f"{path}: unsupported model type {path.suffix!r} (expected "
                                f"{', '.join(EXPORT_SUFFIXES)})")
    return importlib.import_module(BACKENDS[path.suffix][0]).read_metadata(path)


def recorded_model_sha256(path: str | Path) -> str | None:
    """The hash of its model bytes that export recorded in a file (None where none can be read):
    which file a report's row measured."""
    try:
        return read_metadata(path).get("model_sha256")
    except RuntimeModelError:
        return None


def open_model(path: str | Path, threads: int | None = None, allow_other_resize: bool = False,
               xnnpack: str = "default"):
    """Any mri-edge model (.tflite, .onnx, OpenVINO .xml, .keras, or a run folder's model.keras)
    as a `runtime.Model`; xnnpack chooses the kernels of a .tflite file (`runtime.TFLiteModel`)."""
    from .run import RunFolder  # noqa: PLC0415

    p = Path(path)
    if p.is_dir():
        p = RunFolder(p).model_path
    if p.suffix not in BACKENDS:
        raise RuntimeModelError(f"{p}: unsupported model type {p.suffix!r} (expected {', '.join(MODEL_SUFFIXES)})")
    if not p.is_file():
        raise RuntimeModelError(f"model file not found: {p}")
    if xnnpack != "default" and p.suffix != ".tflite":
        raise RuntimeModelError(f"{p}: xnnpack={xnnpack} applies to .tflite files only")
    if p.suffix == ".tflite":
        from .runtime import load  # noqa: PLC0415

        return load(p, threads, allow_other_resize=allow_other_resize, xnnpack=xnnpack)
    module, cls = BACKENDS[p.suffix]
    opener = getattr(importlib.import_module(module), cls)
    if p.suffix == ".onnx":
        return opener(p, read_metadata(p), threads, allow_other_resize=allow_other_resize)
    return opener(p, threads=threads, allow_other_resize=allow_other_resize)  # they read their own metadata
