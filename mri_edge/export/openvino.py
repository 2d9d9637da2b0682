"""OpenVINO IR files from the fp32 ONNX file: fp32 as it is, int8 through NNCF; saved with the
metadata (and the weights' hash) in rt_info."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .. import quiet, runtime
from ..files import sha256_file
from ..ov import RT_INFO_KEY, core


def from_onnx(onnx_path: Path):
    _, ie = core()
    return ie.read_model(str(onnx_path))


def from_int8_onnx(onnx_path: Path):
    """An int8 ONNX file's QDQ graph as OpenVINO int8 (--openvino-int8 onnx). convert_model folds
    each QuantizeLinear/DequantizeLinear pair into one FakeQuantize; read_model keeps them
    apart, and the IR's .xml grew from 1.7 to 3.8 MB for DenseNet121."""
    ov, _ = core()
    return ov.convert_model(str(onnx_path))


def nncf_options(accuracy_control: bool = False) -> dict:
    """NNCF's quantization options for every int8 OpenVINO file. overflow_fix ENABLE: 7-bit
    weights in every layer, not only the first (NNCF's default). Without VNNI (AVX2 only, as on
    an AMD EPYC Zen 3) oneDNN's int8 convolutions add pairs of u8 x s8 products in int16, which
    saturate with full-range weights (the ONNX file's reduce_range has the same reason). On such
    a CPU the demo's NNCF file lost 2.00 points of accuracy, 1.50 with this fix; the file made
    from the int8 ONNX file instead (`from_int8_onnx`, the default) lost 0.50."""
    import nncf  # noqa: PLC0415
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix  # noqa: PLC0415

    # the same parameters under the name each entry point gives them
    key = "advanced_quantization_parameters" if accuracy_control else "advanced_parameters"
    return {"preset": nncf.QuantizationPreset.PERFORMANCE,
            key: AdvancedQuantizationParameters(overflow_fix=OverflowFix.ENABLE)}


def quantize_int8(onnx_path: Path, calib: np.ndarray):
    """Post-training int8 (NNCF, its default ranges) from the fp32 ONNX file, calibrated on
    the same training images as the TFLite and ONNX int8 files."""
    import nncf  # noqa: PLC0415

    model = from_onnx(onnx_path)
    size = int(calib.shape[1])
    model.reshape([1, size, size, 3])  # statistics are collected one image at a time
    data = nncf.Dataset(list(calib), lambda img: img[None].astype(np.float32))
    with quiet.nncf_quiet():
        q = nncf.quantize(model, data, subset_size=len(calib), **nncf_options())
    q.reshape([-1, size, size, 3])
    return q


def save(model, target: Path, meta: dict, expect_sha256: str | None = None) -> None:
    """Write target (.xml) and its .bin; the new pair replaces an old one only once both are
    complete (and, with expect_sha256, only if its weights hash to that)."""
    ov, _ = core()
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
        if expect_sha256 and meta["model_sha256"] != expect_sha256:
            raise runtime.RuntimeModelError(f"{target}: OpenVINO wrote different weights when its metadata changed; "
                                            "the file was left as it was")
        os.replace(tmp.with_suffix(".bin"), target.with_suffix(".bin"))
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
        tmp.with_suffix(".bin").unlink(missing_ok=True)


def rewrite_openvino_metadata(path: Path, meta: dict) -> None:
    """Replace an IR's metadata; save() rewrites the pair and checks the weights are unchanged."""
    _, ie = core()
    save(ie.read_model(str(path)), path, dict(meta), expect_sha256=meta.get("model_sha256"))


def io_details(model) -> dict:
    """Input/output records in the same shape as the TFLite and ONNX files' (batch dimension -1)."""
    def record(port) -> dict:
        dims = [d.get_length() for d in list(port.get_partial_shape())[1:]]
        return {"name": port.get_any_name(), "dtype": "float32", "shape": [-1, *dims], "scale": 0.0, "zero_point": 0}

    return {"input": record(model.inputs[0]), "output": record(model.outputs[0])}
