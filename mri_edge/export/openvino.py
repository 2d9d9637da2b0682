"""OpenVINO IR files from the fp32 ONNX file: fp32 as it is, int8 through NNCF (with accuracy
control for `export --max-drop`, scored as `accuracy` scores every format); saved with the
metadata (and the weights' hash) in rt_info."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .. import progress, quiet, runtime
from ..files import sha256_file
from ..integrity import hashed_file
from ..ov import RT_INFO_KEY, core

if TYPE_CHECKING:
    from .heldout import HeldOut


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
        meta["model_sha256"] = sha256_file(hashed_file(tmp))
        model.set_rt_info(json.dumps(meta), RT_INFO_KEY)
        ov.save_model(model, str(tmp), compress_to_fp16=False)
        if sha256_file(hashed_file(tmp)) != meta["model_sha256"]:
            raise runtime.RuntimeModelError("OpenVINO wrote different weights for the same model twice")
        if expect_sha256 and meta["model_sha256"] != expect_sha256:
            raise runtime.RuntimeModelError(f"{target}: OpenVINO wrote different weights when its metadata changed; "
                                            "the file was left as it was")
        os.replace(hashed_file(tmp), hashed_file(target))
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
        hashed_file(tmp).unlink(missing_ok=True)


def rewrite_openvino_metadata(path: Path, meta: dict) -> None:
    """Replace an IR's metadata; save() rewrites the pair and checks the weights are unchanged."""
    _, ie = core()
    save(ie.read_model(str(path)), path, dict(meta), expect_sha256=meta.get("model_sha256"))


def io_details(model) -> dict:
    """Input/output records in the same shape as the TFLite and ONNX files' (batch dimension -1)."""
    def record(port) -> dict:
        dims = [d.get_length() for d in list(port.get_partial_shape())[1:]]
        return {"name": port.get_any_name(), "dtype": "float32", "shape": [-1, *dims], "scale": 0.0, "zero_point": 0}

    out = {"input": record(model.inputs[0]), "output": record(model.outputs[0])}
    out.update({runtime.FEATURES: record(port) for port in model.outputs[1:] if runtime.FEATURES in port.get_names()})
    return out


def add_features_output(model) -> bool:
    """Give an IR read from a file made before the features output existed that output
    (`runtime.FEATURES`): the single ReduceMean's output (the global pooling), followed
    through the reshapes (and, in an int8 file, fake quantization) to its first (N, C) form,
    as a second Result. False where there is no single pooling."""
    pools = [op for op in model.get_ops() if op.get_type_name() == "ReduceMean"]
    if len(pools) != 1 or len(model.outputs) != 1:
        return False
    port = pools[0].output(0)
    while port.get_partial_shape().rank.get_length() != 2:
        after = list(port.get_target_inputs())
        if len(after) != 1 or after[0].get_node().get_type_name() not in ("Reshape", "Squeeze", "FakeQuantize"):
            return False
        port = after[0].get_node().output(0)
    port.get_tensor().add_names({runtime.FEATURES})
    model.add_outputs([port])
    return True


def openvino_accuracy_aware(fp32_onnx: Path, calib: np.ndarray, held: HeldOut, max_drop_pts: float):
    """(int8 OpenVINO model, recipe) from NNCF's quantization with accuracy control. Its metric
    is `quality`, so a drop of at most max_drop_pts bounds agreement and accuracy alike."""
    import nncf  # noqa: PLC0415

    from .accuracy import METRIC, quality, within  # noqa: PLC0415
    from .heldout import HeldOut  # noqa: PLC0415, F811

    model = from_onnx(fp32_onnx)
    size = int(calib.shape[1])
    model.reshape([1, size, size, 3])
    items = [(held.x[i][None].astype(np.float32), i) for i in range(len(held.x))]

    def probs_of(compiled, data) -> np.ndarray:
        out = compiled.outputs[0]
        return np.concatenate([np.asarray(compiled(img)[out]) for img, _ in data])

    scored = itertools.count(1)

    def validate(compiled, data) -> tuple[float, list[float]]:
        data = list(data)
        p = probs_of(compiled, data)
        idx = np.array([i for _, i in data])
        sub = HeldOut(held.x[idx], held.ref[idx], held.labels[idx])
        score = sub.score(p)
        # NNCF's steps run silently for minutes: each scored model is a line
        progress.note(f"  int8 OpenVINO accuracy control: model {next(scored)} on {len(idx)} held-out images: "
                      f"agreement {score['agreement']:.2%}, accuracy {0.0 - score['accuracy_drop_pts']:+.2f} pts")
        return quality(score), [float(a == b) for a, b in zip(p.argmax(1), sub.top)]

    with quiet.nncf_quiet():
        # the plain quantization of the same fixed-batch model, to name what accuracy control reverted
        # (openvino.quantize_int8 returns a dynamic-batch model, whose shape ops would count as reverted)
        plain = quantized_ops(nncf.quantize(model, nncf.Dataset(list(calib), lambda im: im[None].astype(np.float32)),
                                            subset_size=len(calib), **nncf_options()))
        q = nncf.quantize_with_accuracy_control(
            model, nncf.Dataset(list(calib), lambda im: im[None].astype(np.float32)), nncf.Dataset(items), validate,
            max_drop=max_drop_pts / 100, drop_type=nncf.DropType.ABSOLUTE, subset_size=len(calib),
            **nncf_options(accuracy_control=True))
    kept = quantized_ops(q)
    score = held.score(probs_of(_compile(q), items))
    q.reshape([-1, size, size, 3])
    reverted = sorted(plain - kept)
    return q, {"method": "NNCF quantize_with_accuracy_control (operations reverted to float by their effect on "
                         "held-out agreement and accuracy)", "max_drop_pts": max_drop_pts,
               "held_out_images": int(len(held.x)), "metric": METRIC, "float_ops": reverted,
               "float_nodes": len(reverted), "held_out_agreement": score["agreement"],
               "held_out_flip_estimate": score["flip_estimate"], "held_out_flip_bound": score["flip_bound"],
               "held_out_accuracy_drop_pts": score["accuracy_drop_pts"], "within_budget": within(score, max_drop_pts)}


def quantized_ops(model) -> set[str]:
    """Names of the operations fed by a FakeQuantize (the ones that run in int8)."""
    out = set()
    for op in model.get_ops():
        if op.get_type_name() == "FakeQuantize":
            for target in op.output(0).get_target_inputs():
                out.add(target.get_node().get_friendly_name())
    return out


def _compile(model):
    _, ie = core()
    return ie.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
