"""Which images `mri-edge calibrate` fits on: the run's split manifest (rebuilt from its config
for a shipped folder), the held-out rows (a grouped validation split, or the validation images
with no near twin in training) and a record borrowed from the run of the same recipe
(--from-run)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import groups, report, trust
from .config import GROUP_THRESHOLD, CalibrateConfig, TrainConfig, carve_seed
from .data import is_refit
from .errors import MriEdgeError
from .files import read_json, sha256_file
from .run import RunFolder


class CalibrateError(MriEdgeError):
    pass


def held_out_rows(manifest: dict, cfg: CalibrateConfig, log) -> tuple[list[int], dict]:
    """Indices into the validation split of the images to fit on, and how they were chosen
    (with a 1-NN probe of them and of the test split against training)."""
    root = Path(manifest["root"])
    val = manifest["splits"].get("val") or []
    train = manifest["splits"].get("train") or []
    test = manifest["splits"].get("test") or []
    if not val:
        raise CalibrateError("the run has no validation split to calibrate on")
    if is_refit(manifest):
        raise CalibrateError("the run trained on its validation images too (train --refit): none is held out to fit "
                             "on; calibrate the run of its recipe without --refit, then this one with --from-run RUN")
    method = (manifest.get("val_split") or {}).get("method", "random")
    paths = [str(root / rel) for rel, _ in train + val + test]
    thumbs, _ = groups.read_thumbnails(paths, "thumbnails of train, validation and test")
    labels = np.array([y for _, y in train + val + test])
    nt, nv = len(train), len(val)
    t_th, v_th, x_th = thumbs[:nt], thumbs[nt:nt + nv], thumbs[nt + nv:]
    nn_v, best_v = groups.nearest(v_th, t_th)
    if method == "grouped":
        keep = np.arange(nv)
        rule = "the run's grouped validation split (whole groups of near-identical images held out)"
    else:
        keep = np.flatnonzero(best_v < cfg.group_threshold)
        rule = (f"validation images with no near twin in training (thumbnail correlation < {cfg.group_threshold}); "
                f"{nv - len(keep)} of {nv} have one")
    twins = False
    least = CalibrateConfig.__dataclass_fields__["min_images"].metadata["minimum"]  # what --min-images accepts
    more = (f"fewer than --min-images {cfg.min_images}: hold out more (a larger --val-fraction, or a Validation folder) "
            "and retrain" + (f", or lower --min-images (to {least} at least)" if nv >= least else ""))
    if nv < cfg.min_images or (len(keep) < cfg.min_images and method == "grouped"):
        raise CalibrateError(f"the {'grouped ' if method == 'grouped' else ''}validation split holds {nv} images, {more}")
    if len(keep) < cfg.min_images:
        if not cfg.allow_twins:
            raise CalibrateError(
                f"only {len(keep)} of {nv} validation images have no near twin in training (correlation >= "
                f"{cfg.group_threshold}), fewer than {cfg.min_images}: a fit on twins of training stays "
                "overconfident on new subjects. Retrain with `--val-split grouped`, or pass --allow-twins to fit on "
                "the whole validation split anyway")
        keep, twins = np.arange(nv), True
        rule = f"the whole validation split, near twins of training included (--allow-twins; {len(keep)} images)"
    y_val, y_train = labels[nt:nt + nv], labels[:nt]
    info = {"rule": rule, "method": method, "twins_included": twins, "n": int(len(keep)), "of": nv,
            "group_threshold": cfg.group_threshold,
            "nn_probe_accuracy": float((y_train[nn_v[keep]] == y_val[keep]).mean()) if len(keep) else None,
            "median_best_correlation": float(np.median(best_v[keep])) if len(keep) else None}
    if test:
        nn_x, _ = groups.nearest(x_th, t_th)
        info["test_nn_probe_accuracy"] = float((y_train[nn_x] == labels[nt + nv:]).mean())
    log(f"held out: {info['n']} images ({rule}); 1-NN probe {info['nn_probe_accuracy']:.1%} vs test "
        f"{info.get('test_nn_probe_accuracy', float('nan')):.1%}")
    gap = (info["nn_probe_accuracy"] or 0) - info.get("test_nn_probe_accuracy", 1.0)
    # two standard errors of the gap (at the test's rate): a handful of held-out images
    # cannot show that they are twins
    p_t = info.get("test_nn_probe_accuracy", 1.0)
    noise = 2 * np.sqrt(p_t * (1 - p_t) * (1 / max(len(keep), 1) + 1 / max(len(test), 1)))
    info["probe_gap"], info["probe_gap_noise"] = float(gap), float(noise)
    if gap > cfg.max_probe_gap + noise and not twins:
        if not cfg.allow_twins:
            raise CalibrateError(
                f"the {info['n']} held-out images are not new to the model: a raw-pixel 1-NN against training gets "
                f"{info['nn_probe_accuracy']:.1%} of them and {info['test_nn_probe_accuracy']:.1%} of test (gap "
                f"{gap:.1%} > {cfg.max_probe_gap:.0%} + {noise:.1%} noise); a fit on them stays overconfident on new "
                "subjects. Retrain with `--val-split grouped`, or pass --allow-twins to fit on them anyway")
        info["twins_included"] = True
        info["rule"] += f" (--allow-twins: not new to the model, their raw-pixel 1-NN probe beats the test's by {gap:.1%})"
    return keep.tolist(), info


def borrowed(manifest: dict, cfg: CalibrateConfig, log) -> tuple[trust.Trust, dict]:
    """For a run trained with --refit: the record of --from-run, the run of its recipe without
    --refit that held out the images this one trained on last (docs/trust.md), and how that
    record's held-out images were chosen."""
    if not is_refit(manifest):
        raise CalibrateError("--from-run is for a run trained with --refit; this one has held-out images: calibrate it "
                             "on them")
    donor = RunFolder(cfg.from_run)
    if not donor.trust_path.is_file():
        raise CalibrateError(f"--from-run {donor.path}: " + (f"not calibrated (no trust.json): mri-edge calibrate "
                             f"{donor.path} first" if donor.path.is_dir() else "no such run folder"))
    if not donor.manifest_path.is_file():
        raise CalibrateError(f"--from-run {donor.path} has no {donor.manifest_path.name}: which images it held out "
                             "cannot be checked")
    other = donor.manifest()
    if is_refit(other):
        raise CalibrateError(f"--from-run {donor.path} trained with --refit too: its record was not fitted on "
                             "held-out images")
    rows = lambda m, *splits: sorted(tuple(r) for s in splits for r in m["splits"].get(s, []))  # noqa: E731
    if other["class_names"] != manifest["class_names"] or rows(other, "val") != rows(manifest, "val") or \
            rows(other, "train", "val") != rows(manifest, "train"):
        raise CalibrateError(f"--from-run {donor.path} held out other images or classes than this run trained on "
                             "last: not its recipe's run on the same carve")
    record = trust.Trust.from_meta({"trust": read_json(donor.trust_path, "calibration record")})
    if donor.model_path.is_file() and not trust.fitted_for(record.to_dict(), sha256_file(donor.model_path)):
        raise CalibrateError(f"--from-run {donor.path}: its record was fitted for another model than its model.keras "
                             f"now: mri-edge calibrate {donor.path} again first")
    held = read_json(donor.calibrate_report_paths[0], "its calibration report", keys=("held_out",))["held_out"]
    if missing := [k for k in ("n", "rule", "nn_probe_accuracy", "twins_included") if k not in held]:
        raise CalibrateError(f"--from-run {donor.path}: its calibrate.json lacks {', '.join(missing)}: mri-edge "
                             f"calibrate {donor.path} again first")
    if record.familiarity:  # distances in another model's features say nothing about this one's
        record.familiarity = None
        log(f"note: no familiarity check: {donor.path}'s is measured in its model's features, not this model's")
    name = donor.path.resolve().name  # what the record and reports name it by, however the path was typed
    log(f"the record of {donor.path} (fitted on {held['n']} held-out images this run trained on last); "
        "nothing is fitted, the test split is reported")
    return record, {**held, "rule": f"those of {name}, this run's recipe without --refit (this run trained on "
                                    f"them): {held['rule']}", "borrowed_from": name}


def split_manifest(run: RunFolder, data_dir: str | None, log) -> dict:
    """The run's split manifest, read from data_dir when given. A shipped folder without one
    gets it rebuilt from its config (same discovery, seed and carve as its training) and
    checked against its test report's image count."""
    if run.manifest_path.is_file():
        manifest = run.manifest()
        if data_dir:
            manifest["root"] = str(Path(data_dir).resolve())
        return manifest
    cfg = run.config()  # a folder that is no run: said so in one line (RunFolder.config)
    if not data_dir:
        raise CalibrateError(f"{run.path} has no split_manifest.json; pass --data-dir to rebuild it from the run's config.json")
    from . import data  # noqa: PLC0415
    ds = data.discover(data_dir, cfg["task"], cfg.get("val_fraction", TrainConfig.val_fraction), carve_seed(cfg),
                       cfg.get("val_split", TrainConfig.val_split), cfg.get("group_threshold", GROUP_THRESHOLD),
                       cfg.get("weights") if cfg.get("val_kept_from") else None)
    if cfg.get("val_kept_from") and "kept_from" not in ds.val_split:
        raise CalibrateError(f"{run.path} held out the carve of {cfg['val_kept_from']}, which is not here (or not "
                             "of these images): restore it, or the run's split_manifest.json")
    if cfg.get("refit"):
        data.refit(ds)  # as train made it: held_out_rows then refuses it
    manifest = ds.manifest()
    n_test = len(manifest["splits"].get("test", []))
    want = (run.test_report() or {}).get("n")
    if want is not None and int(want) != n_test:
        # the fit reads validation only; a test split that differs (a junk file now ignored) is reported
        log(f"warning: {data_dir} gives {n_test} test images, the run's test report {want}")
        manifest["test_count_at_training"] = int(want)
    manifest["rebuilt_from_config"] = True
    report.write_json(run.manifest_path, manifest)
    log(f"rebuilt {run.manifest_path} from config.json (split seed {carve_seed(cfg)}, "
        f"{len(manifest['splits']['val'])} validation images)")
    return manifest
