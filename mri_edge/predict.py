"""`mri-edge predict`: classify image files with any model kind."""

from __future__ import annotations

import glob
import json
import time
from pathlib import Path

from . import preprocess, runtime, trust
from .errors import MriEdgeError


class PredictError(MriEdgeError):
    """Images to classify that cannot be found."""


def expand_inputs(items) -> list[Path]:
    out: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            # hidden folders (.ipynb_checkpoints copies and the like) are not scans to classify
            out += sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in preprocess.IMAGE_SUFFIXES
                          and not any(part.startswith(".") for part in q.relative_to(p).parts))
        elif p.exists():
            out.append(p)
        else:
            matches = sorted(Path(m) for m in glob.glob(item, recursive=True))
            if not matches and any(c in str(item) for c in "*?["):
                raise PredictError(f"{item}: the pattern matches no file")
            # a pattern, like a folder, picks the images among what it matches (not readme.txt beside them)
            images = [m for m in matches if m.is_file() and m.suffix.lower() in preprocess.IMAGE_SUFFIXES]
            if matches and not images:
                raise PredictError(f"{item}: the pattern matches no image file "
                                   f"({', '.join(sorted(preprocess.IMAGE_SUFFIXES))})")
            out += images if matches else [p]
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
        emit(f"model: {model.path.name} [{model.runtime_name}], classes: {', '.join(model.class_names)}")
        if model.trust:
            t = model.trust
            emit(f"calibrated: temperature {t.temperature:.3f}"
                 + (f"; answers below p {t.threshold:.4f} are marked '{trust.REVIEW}'" if t.threshold is not None
                    else "")
                 + (f"; prediction sets at {1 - t.alpha:.0%} coverage" if t.conformal_q is not None else "")
                 + (f"; images farther than {t.familiarity['limit']:.2f} from the training images' features are "
                    "referred" if t.familiarity and model.has_features else ""))
        else:
            emit("not calibrated: probabilities are the model's raw softmax (run `mri-edge calibrate`)")
        emit(f"{'image':50s} {'prediction':22s} {'p':>6s}  top-{top_k}")
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
                extra += f"  set ({r.set_coverage:.0%}): {' or '.join(r.prediction_set)}"
            if r.uncertain:
                extra += f"  [{trust.REVIEW}{': ' + '; '.join(r.warnings) if r.warnings else ''}]"
            emit(f"{short_path(p):50s} {r.label:22s} {r.probabilities[r.label]:6.3f}  "
                 + ", ".join(f"{n} {v:.3f}" for n, v in top) + f"  ({r.timing_ms['total']:.1f} ms){extra}")
    if not as_json:
        emit(f"{len(paths) - failed} classified, {failed} failed, {time.perf_counter() - t0:.2f} s")
    return failed
