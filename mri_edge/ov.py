"""OpenVINO IR files (.xml + .bin): export from the ONNX file, int8 through NNCF, and inference.

OpenVINO is here because it is the one runtime measured on this kind of CPU whose int8
kernels use AMX (oneDNN): LiteRT's XNNPACK does too, onnxruntime's MLAS does not. It is
a workstation/x86-box runtime, so it lives outside `runtime.py` (the on-device module).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from . import runtime
from .files import sha256_file

RT_INFO_KEY = ["mri_edge", "metadata"]


def available(for_export: bool = False) -> bool:
    """OpenVINO importable (and NNCF too, which export needs for int8)."""
    import importlib.util  # noqa: PLC0415

    mods = ("openvino", "nncf") if for_export else ("openvino",)
    return all(importlib.util.find_spec(m) is not None for m in mods)


def _core():
    try:
        import openvino as ov  # noqa: PLC0415
    except ImportError:
        raise runtime.RuntimeModelError("OpenVINO is not installed (pip install 'mri-edge[openvino]')") from None
    return ov, ov.Core()


def size_on_disk(path: str | Path) -> int:
    """Bytes of a model file; an OpenVINO .xml counts its .bin too."""
    path = Path(path)
    weights = path.with_suffix(".bin")
    return path.stat().st_size + (weights.stat().st_size if path.suffix == ".xml" and weights.is_file() else 0)


def read_metadata(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise runtime.RuntimeModelError(f"model file not found: {path}")
    if not path.with_suffix(".bin").is_file():
        raise runtime.RuntimeModelError(f"{path}: its weights file {path.with_suffix('.bin').name} is missing")
    runtime._check_kind(path)
    _, core = _core()
    try:
        model = core.read_model(str(path))
    except Exception as e:
        raise runtime.RuntimeModelError(f"{path}: not a loadable OpenVINO IR ({type(e).__name__})") from None
    if not model.has_rt_info(RT_INFO_KEY):
        raise runtime.RuntimeModelError(f"{path}: no mri-edge metadata (not exported by `mri-edge export`?)")
    return json.loads(model.get_rt_info(RT_INFO_KEY).astype(str))


def from_onnx(onnx_path: Path):
    _, core = _core()
    return core.read_model(str(onnx_path))


def quantize_int8(onnx_path: Path, calib: np.ndarray):
    """Post-training int8 (NNCF, its default ranges) from the fp32 ONNX file, calibrated on
    the same training images as the TFLite and ONNX int8 files."""
    import nncf  # noqa: PLC0415

    model = from_onnx(onnx_path)
    size = int(calib.shape[1])
    model.reshape([1, size, size, 3])  # statistics are collected one image at a time
    data = nncf.Dataset(list(calib), lambda img: img[None].astype(np.float32))
    q = nncf.quantize(model, data, subset_size=len(calib), preset=nncf.QuantizationPreset.PERFORMANCE)
    q.reshape([-1, size, size, 3])
    return q


def save(model, target: Path, meta: dict) -> None:
    """Write target (.xml) and its .bin; the new pair replaces an old one only once both are complete."""
    ov, _ = _core()
    target = Path(target)
    tmp = target.with_name(f".{target.stem}.tmp.xml")
    try:
        # Saved twice: the weights' hash goes into the .xml's metadata, and the .bin does not
        # depend on the metadata (checked).
        model.set_rt_info(json.dumps(meta), RT_INFO_KEY)
        ov.save_model(model, str(tmp), compress_to_fp16=False)  # fp32 means fp32; int8 weights stay int8
        meta["model_sha256"] = sha256_file(tmp.with_suffix(".bin"))
        model.set_rt_info(json.dumps(meta), RT_INFO_KEY)
        ov.save_model(model, str(tmp), compress_to_fp16=False)
        if sha256_file(tmp.with_suffix(".bin")) != meta["model_sha256"]:
            raise runtime.RuntimeModelError("OpenVINO wrote different weights for the same model twice")
        os.replace(tmp.with_suffix(".bin"), target.with_suffix(".bin"))
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
        tmp.with_suffix(".bin").unlink(missing_ok=True)


def io_details(model) -> dict:
    """Input/output records in the same shape as the TFLite and ONNX files' (batch dimension -1)."""
    def record(port) -> dict:
        dims = [d.get_length() for d in list(port.get_partial_shape())[1:]]
        return {"name": port.get_any_name(), "dtype": "float32", "shape": [-1, *dims], "scale": 0.0, "zero_point": 0}

    return {"input": record(model.inputs[0]), "output": record(model.outputs[0])}


class OpenVINOModel(runtime.Model):
    """Compiled for the CPU at a fixed batch (recompiled when the batch changes), with fp32
    as the precision of every op that is not int8: on AMX machines OpenVINO would otherwise
    run them in bf16 and the file would not compute what verify checked."""

    def __init__(self, path: Path, threads: int | None = None):
        super().__init__(path, read_metadata(path))
        _, self.core = _core()
        self.net = self.core.read_model(str(path))
        self.config = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1, "INFERENCE_PRECISION_HINT": "f32"}
        if threads:
            self.config["INFERENCE_NUM_THREADS"] = threads
        self.runtime_name = "openvino"
        self._batch = None
        self._request = None

    def _ensure_batch(self, n: int) -> None:
        if self._batch != n:
            self.net.reshape([n, self.image_size, self.image_size, 3])
            self._request = self.core.compile_model(self.net, "CPU", self.config).create_infer_request()
            self._batch = n

    def run(self, batch_uint8: np.ndarray) -> np.ndarray:
        self._ensure_batch(len(batch_uint8))
        return np.array(self._request.infer({0: batch_uint8.astype(np.float32)})[0], np.float32)
