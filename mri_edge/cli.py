"""mri-edge command line: a thin layer over the stage modules.

Heavy libraries (TensorFlow, Keras, onnx) are imported inside commands so that
`mri-edge --help` stays instant.
"""

from __future__ import annotations

import dataclasses
import sys
import threading
from pathlib import Path

import click
from click.core import ParameterSource

from . import __version__
from .clitools import (BENCH_TEXT, BUILT_IN_TASK, OUT_DIR, QUICK_TEXT, TASK_CHOICE, THREADS, VERBOSE_HELP, Finite,
                       Interrupted, Main, config_from, echo, handle_interrupts, int_list, one_line_warnings, options_from,
                       run_guarded)
from .config import (BENCH_DEFAULTS as BENCH, BENCH_QUICK, EXPLAIN_IMAGES, GROUP_THRESHOLD, HASH_MAX_DISTANCE,
                     PIXEL_MAD_THRESHOLD, ExportConfig, Thresholds, TrainConfig)
from .demo import RECIPE
from .run import AUDIT_FILES, BENCH_FILES, RUNS_ROOT, RunFolder


@click.group(cls=Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mri-edge")
@click.option("--verbose", is_flag=True, help=VERBOSE_HELP)
def main(verbose):
    """Train, export, verify and benchmark brain-MRI classifiers for edge devices.

    \b
    Typical flow:
      mri-edge train --task tumor --data-dir ../shared/data/brain-tumor-mri
      mri-edge export RUN_DIR --format all
      mri-edge verify RUN_DIR
      mri-edge bench RUN_DIR
      mri-edge predict RUN_DIR/exports/model_int8.tflite scan.jpg
    """
    from .quiet import set_verbose  # noqa: PLC0415

    set_verbose(verbose)
    if not verbose:
        one_line_warnings()
    if threading.current_thread() is threading.main_thread():
        handle_interrupts()


# calibrate, explain, card, ensemble and pretrain live in their own modules (this one would pass 400 lines)
from .cli_ensemble import ensemble  # noqa: E402
from .cli_pretrain import pretrain  # noqa: E402
from .cli_trust import calibrate, card, explain  # noqa: E402

for _command in (calibrate, explain, card, ensemble, pretrain):
    main.add_command(_command)


@main.command()
@click.option("--task", type=TASK_CHOICE, default=None,
              help="Built-in task, or custom (classes from folders). Required unless --resume.")
@click.option("--data-dir", type=click.Path(), required=False,
              help="Folder with Training/[Validation/]Testing class folders (any common spelling).")
@click.option("--out", type=OUT_DIR, default=None,
              help="Run folder [default: artifacts/runs/<task>-<timestamp>].")
@click.option("--resume", type=click.Path(exists=True, file_okay=False), default=None,
              help="Continue an interrupted run from its last checkpoint.")
@click.option("--force", is_flag=True, help="Write the run into an --out folder that holds other files.")
@options_from(TrainConfig)
def train(task, data_dir, out, resume, force, **kw):
    """Train a DenseNet121 classifier in two phases and write its test report.

    \b
    Example:
      mri-edge train --task tumor --data-dir ../shared/data/brain-tumor-mri \\
          --weights none --image-size 64 --epochs-finetune 4
    """
    if not resume and not (task and data_dir):
        raise click.UsageError("--task and --data-dir are required (unless --resume, which reads them from the run)")
    ctx = click.get_current_context()
    given = [p.opts[0] for p in ctx.command.params if p.name not in ("resume", "verbose")
             and ctx.get_parameter_source(p.name) == ParameterSource.COMMANDLINE]
    if resume and given:  # the run continues with the options it was started with (its config.json)
        raise click.UsageError(f"--resume continues the run with its own options; drop {', '.join(given)}")
    if not kw.get("teacher") and ctx.get_parameter_source("distill_weight") == ParameterSource.COMMANDLINE:
        raise click.UsageError("--distill-weight is the share of a teacher's answers: give --teacher RUN too")
    from . import train as train_lib  # noqa: PLC0415

    out = resume or out or str(train_lib.default_run_dir(task))
    cfg = config_from(TrainConfig, kw, task=task or "custom", data_dir=str(data_dir or ""), out=str(out))
    try:
        run_dir = run_guarded(train_lib.train, cfg, resume=resume, log=echo, force=force)
    except Interrupted:
        run = RunFolder(out)
        if run.checkpoint_path.is_file() and run.state_path.is_file():
            raise Interrupted(f"interrupted; the last finished epoch is saved: continue with "
                              f"`mri-edge train --resume {out}`") from None
        raise Interrupted("interrupted before the first epoch finished: nothing to resume; run the same "
                          "command again") from None
    click.echo(f"run folder: {run_dir}")
    click.echo(f"next: mri-edge export {run_dir} --format all")


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--data-dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="Where the run's data is on this machine (re-roots its split manifest).")
@click.option("--dedup", type=click.Path(exists=True, dir_okay=False), default=None,
              help="An audit.json: also report the leakage-free test subset.")
@click.option("--fp16-weights", is_flag=True,
              help="Store model.keras with its kernels rounded to float16 (half the size; the trained file stays "
                   "as model_fp32.keras) and report on the rounded model. Before export.")
def evaluate(run_dir, data_dir, dedup, fp16_weights):
    """Re-run a finished run's test evaluation on this machine.

    \b
    Example (a model trained on a GPU machine, data in another place here):
      mri-edge evaluate artifacts/runs/alzheimer-gpu --data-dir ../shared/data/alzheimer-mri
    """
    from . import evaluate as evaluate_lib  # noqa: PLC0415

    run_guarded(evaluate_lib.evaluate, run_dir, data_dir=data_dir, dedup=dedup, log=echo, fp16_weights=fp16_weights)
    exported = not fp16_weights and RunFolder(run_dir).export_files()  # rounded weights need new files
    click.echo(f"next: mri-edge verify {run_dir}" if exported else f"next: mri-edge export {run_dir} --format all")


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@options_from(ExportConfig)
@click.option("--add-features", is_flag=True, help="Only add the features output (calibrate's familiarity check "
              "reads it) to files exported before it existed, OpenVINO included; their probabilities stay bit for bit.")
def export(run_dir, add_features, **options):
    """Export a trained run to TFLite, ONNX and OpenVINO files with embedded metadata.

    An option that no planned file uses (say --bn-scales with --format onnx) is refused.

    \b
    Example:
      mri-edge export artifacts/runs/tumor-20260101-120000 --format tflite --quantize int8
    """
    from click.core import ParameterSource  # noqa: PLC0415

    from . import export as export_lib  # noqa: PLC0415

    ctx = click.get_current_context()
    given = tuple(n for n in options if ctx.get_parameter_source(n) == ParameterSource.COMMANDLINE)
    if add_features:
        return run_guarded(export_lib.add_features_run, run_dir, log=echo, given=given)
    given = tuple(n for n in export_lib.FORMAT_OPTIONS if n in given)  # refused where no planned file uses one
    cfg = config_from(ExportConfig, options)
    results, failures = run_guarded(export_lib.export_run, run_dir, **dataclasses.asdict(cfg), log=echo, given=given)
    if results:
        click.echo(export_lib.table(results))
    index = RunFolder(run_dir).exports_index_path
    click.echo(f"\nwrote {index}")
    if failures:
        for f in failures:
            click.echo(f"FAILED {f['file']}: {f['error']}", err=True)
        raise click.ClickException(f"{len(failures)} export(s) failed; earlier files were left untouched")
    first = next((r["file"] for r in results if r["quantization"] == "int8"), results[0]["file"])
    click.echo("next:")
    click.echo(f"  mri-edge verify {run_dir}")
    click.echo(f"  mri-edge bench {run_dir}")
    click.echo(f"  mri-edge predict {index.parent / first} IMAGE...")


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--file", "files", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Exported file(s) to check [default: every file in RUN_DIR/exports].")
@options_from(Thresholds)
@THREADS
@click.option("--dedup", type=click.Path(exists=True, dir_okay=False), default=None,
              help="An audit.json: also report parity on the leakage-free test subset.")
@click.option("--split", type=click.Choice(["test", "val"]), default="test", show_default=True,
              help="val: gate on the validation split instead (for choosing export settings).")
@click.option("--explain-images", type=click.IntRange(0), default=EXPLAIN_IMAGES, show_default=True,
              help="Compare occlusion maps of each file with the Keras model's on this many images (0: skip).")
@click.option("--debug-quant", is_flag=True,
              help="Also write verify/quant_debug.md: per-layer error of the int8 ONNX file against the fp32 one.")
def verify(run_dir, files, threads, dedup, split, explain_images, debug_quant, **gates):
    """Check that every exported file is as accurate as the Keras model.

    Runs each file on the test split through the on-device runtime and compares
    with the Keras test predictions. Exits 1 if any file fails its gate.
    --split val does the same on the validation split (reports in RUN_DIR/verify/val),
    to compare export settings without looking at the test set.

    \b
    Example:
      mri-edge verify artifacts/runs/tumor-20260101-120000
    """
    from . import verify as verify_lib  # noqa: PLC0415

    out = run_guarded(verify_lib.verify_run, run_dir, files or None, config_from(Thresholds, gates), threads,
                      dedup=dedup, log=echo, split=split, explain_images=explain_images, debug_quant=debug_quant)
    click.echo(verify_lib.summary_table(out))
    click.echo(f"\nwrote {out['report_files'][0]} and {Path(out['report_files'][1]).name}")
    if out["selected_files_only"]:
        click.echo(f"(only the files named by --file; the run's full report {RunFolder(run_dir).parity_paths()[0]} is "
                   "unchanged)")
    if not out["passed"]:
        click.echo("PARITY FAILED:\n  " + "\n  ".join(out["failures"]) + verify_lib.failure_hint(out), err=True)
        sys.exit(1)
    click.echo("parity OK: every exported file is within its gate")


@main.command()
@click.argument("model_path", type=click.Path(exists=True))
@click.argument("images", nargs=-1, required=True)
@click.option("--top-k", default=3, show_default=True, type=click.IntRange(1),
              help="Classes listed per image, most probable first (at most the model's number of classes).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per image on stdout.")
@click.option("--out", type=OUT_DIR, help="Also write predictions.json and predictions.md here.")
@THREADS
@click.option("--allow-other-resize", is_flag=True,
              help="Run even if this machine cannot resize images the way the model's preprocessing record says.")
@click.option("--xnnpack", type=click.Choice(["default", "latest", "off"]), default="default", show_default=True,
              help=".tflite only: the interpreter's XNNPACK kernels, or off for its built-in kernels "
                   "(which round int8 differently).")
def predict(model_path, images, top_k, as_json, out, threads, allow_other_resize, xnnpack):
    """Classify images with a .tflite, .onnx, OpenVINO .xml or .keras model (a run folder: its model.keras).

    IMAGES may be files, folders or glob patterns. Unreadable images are reported
    and skipped; the exit status is 1 if any image failed.

    \b
    Example:
      mri-edge predict artifacts/tumor/model_int8.tflite scan1.jpg scans/
    """
    from . import predict as predict_lib  # noqa: PLC0415
    from .backends import open_model  # noqa: PLC0415

    model = run_guarded(open_model, model_path, threads, allow_other_resize, xnnpack)
    inputs = run_guarded(predict_lib.read_inputs, images, echo)
    failed = run_guarded(predict_lib.run, model, inputs.paths, top_k, as_json, click.echo, Path(out) if out else None,
                         inputs.unmatched)
    if failed:
        click.echo(f"{failed} of {len(inputs.paths) + len(inputs.unmatched)} image(s) could not be read", err=True)
        sys.exit(1)


@main.command()
@click.argument("targets", nargs=-1, required=True)
@click.option("--threads", default=BENCH_TEXT["threads"], show_default=True, callback=int_list, help="Comma list, e.g. 1,2.")
@click.option("--batch", "batches", default=BENCH_TEXT["batches"], show_default=True, callback=int_list, help="Comma list.")
@click.option("--warmup", default=BENCH["warmup"], show_default=True, type=click.IntRange(0), help="Untimed runs before timing.")
@click.option("--runs", default=BENCH["runs"], show_default=True, type=click.IntRange(1), help="Timed runs of each row.")
@click.option("--seconds", default=None, type=Finite(0), help="Time each row at least this long.")
@click.option("--ort-opt-level", type=click.Choice(["disable", "basic", "extended", "all"]), default="all",
              show_default=True, help="onnxruntime graph optimisation level.")
@click.option("--out", "out_dir", type=OUT_DIR, default=None,
              help="Report folder [default: RUN_DIR/bench, or artifacts/runs/bench for model files].")
@click.option("--compare", "compare_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="An older bench.json: print p50 ratios against it.")
@click.option("--image", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Image for the end-to-end (decode + resize + invoke) column [default: a test image of the run].")
@click.option("--quick", is_flag=True, help=f"{QUICK_TEXT.capitalize()} (smoke test).")
@click.option("--device", type=click.Choice(["all", "cpu", "gpu"]), default="all", show_default=True,
              help="Only the rows of CPU or of GPU runtimes.")
@click.option("--strict", is_flag=True, help="Exit 1 if any row fails (by default only when every row fails).")
def bench(targets, threads, batches, warmup, runs, seconds, ort_opt_level, out_dir, compare_path, image, quick,
          device, strict):
    """Measure latency, throughput, size and memory of every artifact on every runtime.

    TARGETS are run folders (model.keras + exports/) and/or model files.

    \b
    Example:
      mri-edge bench artifacts/tumor --threads 1,2 --batch 1,8
    """
    from . import bench as bench_lib  # noqa: PLC0415

    old = run_guarded(bench_lib.read_bench, compare_path) if compare_path else None  # checked before any timing
    if quick and (given := [f for p, f in (("batches", "--batch"), ("warmup", "--warmup"), ("runs", "--runs"))
                            if click.get_current_context().get_parameter_source(p) == ParameterSource.COMMANDLINE]):
        raise click.UsageError(f"--quick sets {QUICK_TEXT}: drop it or {', '.join(given)}")
    if quick:
        batches, warmup, runs = (BENCH_QUICK[k] for k in ("batches", "warmup", "runs"))
    if out_dir is None:
        out_dir = RunFolder(targets[0]).bench_dir if Path(targets[0]).is_dir() else RUNS_ROOT / "bench"
    out = run_guarded(bench_lib.bench, targets, threads, batches, warmup, runs, seconds, out_dir, log=echo,
                      ort_opt_level=ort_opt_level, image=image, device=device)
    click.echo(bench_lib.table(out))
    for s in out["skipped"]:
        click.echo(f"skipped: {s['model']} on {s['runtime']} ({s['reason']})")
    for e in out["errors"]:
        click.echo(f"skipped (failed): {e['model']} on {e['runtime']} t={e['threads']} b={e['batch']}: {e['error']}")
    if old is not None:
        click.echo("\n" + bench_lib.compare(out, old))
    json_path, md_path, png_path = (Path(out_dir) / name for name in BENCH_FILES)
    click.echo(f"\nwrote {json_path} and {md_path.name}{f', {png_path.name}' if png_path.is_file() else ''}")
    if out["errors"] and strict:
        raise click.ClickException(f"{len(out['errors'])} row(s) failed: {out['errors'][0]['error']}")


@main.group(cls=Main)
def data():
    """Dataset tools: synthetic data and audits."""


@data.command("audit")
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--task", type=TASK_CHOICE, default="custom", show_default=True)
@click.option("--out", "out_dir", type=OUT_DIR, default=None,
              help="Report folder [default: artifacts/runs/audit/<data folder name>].")
@click.option("--hash-distance", default=HASH_MAX_DISTANCE, show_default=True, type=click.IntRange(0, 64),
              help="dHash Hamming distance that makes a near-duplicate candidate.")
@click.option("--pixel-threshold", default=PIXEL_MAD_THRESHOLD, show_default=True, type=Finite(0),
              help="Mean absolute grey-level difference that confirms a candidate.")
@click.option("--group-threshold", default=GROUP_THRESHOLD, show_default=True, type=Finite(0, 1),
              help="Thumbnail correlation that makes near twins, for the grouped validation probe.")
def data_audit(data_dir, task, out_dir, hash_distance, pixel_threshold, group_threshold):
    """Audit a dataset: counts, image kinds, corrupt files, exact and near duplicates, leakage.

    \b
    Example:
      mri-edge data audit ../shared/data/brain-tumor-mri --task tumor
      mri-edge train ... --dedup artifacts/runs/audit/brain-tumor-mri/audit.json
    """
    from . import audit as audit_lib, audit_report  # noqa: PLC0415

    out_dir = Path(out_dir or RUNS_ROOT / "audit" / Path(data_dir).resolve().name)
    out = run_guarded(audit_lib.audit, data_dir, task, out_dir, hash_distance, pixel_threshold, log=echo,
                      group_threshold=group_threshold)
    for s, v in out["leaked"].items():
        total = sum(out["counts"].get(s, {}).values())
        if total:
            click.echo(f"{s}: {len(v)} of {total} images have an exact or near copy in training"
                       f"{' or validation' if s == 'test' else ''}")
    click.echo(f"exact duplicate pairs by split: {audit_report.counts_text(out['exact_duplicates']['pairs_by_split'])}")
    click.echo(f"label conflicts: {out['n_label_conflicts']}; corrupt files: {len(out['corrupt'])}")
    click.echo(f"wrote {out_dir / AUDIT_FILES[0]}, {AUDIT_FILES[1]}, {out['pairs_csv']}" + (f", {out['pairs_plot']}" if out.get("pairs_plot") else ""))
    click.echo(f"next: mri-edge train ... --dedup {out_dir / AUDIT_FILES[0]}")


@data.command("synth")
@click.option("--out", type=OUT_DIR, required=True)
@click.option("--task", type=BUILT_IN_TASK, default="tumor", show_default=True)
@click.option("--n-train", default=60, show_default=True, type=click.IntRange(2), help="Images per class in Training.")
@click.option("--n-test", default=20, show_default=True, type=click.IntRange(1), help="Images per class in Testing.")
@click.option("--size", default=128, show_default=True, type=click.IntRange(32, 1024))
@click.option("--seed", default=0, show_default=True, type=int)
def data_synth(out, task, n_train, n_test, size, seed):
    """Write a synthetic MRI-like dataset in the Kaggle folder layout.

    \b
    Example:
      mri-edge data synth --out /tmp/phantoms --task tumor
    """
    from .progress import Progress  # noqa: PLC0415
    from .synth import write_dataset  # noqa: PLC0415

    target = Path(out)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise click.ClickException(f"--out {out} is not empty; phantoms would mix with what is there "
                                   "(choose a new or empty folder)")
    with Progress((n_train + n_test) * 4, "writing phantoms") as bar:
        root = write_dataset(out, task, n_train, n_test, size, seed, progress=bar.update)
    click.echo(f"wrote {root}")


@main.command()
@click.option("--out", type=OUT_DIR, default=str(RUNS_ROOT / "demo"), show_default=True)
@click.option("--task", type=BUILT_IN_TASK, default="tumor", show_default=True)
@click.option("--image-size", default=RECIPE.image_size, show_default=True, type=click.IntRange(32, 256))
@click.option("--epochs", default=RECIPE.epochs, show_default=True, type=click.IntRange(1))
@click.option("--n-train", default=RECIPE.n_train, show_default=True, type=click.IntRange(4),
              help="Phantoms per class in Training.")
@click.option("--skip-export", is_flag=True, help="Only train and report.")
def demo(out, task, image_size, epochs, n_train, skip_export):
    """Run the whole pipeline on generated phantoms; no dataset needed.

    Generates a small synthetic dataset, trains DenseNet121 from scratch at a small size,
    then exports every format, verifies each file against the Keras model and benchmarks
    them. Exits 1, naming what failed, if any export fails or misses its parity gate.

    \b
    Example:
      mri-edge demo --out /tmp/demo
    """
    from .demo import run_demo  # noqa: PLC0415

    run_dir, problems = run_guarded(run_demo, out, task, image_size, epochs, n_train, skip_export, log=echo,
                                    show=click.echo)
    click.echo(f"\nproduced: {run_dir} (index page {RunFolder(run_dir).index_path}; data in {Path(out) / 'data'})")
    click.echo("next, on real data:\n"
               "  mri-edge data audit ../shared/data/brain-tumor-mri --task tumor\n"
               "  mri-edge train --task tumor --data-dir ../shared/data/brain-tumor-mri --image-size 64 \\\n"
               "      --dedup artifacts/runs/audit/brain-tumor-mri/audit.json --out artifacts/runs/tumor\n"
               "  # --weights imagenet is the default; --weights none trains from scratch, as the demo did\n"
               "  mri-edge export artifacts/runs/tumor --format all && mri-edge verify artifacts/runs/tumor")
    if problems:
        raise click.ClickException("demo FAILED: " + "; ".join(problems))
    click.echo("demo finished: every exported file passed its parity gate" if not skip_export else
               "demo finished: trained and reported (export skipped)")


if __name__ == "__main__":
    main()
