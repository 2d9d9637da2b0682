"""`mri-edge ensemble`: finished runs combined into one model that averages their probabilities.

The result is a run folder like any other (config, labels, split manifest, model.keras, test
report), so calibrate, export, verify, bench, card and predict work on it unchanged: the
exported file is one graph that runs every member on the image and returns the mean of
their probabilities. Members must share the class names, the input size and preprocessing,
and the validation and test splits: the validation split is what calibration and the
accuracy-aware export hold out, and no member may have trained on it.
"""

from __future__ import annotations

from pathlib import Path

from . import data, quiet, report
from .config import REGULARISERS
from .errors import MriEdgeError
from .files import sha256_file
from .run import RunFolder


class EnsembleError(MriEdgeError, ValueError):
    """Runs that cannot be averaged into one model."""


MODEL_NAME = "mri_edge_ensemble"


def check_members(run_dirs: list) -> list[dict]:
    """Each member's folder, config, labels and split manifest; one-line errors for runs
    that are missing, unfinished or not comparable."""
    runs = [RunFolder(p) for p in run_dirs]
    if len(runs) < 2:
        raise EnsembleError("an ensemble needs at least two runs")
    seen = set()
    members = []
    for run in runs:
        run.require_model()
        key = run.path.resolve()
        if key in seen:
            raise EnsembleError(f"{run.path} is given twice; an ensemble averages different runs")
        seen.add(key)
        members.append({"run": run, "config": run.config(), "labels": run.labels(), "manifest": run.manifest()})
    first = members[0]
    refit = [str(m["run"].path) for m in members if data.is_refit(m["manifest"])]
    if refit:
        raise EnsembleError(f"{', '.join(refit)} trained on its validation images too (train --refit): the ensemble "
                            "would be judged and calibrated on images a member learned; average runs without --refit")
    for m in members[1:]:
        where = f"{m['run'].path} and {first['run'].path}"
        if m["labels"]["class_names"] != first["labels"]["class_names"]:
            raise EnsembleError(f"{where} have different classes")
        if m["config"]["image_size"] != first["config"]["image_size"]:
            raise EnsembleError(f"{where} have different input sizes ({m['config']['image_size']} vs "
                                f"{first['config']['image_size']} px); train them at one size")
        if m["config"].get("preprocessing") != first["config"].get("preprocessing"):
            raise EnsembleError(f"{where} record different preprocessing contracts")
        for split in ("val", "test"):
            if m["manifest"]["splits"].get(split) != first["manifest"]["splits"].get(split):
                left_out = (m["manifest"].get("unreadable") or {}).get(split) or \
                    (first["manifest"].get("unreadable") or {}).get(split)
                raise EnsembleError(
                    f"{where} have different {split} splits; members must share them (train each with the same "
                    "--val-split and --split-seed), or a member may have trained on the images the ensemble is judged on"
                    + (f"; one left out images it could not decode ({', '.join(left_out[:3])}): fix or remove them and "
                       "train again" if left_out else ""))
    return members


def ensemble_model(nets: list, image_size: int):
    """One Keras model: raw 0-255 RGB in, the mean of the members' probabilities out. Each
    member keeps its own normalisation layer, so the preprocessing contract is unchanged."""
    import keras  # noqa: PLC0415

    inputs = keras.Input((image_size, image_size, 3), name="image")
    outs = [keras.Model(net.inputs[0], net.outputs[0], name=f"member_{i + 1}")(inputs) for i, net in enumerate(nets)]
    probs = keras.layers.Average(name="probabilities", dtype="float32")(outs)
    return keras.Model(inputs, probs, name=MODEL_NAME)


def member_models(config: dict, sha: str) -> set[str]:
    """The model files a run's probabilities come from: its own, or, for an ensemble, its members'."""
    members = (config.get("ensemble") or {}).get("members") or []
    return {m["model_sha256"] for m in members if m.get("model_sha256")} or {sha}


def build(run_dirs: list, out, force: bool = False, log=print) -> dict:
    """Write the ensemble's run folder at `out` and its test report; returns the test metrics.

    model.keras is written last: a folder left by an interrupted or failed build has no
    model, so no later command takes it for a finished run and the same --out can be retried.
    """
    from . import model as model_lib  # noqa: PLC0415
    from .config import TrainConfig  # noqa: PLC0415
    from .evaluate import evaluate_run  # noqa: PLC0415
    from .train import versions  # noqa: PLC0415

    members = check_members(run_dirs)
    run = RunFolder(out)
    if any(run.path.resolve() == m["run"].path.resolve() for m in members):
        raise EnsembleError(f"--out {run.path} is one of the members; choose a new folder")
    run.check_new_run(force)
    seen: set[str] = set()
    for m in members:
        m["sha256"] = sha256_file(m["run"].model_path)
        inner = member_models(m["config"], m["sha256"])
        if inner & seen:
            raise EnsembleError(f"{m['run'].path} holds a model another member holds too (an ensemble and one of its "
                                "members?); it would count twice")
        seen |= inner
        m["test_accuracy"] = _test_accuracy(m["run"])
    first = members[0]
    manifest = first["manifest"]
    first["run"].check_preprocessing()  # the members share the record (checked above); decoded here
    quiet.import_tensorflow()  # before versions() imports Keras: its start-up lines stay hidden
    record = {"combine": "mean of the members' probabilities", "members": [
        {"run": str(m["run"].path.resolve()), "model_sha256": m["sha256"], "weights": m["config"].get("weights"),
         "test_accuracy": m["test_accuracy"]} for m in members]}
    # The first member's config gives the shared facts (task, classes, size, preprocessing, splits,
    # seed); what described its own training or files goes, so nothing here speaks for one member.
    config = {k: v for k, v in first["config"].items()
              if k not in ("distribution", "weights_stored", "evaluated", "distillation", "distill_weight",
                            *REGULARISERS)}
    config.update({"out": str(run.path), "data_dir": manifest["root"], "weights": "ensemble", "phases": [],
                   "ensemble": record, "versions": versions(),
                   "wall_time_s": sum(float(m["config"].get("wall_time_s") or 0.0) for m in members)})
    try:
        cfg = TrainConfig.from_saved(config)
    except (TypeError, ValueError) as e:
        raise EnsembleError(f"{first['run'].path}/config.json is not a config of `mri-edge train` ({e})") from None
    if cfg.dedup and not Path(cfg.dedup).is_file():
        log(f"the members' --dedup file {cfg.dedup} is not here; leakage-free subset not reported")
        cfg.dedup = config["dedup"] = None
    dataset = data.dataset_from_manifest(manifest)
    missing = [p for s in ("val", "test") for p in dataset.splits[s].paths if not Path(p).is_file()]
    if missing:
        raise EnsembleError(f"the members' data is not at {manifest['root']} ({len(missing)} file(s) missing, e.g. "
                            f"{missing[0]}); re-root the first member with `mri-edge evaluate --data-dir`")
    quiet.import_tensorflow()
    nets = []
    for i, m in enumerate(members, 1):
        log(f"member {i}/{len(members)}: {m['run'].path}")
        with quiet.native_stderr():
            nets.append(model_lib.load_model(m["run"].model_path))
    net = ensemble_model(nets, int(cfg.image_size))
    cache = Path(cfg.cache_dir) if cfg.cache_dir else None
    dec = {s: data.decode_split(dataset.splits[s], cfg.image_size, cache) for s in ("val", "test")}
    run.path.mkdir(parents=True, exist_ok=True)
    report.write_json(run.manifest_path, manifest)
    report.write_json(run.labels_path, first["labels"])
    report.write_json(run.config_path, config)
    notes = [f"ensemble: the mean of the probabilities of {len(members)} runs (no training of its own)"] + [
        f"member {i}: {m['run'].path} (test accuracy {_fmt(m['test_accuracy'])})" for i, m in enumerate(members, 1)]
    metrics = evaluate_run(run.path, net, dec, cfg, config["wall_time_s"], notes)
    model_lib.save_model(net, run.model_path)
    run.write_index()
    return metrics


def _test_accuracy(run: RunFolder) -> float | None:
    return (run.test_report() or {}).get("accuracy")


def _fmt(acc: float | None) -> str:
    return "not recorded" if acc is None else f"{acc:.4f}"
