"""Accuracy parity of every exported file against the Keras test-set report.

Each exported file runs on the whole test split through `mri_edge.runtime` (the
code a device runs; OpenVINO files through `mri_edge.ov`) and is compared image by
image with the Keras predictions stored by `mri-edge train` in test_predictions.json.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from . import explain, familiar, metrics, quiet, report, trust
from .verify_report import markdown, plot_name, summary_table  # noqa: F401 (summary_table: the CLI's)
from .config import EXPLAIN_IMAGES, OCCLUSION_GRID, Thresholds
from .errors import MriEdgeError, first_line, require
from .files import sha256_file
from .data import DataMovedError, decode_images
from .freshness import made_from_another
from .run import RunFolder, holding
from .keras_model import validation_reference
from .ov import size_on_disk
from .integrity import RuntimeModelError, check_kind, check_model_file
from .backends import EXPORT_SUFFIXES, open_model

__all__ = ["DataMovedError", "VerifyError", "verify_run"]


class VerifyError(MriEdgeError):
    pass


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts b and c."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return float(min(1.0, 2 * tail))


def paired_delta_ci(keras_ok: np.ndarray, file_ok: np.ndarray, seed: int = 0, n_boot: int = 2000) -> list[float]:
    """Bootstrap 95% CI of accuracy(file) - accuracy(keras), resampling images in pairs."""
    return metrics.bootstrap_ci(file_ok.astype(float) - keras_ok.astype(float), n_boot=n_boot, seed=seed)


def find_exports(run_dir: Path) -> list[Path]:
    return RunFolder(run_dir).export_files()


def compare(names: list[str], labels: np.ndarray, keras_probs: np.ndarray, file_probs: np.ndarray,
            paths: list[str], seed: int = 0) -> dict:
    """Every parity number for one file against the Keras reference."""
    kp = keras_probs.argmax(1)
    fp = file_probs.argmax(1)
    km = metrics.classification_metrics(labels, kp, names)
    fm = metrics.classification_metrics(labels, fp, names)
    k_ok = kp == labels
    f_ok = fp == labels
    b = int((k_ok & ~f_ok).sum())
    c = int((~k_ok & f_ok).sum())
    diff = np.abs(keras_probs - file_probs)
    k_cal = metrics.calibration_metrics(labels, keras_probs)
    f_cal = metrics.calibration_metrics(labels, file_probs)
    f_in_k_bins = metrics.calibration_metrics(labels, file_probs, binned_by=keras_probs.max(1))["ece"]
    flips = [{"path": paths[i], "true": names[labels[i]], "keras": names[kp[i]], "export": names[fp[i]],
              "keras_p": float(keras_probs[i, kp[i]]), "export_p": float(file_probs[i, fp[i]])}
             for i in np.flatnonzero(kp != fp)]
    per_class = {}
    for n in names:
        per_class[n] = {k: fm["per_class"][n][k] - km["per_class"][n][k]
                        for k in ("precision", "recall", "f1", "sensitivity", "specificity")}
    return {
        "n": int(len(labels)),
        "accuracy": fm["accuracy"], "keras_accuracy": km["accuracy"],
        "accuracy_delta": fm["accuracy"] - km["accuracy"],
        "accuracy_delta_ci95": paired_delta_ci(k_ok, f_ok, seed),
        "macro_f1": fm["macro"]["f1"], "macro_f1_delta": fm["macro"]["f1"] - km["macro"]["f1"],
        "agreement": float((kp == fp).mean()),
        "mcnemar": {"keras_right_export_wrong": b, "keras_wrong_export_right": c, "p_value": mcnemar_exact(b, c)},
        "prob_abs_diff": {"mean": float(diff.mean()), "max": float(diff.max())},
        "calibration": {**{k: f_cal[k] for k in ("ece", "mce", "brier", "nll", "mean_confidence")},
                        "keras": {k: k_cal[k] for k in ("ece", "mce", "brier", "nll", "mean_confidence")},
                        "ece_delta": f_cal["ece"] - k_cal["ece"], "ece_delta_keras_bins": f_in_k_bins - k_cal["ece"],
                        "reliability": f_cal["reliability"]},
        "per_class_delta": per_class,
        "per_class": fm["per_class"],
        "confusion_matrix": fm["confusion_matrix"],
        "flips": flips,
    }


def ece_moved(cal: dict, limit: float) -> bool:
    """The ECE changed by more than `limit`, in the file's own bins and also with every image in
    its Keras bin: on a small test set a confidence that crosses a bin edge by a hair regroups the
    bins and moves the first with no change of calibration; the second moves only as much as the
    confidences do."""
    return min(abs(cal["ece_delta"]), abs(cal.get("ece_delta_keras_bins", cal["ece_delta"]))) > limit + 1e-12


def trust_metrics(record: trust.Trust, labels: np.ndarray, keras_probs: np.ndarray, file_probs: np.ndarray) -> dict:
    """The file's stored calibration applied to it and to the Keras model: ECE after the
    temperature, abstention at the stored threshold and the conformal sets' coverage."""
    out = {"temperature": record.temperature}
    cal = {"file": record.apply(file_probs), "keras": record.apply(keras_probs)}
    for who, probs in cal.items():
        out[who] = {"ece": metrics.calibration_metrics(labels, probs)["ece"], **record.decision_metrics(probs, labels)}
    out["ece_delta"] = out["file"]["ece"] - out["keras"]["ece"]
    out["ece_delta_keras_bins"] = metrics.calibration_metrics(labels, cal["file"], binned_by=cal["keras"].max(1))["ece"] \
        - out["keras"]["ece"]
    return out


def trust_mismatch(model, run_record: dict | None, model_sha: str | None = None) -> str | None:
    """Why a file cannot be checked against the run's model.keras (sha256 `model_sha`) or its
    stored calibration trusted, or None: it was exported from another model.keras, its
    calibration was fitted for another model, or is not the run's current record."""
    if made_from_another({model.path.name: model.meta}, model_sha):
        return "exported from another model.keras than the run's (retrained, or evaluate --fp16-weights since?): " \
               "run mri-edge export again"
    record = model.trust.to_dict() if model.trust else None
    if record and not trust.fitted_for(record, model.meta.get("source_model_sha256")):
        return "its calibration was fitted for another model: run mri-edge calibrate again"
    if run_record is not None and record != run_record:
        return "its calibration record is not the run's trust.json (exported again after calibrate?): run " \
               "mri-edge calibrate again"
    return None


def explanation_sample(labels: np.ndarray, n: int) -> np.ndarray:
    """The test images whose explanations are compared: a fixed random sample of n."""
    return np.sort(np.random.default_rng(0).permutation(len(labels))[:n])


def _check_file(f: Path, threads, names, ref, labels, keras_probs, keras: KerasSide, thresholds, clean,
                batch_size, keras_maps=None, root_run: Path | None = None, model_sha: str | None = None) -> dict:
    """Every parity number and the gate of one exported file; `keras` decodes the split's images
    and gives the Keras model's features for a file with a familiarity check."""
    model = open_model(f, threads=threads)
    if model.class_names != names:
        raise VerifyError(f"class names {model.class_names} differ from the run's {names}")
    imgs = keras.images_for(model)
    checks = bool(model.trust and model.trust.familiarity)
    label = f"running {f.name} [{model.runtime_name}]"
    if checks:
        probs, feats = model.predict_arrays(imgs, batch_size, calibrated=False, label=label, features=True)
    else:
        probs, feats = model.predict_arrays(imgs, batch_size, calibrated=False, label=label), None
    meta = model.meta
    r = compare(names, labels, keras_probs, probs, ref["paths"])
    q = meta.get("quantization", "none")
    min_agree, max_drop = thresholds.for_quantization(q)
    r.update({"file": f.name, "quantization": q, "format": meta.get("format"), "runtime": model.runtime_name,
              "size_mb": size_on_disk(f) / 1e6, "model_sha256": meta.get("model_sha256"),
              "thresholds": {"min_agreement": min_agree, "max_accuracy_drop_pts": max_drop,
                             "max_ece_change": thresholds.max_ece_change}})
    if model.trust:
        r["trust"] = trust_metrics(model.trust, labels, keras_probs, probs)
    stale = trust_mismatch(model, RunFolder(root_run).trust() if root_run else None, model_sha)
    if checks and not stale:  # a stale file is failed for that; its check is not compared
        if feats is None:
            r["familiarity"] = {"skipped": "the file has no features output"}
        elif (kf := keras.features()) is None:
            r["familiarity"] = {"skipped": keras.features_skipped}
        else:
            r["familiarity"] = familiar.parity(model.trust, kf, feats)
    if keras_maps is not None:
        idx, targets, ref_maps = keras_maps
        maps = explain.occlusion_maps(model, imgs, idx, targets, f.name)
        r["explanation"] = {"method": f"occlusion {OCCLUSION_GRID}x{OCCLUSION_GRID}",
                            **explain.parity(ref_maps, maps, model.image_size)}
        r["thresholds"]["min_explanation_corr"] = thresholds.min_explanation_corr
    reasons, gates = [], []  # each failure's text, and which gate it is (failure_hint reads the gates)

    def fail(gate: str, reason: str) -> None:
        gates.append(gate)
        reasons.append(reason)

    if stale:
        fail("stale", stale)
    if r["agreement"] < min_agree:
        fail("agreement", f"top-1 agreement {r['agreement']:.4f} < {min_agree}")
    if -r["accuracy_delta"] * 100 > max_drop + 1e-9:
        fail("accuracy", f"accuracy drop {-r['accuracy_delta'] * 100:.2f} points > {max_drop:.2f}")
    if ece_moved(r["calibration"], thresholds.max_ece_change):
        fail("ece", f"calibration changed: |ΔECE| {abs(r['calibration']['ece_delta']):.4f} > "
                    f"{thresholds.max_ece_change}")
    if "trust" in r and ece_moved(r["trust"], thresholds.max_ece_change):
        fail("calibrated_ece", f"calibrated probabilities changed: |ΔECE| after the stored temperature "
                               f"{abs(r['trust']['ece_delta']):.4f} > {thresholds.max_ece_change}")
    fam = r.get("familiarity") or {}
    if feats is None and fam:
        fail("features", "its trust record holds a familiarity check that the file cannot run (no features "
                         f"output): run mri-edge export {root_run or 'RUN'} --add-features, then mri-edge calibrate again")
    if moved := familiar.gate(fam, min_agree, thresholds.min_familiarity_kappa):
        fail("familiarity", moved)
    if ("explanation" in r and thresholds.min_explanation_corr
            and r["explanation"]["rank_correlation"]["median"] < thresholds.min_explanation_corr):
        fail("explanation", "explanations moved: median rank correlation "
                            f"{r['explanation']['rank_correlation']['median']:.3f} < {thresholds.min_explanation_corr}")
    r["passed"] = not reasons
    r["fail_reasons"], r["failed_gates"] = reasons, gates
    if clean is not None:
        sub = compare(names, labels[clean], keras_probs[clean], probs[clean],
                      [p for p, k in zip(ref["paths"], clean) if k])
        r["dedup"] = {k: sub[k] for k in ("n", "accuracy", "keras_accuracy", "accuracy_delta", "agreement",
                                          "macro_f1", "accuracy_delta_ci95")}
    return r


class KerasSide:
    """The split's images, decoded once per input size, and the run's model.keras, opened once
    when first needed."""

    def __init__(self, run: RunFolder, root: Path, paths: list[str], split: str, log=print):
        self.run, self.root, self.paths, self.split, self.log = run, root, paths, split, log
        self.decoded: dict[int, np.ndarray] = {}
        self._net = None
        self._features: np.ndarray | None | bool = False  # False: not computed yet
        self.features_skipped = ""  # why there are none

    def images_for(self, model) -> np.ndarray:
        """The split's images under the model's preprocessing."""
        if model.image_size not in self.decoded:
            self.decoded[model.image_size] = decode_images(model, self.root, self.paths, f"{self.split} images")
        return self.decoded[model.image_size]

    def images(self) -> tuple:
        """(the Keras model, its decoded images)."""
        if self._net is None:
            self._net = open_model(self.run.model_path)
        return self._net, self.images_for(self._net)

    def explanations(self, labels: np.ndarray, keras_probs: np.ndarray, n: int):
        """(image indices, explained classes, Keras occlusion maps) on n images of the split."""
        net, imgs = self.images()
        idx = explanation_sample(labels, n)
        targets = keras_probs[idx].argmax(1).tolist()
        return idx, targets, explain.occlusion_maps(net, imgs, idx, targets, "Keras")

    def features(self) -> np.ndarray | None:
        """The pooled features of every image (familiar.parity), or None where Keras cannot run them."""
        if self._features is False:
            self._features = None
            try:
                self._features = familiar.features(*self.images(), "the split (familiarity check)")
                if self._features is None:
                    self.features_skipped = "the Keras model has no single global pooling to take features from"
            except DataMovedError:
                raise
            except Exception as e:  # noqa: BLE001 (no model.keras, no Keras here, or Keras failed: no file's fault)
                self.features_skipped = f"the Keras model's features could not be computed: {first_line(e)}"
            if self._features is None:
                self.log(f"familiarity parity skipped: {self.features_skipped}")
        return self._features


@holding("verify")
def verify_run(run_dir, files=None, thresholds: Thresholds | None = None, threads: int | None = None,
               batch_size: int = 16, dedup: str | None = None, log=print, split: str = "test",
               explain_images: int = EXPLAIN_IMAGES, debug_quant: bool = False) -> dict:
    """Gate every exported file on the test split (the report of record: run_dir/parity.json),
    or on the validation split (run_dir/verify/val/), where export settings can be compared
    without looking at the test set.

    `files` checks only those files; their report goes to run_dir/verify/selected/ (or
    verify/val/selected/), so the run's full report is never replaced by a shorter one. A named
    file that is no model file at all (wrong suffix, empty, another kind's bytes) is refused
    before any work. Otherwise a file that cannot be opened or run is a FAIL row; the others
    are still checked.
    """
    require(("sklearn", "matplotlib"), "mri-edge verify")  # its reports; before minutes of inference
    run = RunFolder(run_dir)
    run_dir = run.path
    run.check_writable()
    thresholds = thresholds or Thresholds()
    if split not in ("test", "val"):
        raise VerifyError("--split must be test or val")
    if split == "val" and dedup:
        raise VerifyError("--dedup describes the test split; leave it out with --split val")
    if not run_dir.is_dir():
        raise VerifyError(f"run folder not found: {run_dir}")
    for f in map(Path, files or []):
        try:
            check_model_file(f, EXPORT_SUFFIXES, "an exported model file")
        except RuntimeModelError as e:
            raise VerifyError(f"--file {e}") from None
    if run.model_path.is_file():  # damaged, every file would read as exported from another model.keras
        try:
            check_kind(run.model_path)
        except RuntimeModelError as e:
            raise VerifyError(f"{e}: restore it (the files are checked against it)") from None
    test_ref = run.test_predictions()
    manifest = run.manifest()
    root = Path(manifest["root"])
    selected = bool(files)
    parity_json, parity_md = run.parity_paths(split, selected)
    report_dir = parity_json.parent
    plot_dir = report_dir if selected else run.verify_dir(split)
    files = [Path(f) for f in files] if files else find_exports(run_dir)
    if not files:
        raise VerifyError(f"no exported files in {run.exports_dir}; run `mri-edge export {run_dir}` first")
    plot_dir.mkdir(parents=True, exist_ok=True)
    ref = test_ref if split == "test" else validation_reference(run_dir, log)[0]
    names = ref["class_names"]
    labels = np.asarray(ref["labels"])
    keras_probs = np.asarray(ref["probs"], np.float32)
    clean = None
    if dedup:
        from . import audit  # noqa: PLC0415

        clean = audit.leakage_free_mask(dedup, [str(root / p) for p in ref["paths"]], root)

    if debug_quant:
        from .export.debug import layer_report  # noqa: PLC0415

        layer_report(run, log)
    keras_maps = None
    keras = KerasSide(run, root, ref["paths"], split, log)
    if explain_images and run.model_path.is_file():
        try:
            keras_maps = keras.explanations(labels, keras_probs, explain_images)
        except DataMovedError:
            raise
        except MriEdgeError as e:  # e.g. a machine with the runtimes but not Keras
            log(f"explanation parity skipped: {e}")
    model_sha = sha256_file(run.model_path) if run.model_path.is_file() else None  # once, not per file
    results = {}
    failures = []
    for f in files:
        try:
            r = _check_file(f, threads, names, ref, labels, keras_probs, keras, thresholds, clean,
                            batch_size, keras_maps, run_dir, model_sha)
        except DataMovedError:
            raise
        except MriEdgeError as e:
            r = {"file": f.name, "error": str(e)}
        except Exception as e:  # a runtime that crashes on this file: a FAIL row, not the end of verify
            r = {"file": f.name, "error": f"{type(e).__name__}: {first_line(e)}"}
        if "error" in r:
            r.update({"passed": False, "fail_reasons": [f"cannot be checked: {r['error']}"], "failed_gates": ["error"]})
            results[f.name] = r
            failures.append(f"{f.name}: cannot be checked: {r['error']}")
            log(f"FAIL {f.name}: {r['error']}")
            continue
        results[f.name] = r
        log(f"{'PASS' if r['passed'] else 'FAIL'} {f.name}: accuracy {r['accuracy']:.4f} "
            f"(delta {r['accuracy_delta'] * 100:+.2f} pts), agreement {r['agreement']:.4f}"
            + (f", familiarity referrals agree on {r['familiarity']['agreement']:.2%}"
               if "agreement" in r.get("familiarity", {}) else ""))
        if r["fail_reasons"]:
            failures.append(f"{f.name}: " + "; ".join(r["fail_reasons"]))
    keras_m = metrics.classification_metrics(labels, keras_probs.argmax(1), names)
    out = {"run_dir": str(run_dir), "split": split, "n_test": int(len(labels)), "class_names": names,
           "keras": {"accuracy": keras_m["accuracy"], "macro_f1": keras_m["macro"]["f1"]},
           "thresholds": thresholds.__dict__, "files": results, "failures": failures, "passed": not failures,
           "selected_files_only": selected}
    for left in plot_dir.glob(".plots-*"):  # a verify killed outright (SIGKILL, out of memory) left them
        shutil.rmtree(left, ignore_errors=True)
    staged = Path(tempfile.mkdtemp(prefix=".plots-", dir=plot_dir))  # land with the report they belong to
    try:
        for n, r in results.items():
            if "error" not in r:
                report.plot_confusion(r["confusion_matrix"], names, staged / plot_name("confusion", n),
                                      f"{n}: accuracy {r['accuracy']:.3f}")
                report.plot_reliability({**r["calibration"], "bins": metrics.ECE_BINS}, staged / plot_name("reliability", n), n)
        with quiet.signals_deferred():  # the report and its plots say one thing
            report.write_json(parity_json, out)
            report.write_text(parity_md, markdown(out, plot_dir.relative_to(report_dir).as_posix()))
            keep = {p.name for p in staged.iterdir()}
            for name in keep:
                os.replace(staged / name, plot_dir / name)
            if not selected:  # plots of files not plotted now (removed, renamed, or not runnable) do not outlive them
                for p in [*plot_dir.glob("confusion_*.png"), *plot_dir.glob("reliability_*.png")]:
                    if p.name not in keep:
                        p.unlink()
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    run.write_index()
    out["report_dir"], out["report_files"] = str(report_dir), [str(parity_json), str(parity_md)]
    return out


def failure_hint(out: dict) -> str:
    """What a user can do about int8 or dynamic-range files that moved answers (the usual failure;
    a fp32 file that fails is a bug or a stale file, which its reason says)."""
    moved = [n for n, r in out["files"].items() if r.get("quantization") in ("int8", "dynamic")
             and {"agreement", "accuracy", "ece", "calibrated_ece"} & set(r.get("failed_gates", []))]
    if not moved:
        return ""
    n = out["n_test"]
    return (f"\n{', '.join(moved)}: quantization moves the answers a model is least sure of (one image is "
            f"{100 / n:.2f} points of {n}; weak or barely trained models have many near ties). `mri-edge export "
            f"RUN --max-drop PTS --float-head` keeps the parts that move them in float; docs/int8.md")
