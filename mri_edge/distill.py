"""Knowledge distillation (`train --teacher RUN`): a student trained towards a finished run's
probabilities (Hinton et al. 2015), usually an ensemble's (`mri-edge ensemble`), so that one
DenseNet121 carries what several learned at the cost of one.

The teacher answers on every training batch as the student gets it, mixup and CutMix blends
included, not once per image beforehand. A teacher's answers on its own training images are
nearly its labels (these runs fit training to 99%); on blends of two images they are its
function, which is what the student is to match (Beyer et al. 2022, "consistent teaching").
The geometric augmentation runs inside the student's graph after that, so the teacher sees the
blend unflipped and unrotated.

The target of each image is (1 - w) * label + w * teacher probabilities, with w =
--distill-weight; the loss stays the cross-entropy (with --label-smoothing if given), so
validation, checkpoint choice and every report are unchanged: the held-out split judges the
student on its labels alone. A teacher may not have trained on the student's validation or test
images: the held-out rule would then pick the student that copies it best there.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import MriEdgeError
from .files import sha256_file
from .run import RunFolder


class TeacherError(MriEdgeError, ValueError):
    """A --teacher that cannot teach this run."""


def overlap(trained: set[str], student_manifest: dict) -> dict[str, int]:
    """How many of the student's validation and test images are among `trained` (relative paths;
    the runs may have read the data from different folders)."""
    return {s: sum(rel in trained for rel, _ in student_manifest["splits"].get(s, [])) for s in ("val", "test")}


def trained_on(run: RunFolder, _seen: frozenset = frozenset()) -> set[str]:
    """The images a run's weights were fitted on: its training split, for an ensemble each member's
    (members share validation and test, not necessarily training), and those of the run or pretrain
    folder it started from (config.json `weights`, a .keras file beside a split manifest), and so on
    up the line. A start whose folder is not on this machine (or not where its path says) ends the line."""
    fitted = {rel for rel, _ in run.manifest()["splits"].get("train", [])}
    config = run.config() if run.config_path.is_file() else {}
    seen = _seen | {run.path.resolve()}  # folders on this line already counted (a start may loop back)
    for m in (config.get("ensemble") or {}).get("members", []):
        member = RunFolder(m["run"])
        if not member.manifest_path.is_file():
            raise TeacherError(f"--teacher {run.path}: its member {m['run']} is not here, so what it trained on "
                               "cannot be checked")
        fitted |= trained_on(member, seen)
    start = Path(str(config.get("weights", "none")))
    if start.suffix == ".keras" and RunFolder(start.parent).manifest_path.is_file() \
            and start.parent.resolve() not in seen:
        fitted |= trained_on(RunFolder(start.parent), seen)
    return fitted


def weights_seen(weights: str, manifest: dict) -> list[str]:
    """A note (a list of at most one) when --weights is a .keras file whose folder records what it was
    fitted on (a run, a pretrain folder) and that includes this run's validation or test images:
    the held-out rule and the test report would then flatter the run."""
    folder = Path(weights).parent
    if Path(weights).suffix != ".keras" or not RunFolder(folder).manifest_path.is_file():
        return []
    try:
        seen = overlap(trained_on(RunFolder(folder)), manifest)
    except MriEdgeError as e:
        return [f"warning: what --weights {weights} was fitted on cannot be checked ({e})"]
    if not any(seen.values()):
        return []
    which = " and ".join(w for w, n in (("validation", seen["val"]), ("test", seen["test"])) if n)
    return [f"warning: --weights {weights} was fitted on {seen['val']} of this run's validation and {seen['test']} of "
            f"its test images, so its {which} results are optimistic (the carve of the run or pretraining that made it "
            "is kept only for the same training images: carve with its --val-split, --val-fraction, --split-seed and "
            "--group-threshold)"]


class Teacher:
    """A finished run's model.keras, checked against the student's classes, input and splits."""

    def __init__(self, path, class_names: list[str], image_size: int, student_manifest: dict):
        from .keras_model import KerasModel  # noqa: PLC0415

        run = RunFolder(path)
        try:
            run.require_model()
        except MriEdgeError as e:
            raise TeacherError(f"--teacher {path}: {e}") from None
        labels, config = run.labels(), run.config()
        if labels["class_names"] != list(class_names):
            raise TeacherError(f"--teacher {path}: its classes {labels['class_names']} are not this run's "
                               f"{list(class_names)}")
        if int(config["image_size"]) != int(image_size):
            raise TeacherError(f"--teacher {path}: it takes {config['image_size']} px images, this run "
                               f"{image_size} px; train the student at the teacher's size")
        seen = overlap(trained_on(run), student_manifest)
        if any(seen.values()):
            raise TeacherError(f"--teacher {path}: it (with the runs it started from) trained on {seen['val']} of "
                               f"this run's validation and {seen['test']} of its test images; train the student with "
                               "the teacher's --val-split, split seed and --group-threshold, so that both hold out the "
                               "same images (if they do, one of the runs it started from held out others)")
        self.model = KerasModel(run.model_path)  # checks the preprocessing contract the file records
        report = run.test_report() or {}
        self.record = {"run": str(path), "model_sha256": sha256_file(run.model_path),
                       "members": len(config.get("ensemble", {}).get("members", [])) or 1,
                       "test_accuracy": report.get("accuracy")}

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities of a float32 batch of raw (possibly blended) pixels."""
        return self.model.run(batch)


def targets(labels: np.ndarray, teacher_probs: np.ndarray, weight: float) -> np.ndarray:
    """Each image's target: its (one-hot or blended) label and the teacher's probabilities, mixed."""
    return ((1.0 - weight) * labels + weight * np.asarray(teacher_probs, np.float32)).astype(np.float32)


def load(cfg, dataset, log=print, recorded: dict | None = None) -> Teacher | None:
    """The run's teacher (None without --teacher), announced in the log; `recorded`: the teacher
    a resumed run started with (config.json's "distillation"), which it must still be."""
    if not cfg.teacher:
        return None
    if not 0.0 < cfg.distill_weight <= 1.0:
        raise TeacherError(f"--distill-weight {cfg.distill_weight}: give a share in (0, 1]")
    teacher = Teacher(Path(cfg.teacher), dataset.class_names, cfg.image_size, dataset.manifest())
    if recorded and recorded.get("model_sha256") != teacher.record["model_sha256"]:
        raise TeacherError(f"--resume: the teacher {cfg.teacher} is not the model this run started with (its "
                           "model.keras changed); a student of two teachers would be recorded as one's")
    teacher(np.zeros((1, cfg.image_size, cfg.image_size, 3), np.float32))  # built here, not in a loader thread
    acc = teacher.record["test_accuracy"]
    log(f"distilling from {cfg.teacher} ({teacher.record['members']} model(s)"
        f"{f', test accuracy {acc:.4f}' if acc is not None else ''}): targets are {1 - cfg.distill_weight:g} x labels "
        f"+ {cfg.distill_weight:g} x its probabilities on each training batch")
    return teacher
