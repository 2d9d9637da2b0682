"""`mri-edge predict`: classify image files with any model kind."""

from __future__ import annotations

import glob
import json
import time
from pathlib import Path

from . import preprocess, runtime, trust
from .data import is_junk, list_images
from .errors import MriEdgeError


class PredictError(MriEdgeError):
    """Images to classify that cannot be found."""


def expand_inputs(items) -> list[Path]:
    """Files as named (a bad one is reported when read), the images in folders, and the images
    among what a pattern matches, its folders walked as folders are (not the readme.txt beside them)."""
    out: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():  # the images in it as a dataset's class folder is read: no hidden or OS debris
            out += list_images(p)
        elif p.exists():
            out.append(p)
        else:
            matches = sorted(Path(m) for m in glob.glob(item, recursive=True))
            if not matches and any(c in str(item) for c in "*?["):
                raise PredictError(f"{item}: the pattern matches no file")
            if not matches:
                out.append(p)  # a missing file: said so when it is read
                continue
            images = [q for m in matches for q in (list_images(m) if m.is_dir() else
                                                   [] if is_junk(Path(m.name)) else [m])]
            if not images:
                raise PredictError(f"{item}: the pattern matches no image file "
                                   f"({', '.join(sorted(preprocess.IMAGE_SUFFIXES))})")
            out += images
    return out


def short_path(p, width: int = 50) -> str:
    """The path's last components that fit in `width` (never cut inside a name), '…/' in front."""
    text = str(p)
    if len(text) <= width:
        return text
    parts = Path(text).parts
    out = parts[-1]
    for part in reversed(parts[:-1]):
        if len(part) + len(out) + 3 > width:
            break
        out = f"{part}/{out}"
    return "…/" + out


def run(model: runtime.Model, paths: list[Path], top_k: int, as_json: bool, emit) -> int:
    """Classify each path; a bad image is reported and skipped. Returns the failure count."""
    failed = 0
    if not as_json:
        emit(f"model: {model.path.name} (runtime {model.runtime_name}); classes: {', '.join(model.class_names)}")
        if model.trust:
            t = model.trust
            emit(f"calibrated: temperature {t.temperature:.3f}"
                 + (f"; answers below p {trust.threshold_text(t.threshold)} are marked '{trust.REVIEW}'"
                    if t.threshold is not None
                    else "")
                 + (f"; prediction sets at {1 - t.alpha:.0%} coverage" if t.conformal_q is not None else "")
                 + (f"; images farther than {t.familiarity['limit']:.2f} from the training images' features are "
                    "referred" if t.familiarity and model.has_features else ""))
        else:
            emit(trust.NOT_CALIBRATED)
        emit(f"{'image':50s} {'prediction':22s} {'p':>6s}  top-{min(top_k, len(model.class_names))}")
    t0 = time.perf_counter()
    for p in paths:
        try:
            r = model.predict(p)
        except preprocess.ImageError as e:
            failed += 1
            if as_json:
                emit(json.dumps({"image": str(p), "error": str(e)}))
            else:
                emit(f"{short_path(p):50s} ERROR: {str(e).removeprefix(f'{p}: ')}")
            continue
        top = r.top(top_k)
        if as_json:
            emit(json.dumps({"image": str(p), "label": r.label, "index": r.index, "probabilities": r.probabilities,
                             "top_k": top, "calibrated": r.calibrated, "uncertain": r.uncertain,
                             "threshold": model.trust.threshold if model.trust else None,
                             "prediction_set": r.prediction_set, "set_coverage": r.set_coverage,
                             "warnings": r.warnings, "feature_distance": r.distance,
                             "timing_ms": {k: round(v, 3) for k, v in r.timing_ms.items()}}))
        else:
            extra = ""
            if r.prediction_set is not None:
                extra += f"  {trust.set_text(r.prediction_set, r.set_coverage)}"
            if r.uncertain:
                extra += f"  [{trust.review_text(r.warnings)}]"
            emit(f"{short_path(p):50s} {r.label:22s} {r.probabilities[r.label]:6.3f}  "
                 + ", ".join(f"{n} {v:.3f}" for n, v in top) + f"  ({r.timing_ms['total']:.1f} ms){extra}")
    if not as_json:
        emit(f"{len(paths) - failed} classified, {failed} failed, {time.perf_counter() - t0:.2f} s")
    return failed
