"""Per-layer int8 error (`verify --debug-quant`): each tensor of the int8 ONNX file against the
same tensor of the fp32 ONNX file on validation images, as Markdown, JSON and a PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .formats import ExportError, file_name


def onnx_layer_errors(fp32_path: Path, int8_path: Path, x: np.ndarray, ref_top: np.ndarray, workdir: Path,
                      n: int = 64) -> dict:
    """Per-tensor error of an int8 ONNX file against its fp32 source on n held-out images, in
    graph order: SQNR (dB) and relative error ||q - f|| / ||f||, on all images and on those
    whose top-1 class flips, through onnxruntime's QDQ debugger (qdq_loss_debug).

    The debugger's own per-tensor "qdq" error is left out: where the quantizer folds a Relu
    into the quantization of a convolution's output, it compares the value before the Relu
    with the one after it (about 3 dB on every Relu of DenseNet), which is not an error. In
    that int8 graph the Relu's output name belongs to the convolution's output, before the Relu
    (the QuantizeLinear after it clamps at zero): it is compared after a Relu here."""
    import onnx  # noqa: PLC0415
    from onnxruntime.quantization import CalibrationDataReader  # noqa: PLC0415
    from onnxruntime.quantization.qdq_loss_debug import (  # noqa: PLC0415
        collect_activations, modify_model_output_intermediate_tensors)

    from .onnx import pre_process  # noqa: PLC0415

    class Reader(CalibrationDataReader):
        def __init__(self, imgs):
            self.it = iter(imgs)

        def get_next(self):
            v = next(self.it, None)
            return None if v is None else {"image": v[None].astype(np.float32)}

    idx = np.sort(np.random.default_rng(0).permutation(len(x))[:n])
    pre = pre_process(fp32_path, workdir / "debug_pre.onnx")  # the graph the int8 file was quantized from
    modify_model_output_intermediate_tensors(pre, workdir / "debug_f.onnx")
    modify_model_output_intermediate_tensors(int8_path, workdir / "debug_q.onnx")
    fa = collect_activations(str(workdir / "debug_f.onnx"), Reader(x[idx]))
    qa = collect_activations(str(workdir / "debug_q.onnx"), Reader(x[idx]))
    pre_graph = onnx.load(str(pre)).graph
    out_name = pre_graph.output[0].name
    flips = np.array([q.argmax() != r for q, r in zip(qa[out_name], ref_top[idx])]) if out_name in qa else \
        np.zeros(len(idx), bool)
    order = [o for node in pre_graph.node for o in node.output]
    relu_f = {o for node in pre_graph.node if node.op_type == "Relu" for o in node.output}
    relu_q = {o for node in onnx.load(str(int8_path)).graph.node if node.op_type == "Relu" for o in node.output}
    rows = []
    for depth, name in enumerate(t for t in order if t in fa and t in qa):
        f = np.stack([np.ravel(a) for a in fa[name]]).astype(np.float64)
        q = np.stack([np.ravel(a) for a in qa[name]]).astype(np.float64)
        if f.shape != q.shape:
            continue
        if name in relu_f and name not in relu_q:
            q = np.maximum(q, 0)
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

    fp32, int8 = (run.exports_dir / file_name("onnx", q) for q in ("none", "int8"))
    if not (fp32.is_file() and int8.is_file()):
        raise ExportError(f"--debug-quant compares exports/{int8.name} with exports/{fp32.name}; export both "
                          "(mri-edge export RUN --format onnx)")
    ref, x = validation_reference(run.path, log, with_images=True)
    with tempfile.TemporaryDirectory() as td:
        out = onnx_layer_errors(fp32, int8, x, np.asarray(ref["probs"]).argmax(1), Path(td))
    d = run.verify_dir()
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
        f"error of each tensor of `{int8.name}` against the same tensor of `{fp32.name}`, in graph order.", "",
        "![relative error by depth](quant_debug.png)", "", "Largest errors:", "",
        report.md_table(["depth", "tensor", "SQNR dB", "relative error", "on flipped images", "on the others"],
                        [[r["depth"], f"`{r['tensor']}`", f"{r['sqnr_db']:.1f}", f"{r['relative_error']:.4f}",
                          "" if r["relative_error_flipped"] is None else f"{r['relative_error_flipped']:.4f}",
                          "" if r["relative_error_kept"] is None else f"{r['relative_error_kept']:.4f}"]
                         for r in worst]), ""]))
    log(f"per-layer int8 error: {d / 'quant_debug.md'}")
    return out
