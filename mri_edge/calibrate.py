"""`mri-edge calibrate`: fit a temperature, an abstention threshold and conformal prediction
sets on held-out images that look like new subjects to the model, store the record in the
run (trust.json) and in every exported file's metadata, and report what it gives on test.

Held-out images: the run's validation split when it was carved by whole groups of
near-identical images (`train --val-split grouped`); otherwise only those validation images
with no near twin in training (thumbnail correlation below --group-threshold, the measure
of `groups.py`). A temperature fitted on twins of training stays overconfident on new subjects,
so too few twin-free images, or ones a raw-pixel 1-NN gets more of than of test, is an error
unless --allow-twins. The test split is only ever reported, never fitted on.

The fit uses the most precise model of the run (model.keras, else the fp32, fp16, dynamic, int8
file in that order, or --reference); one record serves every file, and every runtime applies it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import familiar, metrics, quiet, report, trust
from .calibrate_report import summary_table, write_reports  # noqa: F401 (summary_table: the CLI's)
from .config import CalibrateConfig
from .data import decode_images
from .errors import require
from .files import sha256_file
from .freshness import made_from_another
from .run import RunFolder, holding
from .backends import open_model
from .calibrate_heldout import CalibrateError, borrowed, held_out_rows, split_manifest
from .export.formats import QUANTIZATIONS


def reference_model(run: RunFolder, files: list[Path], reference: str | None) -> Path:
    """The model to fit on: --reference (checked before any work to be this run's model or one of
    its files' siblings: a record fitted on another model would be stored in these files), else
    model.keras, else the run's most precise file."""
    if reference:
        return checked_reference(run, files, Path(reference))
    if run.model_path.is_file():
        return run.model_path
    if not files:
        raise CalibrateError(f"{run.path}: no model.keras and no exported files to calibrate")
    from .backends import read_metadata  # noqa: PLC0415

    def rank(p: Path):
        if p.suffix == ".xml":
            return (9, 9)
        q = read_metadata(p).get("quantization", "int8")
        return (QUANTIZATIONS.index(q) if q in QUANTIZATIONS else 9, 0 if p.suffix == ".tflite" else 1)

    return min(files, key=rank)


def checked_reference(run: RunFolder, files: list[Path], ref: Path) -> Path:
    from .backends import MODEL_SUFFIXES, read_metadata  # noqa: PLC0415
    from .integrity import RuntimeModelError, check_model_file  # noqa: PLC0415

    try:
        check_model_file(ref, MODEL_SUFFIXES, "a model file")
        made_from = sha256_file(ref) if ref.suffix == ".keras" else read_metadata(ref).get("source_model_sha256")
    except RuntimeModelError as e:
        raise CalibrateError(f"--reference {e}") from None
    runs = {sha256_file(run.model_path)} if run.model_path.is_file() else \
        {read_metadata(f).get("source_model_sha256") for f in files}  # (a damaged file: named in one line)
    if made_from is None or made_from not in runs:
        raise CalibrateError(f"--reference {ref}: not this run's model (made from another model.keras); its record "
                             "would go into this run's files: give the run's model.keras or one of its own files")
    others(files, ref)  # a copy of one of the run's files under its name
    return ref


def source_model_sha256(run: RunFolder, ref_path: Path) -> str | None:
    """SHA-256 of the trained model the files come from: model.keras, or what the reference
    file's metadata records (a shipped folder has no model.keras)."""
    if run.model_path.is_file():
        return sha256_file(run.model_path)
    from .backends import read_metadata  # noqa: PLC0415

    return read_metadata(ref_path).get("source_model_sha256")


def target(cfg: CalibrateConfig) -> dict:
    """What the threshold was chosen for, as trust.json records it."""
    if cfg.coverage is not None:
        return {"coverage": cfg.coverage}
    if cfg.risk_confidence is None:
        return {"max_risk": cfg.max_risk}
    return {"max_risk": cfg.max_risk, "confidence": cfg.risk_confidence}


def untestable(cfg: CalibrateConfig, n_held_out: int) -> str:
    """Why a tested threshold refers every answer, when the cause is the held-out set's size."""
    if cfg.risk_confidence is None or not cfg.max_risk:
        return ""
    fewest = trust.fewest_to_certify(cfg.max_risk, cfg.risk_confidence)
    if n_held_out >= fewest:
        return (f" with {cfg.risk_confidence:.0%} confidence (the first test, of the {fewest} most confident answers, "
                "fails: an error among them)")
    return (f"; a test at {cfg.risk_confidence:.0%} confidence needs at least {fewest} accepted held-out answers "
            f"(held out: {n_held_out})")


def evaluate(probs: np.ndarray, labels: np.ndarray, record: trust.Trust) -> dict:
    """Calibration before and after the temperature, abstention at the threshold and the
    conformal sets' coverage, for one model on one split."""
    cal = record.apply(probs)
    keys = ("ece", "mce", "brier", "nll", "mean_confidence", "accuracy")
    before, after = metrics.calibration_metrics(labels, probs), metrics.calibration_metrics(labels, cal)
    out = {"n": int(len(labels)), "before": {k: before[k] for k in keys}, "after": {k: after[k] for k in keys},
           "reliability_before": before["reliability"], "reliability_after": after["reliability"],
           "coverage_risk": trust.coverage_risk(cal, labels), **record.decision_metrics(cal, labels)}
    return out


@holding("calibrate")
def calibrate_run(run_dir, cfg: CalibrateConfig | None = None, reference: str | None = None,
                  threads: int | None = None, data_dir: str | None = None, log=print) -> dict:
    cfg = cfg or CalibrateConfig()
    run = RunFolder(run_dir)
    if not run.path.is_dir():
        raise CalibrateError(f"run folder not found: {run.path}")
    run.check_writable(run.path, run.calibration_dir, run.exports_dir)  # each written, the report last
    require(("matplotlib",), "mri-edge calibrate")  # its plots, written after every file's record
    if cfg.foreign:  # before any work: a typo here would otherwise fail after minutes
        familiar.check_foreign(cfg.foreign)
    files = run.export_files()
    ref_path = reference_model(run, files, reference)  # before a split manifest is rebuilt or an image read
    source_sha = source_model_sha256(run, ref_path)
    if other := made_from_another(run.export_metadata(), source_sha):  # a record fitted on one model, into another's
        raise CalibrateError(f"{', '.join(other)}: exported from another model.keras than the run's (retrained, or "
                             f"evaluate --fp16-weights since); run mri-edge export {run.path} again first")
    manifest = split_manifest(run, data_dir, log)
    root = Path(manifest["root"])
    names = manifest["class_names"]
    donor = borrowed(manifest, cfg, log) if cfg.from_run else None
    keep, held = ([], donor[1]) if donor else held_out_rows(manifest, cfg, log)
    val_rows = [manifest["splits"]["val"][i] for i in keep]
    test_rows = manifest["splits"].get("test") or []
    y_val = np.array([y for _, y in val_rows])
    y_test = np.array([y for _, y in test_rows])

    decoded: dict[tuple[int, str], np.ndarray] = {}

    def images(model, rows, what):
        key = (model.image_size, what)
        if key not in decoded:
            decoded[key] = decode_images(model, root, [rel for rel, _ in rows], what, "if the dataset moved, give --data-dir")
        return decoded[key]

    def run_on(path: Path):
        """The opened model, its probabilities on held-out and test images, and the features of
        held-out, test and --foreign images (None where the file has no features output)."""
        model = open_model(path, threads=threads)
        if model.class_names != names:
            raise CalibrateError(f"{path}: class names {model.class_names} differ from the run's {names}")
        val, f_val = model.predict_arrays(images(model, val_rows, "held-out images"), 32, calibrated=False,
                                          label=f"{model.path.name} on held-out images", features=True) \
            if val_rows else (None, None)
        test, f_test = model.predict_arrays(images(model, test_rows, "test images"), 32, calibrated=False,
                                            label=f"{model.path.name} on test images", features=True) \
            if test_rows else (None, None)
        feats = {"held_out": f_val, **({"test": f_test} if test_rows else {})}
        if cfg.foreign:
            key = (model.image_size, "foreign")
            if key not in decoded:
                decoded[key] = familiar.foreign_images(model, cfg.foreign, cfg.foreign_limit)
            feats["foreign"] = familiar.features(model, decoded[key], "foreign images")
        return model, val, test, feats

    ref_model, ref_val, ref_test, ref_feats = run_on(ref_path)
    if donor:  # the recipe's record: its reports' numbers are this run's on test only
        record = donor[0]  # now this model's; the record names whose model it was fitted with
        record.fitted_on = {**record.fitted_on, "source_model_sha256": source_sha, "borrowed_from": {
            "run": held["borrowed_from"], "source_model_sha256": record.fitted_on.get("source_model_sha256")}}
        on_test = (lambda p: {"test": evaluate(p, y_test, record)} if p is not None else {})
        results = {ref_path.name: {**on_test(ref_test), "reference": True}}
        for f in others(files, ref_path):
            results[f.name] = on_test(run_on(f)[2])
        return store(run, files, record, held, results, cfg, names, log)
    ref_runtime = ref_model.runtime_name
    temperature = trust.fit_temperature(ref_val, y_val)
    cal_val = trust.scale(ref_val, temperature)
    threshold = trust.choose_threshold(cal_val, y_val, cfg.max_risk, cfg.coverage, cfg.risk_confidence)
    q = trust.conformal_quantile(cal_val, y_val, cfg.alpha)
    record = trust.Trust(temperature, threshold, cfg.alpha, q, fitted_on={
        "model": ref_path.name, "runtime": ref_runtime, "images": held["n"], "rule": held["rule"],
        # which trained model the record belongs to: verify and the .keras back end refuse it elsewhere
        "source_model_sha256": source_sha,
        "twins_included": held["twins_included"],
        "temperature_at_bound": bool(min(abs(temperature - b) / b for b in trust.T_RANGE) < 0.01),
        "target": target(cfg)})
    if ref_feats["held_out"] is not None:
        train_rows = familiar.training_rows(manifest, cfg.familiar_images)
        f_train = familiar.features(ref_model, images(ref_model, train_rows, "training images"), "training images")
        record.familiarity = familiar.fit(f_train, np.array([y for _, y in train_rows]), ref_feats["held_out"], cfg)
        if (dims := record.familiarity["shape"][1]) < cfg.familiar_dims:
            log(f"note: --familiar-dims {cfg.familiar_dims} is more than the features and training images allow; "
                f"measured in {dims} directions")
    else:
        log(f"note: {ref_path.name} has no features output (exported before mri-edge had one, or an ensemble): "
            "no familiarity check")
    if record.fitted_on["temperature_at_bound"]:
        why = ("too few errors to fit it" if temperature < 1 else
               "its answers are little better than chance there, so every probability is flattened")
        log(f"warning: the temperature stopped at the end of its range {trust.T_RANGE} (held-out accuracy "
            f"{(ref_val.argmax(1) == y_val).mean():.1%}: {why})")
    if cfg.max_risk is not None and threshold == trust.REFER_ALL:
        log(f"warning: no confidence threshold keeps the held-out error at or below {cfg.max_risk}"
            f"{untestable(cfg, held['n'])}: every answer will be marked for review (a better model, more held-out "
            "images, or a looser --max-risk / --coverage)")
    log(f"temperature {temperature:.3f}, abstain below {trust.threshold_text(threshold)}, conformal q {q:.3f} (alpha {cfg.alpha}), "
        f"fitted on {held['n']} held-out images with {ref_path.name}")

    def familiarity(name: str, feats: dict, val, test) -> dict:
        if not record.familiarity:
            return {}
        if feats["held_out"] is None:
            log(f"warning: {name} has no features output, so no familiarity check: mri-edge export "
                f"{run.path} --add-features, then calibrate again")
        labelled = {"held_out": (val, y_val), "test": (test, y_test)}
        return {"familiarity": {k: familiar.referred(record, f, *labelled.get(k, ())) for k, f in feats.items()}}

    results = {ref_path.name: {"held_out": evaluate(ref_val, y_val, record),
                               **({"test": evaluate(ref_test, y_test, record)} if ref_test is not None else {}),
                               "reference": True, **familiarity(ref_path.name, ref_feats, ref_val, ref_test)}}
    for f in others(files, ref_path):
        _, val, test, feats = run_on(f)
        results[f.name] = {"held_out": evaluate(val, y_val, record),
                           **({"test": evaluate(test, y_test, record)} if test is not None else {}),
                           **familiarity(f.name, feats, val, test)}
    return store(run, files, record, held, results, cfg, names, log)


def others(files: list[Path], ref_path: Path) -> list[Path]:
    """The run's files other than the reference model."""
    out = [f for f in files if f.resolve() != ref_path.resolve()]
    if any(f.name == ref_path.name for f in out):
        raise CalibrateError(f"--reference {ref_path} has the name of one of the run's files; pass that file instead")
    return out


def store(run: RunFolder, files: list[Path], record: trust.Trust, held: dict, results: dict, cfg: CalibrateConfig,
          names: list[str], log) -> dict:
    """The record into each file and the run, then the reports."""
    # Store in each file (its model bytes untouched, their hash checked), then the run's record.
    # A file that already holds this record is left as it is: calibrating again changes no bytes.
    from .export import rewrite_metadata  # noqa: PLC0415
    from .backends import read_metadata  # noqa: PLC0415

    with quiet.signals_deferred():  # the files, trust.json and the reports change together
        stored_form = json.loads(json.dumps(record.to_dict()))
        done = []
        for f in files:
            try:
                meta = read_metadata(f)
                if meta.get("trust") != stored_form:
                    rewrite_metadata(f, {**meta, "trust": record.to_dict()})
                results[f.name]["model_sha256"] = meta.get("model_sha256")  # which file the row measured (card checks)
                stored = open_model(f).trust  # reopened: hash checked, record read back
                if stored is None or stored.to_dict() != record.to_dict():
                    raise CalibrateError("the record did not read back")
            except Exception as e:
                raise CalibrateError(f"{f}: cannot store the calibration ({e}); updated so far: "
                                     f"{', '.join(done) or 'none'}; fix it and run calibrate again") from None
            done.append(f.name)
        report.write_json(run.trust_path, record.to_dict())
        for line in familiar.summary_lines(record, results):
            log(line)
        out = {"run_dir": str(run.path), "class_names": names, "trust": record.to_dict(), "held_out": held,
               "files": results, "updated_files": [f.name for f in files], "foreign": cfg.foreign}
        write_reports(run, out)
    return out
