"""`mri-edge ensemble` (registered on the `mri-edge` group by cli.py)."""

from __future__ import annotations

import click

from .clitools import OUT_DIR, echo, run_guarded


@click.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=OUT_DIR, help="The ensemble's run folder (new or empty).")
@click.option("--force", is_flag=True, help="Write into a non-empty --out that is not a run folder.")
def ensemble(run_dirs, out, force):
    """Average finished runs into one model (RUN_DIRS: two or more run folders).

    The ensemble is a run folder of its own: one model.keras that runs every member and
    returns the mean of their probabilities, with its test report. calibrate, export,
    verify, bench and predict then treat it like any trained run; its exported files are
    one graph. Members must share classes, input size, preprocessing and the validation and
    test splits (train them with the same --val-split and --split-seed).

    \b
    Example:
      mri-edge ensemble artifacts/runs/a artifacts/runs/b --out artifacts/runs/a+b
    """
    from . import ensemble as ensemble_lib  # noqa: PLC0415

    m = run_guarded(ensemble_lib.build, list(run_dirs), out, force=force, log=echo)
    from .report import test_summary  # noqa: PLC0415

    click.echo(f"{test_summary(m)} ({out})")
    click.echo(f"next: mri-edge calibrate {out}, then mri-edge export {out} --format all")
