"""`mri-edge demo`: the whole pipeline on generated phantoms (synth -> train -> export ->
verify -> bench), no dataset needed."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from .config import BENCH_QUICK, TrainConfig
from .errors import MriEdgeError, require, training_packages
from .run import RunFolder

MARKER = ".mri-edge-demo"


class DemoError(MriEdgeError):
    pass


@dataclass(frozen=True)
class Recipe:
    """Small enough for a few minutes on 2 cores, trained well enough that its int8 files pass
    the same parity gates as a real model's."""

    image_size: int = 64
    epochs: int = 12  # 6 epochs left the model unsure of many phantoms (test 87.5%), and int8 flipped them
    n_train: int = 100
    n_test: int = 50  # per class: the 98% agreement gate then allows 4 flips, not 1
    lr: float = 1e-3
    dense_units: int = 256
    calib_size: int = 300
    held_out_min: int = 40  # the phantoms' validation split: 10 per class (no subjects, no twins)
    explain_images: int = 32


RECIPE = Recipe()


def prepare(out: Path) -> Path:
    """The demo folder, made or reused (only when a demo made it), and its data folder."""
    if out.exists() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise DemoError(f"--out {out} is not empty and not a demo folder; choose another --out")
    run = RunFolder(out / "run")
    with run.lock("demo"):  # a demo training here now holds its run: refused, and nothing is removed
        if run.model_path.is_file():
            raise DemoError(f"{out} already holds a finished demo run; remove it or pass another --out")
        if run.path.exists():  # an interrupted demo's run (the marker says the folder is ours): begun again
            shutil.rmtree(run.path)
        out.mkdir(parents=True, exist_ok=True)
        (out / MARKER).write_text("made by `mri-edge demo`\n")
        data_dir = out / "data"
        if data_dir.exists():
            shutil.rmtree(data_dir)  # phantoms of an interrupted demo (the marker says the folder is ours)
    return data_dir


def run_demo(out, task: str = "tumor", image_size: int = RECIPE.image_size, epochs: int = RECIPE.epochs,
             n_train: int = RECIPE.n_train, skip_export: bool = False, log=print, show=print) -> tuple[Path, list[str]]:
    """(run folder, what failed): `log` gets progress, `show` the tables."""
    require(training_packages() + (() if skip_export else ("tensorflow",)), "mri-edge demo")
    from . import train as train_lib  # noqa: PLC0415
    from .synth import write_dataset  # noqa: PLC0415

    out = Path(out)
    data_dir = prepare(out)
    log(f"demo 1/4: generating a synthetic {task} dataset in {data_dir}")
    write_dataset(data_dir, task, n_train=n_train, n_test=RECIPE.n_test, size=128, seed=0)
    cfg = TrainConfig(task=task, data_dir=str(data_dir), out=str(out / "run"), weights="none", image_size=image_size,
                      batch_size=16, epochs_head=0, epochs_finetune=epochs, lr=RECIPE.lr, patience=epochs,
                      dense_units=RECIPE.dense_units, cache_dir=str(out / "cache"))
    log(f"demo 2/4: training DenseNet121 from scratch at {image_size} px for {epochs} epoch{'s' * (epochs != 1)}")
    started = time.time()
    run_dir = train_lib.train(cfg, log=log)
    problems = [] if skip_export else downstream(run_dir, log, show)
    write_summary(out, run_dir, problems, skip_export, time.time() - started)
    return run_dir, problems


def write_summary(out: Path, run_dir: Path, problems: list[str], skip_export: bool, seconds: float) -> None:
    """demo.json and demo.md beside the run: whether every step passed, and where its reports are."""
    from . import report  # noqa: PLC0415

    passed = not problems
    verdict = ("every exported file passed its parity gate" if not skip_export else "trained (export skipped)") \
        if passed else "FAILED: " + "; ".join(problems)
    index = RunFolder(run_dir).index_path
    rel = (index.relative_to(out) if index.is_relative_to(out) else index).as_posix()
    report.write_json(out / "demo.json", {"passed": passed, "problems": problems, "export_skipped": skip_export,
                                          "run": str(run_dir), "seconds_after_data": round(seconds, 1)})
    report.write_text(out / "demo.md", f"# mri-edge demo\n\nResult: {verdict}.\n\nTraining and the steps after it "
                      f"took {seconds / 60:.1f} min. Everything the run produced: [{rel}]({rel}).\n")


def downstream(run_dir: Path, log=print, show=print) -> list[str]:
    """Export, verify and bench the demo run; returns what failed, for the last line."""
    from . import bench as bench_lib  # noqa: PLC0415
    from . import export as export_lib  # noqa: PLC0415
    from . import verify as verify_lib  # noqa: PLC0415

    log("\ndemo 3/4: mri-edge export (every format), calibrate and verify")
    results, failures = export_lib.export_run(run_dir, ("all",), (), "uint8", RECIPE.calib_size, log=log)
    problems = [f"export of {f['file']} failed ({f['error']})" for f in failures]
    show(export_lib.table(results))
    from . import calibrate as calibrate_lib  # noqa: PLC0415
    from .config import CalibrateConfig  # noqa: PLC0415

    log("\nmri-edge calibrate: temperature, abstention threshold and prediction sets on held-out phantoms "
        f"(--min-images {RECIPE.held_out_min}: the phantoms' validation split, under the default for real data)")
    try:
        cal = calibrate_lib.calibrate_run(run_dir, CalibrateConfig(min_images=RECIPE.held_out_min), log=log)
        show(calibrate_lib.summary_table(cal))
    except MriEdgeError as e:
        problems.append(f"calibrate: {e}")
    parity = verify_lib.verify_run(run_dir, log=log, explain_images=RECIPE.explain_images)
    show(verify_lib.summary_table(parity))
    problems += [f"parity: {f}" for f in parity["failures"]]
    log("\ndemo 4/4: mri-edge bench --quick")
    try:
        show(bench_lib.table(bench_lib.bench([str(run_dir)], **BENCH_QUICK, out_dir=RunFolder(run_dir).bench_dir,
                                             log=log)))
    except MriEdgeError as e:
        problems.append(f"bench: {e}")
    from .card import write_card  # noqa: PLC0415

    write_card(run_dir)
    log(f"model card: {RunFolder(run_dir).card_paths[1]}")
    return problems
