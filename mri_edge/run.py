"""The run folder: one owner for its layout and for reading and writing its files.

    RUN/
      config.json          TrainConfig + versions + preprocessing contract (train)
      labels.json          task, class names and keys (train)
      split_manifest.json  which file went to which split (train)
      state.json           resumable progress (train; finished=true at the end)
      checkpoint.keras     last epoch while training (checkpoint_state.npz: its optimizer and random
                           streams); best.keras best epoch of a phase;
                           best_of_phases.keras the best earlier phase's, until the last phase ends
      model.keras          the trained model (train); kernels in float16 after `evaluate --fp16-weights`,
                           which keeps the trained file as model_fp32.keras
      history.csv, training_curves.png, test_report.json, test_predictions.json,
      confusion_matrix.png, examples.png, reliability.png, train_report.md  (train / evaluate)
      exports/             exported files + exports.json + calibration_manifest.json (export)
      parity.json, parity.md, verify/                           (verify)
      bench/                                                    (bench)
      trust.json           temperature, abstention threshold, conformal quantile (calibrate)
      calibration/         calibrate.json, calibrate.md, reliability and coverage-risk plots (calibrate)
      model_card.md, model_card.json                            (card)
      report.md            index page linking all of the above (rewritten by each command)
      .lock                who writes the folder now (`RunFolder.lock`)

A shipped folder (artifacts/<task>) is the same layout with the exported files at its top
level instead of in exports/ (its model.keras, kernels in float16, is what they were exported from).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from pathlib import Path

from .errors import MriEdgeError, first_line
from .files import atomic_write_text, read_json


class RunError(MriEdgeError, ValueError):
    """A folder is not (or not yet) the run folder a command needs."""


# What `mri-edge train` may find in --out and still call the folder its own.
TRAIN_OUTPUTS = (".lock", "config.json", "labels.json", "split_manifest.json", "state.json", "checkpoint.keras",
                 "checkpoint_state.npz", "best.keras", "best_of_phases.keras", "model.keras", "history.csv", "training_curves.png", "test_report.json", "test_predictions.json",
                 "confusion_matrix.png", "examples.png", "reliability.png", "train_report.md", "report.md")
# Where commands write by default (relative to the working folder): run folders, and the reports of
# commands that have no run folder (audit, bench of model files, explain, demo) in named folders.
RUNS_ROOT = Path("artifacts") / "runs"
AUDIT_FILES = ("audit.json", "audit.md")  # data audit's reports, in its --out (a shipped folder carries audit.md)
# bench's reports, in any --out folder: a run's bench/ or, in a shipped folder, its top level
BENCH_FILES = ("bench.json", "bench.md", "bench.png")


_HELD: dict[Path, int] = {}  # run folders this process has locked, and how many times (nested commands)


class RunFolder:
    def __init__(self, path):
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    # ------------------------------------------------------------ paths
    config_path = property(lambda self: self.path / "config.json")
    labels_path = property(lambda self: self.path / "labels.json")
    manifest_path = property(lambda self: self.path / "split_manifest.json")
    state_path = property(lambda self: self.path / "state.json")
    model_path = property(lambda self: self.path / "model.keras")
    checkpoint_path = property(lambda self: self.path / "checkpoint.keras")
    best_path = property(lambda self: self.path / "best.keras")
    best_of_phases_path = property(lambda self: self.path / "best_of_phases.keras")
    trainer_state_path = property(lambda self: self.path / "checkpoint_state.npz")  # callbacks.TrainerState
    predictions_path = property(lambda self: self.path / "test_predictions.json")
    history_path = property(lambda self: self.path / "history.csv")  # an epoch a row, with its phase
    test_report_path = property(lambda self: self.path / "test_report.json")
    exports_dir = property(lambda self: self.path / "exports")
    train_report_path = property(lambda self: self.path / "train_report.md")
    curves_path = property(lambda self: self.path / "training_curves.png")
    confusion_path = property(lambda self: self.path / "confusion_matrix.png")
    examples_path = property(lambda self: self.path / "examples.png")
    reliability_path = property(lambda self: self.path / "reliability.png")
    fp32_model_path = property(lambda self: self.path / "model_fp32.keras")  # kept by evaluate --fp16-weights
    index_path = property(lambda self: self.path / "report.md")
    encoder_path = property(lambda self: self.path / "encoder.keras")  # a pretrain folder's (same config, manifest)
    exports_index_path = property(lambda self: self.path / "exports" / "exports.json")
    exports_report_path = property(lambda self: self.path / "exports" / "exports.md")
    trust_path = property(lambda self: self.path / "trust.json")
    calibration_dir = property(lambda self: self.path / "calibration")
    calibrate_report_paths = property(lambda self: (self.calibration_dir / "calibrate.json",
                                                    self.calibration_dir / "calibrate.md"))
    card_paths = property(lambda self: (self.path / "model_card.json", self.path / "model_card.md"))
    bench_dir = property(lambda self: self.path / "bench")
    # bench writes a run's into bench/; a shipped folder holds its report at the top level
    bench_paths = property(lambda self: (self.bench_dir / BENCH_FILES[0], self.path / BENCH_FILES[0]))

    def verify_dir(self, split: str = "test") -> Path:
        """Where verify keeps a split's plots and caches: verify/ (test), verify/val/."""
        return self.path / "verify" / ("val" if split == "val" else "")

    def parity_paths(self, split: str = "test", selected: bool = False) -> tuple[Path, Path]:
        """verify's parity.json and parity.md: the test split's (the report of record) at the top
        level, the validation split's in verify/val/, a check of --file alone in their selected/."""
        d = self.verify_dir(split) / "selected" if selected else self.path if split == "test" else self.verify_dir(split)
        return d / "parity.json", d / "parity.md"

    def export_files(self) -> list[Path]:
        """The exported model files: exports/, or the top level of a shipped folder."""
        from .backends import EXPORT_SUFFIXES  # noqa: PLC0415

        for folder in (self.exports_dir, self.path):
            if folder.is_dir():
                found = sorted(p for p in folder.iterdir() if p.suffix in EXPORT_SUFFIXES and p.is_file())
                if found:
                    return found
        return []

    def check_preprocessing(self) -> None:
        """Refuse, before any image is decoded for this run's model here, a machine that cannot
        resize as the run's preprocessing record says: evaluate, export, ensemble or a resumed
        training would measure or train it on other pixels than it was trained on."""
        from .preprocess import check_contract  # noqa: PLC0415

        cfg = self.config()
        check_contract(self.model_path, {"preprocessing": cfg.get("preprocessing"),
                                         "input_size": [int(cfg["image_size"])] * 2}, override=None)

    def trust(self) -> dict | None:
        """trust.json (what `mri-edge calibrate` fitted), or None before calibration."""
        return read_json(self.trust_path, "trust record", ("temperature",)) if self.trust_path.is_file() else None

    # ------------------------------------------------------------ reads (one-line errors)
    def config(self) -> dict:
        if not self.config_path.exists():  # e.g. an audit or export folder given where a run goes
            raise RunError(f"{self.path}: not a run folder (no config.json, which `mri-edge train` writes)")
        return read_json(self.config_path, "run config", ("task", "image_size"))

    def labels(self) -> dict:
        return read_json(self.labels_path, "run labels", ("class_names",))

    def manifest(self) -> dict:
        m = read_json(self.manifest_path, "split manifest", ("root", "splits", "class_names"))
        if not isinstance(m["splits"], dict) or not all(isinstance(v, list) for v in m["splits"].values()):
            raise RunError(f"split manifest {self.manifest_path}: 'splits' is not a mapping of lists; the file is damaged")
        return m

    def state(self) -> dict:
        return read_json(self.state_path, "training state", ("phase", "epoch"))

    def test_report(self) -> dict | None:
        """test_report.json (accuracy, per-class, CIs), or None before the run was evaluated."""
        if not self.test_report_path.is_file():
            return None
        return read_json(self.test_report_path, "test report", ("accuracy", "n"))

    def test_predictions(self) -> dict:
        if not self.predictions_path.is_file():
            raise RunError(f"{self.path} has no test_predictions.json (is it a finished `mri-edge train` run?)")
        return read_json(self.predictions_path, "test predictions", ("class_names", "paths", "labels", "probs"))

    def exports_index(self) -> dict:
        """exports.json, or an empty index when there is none or it is damaged (it is rebuilt)."""
        try:
            return read_json(self.exports_index_path)
        except MriEdgeError:
            return {}

    def write_exports_index(self, index: dict) -> None:
        """exports.json, the one place it is written: by export after each file it lands, and for a
        file changed in place (calibrate's record, --add-features: `export.pipeline.index_new_bytes`)."""
        from .report import write_json  # noqa: PLC0415

        self.exports_dir.mkdir(exist_ok=True)  # an export whose every file failed leaves none behind it
        write_json(self.exports_index_path, index)

    @contextlib.contextmanager
    def lock(self, command: str):
        """Hold the folder for one writing command: a second one (another export, calibrate while
        export lands its files, two trains with one --out) is refused at once with who holds it,
        instead of both writing and leaving the folder inconsistent. An OS file lock on `.lock`:
        it goes with the process that holds it, so a killed command leaves none behind. Nested
        in one process (demo, a command calling another), it is taken once."""
        key = self.path.resolve()
        if key in _HELD or not self.path.is_dir():  # (a folder not made yet: train locks it once made)
            _HELD[key] = _HELD.get(key, 0) + 1
            try:
                yield
            finally:
                _HELD[key] -= 1
                if not _HELD[key]:
                    del _HELD[key]
            return
        try:
            import fcntl  # noqa: PLC0415
        except ImportError:  # Windows: no lock
            fcntl = None
        fd, named = None, True
        for flags in ((os.O_RDWR | os.O_CREAT, os.O_RDONLY) if fcntl else ()):
            try:  # read-only: another user's .lock in a shared folder (flock needs no write access)
                fd, named = os.open(self.path / ".lock", flags, 0o644), flags != os.O_RDONLY
                break
            except OSError:  # (a read-only folder: the command's own check says so)
                continue
        held = False
        try:
            if fd is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    held = named
                except BlockingIOError:
                    holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another command"
                    raise RunError(f"{self.path} is in use by `mri-edge {holder}`; wait for it to end, or use "
                                   "another folder") from None
                except OSError:  # a file system without locks (NFS without lockd, some FUSE mounts): none
                    pass
            if held:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{command} (pid {os.getpid()})".encode(), 0)
            _HELD[key] = 1
            yield
        finally:
            _HELD.pop(key, None)
            if held:
                os.ftruncate(fd, 0)  # held by no one: nothing to say (a kill leaves the name, not the lock)
            if fd is not None:
                os.close(fd)  # (the lock goes with it)

    def check_writable(self, *folders: Path) -> None:
        """Refuse at once a run folder (or those of its `folders` that exist) where the command's
        results could not be written: a read-only copy of a run would otherwise fail after minutes of work."""
        from .files import unwritable  # noqa: PLC0415

        for folder in [f for f in folders if f.is_dir()] if folders else [self.path]:
            if why := unwritable(folder):
                raise RunError(why)

    def require_model(self) -> Path:
        if not self.path.is_dir():
            raise RunError(f"run folder not found: {self.path}")
        if not self.model_path.is_file():
            inner = sorted(p.parent for p in self.path.glob("*/model.keras"))  # the demo's folder holds its run
            hint = " (unfinished run? continue it with `mri-edge train --resume`)" if self.state_path.is_file() else \
                f" (the run is {inner[0]})" if len(inner) == 1 else " (is it a finished `mri-edge train` run?)"
            raise RunError(f"{self.path} has no model.keras{hint}")
        return self.model_path

    @staticmethod
    def saved_best(state: dict | None, monitor: str) -> float | None:
        """The monitored value of the kept epoch in a saved state, None when there is none;
        states written before --select-by existed kept only best_val_loss."""
        if not state:
            return None
        best = (state.get("best") or {}).get(monitor)
        if best is None and monitor == "val_loss":
            best = state.get("best_val_loss")
        return best if best is not None and math.isfinite(best) else None

    def write_state(self, phase: int, epoch: int, history: list, elapsed_s: float, finished: bool = False,
                    best: dict | None = None, phase_elapsed_s: float = 0.0, patience: dict | None = None,
                    stopped: bool = False) -> None:
        """state.json: where training stands (phase index, epochs done in it, the monitored
        value of the phase's best epoch so far, e.g. {"val_loss": 0.41}, early stopping's count
        (callbacks.Patience), whether the phase stopped before its last epoch), for --resume."""
        from .report import write_json  # noqa: PLC0415

        write_json(self.state_path, {"phase": phase, "epoch": epoch, "best": best or {},
                                     "history": history, "elapsed_s": elapsed_s, "phase_elapsed_s": phase_elapsed_s,
                                     "finished": finished, **({"patience": patience} if patience else {}),
                                     **({"stopped": True} if stopped else {})})

    def export_metadata(self, damaged: list[str] | None = None) -> dict[str, dict]:
        """Each exported file's embedded metadata by name ({} where it cannot be read). Given a
        list `damaged`, each file that cannot be read, or whose model bytes differ from the hash
        export recorded in it, adds its one-line reason there (what vouches for files refuses them)."""
        from .backends import read_metadata  # noqa: PLC0415
        from .integrity import RuntimeMissingError, check_integrity  # noqa: PLC0415

        out = {}
        for f in self.export_files():
            try:
                out[f.name] = read_metadata(f)
                if damaged is not None:
                    check_integrity(f, out[f.name])
            except MriEdgeError as e:
                out[f.name] = {}
                if damaged is not None and not isinstance(e, RuntimeMissingError):  # a device install: unread
                    damaged.append(first_line(e))
        return out

    def leave_out_unreadable(self, unreadable: dict[str, list[str]]) -> dict[str, list[str]]:
        """Take images that could not be decoded (paths relative to the data folder, by split)
        out of the split manifest's splits, so calibrate, export, verify and bench use the images
        the model was trained and tested on; returns every image left out so far, by split (the
        manifest's "unreadable")."""
        m = self.manifest()
        gone = {s: set(paths) for s, paths in unreadable.items() if paths}
        before = m.get("unreadable") or {}
        if gone:
            from .report import write_json  # noqa: PLC0415

            m["splits"] = {s: [r for r in rows if r[0] not in gone.get(s, ())] for s, rows in m["splits"].items()}
            m["unreadable"] = {s: sorted(set(before.get(s, [])) | gone.get(s, set())) for s in set(gone) | set(before)}
            write_json(self.manifest_path, m)
        return m.get("unreadable") or {}

    # ------------------------------------------------------------ train's --out check
    def check_new_run(self, force: bool = False) -> None:
        """Refuse an --out folder that holds anything but the start of this run.

        A finished run and a resumable one are never overwritten; a folder with other files
        (a copy of a shipped model, a dataset) is refused unless force, because writing a new
        report beside old model files would leave a folder that contradicts itself.
        """
        if not self.path.exists():
            return
        if not self.path.is_dir():
            raise RunError(f"--out {self.path} is a file, not a folder")
        if self.model_path.exists():
            raise RunError(f"{self.path} already holds a trained model; choose another --out")
        if self.encoder_path.exists():  # its manifest says what the encoder was fitted on: keep it
            raise RunError(f"{self.path} is a pretrain folder (`mri-edge pretrain`); choose another --out")
        if self.checkpoint_path.exists() and self.state_path.exists():
            raise RunError(f"{self.path} holds an unfinished run; continue it with `mri-edge train --resume "
                           f"{self.path}` or choose another --out")
        foreign = sorted(p.name for p in self.path.iterdir() if p.name not in TRAIN_OUTPUTS)
        if foreign and not force:
            shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
            raise RunError(f"--out {self.path} is not empty and not a run of `mri-edge train` (it holds {shown}); "
                           "choose an empty or new folder, or pass --force to write the run there anyway")

    # ------------------------------------------------------------ the index page
    def write_index(self) -> Path:
        """report.md; a report edited by hand (valid JSON, not what its command writes) leaves a page
        that says so, not a traceback at the end of the command that wrote its own report."""
        from .report import run_index_markdown  # noqa: PLC0415

        try:
            text = run_index_markdown(self)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
            text = (f"# mri-edge run `{self.path.name}`\n\nThis page could not be made: a report in this folder is "
                    f"not as its command writes it ({type(e).__name__}: {e}); run again the command that wrote it.\n")
        atomic_write_text(self.index_path, text)
        return self.index_path


def holding(command: str):
    """Decorator: a command's library function, called with the run folder first, holds it
    (`RunFolder.lock`) while it runs."""
    def deco(fn):
        @functools.wraps(fn)
        def wrapper(run_dir, *args, **kwargs):
            with RunFolder(run_dir).lock(command):
                return fn(run_dir, *args, **kwargs)
        return wrapper
    return deco


def best_bench(found: list[tuple[Path, dict | None]]) -> tuple[Path | None, dict | None]:
    """(folder, report) of the run's benchmark of record, from (folder, report or None) pairs
    (`RunFolder.bench_paths`): of those with rows, the one of more timed runs, so that a later
    `bench --quick` (10 runs) does not stand in for a full one. report.md and the card both use it."""
    found = [(d, b) for d, b in found if b and b.get("rows")]
    return max(found, key=lambda f: (f[1].get("settings") or {}).get("runs") or 0) if found else (None, None)
