"""`mri-edge predict`: classify image files with any model kind."""

from __future__ import annotations

import glob
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import preprocess, quiet, runtime, trust
from .data import is_hidden, is_junk, list_images
from .errors import MriEdgeError


class PredictError(MriEdgeError):
    """Arguments that name no image at all."""


@dataclass
class Inputs:
    """What the IMAGES arguments name: the files to read, the patterns that name no image (each a
    failure, reported as an unreadable file is: {"image", "error"}) and, per folder, the files in
    it that are not read (not images by their suffix)."""

    paths: list[Path] = field(default_factory=list)
    unmatched: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    noted: set[Path] = field(default_factory=set)  # files a note named already (a pattern may walk a folder twice)


def folder_images(folder: Path, inputs: Inputs) -> list[Path]:
    """The images in a folder, read as a dataset's class folder is (no hidden files or OS debris);
    its other files are named in a note (a scanner's IM0001 has no suffix: name it to read it), and
    a broken link with an image's suffix is kept, to fail when read."""
    unlisted: list[Path] = []
    images = list_images(folder, unlisted)
    if unlisted:  # (a root-owned lost+found on a stick): its images, if any, are not read; the rest are
        inputs.notes.append(f"{folder}: {len(unlisted)} folder(s) not read (permission denied): "
                            + ", ".join(d.as_posix() for d in unlisted[:5]))
    kept = set(images)
    other = sorted(p for p in folder.rglob("*") if p not in kept and not p.is_dir()
                   and not is_hidden(p.relative_to(folder)))
    broken = [p for p in other if p.is_symlink() and not p.exists() and p.suffix.lower() in preprocess.IMAGE_SUFFIXES]
    other = [p for p in other if p not in broken and p not in inputs.noted]
    inputs.noted.update(other)
    if other:
        names = ", ".join(p.relative_to(folder).as_posix() for p in other[:5]) + (", ..." if len(other) > 5 else "")
        inputs.notes.append(f"{folder}: {len(other)} file(s) not read, not images by their suffix ({names}); "
                            "name a file to read it whatever its suffix")
    return sorted(images + broken)


def expand_inputs(items) -> Inputs:
    """Files as named (a bad one is reported when read), the images in folders, and the images
    among what a pattern matches, its folders walked as folders are (not the readme.txt beside them)."""
    out = Inputs()
    for item in items:
        p = Path(item)
        if p.is_dir():
            images = folder_images(p, out)
            if not images:  # a failed row, as a pattern that matches nothing: never dropped unsaid
                out.unmatched.append({"image": str(item), "error": f"{item}: a folder with no image file "
                                      f"({', '.join(sorted(preprocess.IMAGE_SUFFIXES))})"})
            out.paths += images
        elif p.exists() or p.is_symlink():
            out.paths.append(p)  # (a broken link: said so when it is read)
        else:
            matches = sorted(Path(m) for m in glob.glob(item, recursive=True))
            if not matches and any(c in str(item) for c in "*?["):
                out.unmatched.append({"image": str(item), "error": f"{item}: the pattern matches no file"})
                continue
            if not matches:
                out.paths.append(p)  # a missing file: said so when it is read
                continue
            images = [q for m in matches for q in (folder_images(m, out) if m.is_dir() else
                                                   [] if is_junk(Path(m.name)) else [m])]
            if not images:
                out.unmatched.append({"image": str(item), "error": f"{item}: the pattern matches no image file "
                                      f"({', '.join(sorted(preprocess.IMAGE_SUFFIXES))})"})
            out.paths += images
    # a file named twice (itself and its folder, or two patterns) is read once, where first named
    unique: dict[Path, Path] = {}
    for q in out.paths:
        unique.setdefault(q.resolve() if q.exists() else q, q)
    out.paths = list(unique.values())
    return out


def read_inputs(items, note) -> Inputs:
    """`expand_inputs` for predict and explain: its notes given to note(line); arguments that
    name nothing at all are refused."""
    inputs = expand_inputs(items)
    for line in inputs.notes:
        note(line)
    if not inputs.paths and not inputs.unmatched:
        raise PredictError(f"no image files matched {' '.join(map(str, items))}")
    return inputs


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


def record(model: runtime.Model, path: Path, r: runtime.Prediction, top_k: int) -> dict:
    """One image's answer as `--json` prints it and predictions.json keeps it."""
    return {"image": str(path), "model": str(model.path), "runtime": model.runtime_name,
            "label": r.label, "index": r.index, "probabilities": r.probabilities,
            "top_k": r.top(top_k), "calibrated": r.calibrated, "uncertain": r.uncertain,
            "threshold": model.trust.threshold if model.trust else None,
            "prediction_set": r.prediction_set, "set_coverage": r.set_coverage,
            "warnings": r.warnings, "feature_distance": r.distance,
            "timing_ms": {k: round(v, 3) for k, v in r.timing_ms.items()}}


def run(model: runtime.Model, paths: list[Path], top_k: int, as_json: bool, emit, out: Path | None = None,
        unmatched: list[dict] = ()) -> int:
    """Classify each path; a bad image is reported and skipped, as is each pattern in
    `unmatched` (`Inputs`). Returns the failure count. out: a folder that also gets
    predictions.json and predictions.md."""
    failed, rows = len(unmatched), list(unmatched)
    if not as_json:
        emit(f"model: {model.path.name} (runtime {model.runtime_name}); classes: {', '.join(model.class_names)}")
        emit(calibration_text(model))
        emit(f"{'image':50s} {'prediction':22s} {'p':>6s}  top-{min(top_k, len(model.class_names))}")
    for r in unmatched:
        emit(json.dumps(r) if as_json else f"{short_path(r['image']):50s} ERROR: "
             f"{r['error'].removeprefix(r['image'] + ': ')}")
    t0 = time.perf_counter()
    for p in paths:
        try:
            r = model.predict(p)
        except preprocess.ImageError as e:
            failed += 1
            rows.append({"image": str(p), "error": str(e)})
            emit(json.dumps(rows[-1]) if as_json else f"{short_path(p):50s} ERROR: {str(e).removeprefix(f'{p}: ')}")
            continue
        rows.append(record(model, p, r, top_k))
        if as_json:
            emit(json.dumps(rows[-1]))
        else:
            set_note, review = notes(rows[-1], model)
            emit(f"{short_path(p):50s} {r.label:22s} {r.probabilities[r.label]:6.3f}  {top_text(rows[-1])}"
                 f"  ({r.timing_ms['total']:.1f} ms)" + (f"  {set_note}" if set_note else "")
                 + (f"  [{review}]" if review else ""))
    elapsed = time.perf_counter() - t0
    if not as_json:
        emit(f"{len(rows) - failed} classified, {failed} failed, {elapsed:.2f} s")
    if out is not None:
        with quiet.signals_deferred():  # predictions.json and .md describe one run
            write_reports(Path(out), model, rows, elapsed)
        if not as_json:
            emit(f"reports: {Path(out) / 'predictions.md'}, {Path(out) / 'predictions.json'}")
    return failed


def calibration_text(model: runtime.Model) -> str:
    if not model.trust:
        return trust.NOT_CALIBRATED
    t = model.trust
    return (f"calibrated: temperature {t.temperature:.3f}"
            + (f"; answers below p {trust.threshold_text(t.threshold)} are marked '{trust.REVIEW}'"
               if t.threshold is not None else "")
            + ((f"; {single_sets_text(t)}" if t.sets_single else f"; prediction sets at {1 - t.alpha:.0%} coverage")
               if t.conformal_q is not None else "")
            + (f"; images farther than {t.familiarity['limit']:.2f} from the training images' features are "
               "referred" if t.familiarity and model.has_features else ""))


def single_sets_text(t: trust.Trust) -> str:
    return f"its {1 - t.alpha:.0%} prediction sets are the top class alone (held-out error under {t.alpha:.0%}), not shown"


def top_text(rec: dict) -> str:
    return ", ".join(f"{n} {v:.3f}" for n, v in rec["top_k"])


def notes(rec: dict, model: runtime.Model) -> tuple[str, str]:
    """(the prediction set, why the answer is referred), each '' where there is none (a set is not
    shown where every set is the top class alone: `Trust.sets_single`)."""
    shown = rec["prediction_set"] is not None and not model.trust.sets_single
    return (trust.set_text(rec["prediction_set"], rec["set_coverage"]) if shown else "",
            trust.review_text(rec["warnings"]) if rec["uncertain"] else "")


def write_reports(out: Path, model: runtime.Model, rows: list[dict], elapsed_s: float) -> None:
    """predictions.json (every record, as --json prints them) and predictions.md (a table)."""
    from .files import atomic_write_text, sha256_file  # noqa: PLC0415
    from .report import md_table  # noqa: PLC0415

    out.mkdir(parents=True, exist_ok=True)
    failed = sum("error" in r for r in rows)
    atomic_write_text(out / "predictions.json", json.dumps({
        "model": str(model.path), "model_file_sha256": sha256_file(model.path), "runtime": model.runtime_name,
        "class_names": model.class_names, "calibration": calibration_text(model), "images": len(rows),
        "failed": failed, "seconds": round(elapsed_s, 3), "predictions": rows}, indent=1))
    table = [[r["image"], "", "", "", f"error: {r['error']}"] if "error" in r else
             [r["image"], r["label"], f"{r['probabilities'][r['label']]:.3f}", top_text(r),
              "; ".join(n for n in notes(r, model) if n)] for r in rows]
    atomic_write_text(out / "predictions.md", (
        f"# Predictions: {model.path.name}\n\nRuntime {model.runtime_name}; {calibration_text(model)}.\n"
        f"{len(rows) - failed} classified, {failed} failed, {elapsed_s:.2f} s.\n\n"
        + md_table(["image", "prediction", "p", "top classes", "notes"], table) + "\n"))
