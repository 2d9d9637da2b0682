"""Accuracy-aware int8 (`export --max-drop PTS`): keep the parts of the graph that move
decisions most in float until the int8 file agrees with the Keras model on held-out images
within the budget. The recipe (what stayed in float, why, what it cost) goes into the file's
metadata.

- OpenVINO: NNCF's `quantize_with_accuracy_control`, which ranks quantized operations by
  their effect on the metric and reverts them one by one (the maintained tool for this).
- ONNX: NNCF's ONNX path writes per-channel activation zero points on this graph's
  pooling-as-depthwise convolutions, which onnxruntime cannot run, so the search is done
  here over onnxruntime's own quantizer (`nodes_to_exclude`): stages of the graph (stem,
  dense blocks, head) are measured one at a time, then kept in float in order of agreement
  gained per multiply-accumulate given up, until the budget holds.

Held-out images: the run's validation split with its Keras probabilities (the grouped split
when the run was trained with `--val-split grouped`, so that they behave like new subjects).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..quiet import nncf_quiet
from .formats import ExportError

STAGE = re.compile(r"(conv[1-5]|pool[1-4])")


def onnx_agreement(path: Path, x: np.ndarray, ref_top: np.ndarray, threads: int | None = None) -> float:
    """Top-1 agreement of an ONNX file with the reference classes on the held-out images."""
    import onnxruntime as ort  # noqa: PLC0415

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    probs = np.concatenate([sess.run(None, {name: x[i:i + 64].astype(np.float32)})[0] for i in range(0, len(x), 64)])
    return float((probs.argmax(1) == ref_top).mean())


def onnx_stages(model_path: Path) -> dict[str, dict]:
    """The graph's nodes grouped by stage (DenseNet's conv1-conv5 and transitions, then the
    head after global pooling; other graphs get 'body' and 'head'), with each stage's share
    of the convolution multiply-accumulates."""
    import onnx  # noqa: PLC0415
    from onnx import numpy_helper, shape_inference  # noqa: PLC0415

    model = shape_inference.infer_shapes(onnx.load(str(model_path)))
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in list(model.graph.value_info) + list(model.graph.output)}
    weights = {t.name: numpy_helper.to_array(t).shape for t in model.graph.initializer}
    stages: dict[str, dict] = {}
    current, in_head = "body", False
    for node in model.graph.node:
        if node.op_type in ("GlobalAveragePool", "ReduceMean"):
            in_head = True
        if in_head:
            stage = "head"
        else:
            m = STAGE.search(node.name)
            if m:
                current = {"pool2": "conv2", "pool3": "conv3", "pool4": "conv4", "pool1": "conv1"}.get(m.group(1),
                                                                                                   m.group(1))
            stage = current
        s = stages.setdefault(stage, {"nodes": [], "macs": 0})
        s["nodes"].append(node.name)
        if node.op_type == "Conv" and len(node.input) > 1 and node.input[1] in weights:
            out = shapes.get(node.output[0]) or []
            spatial = int(np.prod(out[2:])) if len(out) > 2 and all(out[2:]) else 1
            s["macs"] += int(np.prod(weights[node.input[1]])) * spatial
        elif node.op_type in ("Gemm", "MatMul") and len(node.input) > 1 and node.input[1] in weights:
            s["macs"] += int(np.prod(weights[node.input[1]]))
    total = sum(s["macs"] for s in stages.values()) or 1
    for s in stages.values():
        s["mac_share"] = s["macs"] / total
    return stages


def onnx_accuracy_aware(fp32_path: Path, out_path: Path, calib: np.ndarray, val: tuple[np.ndarray, np.ndarray],
                        max_drop_pts: float, calib_range: str, threads: int | None, workdir: Path,
                        float_head: bool = False) -> dict:
    """Write the cheapest int8 file found within the budget to out_path; returns its recipe.
    float_head: the head is in float in every candidate (`--float-head`)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process  # noqa: PLC0415

    from .onnx import onnx_int8  # noqa: PLC0415

    x, ref = val
    top = ref.argmax(1)
    budget = 1 - max_drop_pts / 100
    pre = workdir / "aware_pre.onnx"
    quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)  # node names as the quantizer sees them
    stages = onnx_stages(pre)

    base = ["head"] if float_head and "head" in stages else []

    def file_of(kept: list[str]) -> Path:
        return workdir / f"aware_{'_'.join(dict.fromkeys(base + kept)) or 'plain'}.onnx"

    def attempt(kept: list[str]) -> float:
        nodes = [n for s in dict.fromkeys(base + kept) for n in stages[s]["nodes"]]
        path = file_of(kept)
        onnx_int8(pre, path, calib, calib_range, threads=threads, workdir=workdir, nodes_to_exclude=nodes)
        return onnx_agreement(path, x, top, threads)

    steps = [{"float_stages": list(base), "agreement": attempt([]),
              "float_mac_share": sum(stages[k]["mac_share"] for k in base)}]
    chosen = steps[0]
    if steps[0]["agreement"] < budget:
        alone = {s: attempt([s]) - steps[0]["agreement"] for s in stages if s not in base}
        # agreement gained per share of the compute given back to float (the head costs ~nothing)
        order = sorted((s for s in stages if alone[s] > 0 and s not in base),
                       key=lambda s: -alone[s] / max(stages[s]["mac_share"], 1e-4))
        kept: list[str] = list(base)
        for s in order:
            kept.append(s)
            step = {"float_stages": list(kept), "agreement": attempt(kept),
                    "float_mac_share": sum(stages[k]["mac_share"] for k in dict.fromkeys(kept))}
            steps.append(step)
            if step["agreement"] >= budget:
                break
        chosen = max(steps, key=lambda st: (st["agreement"] >= budget, -st["float_mac_share"] if
                                             st["agreement"] >= budget else st["agreement"]))
        for st in steps:
            st["alone_gain"] = {s: alone[s] for s in st["float_stages"] if s in alone}
    file_of(chosen["float_stages"]).replace(out_path)
    return {"method": "onnxruntime quantize_static with nodes_to_exclude, stages searched on held-out images",
            "max_drop_pts": max_drop_pts, "held_out_images": int(len(x)),
            "metric": "top-1 agreement with Keras on the validation split",
            "float_stages": chosen["float_stages"],
            "float_nodes": sum(len(stages[s]["nodes"]) for s in chosen["float_stages"]),
            "float_mac_share": chosen["float_mac_share"], "held_out_agreement": chosen["agreement"],
            "plain_agreement": steps[0]["agreement"], "within_budget": chosen["agreement"] >= budget,
            "steps": steps, "stages": {s: {"nodes": len(v["nodes"]), "mac_share": v["mac_share"]}
                                       for s, v in stages.items()}}


def openvino_accuracy_aware(fp32_onnx: Path, calib: np.ndarray, val: tuple[np.ndarray, np.ndarray],
                            max_drop_pts: float):
    """(int8 OpenVINO model, recipe) from NNCF's quantization with accuracy control."""
    import nncf  # noqa: PLC0415

    from .openvino import from_onnx  # noqa: PLC0415

    x, ref = val
    top = ref.argmax(1)
    model = from_onnx(fp32_onnx)
    size = int(calib.shape[1])
    model.reshape([1, size, size, 3])

    def validate(compiled, items) -> tuple[float, list[float]]:
        out = compiled.outputs[0]
        per = [float(compiled(img)[out].argmax() == k) for img, k in items]
        return float(np.mean(per)), per

    with nncf_quiet():
        # the plain quantization of the same fixed-batch model, to name what accuracy control reverted
        # (openvino.quantize_int8 returns a dynamic-batch model, whose shape ops would count as reverted)
        plain = quantized_ops(nncf.quantize(model, nncf.Dataset(list(calib), lambda im: im[None].astype(np.float32)),
                                            subset_size=len(calib), preset=nncf.QuantizationPreset.PERFORMANCE))
        q = nncf.quantize_with_accuracy_control(
            model, nncf.Dataset(list(calib), lambda im: im[None].astype(np.float32)),
            nncf.Dataset([(x[i][None].astype(np.float32), int(top[i])) for i in range(len(x))]), validate,
            max_drop=max_drop_pts / 100, drop_type=nncf.DropType.ABSOLUTE,
            preset=nncf.QuantizationPreset.PERFORMANCE, subset_size=len(calib))
    kept = quantized_ops(q)
    compiled = _compile(q)
    agreement = validate(compiled, [(x[i][None].astype(np.float32), int(top[i])) for i in range(len(x))])[0]
    q.reshape([-1, size, size, 3])
    reverted = sorted(plain - kept)
    return q, {"method": "NNCF quantize_with_accuracy_control (operations reverted to float by their effect on "
                         "held-out agreement)", "max_drop_pts": max_drop_pts, "held_out_images": int(len(x)),
               "metric": "top-1 agreement with Keras on the validation split", "float_ops": reverted,
               "float_nodes": len(reverted), "held_out_agreement": agreement,
               "within_budget": agreement >= 1 - max_drop_pts / 100}


def quantized_ops(model) -> set[str]:
    """Names of the operations fed by a FakeQuantize (the ones that run in int8)."""
    out = set()
    for op in model.get_ops():
        if op.get_type_name() == "FakeQuantize":
            for target in op.output(0).get_target_inputs():
                out.add(target.get_node().get_friendly_name())
    return out


def _compile(model):
    from ..ov import core  # noqa: PLC0415

    _, ie = core()
    return ie.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})


def onnx_layer_errors(fp32_path: Path, int8_path: Path, x: np.ndarray, ref_top: np.ndarray, workdir: Path,
                      n: int = 64) -> dict:
    """Per-tensor error of an int8 ONNX file against its fp32 source on n held-out images, in
    graph order: SQNR (dB) and relative error ||q - f|| / ||f||, on all images and on those
    whose top-1 class flips, through onnxruntime's QDQ debugger (qdq_loss_debug).

    The debugger's own per-tensor "qdq" error is left out: where the quantizer folds a Relu
    into the quantization of a convolution's output, it compares the value before the Relu
    with the one after it (about 3 dB on every Relu of DenseNet), which is not an error."""
    import onnx  # noqa: PLC0415
    from onnxruntime.quantization import CalibrationDataReader  # noqa: PLC0415
    from onnxruntime.quantization.qdq_loss_debug import (  # noqa: PLC0415
        collect_activations, modify_model_output_intermediate_tensors)
    from onnxruntime.quantization.shape_inference import quant_pre_process  # noqa: PLC0415

    class Reader(CalibrationDataReader):
        def __init__(self, imgs):
            self.it = iter(imgs)

        def get_next(self):
            v = next(self.it, None)
            return None if v is None else {"image": v[None].astype(np.float32)}

    idx = np.sort(np.random.default_rng(0).permutation(len(x))[:n])
    pre = workdir / "debug_pre.onnx"
    quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
    modify_model_output_intermediate_tensors(pre, workdir / "debug_f.onnx")
    modify_model_output_intermediate_tensors(int8_path, workdir / "debug_q.onnx")
    fa = collect_activations(str(workdir / "debug_f.onnx"), Reader(x[idx]))
    qa = collect_activations(str(workdir / "debug_q.onnx"), Reader(x[idx]))
    out_name = onnx.load(str(pre)).graph.output[0].name
    flips = np.array([q.argmax() != r for q, r in zip(qa[out_name], ref_top[idx])]) if out_name in qa else \
        np.zeros(len(idx), bool)
    order = [o for node in onnx.load(str(pre)).graph.node for o in node.output]
    rows = []
    for depth, name in enumerate(t for t in order if t in fa and t in qa):
        f = np.stack([np.ravel(a) for a in fa[name]]).astype(np.float64)
        q = np.stack([np.ravel(a) for a in qa[name]]).astype(np.float64)
        if f.shape != q.shape:
            continue
        rel = np.linalg.norm(q - f, axis=1) / np.maximum(np.linalg.norm(f, axis=1), 1e-12)
        rows.append({"depth": depth, "tensor": name, "sqnr_db": float(-20 * np.log10(max(np.median(rel), 1e-12))),
                     "relative_error": float(rel.mean()),
                     "relative_error_flipped": float(rel[flips].mean()) if flips.any() else None,
                     "relative_error_kept": float(rel[~flips].mean()) if (~flips).any() else None})
    return {"images": int(len(idx)), "flipped": int(flips.sum()), "tensors": rows}


def layer_report(run, log=print) -> dict:
    """Per-layer error report of the run's int8 ONNX file against its fp32 ONNX file on the
    validation split (verify/quant_debug.md, .json, .png)."""
    import tempfile  # noqa: PLC0415

    from .. import report  # noqa: PLC0415
    from ..keras_model import validation_reference  # noqa: PLC0415

    fp32, int8 = run.exports_dir / "model_fp32.onnx", run.exports_dir / "model_int8.onnx"
    if not (fp32.is_file() and int8.is_file()):
        raise ExportError("--debug-quant compares exports/model_int8.onnx with exports/model_fp32.onnx; export both "
                          "(mri-edge export RUN --format onnx)")
    ref, x = validation_reference(run.path, log, with_images=True)
    with tempfile.TemporaryDirectory() as td:
        out = onnx_layer_errors(fp32, int8, x, np.asarray(ref["probs"]).argmax(1), Path(td))
    d = run.path / "verify"
    d.mkdir(exist_ok=True)
    report.write_json(d / "quant_debug.json", out)
    rows = out["tensors"]
    plt = report._plt()
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.plot([r["depth"] for r in rows], [r["relative_error"] for r in rows], lw=1, label="all images")
    if out["flipped"]:
        ax.plot([r["depth"] for r in rows], [r["relative_error_flipped"] for r in rows], lw=1,
                label=f"the {out['flipped']} flipped images")
    ax.set_xlabel("tensor (graph order)")
    ax.set_ylabel("relative error ||q - f|| / ||f||")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    ax.set_title("int8 ONNX against fp32 ONNX, validation images")
    report.save_figure(fig, d / "quant_debug.png")
    worst = sorted(rows, key=lambda r: -r["relative_error"])[:15]
    report.write_text(d / "quant_debug.md", "\n".join([
        "# Per-layer int8 error (ONNX)", "",
        f"{out['images']} validation images, {out['flipped']} of them flip their top-1 class under int8. Relative "
        "error of each tensor of `model_int8.onnx` against the same tensor of `model_fp32.onnx`, in graph order.", "",
        "![relative error by depth](quant_debug.png)", "", "Largest errors:", "",
        report.md_table(["depth", "tensor", "SQNR dB", "relative error", "on flipped images", "on the others"],
                        [[r["depth"], f"`{r['tensor']}`", f"{r['sqnr_db']:.1f}", f"{r['relative_error']:.4f}",
                          "" if r["relative_error_flipped"] is None else f"{r['relative_error_flipped']:.4f}",
                          "" if r["relative_error_kept"] is None else f"{r['relative_error_kept']:.4f}"]
                         for r in worst]), ""]))
    log(f"per-layer int8 error: {d / 'quant_debug.md'}")
    return out
