"""OpenVINO IR files (.xml + .bin): reading their metadata and running them (the exporter is
`mri_edge.export.openvino`).

OpenVINO is here because it is the one runtime measured on this kind of CPU whose int8
kernels use AMX (oneDNN): LiteRT's XNNPACK does too, onnxruntime's MLAS does not. It is
a workstation/x86-box runtime, so it lives outside `runtime.py` (the on-device module).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import quiet, runtime
from .errors import installed
from .integrity import RuntimeMissingError, hashed_file, model_files

RT_INFO_KEY = ["mri_edge", "metadata"]


def available(for_export: bool = False) -> bool:
    """OpenVINO importable (and NNCF too, which export needs for int8)."""
    mods = ("openvino", "nncf") if for_export else ("openvino",)
    return all(installed(m) for m in mods)


def core():
    try:
        import openvino as ov  # noqa: PLC0415
    except ImportError:
        raise RuntimeMissingError("OpenVINO is not installed (pip install 'mri-edge[openvino]')") from None
    return ov, ov.Core()


def size_on_disk(path: str | Path) -> int:
    """Bytes of a model file; an OpenVINO .xml counts its .bin too."""
    return sum(p.stat().st_size for p in model_files(path) if p.is_file())


def read_metadata(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise runtime.RuntimeModelError(f"model file not found: {path}")
    if not (weights := hashed_file(path)).is_file():
        raise runtime.RuntimeModelError(f"{path}: its weights file {weights.name} is missing")
    runtime.check_kind(path)
    _, ie = core()
    failed = None
    with quiet.native_stderr():  # on a bad file OpenVINO's other frontends log their own parse errors
        try:
            model = ie.read_model(str(path))
        except Exception as e:  # caught inside: the capture is replayed only for what escapes it
            failed = e
    if failed is not None:
        raise runtime.RuntimeModelError(f"{path}: not a loadable OpenVINO IR ({type(failed).__name__}; its weights "
                                        f"are in {hashed_file(path).name}: damaged, truncated or missing?)") from None
    if not model.has_rt_info(RT_INFO_KEY):
        raise runtime.RuntimeModelError(f"{path}: no mri-edge metadata (not exported by `mri-edge export`?)")
    return runtime.parse_metadata(model.get_rt_info(RT_INFO_KEY).astype(str), path)


class OpenVINOModel(runtime.Model):
    """Compiled for the CPU once per batch size (a graph of fixed shape runs fastest), with fp32
    as the precision of every op that is not int8: on AMX machines OpenVINO would otherwise
    run them in bf16 and the file would not compute what verify checked."""

    def __init__(self, path: Path, threads: int | None = None, allow_other_resize: bool = False):
        super().__init__(path, read_metadata(path), allow_other_resize)
        _, self.core = core()
        self.net = self.core.read_model(str(path))
        self.config = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1, "INFERENCE_PRECISION_HINT": "f32"}
        if threads:
            self.config["INFERENCE_NUM_THREADS"] = threads
        self.runtime_name = "openvino"
        self._requests = {}  # batch size -> compiled request, each compiled once (`run` calls in one size)

    def run_batch(self, batch_uint8: np.ndarray, features: bool = False):
        n = len(batch_uint8)
        if n not in self._requests:
            self.net.reshape([n, self.image_size, self.image_size, 3])
            self._requests[n] = self.core.compile_model(self.net, "CPU", self.config).create_infer_request()
        out = self._requests[n].infer({0: batch_uint8.astype(np.float32)})
        probs = np.array(out[0], np.float32)
        if not features:
            return probs
        port = next((p for p in self._requests[n].model_outputs[1:] if runtime.FEATURES in p.get_names()), None)
        return probs, None if port is None else np.array(out[port], np.float32).reshape(n, -1)
