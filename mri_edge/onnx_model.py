"""Exported .onnx files through onnxruntime: their metadata and their `Model`.

Beside the device module (`runtime`, TFLite only) for hosts that run ONNX files; imported
only when such a file is opened (`backends.open_model`)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from .integrity import RuntimeMissingError, RuntimeModelError, check_kind
from .runtime import FEATURES, Model, outside_this_package, parse_metadata

METADATA_KEY = "mri_edge"  # the metadata_props key export writes


def _ort(path: Path):
    try:
        import onnxruntime as ort  # noqa: PLC0415
    except ImportError:
        raise RuntimeMissingError(f"{path}: .onnx files need onnxruntime (pip install onnxruntime)") from None
    return ort


def read_metadata(path: str | Path) -> dict:
    """The metadata that `mri-edge export` stored in an .onnx file's metadata_props."""
    path = Path(path)
    check_kind(path)
    ort = _ort(path)
    try:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:
        raise RuntimeModelError(f"{path}: not a loadable ONNX model, damaged or truncated ({type(e).__name__})") \
            from None
    raw = sess.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    if not raw:
        raise RuntimeModelError(f"{path}: no mri-edge metadata (not exported by `mri-edge export`?)")
    return parse_metadata(raw, path)


class OnnxModel(Model):
    def __init__(self, path: Path, meta: dict, threads: int | None = None, providers: list[str] | None = None,
                 opt_level: str = "all", allow_other_resize: bool = False):
        super().__init__(path, meta, allow_other_resize)
        ort = _ort(path)
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
        if meta.get("weight_only"):
            # Every operation is float, with int8 weights behind DequantizeLinear (export --max-drop
            # --float-weights int8). With its QDQ fusions off onnxruntime folds them to float32 once, at
            # load; with them on it dequantizes on every call (128 px: 20 ms, the fp32 file 12 ms).
            so.add_session_config_entry("session.disable_quant_qdq", "1")
        providers = providers or ["CPUExecutionProvider"]
        if meta.get("quantization") == "int8" and meta.get("weight_bits", 8) > 7 and cpu_has_vnni() is False \
                and not meta.get("weight_only"):
            warnings.warn(f"{path}: its int8 weights use the full 8-bit range, which onnxruntime's kernels "
                          "saturate on this CPU (x86 without VNNI): its answers can differ from those verify "
                          "checked; export it again with this mri-edge (7-bit weights)", RuntimeWarning,
                          stacklevel=outside_this_package())
        self.sess = ort.InferenceSession(str(path), so, providers=providers)
        self.runtime_name = f"onnxruntime[{self.sess.get_providers()[0]}]"
        self.in_name = self.sess.get_inputs()[0].name
        self.out_names = [self.sess.get_outputs()[0].name]
        self.out_names += [o.name for o in self.sess.get_outputs()[1:] if o.name == FEATURES]

    def run_batch(self, batch_uint8: np.ndarray, features: bool = False):
        names = self.out_names if features else self.out_names[:1]
        out = self.sess.run(names, {self.in_name: batch_uint8.astype(np.float32)})
        if not features:
            return out[0]
        return out[0], out[1].reshape(len(batch_uint8), -1) if len(out) > 1 else None


# /proc/cpuinfo flags of int8 dot products without int16 saturation, as the reports name them
VNNI_FLAGS = {"amx_int8": "AMX", "avx512_vnni": "AVX-512 VNNI", "avx_vnni": "AVX-VNNI"}


def int8_isa(flags) -> str | None:
    """What a CPU with these flags (bench.json's `cpu_flags`) runs int8 with, in words."""
    f = set(flags)
    return ", ".join(name for flag, name in VNNI_FLAGS.items() if flag in f) or (
        "AVX-512, no VNNI" if any(x.startswith("avx512") for x in f) else "AVX2, no AVX-512" if "avx2" in f else None)


def cpu_has_vnni() -> bool | None:
    """Whether this x86 CPU has VNNI (int8 dot products without int16 saturation); None where
    it cannot be told (not Linux, not x86)."""
    import platform  # noqa: PLC0415

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    try:
        flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    except OSError:
        return None
    return bool(set(VNNI_FLAGS) & set(flags.split()))
