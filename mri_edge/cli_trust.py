"""The trust commands of the command line: calibrate, explain, card (registered on the
`mri-edge` group by cli.py). Heavy libraries are imported inside each command."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .clitools import OUT_DIR, THREADS, config_from, echo, options_from, run_guarded
from .config import OCCLUSION_GRID, CalibrateConfig
from .run import RUNS_ROOT, RunFolder


@click.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@options_from(CalibrateConfig)
@click.option("--reference", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Model to fit on [default: model.keras, else the most precise exported file].")
@click.option("--data-dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="Where the run's dataset is now (rebuilds a missing split manifest from config.json).")
@THREADS
def calibrate(run_dir, reference, data_dir, threads, **kw):
    """Fit temperature, abstention threshold and conformal sets on held-out data.

    The record goes into RUN_DIR/trust.json and into every exported file's metadata
    (their model bytes are unchanged); predict then prints calibrated probabilities,
    marks answers below the threshold for review, and shows prediction sets. The test
    split is reported, never fitted on. Report: RUN_DIR/calibration/calibrate.md.

    \b
    Example:
      mri-edge calibrate artifacts/tumor --max-risk 0.01
    """
    from . import calibrate as calibrate_lib  # noqa: PLC0415

    cfg = run_guarded(config_from, CalibrateConfig, kw)
    out = run_guarded(calibrate_lib.calibrate_run, run_dir, cfg, reference, threads, data_dir, log=echo)
    click.echo(calibrate_lib.summary_table(out))
    folder = RunFolder(run_dir)
    click.echo(f"\nstored in {len(out['updated_files'])} file(s) and {folder.trust_path}; report "
               f"{folder.calibrate_report_paths[1]}\nnext: mri-edge card {run_dir} (the model card "
               "reads the new record)")


@click.command()
@click.argument("model_path", type=click.Path(exists=True))
@click.argument("images", nargs=-1, required=True)
@click.option("--out", "out_dir", type=OUT_DIR, default=str(RUNS_ROOT / "explain"), show_default=True,
              help="Folder for the overlay PNGs, explain.json and explain.md.")
@click.option("--method", type=click.Choice(["occlusion", "gradcam"]), default="occlusion", show_default=True,
              help="occlusion runs through any file's own runtime (int8 included); gradcam needs a .keras model.")
@click.option("--grid", type=click.IntRange(2, 32), default=OCCLUSION_GRID, show_default=True,
              help="Occlusion: cells per side blacked out in turn.")
@THREADS
def explain(model_path, images, out_dir, method, grid, threads):
    """Show where a model looked: one overlay PNG per image.

    \b
    Example:
      mri-edge explain artifacts/tumor/model_int8.tflite scan.jpg --out artifacts/runs/explain
    """
    from . import explain as explain_lib  # noqa: PLC0415
    from . import predict as predict_lib  # noqa: PLC0415
    from .trust import review_text, set_text  # noqa: PLC0415

    inputs = run_guarded(predict_lib.read_inputs, images, echo)
    out = run_guarded(explain_lib.explain_images, model_path, inputs.paths, out_dir, method, grid, threads, log=echo,
                      unmatched=inputs.unmatched)
    for r in out["images"]:
        click.echo(f"{predict_lib.short_path(r['image']):50s} {r['class']:22s} {r['probability']:6.3f}  -> "
                   f"{Path(out_dir) / r['png']}" + (f"  {set_text(r['prediction_set'], r['set_coverage'])}"
                                                     if r["prediction_set"] and not out["sets_note"] else "")
                   + (f"  [{review_text(r['warnings'])}]" if r["uncertain"] else ""))
    if out["sets_note"]:
        click.echo(out["sets_note"])
    click.echo(f"wrote {len(out['images'])} overlay(s), {Path(out_dir) / 'explain.md'}")
    if out["failed"]:
        click.echo(f"{len(out['failed'])} of {len(out['images']) + len(out['failed'])} image(s) could not be read",
                   err=True)
        sys.exit(1)


@click.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
def card(run_dir):
    """Write RUN_DIR/model_card.md and model_card.json from the run's own reports.

    Intended use, data and leakage audit, recipe, results with 95% CIs (official and
    leakage-free), calibration and abstention, parity, latency, file hashes, versions
    and known limitations; what no command has produced yet is listed as missing.

    \b
    Example:
      mri-edge card artifacts/tumor
    """
    from . import card as card_lib  # noqa: PLC0415

    out = run_guarded(card_lib.write_card, run_dir)
    card_json, card_md = RunFolder(run_dir).card_paths
    click.echo(f"wrote {card_md} and {card_json.name}"
               + (f" (not yet recorded: {', '.join(out['missing'])})" if out["missing"] else ""))
