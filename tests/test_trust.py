"""Temperature scaling, abstention and conformal sets: the numbers (trust.py) and their trip
through `mri-edge calibrate` into every exported file and back out of every runtime."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from mri_edge import trust
from mri_edge.cli import main


def softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def overconfident(n, t_true=2.5, k=4, seed=0):
    """Probabilities softmax(z) whose labels were drawn from softmax(z / t_true)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 3, (n, k))
    p_true = softmax(z / t_true)
    labels = np.array([rng.choice(k, p=p) for p in p_true])
    return softmax(z).astype(np.float32), labels


def test_fit_temperature_recovers_the_temperature_that_made_the_labels():
    probs, labels = overconfident(6000)
    t = trust.fit_temperature(probs, labels)
    assert 2.2 < t < 2.8, t
    assert trust.nll(trust.scale(probs, t), labels) < trust.nll(probs, labels)
    # an already calibrated model keeps T near 1
    p, y = overconfident(6000, t_true=1.0, seed=1)
    assert 0.9 < trust.fit_temperature(p, y) < 1.1


def test_scale_keeps_the_ranking_and_is_exact_at_one():
    probs, _ = overconfident(50)
    assert trust.scale(probs, 1.0) is not None and np.array_equal(trust.scale(probs, 1.0), probs)
    s = trust.scale(probs, 3.0)
    assert np.array_equal(s.argmax(1), probs.argmax(1))
    assert np.allclose(s.sum(1), 1, atol=1e-6)
    assert (s.max(1) <= probs.max(1) + 1e-6).all()  # T > 1 softens
    # an int8 output with exact zeros still gets a finite answer
    q = np.array([[1.0, 0.0, 0.0, 0.0]], np.float32)
    assert np.isfinite(trust.scale(q, 2.0)).all()


def test_the_threshold_meets_its_risk_on_the_data_it_was_chosen_on_and_coverage_mode():
    probs, labels = overconfident(2000, t_true=1.0)
    thr = trust.choose_threshold(probs, labels, max_risk=0.1)
    at = trust.at_threshold(probs, labels, thr)
    assert at["risk"] <= 0.1 and at["coverage"] > 0.2
    # one fewer threshold step would break the (errors + 1) / (accepted + 1) rule or add nothing
    thr90 = trust.choose_threshold(probs, labels, coverage=0.9)
    assert abs(trust.at_threshold(probs, labels, thr90)["coverage"] - 0.9) < 0.01
    # an impossible target refers everything
    assert trust.choose_threshold(probs, labels, max_risk=0.0) == trust.REFER_ALL > 1.0
    none = trust.at_threshold(probs, labels, trust.REFER_ALL)
    assert none["accepted"] == 0 and none["risk"] is None and none["accepted_accuracy"] is None
    # nothing accepted has no error rate: the reports say n/a, not a perfect 0.0000
    assert trust.coverage_risk_text(none) == "0.000 / n/a"
    assert trust.coverage_risk_text(at, percent=True) == f"{at['coverage']:.1%} / {at['risk']:.2%}"
    with pytest.raises(trust.TrustError, match="give exactly one of max_risk and coverage"):
        trust.choose_threshold(probs, labels)


def test_binomial_cdf_is_exact():
    binom = pytest.importorskip("scipy.stats").binom

    for errors, n, p in [(0, 10, 0.1), (3, 50, 0.05), (1, 525, 0.01), (40, 523, 0.15), (7, 7, 0.5), (0, 5000, 1e-4)]:
        assert trust.binomial_cdf(errors, n, p) == pytest.approx(binom.cdf(errors, n, p), rel=1e-9, abs=1e-300)
    assert trust.fewest_to_certify(0.01, 0.95) == 299  # 0.99 ** 299 < 0.05 < 0.99 ** 298
    assert trust.fewest_to_certify(0.0, 0.95) == float("inf")


def calibrated_draw(n, rng):
    """Top-1 confidences uniform on [0.5, 1] and right with exactly that probability: the
    error of the answers above a threshold t is (1 - t) / 2, known without sampling."""
    conf = rng.uniform(0.5, 1.0, n)
    right = rng.random(n) < conf
    probs = np.stack([conf, 1 - conf], 1)
    return probs, np.where(right, 0, 1)


def test_a_tested_threshold_holds_its_risk_with_the_stated_confidence():
    rng = np.random.default_rng(0)
    max_risk, confidence = 0.1, 0.9
    held, estimated, covered = [], [], []
    for _ in range(100):
        probs, labels = calibrated_draw(1000, rng)
        thr = trust.choose_threshold(probs, labels, max_risk=max_risk, confidence=confidence)
        held.append((1 - thr) / 2 <= max_risk)
        covered.append(trust.at_threshold(probs, labels, thr)["coverage"])
        estimated.append((1 - trust.choose_threshold(probs, labels, max_risk=max_risk)) / 2 <= max_risk)
    # at most 10% misses (binomial noise on 100 draws: up to about 16); the estimate misses
    # about half the time, as any unbiased estimate of a boundary does; the price is coverage
    # (the ideal threshold 0.8 answers 40%), not a refusal to answer
    assert sum(held) >= 84 and sum(estimated) < 80, (sum(held), sum(estimated))
    assert 0.15 < np.median(covered) < 0.4


def test_a_test_needs_enough_held_out_images_and_a_risk_target():
    probs = np.tile([[0.9, 0.1]], (58, 1)).astype(np.float32)
    probs[:, 0] += np.linspace(0, 0.05, 58)  # distinct confidences, all right
    labels = np.zeros(58, int)
    assert trust.choose_threshold(probs, labels, max_risk=0.05, confidence=0.95) == trust.REFER_ALL  # needs 59
    more = np.vstack([probs, [[0.85, 0.15]]]).astype(np.float32)
    thr = trust.choose_threshold(more, np.zeros(59, int), max_risk=0.05, confidence=0.95)
    assert thr == pytest.approx(0.85)
    # one error early in the order ends the search there, though 200 right answers follow that
    # would pass the test on their own (1 error in 93 or more images)
    rng = np.random.default_rng(1)
    top = np.sort(rng.uniform(0.9, 1.0, 260))[::-1]
    probs = np.stack([top, 1 - top], 1)
    labels = np.zeros(260, int)
    labels[59] = 1  # the 60th most confident: after the first test (59 images) passes
    thr = trust.choose_threshold(probs, labels, max_risk=0.05, confidence=0.95)
    assert thr == pytest.approx(top[58])
    # ties: a threshold cannot split equal confidences, so the first cut at or after 59 images is tested
    tied = np.concatenate([np.linspace(0.99, 0.95, 55), np.full(10, 0.9), np.linspace(0.89, 0.8, 40)])
    probs = np.stack([tied, 1 - tied], 1)
    assert trust.choose_threshold(probs, np.zeros(105, int), max_risk=0.05, confidence=0.95) == pytest.approx(0.8)
    labels = np.zeros(105, int)
    labels[60] = 1  # an error inside the tie: the first cut (65 images, 1 error) fails
    assert trust.choose_threshold(probs, labels, max_risk=0.05, confidence=0.95) == trust.REFER_ALL
    assert trust.choose_threshold(probs, labels, max_risk=1.0, confidence=0.95) == 0.0
    with pytest.raises(trust.TrustError, match="confidence goes with max_risk"):
        trust.choose_threshold(probs, labels, coverage=0.9, confidence=0.95)


def test_conformal_sets_reach_their_coverage_on_new_exchangeable_data():
    probs, labels = overconfident(8000, t_true=1.0, seed=3)
    covers = []
    for s in range(10):  # ten random calibration / test splits
        idx = np.random.default_rng(s).permutation(len(labels))
        cal, new = idx[:1000], idx[1000:]
        q = trust.conformal_quantile(probs[cal], labels[cal], 0.1)
        covers.append(trust.set_coverage(probs[new], labels[new], q)["coverage"])
    assert 0.89 <= np.mean(covers) <= 0.93, covers
    assert np.mean([trust.set_coverage(probs, labels, trust.conformal_quantile(probs, labels, a))['mean_size']
                    for a in (0.05, 0.2)]) > 1  # sets grow where the model is unsure
    sets = trust.prediction_sets(probs[:20], 0.0)
    assert all(len(s) == 1 and s[0] == int(p.argmax()) for s, p in zip(sets, probs[:20]))  # never empty
    unsure = np.array([[0.4, 0.35, 0.2, 0.05]])
    assert trust.prediction_sets(unsure, 0.9) == [[0, 1, 2]]  # mass before the 4th class is 0.95 > 0.9
    assert trust.conformal_quantile(probs[:5], labels[:5], 0.05) == 1.0  # too few images: every class


def test_kappa_sees_a_check_that_never_fires():
    from mri_edge.familiar import kappa

    keras = np.zeros(200, bool)
    keras[:4] = True  # 2% referred
    assert kappa(keras, keras) == 1.0
    never = np.zeros(200, bool)
    assert (keras == never).mean() == 0.98 and kappa(keras, never) == 0.0  # 98% agreement, no skill
    one_off = keras.copy()
    one_off[10] = True
    assert 0.8 < kappa(keras, one_off) < 1.0
    assert kappa(never, never) == 1.0 and kappa(never, ~never) == 0.0


def test_the_kappa_gate_holds_a_bound_not_one_image():
    from mri_edge.familiar import gate, kappa, kappa_upper

    def record(keras, file):  # what verify's gate reads of familiar.parity's record
        return {"agreement": float((keras == file).mean()), "kappa": kappa(keras, file),
                "kappa_upper": kappa_upper(keras, file), "only_keras": int((keras & ~file).sum()),
                "only_file": int((~keras & file).sum())}

    keras = np.zeros(200, bool)
    keras[:4] = True
    swapped = keras.copy()  # one image at the limit changes sides each way (the demo's int8 ONNX file)
    swapped[0], swapped[10] = False, True
    assert kappa(keras, swapped) < 0.8 <= kappa_upper(keras, swapped)
    assert gate(record(keras, swapped), 0.98, 0.8) is None
    for referred in (1, 2, 4):  # a check that never fires fails however few images it misses
        few = np.zeros(200, bool)
        few[:referred] = True
        never = record(few, np.zeros(200, bool))
        assert never["agreement"] >= 0.98 and never["kappa_upper"] == 0.0
        assert "kappa 0.000, 95% upper bound 0.000" in gate(never, 0.98, 0.8)
    many = np.zeros(1000, bool)
    many[:40] = True
    half = many.copy()  # half of 40 referrals elsewhere: no small-sample accident
    half[:20], half[100:120] = False, True
    assert kappa_upper(many, half) < 0.8 and gate(record(many, half), 0.95, 0.8)
    assert kappa([], []) == kappa_upper([], []) == 0.0


def test_familiarity_distance_refers_features_unlike_the_training_ones():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 5, (3, 32))
    labels = rng.integers(0, 3, 1500)
    spread = rng.normal(0, 1, (32, 32))  # correlated features: the whitening must undo it
    feats = centres[labels] + rng.normal(0, 1, (1500, 32)) @ spread
    held = centres[labels[:300]] + rng.normal(0, 1, (300, 32)) @ spread
    other = rng.normal(0, 5, (300, 32)) @ spread + 20  # another kind: off every class
    record = trust.fit_familiarity(feats, labels, dims=16)
    assert record["shape"] == [32, 16] and len(record["centres"]) == 3
    d_held, d_other = trust.distance(held, record), trust.distance(other, record)
    assert 0.7 < np.median(d_held) < 1.3  # in standard deviations of the training spread
    record["limit"] = float(np.quantile(d_held, 0.99))
    # the record travels as JSON in every file's metadata and reads back to the same decisions
    t = trust.Trust.from_meta({"trust": json.loads(json.dumps(trust.Trust(familiarity=record).to_dict()))})
    assert t.unfamiliar(held).mean() <= 0.02 and t.unfamiliar(other).all()
    assert np.array_equal(t.distances(other), d_other)
    assert trust.Trust().unfamiliar(held) is None and t.unfamiliar(None) is None  # no record, no features: no check


@pytest.fixture
def calibrated_run(micro_run, tmp_path):
    """A copy of micro_run calibrated with a coverage target (so some answers abstain)."""
    from mri_edge.calibrate import calibrate_run
    from mri_edge.config import CalibrateConfig

    run = tmp_path / "run"
    shutil.copytree(micro_run, run)
    out = calibrate_run(run, CalibrateConfig(coverage=0.5, alpha=0.2, min_images=4), log=lambda *_: None)
    return run, out


def test_calibrate_stores_one_record_that_every_runtime_applies_identically(calibrated_run):
    from mri_edge import data
    from mri_edge.run import RunFolder
    from mri_edge.backends import open_model

    run, out = calibrated_run
    record = json.loads((run / "trust.json").read_text())
    assert out["trust"] == record and record["fitted_on"]["model"] == "model.keras"
    assert record["threshold"] is not None and record["conformal_q"] is not None
    files = RunFolder(run).export_files()
    assert sorted(out["updated_files"]) == sorted(f.name for f in files) and len(files) == 4
    from mri_edge.files import sha256_file  # exports.json follows the files the record went into

    index = {r["file"]: r["sha256"] for r in RunFolder(run).exports_index()["exports"]}
    assert all(index[f.name] == sha256_file(f) for f in files)
    manifest = RunFolder(run).manifest()
    keras = open_model(run / "model.keras")
    assert keras.trust.to_dict() == record
    imgs = data.decode_images(keras, manifest["root"], [r for r, _ in manifest["splits"]["test"]], "test images")
    ref = keras.predict_arrays(imgs, 8)
    assert not np.allclose(ref, keras.predict_arrays(imgs, 8, calibrated=False))  # the temperature does something
    for f in files:
        m = open_model(f)  # the model-byte hash still matches: only the metadata changed
        assert m.trust.to_dict() == record, f.name
        probs = m.predict_arrays(imgs, 8)
        if m.meta["quantization"] == "none":
            assert np.abs(probs - ref).max() < 1e-4, f.name
        else:
            assert np.array_equal(probs, trust.scale(m.predict_arrays(imgs, 8, calibrated=False), record["temperature"]))
    assert (run / "calibration" / "calibrate.md").is_file() and (run / "calibration" / "coverage_risk.png").is_file()
    assert "calibrate.md" in (run / "report.md").read_text()
    # The familiarity check: fitted with model.keras, measured by every file through its own runtime
    fam = record["familiarity"]
    assert fam["limit"] > 0 and fam["fitted_on"]["held_out_images"] == out["held_out"]["n"]
    _, ref_feats = keras.run(imgs, features=True)
    for f in files:
        m = open_model(f)
        assert m.has_features and out["files"][f.name]["familiarity"]["held_out"]["n"] == out["held_out"]["n"]
        probs, feats = m.run(imgs, features=True)
        assert np.array_equal(probs, m.run(imgs))  # the second output changes nothing in the first
        tol = 1e-3 if m.meta["quantization"] == "none" else 0.25
        assert np.abs(feats - ref_feats).max() <= tol * np.abs(ref_feats).max(), f.name
    assert "Familiarity" in (run / "calibration" / "calibrate.md").read_text()
    # Calibrating again with the same record leaves every file's bytes as they are (shipped
    # files do not change for nothing), and the report names the same files.
    from mri_edge.calibrate import calibrate_run
    from mri_edge.config import CalibrateConfig
    from mri_edge.files import sha256_file

    before = {f.name: (sha256_file(f), f.stat().st_mtime_ns) for f in files}
    again = calibrate_run(run, CalibrateConfig(coverage=0.5, alpha=0.2, min_images=4), log=lambda *_: None)
    assert again["trust"] == record and sorted(again["updated_files"]) == sorted(before)
    assert {f.name: (sha256_file(f), f.stat().st_mtime_ns) for f in files} == before  # not even rewritten


def test_a_refit_run_stores_its_recipes_record_and_reports_test_only(calibrated_run, micro_run, tmp_path):
    """calibrate --from-run: a run trained with --refit (its validation images trained on) takes
    the record of its recipe's run on the same carve, fitted on those images by that run's
    model; nothing is fitted, only test rows are measured, the familiarity check is dropped."""
    from mri_edge.files import sha256_file
    from mri_edge.model import load_model
    from mri_edge.run import RunFolder

    def other_model(run):  # the run's model.keras with its last kernel moved: another trained model
        net = load_model(run / "model.keras")
        layer = next(x for x in reversed(net.layers) if x.get_weights())
        w = layer.get_weights()
        layer.set_weights([w[0] + 0.05, *w[1:]])
        net.save(run / "model.keras")

    donor, _ = calibrated_run
    refit = tmp_path / "refit"
    shutil.copytree(micro_run, refit, ignore=shutil.ignore_patterns("exports"))
    other_model(refit)
    manifest = RunFolder(refit).manifest()  # as train --refit writes it: validation joins training
    manifest["splits"]["train"] += manifest["splits"]["val"]
    manifest["val_split"] = {**manifest.get("val_split", {}), "refit": True}
    (refit / "split_manifest.json").write_text(json.dumps(manifest))
    res = CliRunner().invoke(main, ["calibrate", str(refit), "--from-run", str(donor)])
    assert res.exit_code == 0, res.output
    given, got = (json.loads((r / "trust.json").read_text()) for r in (donor, refit))
    assert {k: got[k] for k in ("temperature", "threshold", "alpha", "conformal_q")} == \
        {k: given[k] for k in ("temperature", "threshold", "alpha", "conformal_q")}
    assert given.get("familiarity") and "familiarity" not in got
    assert got["fitted_on"]["borrowed_from"] == {"run": donor.name,
                                                 "source_model_sha256": given["fitted_on"]["source_model_sha256"]}
    assert got["fitted_on"]["source_model_sha256"] == sha256_file(refit / "model.keras") != \
        given["fitted_on"]["source_model_sha256"]
    out = json.loads((refit / "calibration" / "calibrate.json").read_text())
    assert list(out["files"]) == ["model.keras"] and "held_out" not in out["files"]["model.keras"]
    assert out["files"]["model.keras"]["test"]["n"] == len(manifest["splits"]["test"])
    md = (refit / "calibration" / "calibrate.md").read_text()
    assert "only its test rows are measured here" in md and "reliability_held_out" not in md
    # the refit model applies the record (it was stored for it), and its card says whose fit it is
    image = os.path.join(manifest["root"], manifest["splits"]["test"][0][0])
    res = CliRunner().invoke(main, ["predict", str(refit / "model.keras"), image])
    assert res.exit_code == 0 and f"temperature {given['temperature']:.3f}" in res.output, res.output
    assert CliRunner().invoke(main, ["card", str(refit)]).exit_code == 0
    card = (refit / "model_card.md").read_text()
    assert f"fitted with {donor.name}'s model" in card and f"those of {donor.name}, its recipe's run" in card
    # refused, in one line each: a run with held-out images of its own, an uncalibrated or refit
    # donor, a donor that held out other images, and options that would fit something
    other = tmp_path / "other"
    shutil.copytree(micro_run, other)
    moved = RunFolder(other).manifest()
    moved["splits"]["val"] = moved["splits"]["val"][1:]
    (other / "split_manifest.json").write_text(json.dumps(moved))
    shutil.copytree(donor / "calibration", other / "calibration")
    shutil.copy(donor / "trust.json", other / "trust.json")
    stale = tmp_path / "stale"
    shutil.copytree(donor, stale)
    other_model(stale)  # retrained after it was calibrated
    for run, args, says in ((donor, ["--from-run", str(donor)], "this one has held-out images"),
                            (refit, ["--from-run", str(micro_run)], "not calibrated"),
                            (refit, ["--from-run", str(tmp_path / "typo")], "no such run folder"),
                            (refit, ["--from-run", str(stale)], "fitted for another model"),
                            (refit, ["--from-run", str(refit)], "trained with --refit too"),
                            (refit, ["--from-run", str(other)], "held out other images"),
                            (refit, ["--from-run", str(donor), "--max-risk", "0.1"], "--max-risk would not be used")):
        res = CliRunner().invoke(main, ["calibrate", str(run), *args])
        assert res.exit_code != 0 and says in res.output and "Traceback" not in res.output, res.output


def test_tflite_metadata_bytes_do_not_depend_on_the_clock(monkeypatch):
    import time

    from mri_edge.export.tflite import append_tflite_metadata

    monkeypatch.setattr(time, "time", lambda: 0.0)
    first = append_tflite_metadata(b"flatbuffer", {"task": "tumor"})
    monkeypatch.setattr(time, "time", lambda: 2e9)
    assert append_tflite_metadata(b"flatbuffer", {"task": "tumor"}) == first


def test_predict_marks_answers_below_the_threshold_for_review(calibrated_run, monkeypatch):
    from mri_edge.cli import main
    from mri_edge.run import RunFolder

    run, out = calibrated_run
    manifest = RunFolder(run).manifest()
    images = [f"{manifest['root']}/{rel}" for rel, _ in manifest["splits"]["test"]]
    model = RunFolder(run).export_files()[0]
    res = CliRunner().invoke(main, ["predict", str(model), *images, "--json"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in res.output.splitlines() if line.startswith("{")]
    thr = out["trust"]["threshold"]
    assert {r["uncertain"] for r in rows} == {True, False}  # coverage 0.5 on held-out: both kinds
    for r in rows:
        unlike = [w for w in r["warnings"] if w.startswith("unlike the training images")]
        assert (r["feature_distance"] > out["trust"]["familiarity"]["limit"]) == bool(unlike)
        assert r["calibrated"] and r["uncertain"] == (r["probabilities"][r["label"]] < thr or bool(unlike))
        assert r["prediction_set"][0] == r["label"] and r["set_coverage"] == pytest.approx(0.8)
    text = CliRunner().invoke(main, ["predict", str(model), *images])
    assert trust.REVIEW in text.output and "set (80%)" in text.output
    # sets that are always the top class alone (quantile 0) say no more than the answer: not printed
    assert trust.Trust(conformal_q=0.0).sets_single and not trust.Trust(conformal_q=0.3).sets_single
    monkeypatch.setattr(trust.Trust, "sets_single", property(lambda self: True))
    text = CliRunner().invoke(main, ["predict", str(model), *images])
    assert "set (" not in text.output and "its 80% prediction sets are the top class alone" in text.output


def test_a_calibrated_file_without_features_answers_without_the_check(calibrated_run):
    """A file with a familiarity record but no features output (exported before it existed):
    predict answers with the threshold alone, and calibrate says what to run."""
    from mri_edge.calibrate import calibrate_run
    from mri_edge.config import CalibrateConfig
    from mri_edge.run import RunFolder
    from mri_edge.backends import open_model
    from tests.conftest import strip_features

    run, out = calibrated_run
    f = next(f for f in RunFolder(run).export_files() if f.suffix == ".tflite")
    strip_features(f)
    model = open_model(f)
    assert model.trust.familiarity and not model.has_features
    manifest = RunFolder(run).manifest()
    r = model.predict(f"{manifest['root']}/{manifest['splits']['test'][0][0]}")
    assert r.distance is None and not r.warnings and r.uncertain == (r.probabilities[r.label] < model.trust.threshold)
    said = []
    again = calibrate_run(run, CalibrateConfig(coverage=0.5, alpha=0.2, min_images=4), log=said.append)
    assert any(f.name in s and "--add-features" in s for s in said)
    assert again["files"][f.name]["familiarity"]["held_out"] is None
    # verify fails it: its record promises a check that the file cannot run on a device
    from mri_edge.verify import verify_run

    r = verify_run(run, files=[f], explain_images=0, log=lambda *_: None)["files"][f.name]
    assert r["familiarity"] == {"skipped": "the file has no features output"} and not r["passed"]
    assert any("cannot run (no features output)" in x and "--add-features" in x for x in r["fail_reasons"]), r
    assert "features" in r["failed_gates"]


def test_verify_without_the_keras_model_reports_the_check_as_not_compared(calibrated_run, tmp_path):
    """No model.keras (a folder of deployed files): the check is named as not compared, the
    files are still gated on everything else, and nothing crashes."""
    from mri_edge.verify import verify_run

    run, _ = calibrated_run
    bare = tmp_path / "bare"
    shutil.copytree(run, bare)
    (bare / "model.keras").unlink()
    said = []
    out = verify_run(bare, explain_images=0, log=said.append)
    for name, r in out["files"].items():
        assert r["familiarity"]["skipped"].startswith("the Keras model's features could not be computed"), r
        assert r["passed"] == (not r["fail_reasons"]) and not any("familiarity" in x for x in r["fail_reasons"])
    assert sum("familiarity parity skipped" in s for s in said) == 1  # said once, not per file
    assert "not compared: the Keras model's features could not be computed" in (bare / "parity.md").read_text()


def test_calibrate_refuses_a_foreign_folder_it_cannot_use_before_any_work(micro_run, tmp_path):
    from mri_edge.cli import main

    (tmp_path / "empty").mkdir()
    for folder, says in ((tmp_path / "nowhere", "does not exist"), (tmp_path / "empty", "no images in it")):
        res = CliRunner().invoke(main, ["calibrate", str(micro_run), "--foreign", str(folder)])
        assert res.exit_code != 0 and f"--foreign {folder}: {says}" in res.output
        assert "held-out" not in res.output  # refused before the held-out images were read


def test_calibrate_refuses_twins_and_too_few_images(micro_run, tmp_path):
    from mri_edge.cli import main

    run = tmp_path / "run"
    shutil.copytree(micro_run, run)
    res = CliRunner().invoke(main, ["calibrate", str(run)])  # 4 validation images < 50
    assert res.exit_code == 1 and "the validation split holds 4 images, fewer than --min-images 50" in res.output
    assert not (run / "trust.json").exists()
    res = CliRunner().invoke(main, ["calibrate", str(run), "--max-risk", "0.1", "--coverage", "0.9"])
    assert res.exit_code == 2 and "not both" in res.output  # a usage error, before any work
    res = CliRunner().invoke(main, ["calibrate", str(run), "--coverage", "0.9", "--risk-confidence", "0.95"])
    assert res.exit_code == 2 and "goes with --max-risk" in res.output
    # four held-out images cannot show a 5% error with 95% confidence: every answer is referred, and why
    from mri_edge.calibrate import calibrate_run
    from mri_edge.config import CalibrateConfig

    said = []
    calibrate_run(run, CalibrateConfig(max_risk=0.05, risk_confidence=0.95, min_images=4), log=said.append)
    assert any("needs at least 59 accepted held-out answers" in line for line in said), said
    record = json.loads((run / "trust.json").read_text())
    assert record["threshold"] == trust.REFER_ALL and record["fitted_on"]["target"] == {"max_risk": 0.05,
                                                                                        "confidence": 0.95}


def test_verify_reports_stored_calibration_and_explanation_parity(calibrated_run):
    from mri_edge.config import Thresholds
    from mri_edge.verify import verify_run

    run, cal = calibrated_run
    out = verify_run(run, log=lambda *_: None)
    # what Keras refers on the test split, computed here apart from verify
    from mri_edge.data import decode_images
    from mri_edge.run import RunFolder
    from mri_edge.backends import open_model

    folder = RunFolder(run)
    net = open_model(folder.model_path)
    images = decode_images(net, folder.manifest()["root"], folder.test_predictions()["paths"], "test")
    record = trust.Trust.from_meta({"trust": json.loads((run / "trust.json").read_text())})
    keras_referred = float(record.unfamiliar(net.run(images, features=True)[1]).mean())
    for name, r in out["files"].items():
        t = r["trust"]
        assert t["temperature"] == cal["trust"]["temperature"]
        assert {"abstention", "sets"} <= set(t["file"]) and 0 < t["file"]["abstention"]["coverage"] <= 1
        e = r["explanation"]
        assert e["images"] == 16 and len(e["per_image_rank_correlation"]) == 16
        if r["quantization"] == "none":  # the same graph in float: the same maps
            assert e["rank_correlation"]["median"] > 0.99, name
        fam = r["familiarity"]  # the stored familiarity check, on Keras features and the file's own
        assert fam["n"] == out["n_test"] and fam["limit"] == cal["trust"]["familiarity"]["limit"]
        assert fam["keras_referred"] == keras_referred, (name, fam)
        if r["quantization"] == "none":
            assert fam["agreement"] == 1.0 and fam["kappa"] == 1.0 and fam["rank_correlation"] > 0.999, (name, fam)
    text = (run / "parity.md").read_text()
    assert "## Stored calibration" in text and "## Explanation parity" in text and "## Familiarity check" in text
    res = CliRunner().invoke(main, ["card", str(run)])  # the card's parity table carries both
    assert res.exit_code == 0, res.output
    rows = json.loads((run / "model_card.json").read_text())["parity"]
    assert {n: r["familiarity_agreement"] for n, r in rows.items()} == \
        {n: r["familiarity"]["agreement"] for n, r in out["files"].items()}
    assert "familiarity referrals agree" in (run / "model_card.md").read_text()
    # the gate: a file whose maps correlate less than asked fails for that reason
    name, worst = min(((n, r["explanation"]["rank_correlation"]["median"]) for n, r in out["files"].items()),
                      key=lambda x: x[1])
    gated = verify_run(run, files=[run / "exports" / name], thresholds=Thresholds(min_explanation_corr=1.0),
                       log=lambda *_: None)
    reasons = gated["files"][name]["fail_reasons"]
    assert worst < 1.0 and any("explanations moved" in x for x in reasons), (worst, reasons)


def test_verify_fails_a_file_whose_familiarity_check_moved(calibrated_run, monkeypatch):
    """The gate: a file that refers other images than Keras, beyond its agreement gate, fails."""
    from mri_edge import familiar
    from mri_edge.verify import verify_run

    run, _ = calibrated_run
    real = familiar.parity

    def moved(record, keras_feats, file_feats):  # the file's features pushed past the limit on half the images
        far = file_feats.copy()
        far[::2] += 100 * np.abs(keras_feats).max()
        return real(record, keras_feats, far)

    monkeypatch.setattr(familiar, "parity", moved)
    f = run / "exports" / "model_fp32.tflite"
    r = verify_run(run, files=[f], explain_images=0, log=lambda *_: None)["files"][f.name]
    assert r["familiarity"]["only_file"] >= r["familiarity"]["n"] // 2 - r["familiarity"]["only_keras"] - 1
    assert not r["passed"] and any(x.startswith("familiarity check moved") for x in r["fail_reasons"]), r


def test_explain_writes_overlays_through_any_runtime(calibrated_run, tmp_path):
    from mri_edge.cli import main
    from mri_edge.run import RunFolder
    from mri_edge.backends import open_model

    run, _ = calibrated_run
    manifest = RunFolder(run).manifest()
    images = [f"{manifest['root']}/{rel}" for rel, _ in manifest["splits"]["test"][:3]]
    for model in (run / "exports" / "model_int8.tflite", run / "model.keras"):
        out = tmp_path / model.stem
        res = CliRunner().invoke(main, ["explain", str(model), *images, "--out", str(out), "--grid", "4"])
        assert res.exit_code == 0, res.output
        record = json.loads((out / "explain.json").read_text())
        from mri_edge.files import sha256_file  # which file was explained: a re-export is told from it

        assert record["model_sha256"] == (open_model(model).meta.get("model_sha256") or sha256_file(model))
        assert len(record["images"]) == 3 and all(np.shape(r["map"]) == (4, 4) for r in record["images"])
        assert all((out / r["png"]).is_file() for r in record["images"])
        assert any(np.ptp(r["map"]) > 0 for r in record["images"])  # occlusion moved the probability
        # the calibrated file's answers as predict gives them: its threshold, its sets
        said = [open_model(model).predict(r["image"]) for r in record["images"]]
        assert [(r["class"], round(r["probability"], 5), r["uncertain"], r["prediction_set"])
                for r in record["images"]] == [(p.label, round(p.probabilities[p.label], 5), p.uncertain,
                                                p.prediction_set) for p in said]
        assert res.output.count("refer for review") == sum(p.uncertain for p in said)
        assert res.output.count("set (") == sum(p.prediction_set is not None for p in said) > 0
        # each map is scaled to its own largest value, so its largest drop is given beside it, a drop
        # of the graph's probability (before the temperature), which is given too
        assert all(r["map_max"] == pytest.approx(np.max(r["map"]), abs=1e-5) for r in record["images"])
        assert "| graph's p | largest drop |" in (out / "explain.md").read_text()
        m = open_model(model)
        graph = [float(m.run(m.preprocess(r["image"])[None])[0, m.class_names.index(r["class"])])
                 for r in record["images"]]
        assert [r["graph_probability"] for r in record["images"]] == pytest.approx(graph, abs=1e-5)
    # a map whose strongest cell moves p by under a point is labelled weak, on the overlay and in explain.md
    from mri_edge.explain import WEAK_DROP, peak_text

    assert peak_text("occlusion", 0.2) == "strongest cell: the graph's p drops by 0.2000 when blacked out"
    assert peak_text("occlusion", WEAK_DROP / 10).startswith("weak map: no cell lowers the graph's p by more than 0.0010")
    assert peak_text("occlusion", WEAK_DROP / 10, short=True) == "0.0010 (weak)"
    assert peak_text("occlusion", 0.0) == "no cell lowers the graph's p when blacked out"
    # a cell that changes nothing has one colour on every map, whatever the map's lowest value
    from mri_edge.explain import overlay

    grey = np.full((8, 8, 3), 128, np.uint8)
    one, two = np.zeros((2, 2), np.float32), np.zeros((2, 2), np.float32)
    one[0, 0], two[0, 0], two[1, 1] = 0.5, 0.1, -0.4
    a, b = overlay(grey, one), overlay(grey, two)
    assert (a[6:, :2] == b[6:, :2]).all()  # the bottom-left cell, 0 on both maps
    # again into the same folder with one image and one unreadable file: the overlays of the
    # first run go, the unreadable file is named once (not its path twice) and in explain.md
    out, bad = tmp_path / "model_int8", tmp_path / "bad.jpg"
    bad.write_text("not an image")
    res = CliRunner().invoke(main, ["explain", str(run / "exports" / "model_int8.tflite"), images[0], str(bad),
                                    "--out", str(out), "--grid", "4"])
    assert res.exit_code == 1 and res.output.count(str(bad)) == 1, res.output
    assert sorted(p.name for p in out.glob("*.png")) == [json.loads((out / "explain.json").read_text())["images"][0]["png"]]
    assert f"- {bad}: " in (out / "explain.md").read_text()
    res = CliRunner().invoke(main, ["explain", str(run / "exports" / "model_int8.tflite"), images[0],
                                    "--method", "gradcam", "--out", str(tmp_path / "g")])
    assert res.exit_code == 1 and "Grad-CAM needs gradients" in res.output
    res = CliRunner().invoke(main, ["explain", str(run / "model.keras"), images[0], "--method", "gradcam",
                                    "--out", str(tmp_path / "g")])
    assert res.exit_code == 1 and "no DenseNet121 base layer" in res.output  # the micro model has none


def test_model_card_holds_the_runs_facts_and_names_what_is_missing(calibrated_run):
    from mri_edge.cli import main
    from tests.test_reports import check

    run, cal = calibrated_run
    cfg = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**cfg, "mixup": 0.2, "drop_path": 0.1, "cutmix": 0.0}))
    res = CliRunner().invoke(main, ["card", str(run)])
    assert res.exit_code == 0, res.output
    card = json.loads((run / "model_card.json").read_text())
    text = check(run / "model_card.md")
    assert "not a medical device" in text and "{'" not in text  # versions as words, not a Python dict
    assert "regularisers: mixup 0.2, drop_path 0.1; phases:" in text and card["recipe"]["drop_path"] == 0.1
    assert "epochs_run" not in card["recipe"]  # no history.csv: the most each phase could run, alone
    # with one, the epochs each phase ran beside that
    from mri_edge.report import write_csv

    first = cfg["phases"][0]
    write_csv(run / "history.csv", [{"phase": first["name"], "epoch": e} for e in (1, 2)], ["phase", "epoch"])
    assert CliRunner().invoke(main, ["card", str(run)]).exit_code == 0
    card, text = json.loads((run / "model_card.json").read_text()), (run / "model_card.md").read_text()
    assert card["recipe"]["epochs_run"] == {p["name"]: 2 if p is first else 0 for p in cfg["phases"]}
    assert f"{first['name']} up to {first['epochs']} epoch{'s' * (first['epochs'] != 1)} (2 run)" in text
    (run / "history.csv").unlink()
    from mri_edge.familiar import without_arrays

    assert card["calibration"]["trust"] == without_arrays(cal["trust"])  # the projection stays in trust.json
    limit = cal["trust"]["familiarity"]["limit"]
    assert f"features lie farther than {limit:.2f} from the training images'" in text
    assert {f["file"] for f in card["files"]} == {*cal["updated_files"], "model.keras"}  # and what they came from
    assert "latency (mri-edge bench)" in card["missing"]  # no bench yet: said, not invented
    per_class = card["results"]["official"]["per_class"]
    assert all(lo <= c["sensitivity"] <= hi for c in per_class for lo, hi in [c["sensitivity_ci95"]])
    official = card["results"]["official"]
    lo, hi = official["macro_f1_ci95"]
    assert f"macro-F1 {official['macro_f1']:.3f} [{lo:.3f}, {hi:.3f}]." in text
    assert "model_card.md" in (run / "report.md").read_text()
    assert "in folder" not in (run / "report.md").read_text()  # a copied run folder is not a shipped one
    # Each calibration row names the file it measured; a file exported again after calibrate
    # (another model_sha256 in the row) has its row left out and named as missing, not misreported.
    from mri_edge.backends import read_metadata

    report_path = run / "calibration" / "calibrate.json"
    rows = json.loads(report_path.read_text())
    for name in cal["updated_files"]:
        assert rows["files"][name]["model_sha256"] == read_metadata(run / "exports" / name)["model_sha256"]
    assert set(card["calibration"]["per_file"]) == set(rows["files"])
    rows["files"]["model_int8.tflite"]["model_sha256"] = "0" * 64
    report_path.write_text(json.dumps(rows))
    assert CliRunner().invoke(main, ["card", str(run)]).exit_code == 0
    card = json.loads((run / "model_card.json").read_text())
    assert set(card["calibration"]["per_file"]) == set(rows["files"]) - {"model_int8.tflite"}
    assert any(m.startswith("calibration of model_int8.tflite (exported again since") for m in card["missing"])
    # sets whose quantile is 0 are the top class alone, which the card says
    assert not any("prediction sets are single classes" in x for x in card["limitations"])
    rows["trust"] = {**rows["trust"], "conformal_q": 0.0, "alpha": 0.02}
    report_path.write_text(json.dumps(rows))  # and the record the runtimes apply, as calibrate writes both
    (run / "trust.json").write_text(json.dumps({**json.loads((run / "trust.json").read_text()), "conformal_q": 0.0,
                                                "alpha": 0.02}))
    assert CliRunner().invoke(main, ["card", str(run)]).exit_code == 0
    assert "Its 98% prediction sets are single classes" in (run / "model_card.md").read_text()


def test_gradcam_on_a_densenet121(tiny_run, tmp_path):
    from mri_edge import explain
    from mri_edge.backends import open_model

    net = open_model(tiny_run / "model.keras")
    img = np.random.default_rng(0).integers(0, 255, (net.image_size, net.image_size, 3), dtype=np.uint8)
    heat, target = explain.gradcam(net, img)
    assert heat.ndim == 2 and np.isfinite(heat).all() and 0 <= target < 4
    assert explain.overlay(img, heat).shape == img.shape


def test_shipped_files_carry_their_folders_trust_record():
    from tests.conftest import REPO

    from mri_edge.run import RunFolder
    from mri_edge.backends import open_model

    for folder in (REPO / "artifacts" / "tumor", REPO / "artifacts" / "alzheimer"):
        run = RunFolder(folder)
        record = run.trust()
        assert record is not None and len(run.export_files()) >= 3, folder
        for f in run.export_files():
            if f.suffix == ".xml":
                continue
            stored = open_model(f).trust
            assert (stored.to_dict() if stored else None) == record, f


def test_card_on_a_shipped_folder_describes_that_folder(tmp_path):
    from click.testing import CliRunner

    from mri_edge.cli import main
    from tests.conftest import REPO

    shipped = tmp_path / "tumor"
    shutil.copytree(REPO / "artifacts" / "tumor", shipped)
    res = CliRunner().invoke(main, ["card", str(shipped)])
    assert res.exit_code == 0, res.output
    index = (shipped / "report.md").read_text()
    files = sorted(p.name for p in shipped.iterdir() if p.suffix in (".tflite", ".onnx"))
    assert "## Exports" in index and all(f"[{f}]({f})" in index for f in files)
    assert "## Benchmark" in index and "(bench.md)" in index and "(in folder `tumor`)" in index
    card = json.loads((shipped / "model_card.json").read_text())
    assert sorted(f["file"] for f in card["files"]) == sorted([*files, "model.keras"])
    assert "- [Data audit](audit.md)" in index  # the folder's copy of its dataset's audit
    text = (shipped / "model_card.md").read_text()  # exact and near copies, from the run's audit.json
    assert "near duplicates: train-train (1900), train-test (1270)" in text
    assert "832 of 1311 test images have no exact or near copy in training" in text
    assert "## Latency (batch 1, AMD EPYC, AVX2, no AVX-512)" in text and "benched with" in text
    assert "keeps its epoch of best validation loss (patience 100)" in text
    assert "- 479 of 1311 test images have an exact or near copy in training" in text  # a limitation, with the probe
    assert "kernels rounded to float16 (from the trained model_fp32.keras" in text
    # the accuracy-aware files' recipes (what stayed out of static int8), as export's table gives them
    from mri_edge.backends import read_metadata
    from mri_edge.export.pool import float_parts

    recipe = float_parts(read_metadata(shipped / "model_int8.tflite")["accuracy_aware"])
    assert card["parity"]["model_int8.tflite"]["int8_recipe"] == recipe
    assert f"- `model_int8.tflite`: {recipe}" in (shipped / "model_card.md").read_text()
    # a later `bench --quick` (10 timed runs, in bench/) does not stand in for the shipped 30-run report
    full = json.loads((shipped / "bench.json").read_text())
    (shipped / "bench").mkdir()
    quick = {**full, "settings": {**full["settings"], "runs": 10}, "rows": [{**r, "p50_ms": -1.0} for r in full["rows"]]}
    (shipped / "bench" / "bench.json").write_text(json.dumps(quick))
    assert CliRunner().invoke(main, ["card", str(shipped)]).exit_code == 0
    index = (shipped / "report.md").read_text()
    assert f"{len(full['rows'])} rows of 30 timed runs on" in index and "(bench.md)" in index, index
    card = json.loads((shipped / "model_card.json").read_text())  # the card quotes the same report
    assert card["latency"]["rows"] and all(r["p50_ms"] > 0 for r in card["latency"]["rows"])


@pytest.mark.slow
@pytest.mark.realdata
def test_calibrate_refuses_a_random_alzheimer_carve_and_takes_a_grouped_one(shared_data):
    """A random carve of the Alzheimer training split holds other slices of training subjects:
    the images without a near twin still are (their 1-NN probe beats the test's), so they are
    refused; a grouped carve of the same data is taken whole."""
    from mri_edge import data
    from mri_edge.calibrate import CalibrateError, held_out_rows
    from mri_edge.config import CalibrateConfig

    root = shared_data / "alzheimer-mri"
    with pytest.raises(CalibrateError, match="not new to the model"):
        held_out_rows(data.discover(root, "alzheimer").manifest(), CalibrateConfig(), log=lambda *_: None)
    grouped = data.discover(root, "alzheimer", val_split="grouped").manifest()
    keep, info = held_out_rows(grouped, CalibrateConfig(), log=lambda *_: None)
    assert len(keep) == len(grouped["splits"]["val"]) and not info["twins_included"]
    assert info["probe_gap"] <= CalibrateConfig().max_probe_gap + info["probe_gap_noise"]


def test_a_file_exported_again_keeps_the_runs_calibration_and_a_stale_one_is_flagged(calibrated_run):
    from mri_edge.export import export_run
    from mri_edge.backends import open_model
    from mri_edge.verify import verify_run

    run, cal = calibrated_run
    f = run / "exports" / "model_fp32.tflite"
    export_run(run, ("tflite",), ("none",), "uint8", log=lambda *_: None, workers=1)
    assert open_model(f).trust.to_dict() == cal["trust"]  # fitted for this model.keras: carried over
    assert not verify_run(run, files=[f], explain_images=0, log=lambda *_: None)["files"][f.name]["fail_reasons"]
    # a trust.json fitted for another model is not carried, and the file no longer matches the run's record
    record = json.loads((run / "trust.json").read_text())
    record["fitted_on"]["source_model_sha256"] = "0" * 64
    (run / "trust.json").write_text(json.dumps(record))
    export_run(run, ("tflite",), ("none",), "uint8", log=lambda *_: None, workers=1)
    assert open_model(f).trust is None
    reasons = verify_run(run, files=[f], explain_images=0, log=lambda *_: None)["files"][f.name]["fail_reasons"]
    assert any("not the run's trust.json" in x for x in reasons), reasons
    assert not any("another model.keras" in x for x in reasons)
    # model.keras changed since the export (retrained, or evaluate --fp16-weights): the file is not its export
    from mri_edge.model import load_model, save_model
    net = load_model(run / "model.keras")
    net.set_weights([w + 1e-3 if w.ndim == 1 else w for w in net.get_weights()])
    save_model(net, run / "model.keras")
    reasons = verify_run(run, files=[f], explain_images=0, log=lambda *_: None)["files"][f.name]["fail_reasons"]
    assert any("exported from another model.keras than the run's" in x for x in reasons), reasons


def test_reports_name_the_threshold_target_in_words():
    assert trust.describe_target({"max_risk": 0.01, "confidence": 0.95}) == (
        "error at most 1.0% with 95% confidence, by binomial tests")
    assert trust.describe_target({"max_risk": 0.15}) == "error at most 15.0% on held-out images, estimated"
    assert trust.describe_target({"coverage": 0.9}) == "answer 90% of held-out images"
    assert trust.describe_target({}) == "not recorded"


def test_a_map_flat_but_for_float_rounding_counts_as_flat():
    from mri_edge.explain import rank_correlation

    flat = np.zeros((8, 8))  # Keras's drops on a saturated answer
    noisy = flat + np.random.default_rng(0).normal(0, 1e-7, (8, 8))  # an fp32 file's on the same image
    assert rank_correlation(flat, noisy) == 1.0
    real = np.arange(64.0).reshape(8, 8) / 64
    assert rank_correlation(flat, real) == 0.0 and rank_correlation(real, real + noisy) > 0.999


def test_calibrate_names_a_file_whose_held_out_risk_is_above_the_target():
    from mri_edge.calibrate_report import summary_table

    def res(risk, accepted):
        split = {"n": 100, "before": {"accuracy": 0.7, "ece": 0.2, "nll": 1.0}, "after": {"ece": 0.05, "nll": 0.8},
                 "abstention": {"coverage": accepted / 100, "risk": risk, "accepted": accepted}}
        return {"held_out": split}

    out = {"trust": {"fitted_on": {"model": "model.keras", "target": {"max_risk": 0.15}}},
           "files": {"model.keras": res(0.13, 46), "model_int8.onnx": res(0.17, 47), "model_x.tflite": res(None, 0)}}
    text = summary_table(out)
    assert "above the target 0.15: model_int8.onnx (0.1700 on 47 accepted answers)" in text
    assert "model.keras (" not in text and "model_x" not in text.split("above the target")[1]
    out["trust"]["fitted_on"]["target"] = {"coverage": 0.5}  # no risk target: nothing to compare
    assert "above the target" not in summary_table(out)


def test_a_record_applies_only_to_the_model_it_names():
    record = {"temperature": 2.0, "fitted_on": {"source_model_sha256": "a" * 64}}
    assert trust.fitted_for(record, "a" * 64)
    assert not trust.fitted_for(record, "b" * 64)
    assert not trust.fitted_for(record, None)  # a model of unknown hash cannot be matched
    assert not trust.fitted_for({"temperature": 2.0, "fitted_on": {}}, "a" * 64)
    assert not trust.fitted_for(None, "a" * 64)


def test_a_store_that_fails_halfway_names_what_it_updated_and_calibrate_again_mends_it(calibrated_run, monkeypatch):
    from mri_edge.backends import open_model
    from mri_edge.calibrate import CalibrateError, calibrate_run
    from mri_edge.config import CalibrateConfig
    from mri_edge.export import pipeline
    from mri_edge.run import RunFolder

    run, _ = calibrated_run
    record = (run / "trust.json").read_text()
    real, written = pipeline.rewrite_metadata, []

    def second_fails(path, meta):
        if written:
            raise OSError("disk full")
        real(path, meta)
        written.append(path.name)

    monkeypatch.setattr(pipeline, "rewrite_metadata", second_fails)
    cfg = CalibrateConfig(coverage=0.5, alpha=0.1, min_images=4)  # another record: every file is rewritten
    with pytest.raises(CalibrateError, match="cannot store the calibration") as e:
        calibrate_run(run, cfg, log=lambda *_: None)
    assert f"disk full); updated so far: {written[0]}; fix it and run calibrate again" in str(e.value)
    assert (run / "trust.json").read_text() == record  # the run's record stays the last one stored whole
    monkeypatch.undo()
    calibrate_run(run, cfg, log=lambda *_: None)
    stored = json.loads((run / "trust.json").read_text())
    assert stored["alpha"] == 0.1
    assert all(open_model(f).trust.to_dict() == stored for f in RunFolder(run).export_files())


def test_calibrate_refuses_a_reference_made_from_another_model_before_any_work(micro_run, tmp_path, monkeypatch):
    from mri_edge import calibrate
    from mri_edge.backends import read_metadata
    from mri_edge.export import rewrite_metadata

    run = tmp_path / "run"
    shutil.copytree(micro_run, run)
    other = tmp_path / "other.tflite"
    shutil.copy(run / "exports" / "model_int8.tflite", other)
    rewrite_metadata(other, {**read_metadata(other), "source_model_sha256": "f" * 64})
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    monkeypatch.setattr(calibrate, "held_out_rows", lambda *a, **k: pytest.fail("read the held-out images"))
    res = CliRunner().invoke(main, ["calibrate", str(run), "--reference", str(other)])
    assert res.exit_code == 1 and "not this run's model (made from another model.keras)" in res.output, res.output
    for ref, why in ((run / "labels.json", "not a model file"), (shutil.copy(run / "exports" / "model_fp32.tflite",
                                                                               tmp_path / "model_fp32.tflite"),
                                                                   "has the name of one of the run's files")):
        res = CliRunner().invoke(main, ["calibrate", str(run), "--reference", str(ref)])
        assert res.exit_code == 1 and why in res.output, res.output
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_the_alzheimer_card_names_the_dataset_of_its_starting_weights_and_its_referrals(tmp_path):
    from tests.conftest import REPO

    shipped = tmp_path / "alzheimer"
    shutil.copytree(REPO / "artifacts" / "alzheimer", shipped)
    res = CliRunner().invoke(main, ["card", str(shipped)])
    assert res.exit_code == 0, res.output
    card = json.loads((shipped / "model_card.json").read_text())
    assert card["data"]["starting_weights_trained_on"]["licence"] == "CC0-1.0"  # the tumor model it began from
    text = (shipped / "model_card.md").read_text()
    assert "Its starting weights were trained on Brain Tumor MRI Dataset" in text
    assert "- At its stored threshold it answers 5.5% of test images (92.9% of them right)" in text


def test_a_replaced_model_keras_is_refused_by_calibrate_and_named_by_the_card(calibrated_run):
    """evaluate --fp16-weights (or a retrain) after calibrate: the files and trust.json describe the
    model it replaced. calibrate must not fit on the new model and store into the old files; the
    card must not present the old calibration as this model's, and says what to run."""
    from mri_edge.backends import read_metadata
    from mri_edge.cli import main

    run, _ = calibrated_run
    assert CliRunner().invoke(main, ["evaluate", str(run), "--fp16-weights"]).exit_code == 0
    before = {f.name: read_metadata(f)["trust"] for f in (run / "exports").glob("*.tflite")}
    from mri_edge.calibrate import CalibrateError, calibrate_run
    from mri_edge.config import CalibrateConfig

    with pytest.raises(CalibrateError, match="model_fp32.onnx, .*: exported from another model.keras than the run's"):
        calibrate_run(run, CalibrateConfig(coverage=0.5, alpha=0.2, min_images=4), log=lambda *_: None)
    assert before == {f.name: read_metadata(f)["trust"] for f in (run / "exports").glob("*.tflite")}  # untouched
    assert CliRunner().invoke(main, ["card", str(run)]).exit_code == 0
    card = json.loads((run / "model_card.json").read_text())
    assert "calibration" not in card and not card.get("parity")  # (a session's verify may have left a parity.json)
    assert any(m.startswith("export of model_fp32.onnx, model_fp32.tflite, model_int8.onnx, model_int8.tflite (made "
                            "from another model.keras") for m in card["missing"]), card["missing"]
    assert any(m.startswith("calibration (fitted for another model.keras") for m in card["missing"])
    index = (run / "report.md").read_text()  # the run's index page says the same
    assert "model_int8.tflite: exported from another model.keras than the run's" in index
    assert "Out of date: fitted for another model.keras: run `mri-edge calibrate`." in index


def test_the_card_and_run_index_follow_deleted_and_unmeasured_files(calibrated_run):
    import shutil as sh

    from mri_edge.cli import main
    from mri_edge.run import RunFolder

    run, _ = calibrated_run
    (run / "exports" / "model_fp32.onnx").unlink()  # deleted by hand
    sh.copy(run / "exports" / "model_int8.tflite", run / "exports" / "model_int8_copy.tflite")  # never measured
    assert CliRunner().invoke(main, ["card", str(run)]).exit_code == 0
    card = json.loads((run / "model_card.json").read_text())
    assert set(card["calibration"]["per_file"]) == {"model.keras", "model_fp32.tflite", "model_int8.tflite",
                                                    "model_int8.onnx"}
    assert any(m.startswith("calibration of model_int8_copy.tflite (not measured") for m in card["missing"])
    index = (run / "report.md").read_text()
    assert "(exports/model_fp32.onnx)" not in index and "lists model_fp32.onnx, no longer in exports/" in index
    # a card written before a file was exported again says so in the index
    card["files"] = [{**f, "model_sha256": "0" * 64} if f["file"] == "model_int8.tflite" else f for f in card["files"]]
    (run / "model_card.json").write_text(json.dumps(card))
    RunFolder(run).write_index()
    assert "Out of date for model_int8.tflite (exported again since): run `mri-edge card`" in (run / "report.md").read_text()


def test_the_card_names_a_public_dataset_only_for_its_official_test_split(calibrated_run):
    from mri_edge.cli import main

    run, _ = calibrated_run  # synthetic phantoms in the tumor dataset's folders
    assert CliRunner().invoke(main, ["card", str(run)]).exit_code == 0
    card = json.loads((run / "model_card.json").read_text())
    assert card["data"]["name"] == "user-supplied" and card["data"]["licence"] == "unknown"
    assert "Brain Tumor MRI Dataset" not in (run / "model_card.md").read_text()
    assert "## Results: test split" in (run / "model_card.md").read_text()


def test_a_shipped_cards_reference_row_survives_without_model_keras_and_skipped_files_give_their_reason(tmp_path):
    from mri_edge.cli import main
    from tests.conftest import REPO

    shipped = tmp_path / "alzheimer"
    shutil.copytree(REPO / "artifacts" / "alzheimer", shipped, ignore=shutil.ignore_patterns("model.keras"))
    bench = json.loads((shipped / "bench.json").read_text())  # as if onnxruntime were missing where bench ran
    bench["rows"] = [r for r in bench["rows"] if r["model"] != "model_int8.onnx"]
    bench["skipped"] = [{"model": "model_int8.onnx", "runtime": "onnxruntime", "reason": "onnxruntime not installed"}]
    (shipped / "bench.json").write_text(json.dumps(bench))
    assert CliRunner().invoke(main, ["card", str(shipped)]).exit_code == 0
    card = json.loads((shipped / "model_card.json").read_text())
    assert card["calibration"]["reference_model"] == "model.keras" and "model.keras" in card["calibration"]["per_file"]
    assert any(x.startswith("At its stored threshold it answers 5.5% of test images") for x in card["limitations"])
    assert "latency of model_int8.onnx (bench skipped it: onnxruntime not installed)" in card["missing"]
    assert not any("not measured" in m for m in card["missing"]), card["missing"]


def test_card_and_index_on_hand_edited_folders(tmp_path):
    """Reports edited by hand or removed: one line naming the file and its command, an index page that
    says it could not be made instead of a traceback, and a card that says what the runtimes apply."""
    from mri_edge.cli import main
    from mri_edge.run import RunFolder
    from tests.conftest import REPO

    def copy(name):
        d = tmp_path / name
        shutil.copytree(REPO / "artifacts" / "tumor", d)
        return d

    run = copy("fields")  # valid JSON without the fields evaluate writes
    (run / "test_report.json").write_text(json.dumps({"accuracy": 0.5, "n": 12}))
    res = CliRunner().invoke(main, ["card", str(run)])
    assert res.exit_code == 1 and "test_report.json" in res.output and "run `mri-edge evaluate` again" in res.output
    assert len(res.output.strip().splitlines()) == 1 and "Traceback" not in res.output
    run = copy("index")
    (run / "calibration" / "calibrate.json").write_text(json.dumps({"trust": {}, "files": {}}))
    RunFolder(run).write_index()
    assert "This page could not be made" in (run / "report.md").read_text()
    run = copy("no-trust")  # the exported files carry (and apply) their record; model.keras's, trust.json, is gone
    (run / "trust.json").unlink()
    assert CliRunner().invoke(main, ["card", str(run)]).exit_code == 0
    card = json.loads((run / "model_card.json").read_text())
    assert "calibration" in card and any("trust.json, the record model.keras is applied with, is missing" in m
                                         for m in card["missing"])
    run = copy("no-report")  # calibrate.json gone, the files still calibrated: not "raw softmax"
    shutil.rmtree(run / "calibration")
    assert CliRunner().invoke(main, ["card", str(run)]).exit_code == 0
    card = json.loads((run / "model_card.json").read_text())
    assert any("calibrate.json is missing, though the files carry a record" in m for m in card["missing"])
    assert not any("raw softmax" in x for x in card["limitations"])
    run = copy("renamed")  # a file renamed: its reports' rows follow its model bytes to the new name
    (run / "model_int8.tflite").rename(run / "my.tflite")
    assert CliRunner().invoke(main, ["card", str(run)]).exit_code == 0
    card, index = json.loads((run / "model_card.json").read_text()), (run / "report.md").read_text()
    assert "my.tflite" in card["parity"] and "my.tflite" in card["calibration"]["per_file"] and not card["missing"]
    assert [r["model"] for r in card["latency"]["rows"]].count("my.tflite") == 2  # its rows, as named now
    assert "[my.tflite](my.tflite)" in index  # the index names the rename beside the reports that predate it
    assert "Out of date for model_int8.tflite (renamed my.tflite since): run `mri-edge verify`." in index
    assert "[model_card.md](model_card.md).\n" in index  # the card, written after the rename, is current
    (run / "my.tflite").unlink()  # gone: the reports name a file no longer there
    RunFolder(run).write_index()
    assert "model_int8.tflite (no longer there): run `mri-edge verify`" in (run / "report.md").read_text()
