"""Where a model looked: occlusion maps through any runtime, Grad-CAM for .keras, overlay PNGs,
and the parity of explanations between a model and its exported files.

Occlusion is gradient-free: each cell of a grid x grid partition of the image is set to black
(the background of these scans) in turn and the drop of the explained class's probability
is that cell's importance. It needs only forward passes, so the same code explains a .keras
model, an int8 .tflite file and an OpenVINO .xml through the runtime a device uses, and the
maps of two files can be compared cell by cell. Grad-CAM (Selvaraju et al. 2017) needs
gradients, so it is offered for .keras files only (TensorFlow backend).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import quiet
from .config import OCCLUSION_GRID
from .errors import MriEdgeError
from .files import atomic_write_bytes, sha256_file

TOP_SHARE = 0.1  # "top 10% of pixels" of the overlap measure
FLAT = 1e-6  # a map whose probability drops span no more than this is flat (rank_correlation)
# a strongest cell that moves p by less than a point: the answer rests on no single region (peak_text)
WEAK_DROP = 0.01


class ExplainError(MriEdgeError):
    pass


def occlusion_batch(image: np.ndarray, grid: int = OCCLUSION_GRID) -> np.ndarray:
    """(grid*grid + 1, S, S, 3) uint8: the image itself, then one copy per blacked-out cell."""
    s = image.shape[0]
    edges = np.linspace(0, s, grid + 1).round().astype(int)
    out = np.repeat(image[None], grid * grid + 1, axis=0)
    for i in range(grid):
        for j in range(grid):
            out[1 + i * grid + j, edges[i]:edges[i + 1], edges[j]:edges[j + 1]] = 0
    return out


def occlusion(model, image: np.ndarray, target: int | None = None, grid: int = OCCLUSION_GRID,
              with_p: bool = False):
    """((grid, grid) importance map, explained class): probability drop of `target` (default:
    the model's own top class) when each cell is blacked out. The graph's probabilities, before
    any stored temperature: the map verify compares across files, which a temperature would
    reshape file by file. with_p: also the graph's probability of target on the whole image."""
    # one call of the graph: grid**2 + 1 images, a bounded batch, which a Keras model runs faster
    # whole than in `run`'s chunks (128 px: 1.58 against 2.42 s a map)
    probs = model.run_batch(occlusion_batch(image, grid))
    if target is None:
        target = int(probs[0].argmax())
    heat = (probs[0, target] - probs[1:, target]).reshape(grid, grid).astype(np.float32)
    return (heat, target, float(probs[0, target])) if with_p else (heat, target)


def occlusion_maps(model, images: np.ndarray, idx, targets, name: str) -> list[np.ndarray]:
    """The occlusion map of class targets[k] on images[idx[k]] through model, with a progress
    line (verify: the Keras model's maps, then each file's)."""
    from .progress import Progress  # noqa: PLC0415

    maps = []
    with Progress(len(idx), f"{name} occlusion maps ({OCCLUSION_GRID}x{OCCLUSION_GRID}) on {len(idx)} images") as bar:
        for i, t in zip(idx, targets):
            maps.append(occlusion(model, images[i], int(t))[0])
            bar.update()
    return maps


def gradcam(model, image: np.ndarray, target: int | None = None) -> tuple[np.ndarray, int]:
    """((h, w) Grad-CAM map at DenseNet121's last feature map, explained class) for a .keras model."""
    import keras  # noqa: PLC0415

    if keras.backend.backend() != "tensorflow":
        raise ExplainError("Grad-CAM needs KERAS_BACKEND=tensorflow; use --method occlusion")
    import tensorflow as tf  # noqa: PLC0415

    from .model import BASE_NAME  # noqa: PLC0415

    net = model.net
    try:
        base = net.get_layer(BASE_NAME)
    except ValueError:
        raise ExplainError(f"{model.path}: no DenseNet121 base layer to take Grad-CAM at; use --method occlusion") \
            from None
    x = tf.convert_to_tensor(image[None].astype(np.float32))
    with tf.GradientTape() as tape:
        h = x
        features = None
        for layer in net.layers[1:]:  # input -> normalisation -> base -> head, one layer at a time
            h = layer(h, training=False)
            if layer is base:
                features = h
                tape.watch(features)
        probs = h
        if target is None:
            target = int(tf.argmax(probs[0]))
        score = probs[0, target]
    grads = tape.gradient(score, features)
    weights = tf.reduce_mean(grads, axis=(1, 2))[0]
    cam = tf.nn.relu(tf.reduce_sum(features[0] * weights, axis=-1))
    return np.asarray(cam, np.float32), target


def _cv2():
    from . import preprocess  # noqa: PLC0415

    cv2 = preprocess._cv2()
    if cv2 is None:
        raise ExplainError("explanations need OpenCV (pip install opencv-python-headless)")
    return cv2


def upsample(heat: np.ndarray, size: int) -> np.ndarray:
    cv2 = _cv2()
    return cv2.resize(heat.astype(np.float32), (size, size), interpolation=cv2.INTER_LINEAR)


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """RGB uint8: the image with the map in a jet colour map on top, 0 (and below: cells whose
    blacking-out raises p) blue and the map's own largest value red, so that a cell that changes
    nothing has the same colour on every map."""
    cv2 = _cv2()
    h = upsample(heat, image.shape[0])
    hi = float(h.max())
    h = np.zeros_like(h) if hi < 1e-12 else h.clip(0, None) / hi
    colour = cv2.cvtColor(cv2.applyColorMap((h * 255).astype(np.uint8), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    return (image.astype(np.float32) * (1 - alpha) + colour.astype(np.float32) * alpha).clip(0, 255).astype(np.uint8)


def ranks(a: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1 of a's values, tied values sharing their average rank."""
    _, inverse, counts = np.unique(np.ravel(a), return_inverse=True, return_counts=True)
    start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return (start + (counts - 1) / 2.0)[inverse]


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman correlation of two maps (ties ranked by their average); 1.0 for two flat maps,
    0.0 when only one is flat (a flat map says nothing about where the model looked). Flat: a
    range of at most FLAT, so that float rounding on a saturated answer (drops of 1e-7 where
    Keras's are all 0) is not read as a map."""
    a, b = np.ravel(a), np.ravel(b)
    flat_a, flat_b = np.ptp(a) <= FLAT, np.ptp(b) <= FLAT
    if flat_a and flat_b:
        return 1.0
    if flat_a or flat_b:
        return 0.0
    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def top_overlap(a: np.ndarray, b: np.ndarray, size: int, share: float = TOP_SHARE) -> float:
    """Intersection over union of the top `share` of pixels of two maps upsampled to size x size."""
    ua, ub = upsample(a, size).ravel(), upsample(b, size).ravel()
    k = max(1, int(round(share * ua.size)))
    ta, tb = np.argsort(-ua, kind="stable")[:k], np.argsort(-ub, kind="stable")[:k]
    inter = len(np.intersect1d(ta, tb))
    return inter / (2 * k - inter)


def parity(reference_maps: list[np.ndarray], maps: list[np.ndarray], size: int) -> dict:
    """Rank correlation and top-10% overlap of each image's map against the reference's."""
    rho = np.array([rank_correlation(a, b) for a, b in zip(reference_maps, maps)])
    iou = np.array([top_overlap(a, b, size) for a, b in zip(reference_maps, maps)])
    return {"images": int(len(rho)), "rank_correlation": {"median": float(np.median(rho)), "p10": float(
        np.percentile(rho, 10)), "min": float(rho.min())}, "top10_overlap": {"median": float(np.median(iou)),
                                                                             "p10": float(np.percentile(iou, 10))},
            "per_image_rank_correlation": rho.round(4).tolist()}


def peak_text(method: str, peak: float, short: bool = False) -> str:
    """How much a map scaled to its own largest value weighs: the overlay's last line, and (short)
    the explain.md cell. Occlusion: the largest drop of the graph's p when one cell is blacked out; under
    WEAK_DROP no single cell carries the answer, and the map is labelled weak, as it would
    otherwise look as vivid as one whose cell decides it."""
    if method != "occlusion":
        return f"{peak:.3g}" if short else f"map peak {peak:.3g}"
    if peak <= 0:
        return "none" if short else "no cell lowers the graph's p when blacked out"
    if peak < WEAK_DROP:
        return f"{peak:.4f} (weak)" if short else f"weak map: no cell lowers the graph's p by more than {peak:.4f}"
    return f"{peak:.4f}" if short else f"strongest cell: the graph's p drops by {peak:.4f} when blacked out"


def explain_images(model_path, images: list, out_dir, method: str = "occlusion", grid: int = OCCLUSION_GRID,
                   threads: int | None = None, log=print, unmatched: list[dict] = ()) -> dict:
    """Overlay PNGs (image | map) for each image into out_dir, with explain.json and explain.md;
    unmatched: patterns that named no image (`predict.Inputs`), reported as unreadable images are."""
    cv2 = _cv2()
    from . import preprocess, report, trust  # noqa: PLC0415
    from .backends import open_model  # noqa: PLC0415
    from .predict import calibration_text, notes, single_sets_text  # noqa: PLC0415
    from .progress import Progress  # noqa: PLC0415

    model = open_model(model_path, threads=threads)
    if method == "gradcam" and Path(model.path).suffix != ".keras":
        raise ExplainError(f"{model.path}: Grad-CAM needs gradients, which exported files do not have; use "
                           "--method occlusion (the same method verify compares across files)")
    out_dir = Path(out_dir)
    rows, failed, used, pngs = [], list(unmatched), set(), {}

    def explain_one(src) -> None:
        decoded = preprocess.load_image(src)  # decoded once, as it is: predict's checks look at it so
        # the answer as `predict` gives it: calibrated, referred or not. It runs the image once
        # more than the occlusion batch's first row does (1 of grid**2 + 1 runs), for the features
        # and warnings that predict's checks need and run_batch does not return
        pred = model.predict(decoded)
        img = model.preprocess(decoded)
        if method == "gradcam":
            (heat, target), graph_p = gradcam(model, img), None
        else:
            heat, target, graph_p = occlusion(model, img, grid=grid, with_p=True)
        p = pred.probabilities[model.class_names[target]]
        name = f"{Path(src).stem}_{method}.png"
        if name in used:  # the same file name in another folder (the Alzheimer dataset reuses names across classes)
            name = f"{Path(src).parent.name}_{name}"
            stem, n = name[:-4], 2
            while name in used:
                name, n = f"{stem}_{n}.png", n + 1
        label = (f"{model.class_names[target]} {p:.2f}" + (f" (graph {graph_p:.2f})" if model.trust and graph_p is not None
                                                          else "") + (f": {trust.REVIEW}" if pred.uncertain else ""))
        why = pred.warnings[:1] if pred.uncertain else []  # the first reason, cut below to the width it has
        # each map is scaled to its own largest value: the caption says how much its strongest cell weighs
        peak = peak_text(method, float(heat.max()))
        pair = np.concatenate([img, overlay(img, heat)], axis=1)
        scale = max(1, 256 // img.shape[0])
        pair = cv2.resize(pair, (pair.shape[1] * scale, pair.shape[0] * scale), interpolation=cv2.INTER_NEAREST)
        for y, text in ((16, label), *((34, w) for w in why), (pair.shape[0] - 6, peak)):
            while len(text) > 8 and cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.45, 1)[0][0] > pair.shape[1] - 8:
                text = text[:-4] + "..."
            cv2.putText(pair, text, (4, y), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1, cv2.LINE_AA)
        ok, png = cv2.imencode(".png", cv2.cvtColor(pair, cv2.COLOR_RGB2BGR))
        if not ok:
            raise ExplainError(f"{src}: the overlay could not be encoded as PNG")
        pngs[name] = png.tobytes()  # written with the report, at the end
        used.add(name)
        rows.append({"image": str(src), "png": name, "class": model.class_names[target],
                     "probability": p, **({"graph_probability": round(graph_p, 6)} if graph_p is not None else {}),
                     "uncertain": pred.uncertain, "warnings": pred.warnings,
                     "prediction_set": pred.prediction_set, "set_coverage": pred.set_coverage,
                     "map_max": round(float(heat.max()), 6), "map": heat.astype(np.float64).round(5).tolist()})

    interrupted = False
    with Progress(len(images), f"explain ({method}) on {len(images)} image(s)") as bar:
        for src in images:
            try:
                explain_one(src)
            except preprocess.ImageError as e:  # the message names the file
                failed.append({"image": str(src), "error": str(e)})
            except KeyboardInterrupt:  # the overlays finished so far are written with their report, then it stops
                if not rows:
                    raise
                interrupted = True
                break
            bar.update()
    if not rows:
        why = "; ".join(f["error"] for f in failed[:3]) + (f"; {len(failed) - 3} more" if len(failed) > 3 else "")
        raise ExplainError(f"no image could be read ({why})" if failed else "no image given")
    for f in failed:
        log(f"skipped: {f['error']}")
    try:  # overlays an earlier explain wrote here and this one did not: removed once the new report is written
        old = json.loads((out_dir / "explain.json").read_text())
        earlier = ({r["png"] for r in old["images"]} | set(old.get("kept_from_earlier", []))) - used
    except (OSError, ValueError, KeyError, TypeError):
        earlier = set()
    # sets that say no more than the answer are not shown (`Trust.sets_single`); the note says so
    sets_note = single_sets_text(model.trust) if model.trust and model.trust.sets_single else None
    # which file was explained, as it was then: its model bytes' hash (an exported file's), or the file's
    sha = model.meta.get("model_sha256") or (sha256_file(model.path) if Path(model.path).is_file() else None)
    out = {"model": str(model.path), "model_sha256": sha,
           "runtime": model.runtime_name, "method": method, "sets_note": sets_note,
           # interrupted: an earlier explain's overlays stay (named here, so that the next one removes them)
           "interrupted": interrupted, "kept_from_earlier": sorted(earlier) if interrupted else [],
           "grid": grid if method == "occlusion" else None, "images": rows, "failed": failed}
    md = ["# Explanations", "", f"`{Path(model.path).name}` [{model.runtime_name}], method **{method}**"
          + (f" ({grid}x{grid} cells blacked out in turn; importance = drop of the class's probability)"
             if method == "occlusion" else " (gradients at DenseNet121's last feature map)"), ""]
    md += [calibration_text(model) + ".", ""]
    occl = method == "occlusion"
    md += ["Each map is scaled to its own largest value (red; 0 and below blue), so a weak map looks as vivid as a "
           "strong one: " + (
              "the largest drop (also the overlay's last line) is how far blacking out the strongest cell lowers "
              "the graph's p, the probability before the stored temperature (the map verify compares across files); "
              f"under {WEAK_DROP} the map is marked weak: no single cell carries the answer."
              if occl else "the map peak is its largest value, the ReLU of the gradient-weighted sum of DenseNet121's "
              "last feature maps (no unit: compare it between images of one model only)."), "",
           report.md_table(["image", "class", "p"] + (["graph's p"] if occl else [])
                           + ["largest drop" if occl else "map peak", "prediction set", "review"], [
              [f"[{(Path(Path(r['image']).parent.name) / Path(r['image']).name).as_posix()}](<{r['png']}>)", r["class"],
               f"{r['probability']:.3f}"] + ([f"{r['graph_probability']:.4f}"] if occl else [])
              + [peak_text(method, r["map_max"], short=True), *notes(r, model)] for r in rows]), ""]
    if failed:
        md += ["Not read:", "", *[f"- {f['error']}" for f in failed], ""]
    if interrupted:
        md += [f"Interrupted after {len(rows) + len(failed) - len(unmatched)} of {len(images)} images"
               + ("; the overlays of an earlier explain here are kept." if earlier else "."), ""]
    md += [f"![{r['png']}](<{r['png']}>)" for r in rows[:16]] + [""]
    with quiet.signals_deferred():  # overlays and the report that describes them change together
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in (r["png"] for r in rows):
            atomic_write_bytes(out_dir / name, pngs[name])
        report.write_json(out_dir / "explain.json", out)
        report.write_text(out_dir / "explain.md", "\n".join(md))
        for name in () if interrupted else earlier:
            if isinstance(name, str) and Path(name).name == name and name.endswith(".png"):  # only a file of ours
                (out_dir / name).unlink(missing_ok=True)
    if interrupted:
        raise KeyboardInterrupt
    return out
