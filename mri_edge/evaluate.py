"""The test evaluation of a Keras model: at the end of training, again later (`mri-edge
evaluate`: another machine, data moved, kernels stored as float16) and for ensembles."""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from . import data, distill, groups, metrics, quiet, report
from .config import TrainConfig
from .errors import require, training_packages
from .files import sha256_file
from .progress import Progress
from .run import RunFolder, holding


@holding("evaluate")
def evaluate(run_dir, data_dir: str | None = None, dedup: str | None = None, log=print,
             fp16_weights: bool = False) -> dict:
    """Re-run the test evaluation of a finished run, e.g. one trained on another machine.
    `data_dir` re-roots the run's split manifest (the data sits elsewhere here): every
    file must be found under it before anything is rewritten, and export/verify then
    read from there too. The Keras test report becomes this machine's numbers, which
    is what verify compares exported files against. `fp16_weights` stores model.keras with
    its kernels rounded to float16 (DenseNet121: 28 -> 15 MB, a size a repository can hold; the
    trained file stays as model_fp32.keras), and the test report is that of the rounded model,
    so every later export and check compares against the model that is stored."""
    require(training_packages(), "mri-edge evaluate")
    from . import model as model_lib  # noqa: PLC0415
    from .train import TrainError, resolve_phases, versions  # noqa: PLC0415 (train imports this module)

    run = RunFolder(run_dir)
    run_dir = run.path
    run.require_model()
    run.check_writable()  # before minutes of evaluation, not after
    saved, manifest = run.config(), run.manifest()
    run.check_preprocessing()
    cfg = TrainConfig.from_saved(saved)
    root = Path(data_dir or manifest["root"])
    missing = [rel for rows in manifest["splits"].values() for rel, _ in rows if not (root / rel).is_file()]
    if missing:
        raise TrainError(f"{'--data-dir ' if data_dir else ''}{root}: {len(missing)} file(s) of the run's splits are "
                         f"not there, e.g. {missing[0]}" + ("" if data_dir else "; give --data-dir where the data is now"))
    if data_dir:
        manifest["root"] = str(root.resolve())
        cfg.data_dir = str(data_dir)
    if dedup:
        from . import audit  # noqa: PLC0415

        audit.read_audit(dedup)
        cfg.dedup = dedup
    elif cfg.dedup and not Path(cfg.dedup).is_file():
        log(f"the run's --dedup file {cfg.dedup} is not here; leakage-free subset not reported (pass --dedup)")
        cfg.dedup = None
    dataset = data.dataset_from_manifest(manifest)
    quiet.import_tensorflow()
    original = run.fp32_model_path
    net = model_lib.load_model(original if fp16_weights and original.is_file() else run.model_path)
    stored, commit = {}, None
    if fp16_weights:  # model.keras changes with the reports that describe it (commit), not before
        changed = model_lib.round_kernels_fp16(net)
        stored = {"weights_stored": {"kernels": "float16", "rounded_values": changed, "from": {
            "file": original.name, "sha256": sha256_file(original if original.is_file() else run.model_path)}}}

        def store_rounded():
            if not original.is_file():
                os.link(run.model_path, original)  # the trained file stays, under its new name
            model_lib.save_compact(net, run.model_path)
        commit = store_rounded
        log(f"model.keras: kernels rounded to float16 ({changed} values; the trained file stays as {original})")
    dec = {s: data.decode_split(dataset.splits[s], cfg.image_size, Path(cfg.cache_dir) if cfg.cache_dir else None)
           for s in ("train", "val", "test")}
    if data_dir:
        report.write_json(run.manifest_path, manifest)
    notes = resolve_phases(cfg)[1] + distill.weights_seen(cfg.weights, manifest)
    result = evaluate_run(run_dir, net, dec, cfg, float(saved.get("wall_time_s", 0.0)), notes, config_update={
        "data_dir": cfg.data_dir, "dedup": cfg.dedup, **stored,
        "evaluated": {"versions": versions(), "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}}, commit=commit)
    log(f"{report.test_summary(result)} ({run_dir})")
    return result


def predict_arrays(net, images: np.ndarray, batch_size: int = 32, label: str | None = None) -> np.ndarray:
    """Keras probabilities for uint8 images, a batch at a time, with a progress line when labelled."""
    from .keras_model import forward  # noqa: PLC0415

    out = []
    bar = Progress(len(images), label) if label else None
    for i in range(0, len(images), batch_size):
        out.append(np.asarray(forward(net, images[i:i + batch_size].astype(np.float32))))
        if bar:
            bar.update(len(out[-1]))
    return np.concatenate(out) if out else np.zeros((0, net.output_shape[-1]), np.float32)


def evaluate_run(run_dir: Path, net, dec: dict, cfg: TrainConfig, wall: float, notes: list[str],
                 config_update: dict | None = None, commit=None) -> dict:
    """Test-set report: metrics, bootstrap CI, per-image predictions, plots and report.md, written
    together with what `commit` changes, an interrupt waiting until all are."""
    run = RunFolder(run_dir)
    names = cfg.class_names
    test = dec["test"]
    probs = predict_arrays(net, test.images, label="Keras on the test split")
    pred = probs.argmax(1)
    m = metrics.with_cis(test.labels, pred, names, cfg.seed)
    m["calibration"] = metrics.calibration_metrics(test.labels, probs)
    m["skipped"] = test.skipped
    root = Path(cfg.data_dir)
    rel = [data.rel_path(p, root) for p in test.paths]
    # later commands use the images the run used; resumed or evaluated again, the names stay on record
    unreadable = run.leave_out_unreadable({s: [data.rel_path(x["path"], root) for x in d.skipped] for s, d in dec.items()})
    if cfg.dedup:
        from . import audit  # noqa: PLC0415

        clean = audit.leakage_free_mask(cfg.dedup, test.paths, root)
        m["dedup"] = metrics.with_cis(test.labels[clean], pred[clean], names, cfg.seed)
    with quiet.signals_deferred():
        if commit is not None:
            commit()
        summary = run.config()  # first: it records what commit changed (e.g. weights_stored)
        summary.update({"wall_time_s": wall, **(config_update or {})})
        report.write_json(run.config_path, summary)
        report.write_json(run.test_report_path, m)
        report.write_json(run.predictions_path, {
            "class_names": names, "paths": rel, "labels": test.labels.tolist(), "pred": pred.tolist(),
            "probs": np.round(probs, 6).tolist()})
        report.plot_confusion(m["confusion_matrix"], names, run.confusion_path,
                              f"{cfg.task} test, accuracy {m['accuracy']:.3f}")
        report.plot_examples(test.images, test.labels, pred, probs, names, run.examples_path, seed=cfg.seed)
        report.plot_reliability(m["calibration"], run.reliability_path, f"{cfg.task} test, Keras")
        extra = {
            "wall_time_s": wall,
            "phase_notes": notes + [f"phase '{p['name']}': up to {p['epochs']} epoch{'s' * (p['epochs'] != 1)}, lr {p['lr']:g}, "
                                    f"unfreeze {p['unfreeze']}" for p in cfg.phases],
            "splits": {s: {"n": len(d.labels), "skipped": len(unreadable.get(s, [])), "unreadable": unreadable.get(s, [])}
                       for s, d in dec.items()},
            "validation": groups.describe_carve(run.manifest()),
        }
        report.write_text(run.train_report_path, report.train_report_markdown(run, asdict(cfg), m, extra))
        run.write_index()
    return m
