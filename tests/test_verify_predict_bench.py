import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mri_edge import export as export_lib
from mri_edge import ov
from mri_edge.cli import main
from mri_edge.verify import Thresholds, mcnemar_exact, verify_run

def test_mcnemar_exact_values():
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(5, 5) == 1.0
    assert mcnemar_exact(10, 0) == pytest.approx(2 / 1024)
    assert mcnemar_exact(1, 4) == pytest.approx(0.375)


def test_verify_passes_good_exports(exported_run):
    # The tiny model is barely trained, so near-tied probabilities make int8 flip more than a real
    # model would (and moves their ECE); the float files must still agree exactly.
    loose = Thresholds(quant_agreement=0.0, quant_max_drop_pts=100.0, max_ece_change=1.0)
    out = verify_run(exported_run, thresholds=loose, log=lambda *_: None)
    assert out["passed"], out["failures"]
    floats = ["model_fp32.tflite", "model_fp32.onnx", "model_fp16.tflite"]
    floats += ["model_fp32.xml"] if ov.available(for_export=True) else []
    for name in floats:
        r = out["files"][name]
        assert r["agreement"] == 1.0 and r["accuracy_delta"] == 0 and r["prob_abs_diff"]["max"] < 1e-2
        # as verify's ECE gate reads it: a confidence that crosses a bin edge by a hair moves ECE by 1/n
        c = r["calibration"]
        assert r["mcnemar"]["p_value"] == 1.0 and min(abs(c["ece_delta"]), abs(c["ece_delta_keras_bins"])) < 1e-3
    assert (exported_run / "parity.json").is_file() and "Clinical parity" in (exported_run / "parity.md").read_text()
    # one plot per file, though model_int8.tflite, .onnx and .xml share a stem
    assert (exported_run / "verify" / "confusion_model_int8_tflite.png").is_file()
    assert (exported_run / "verify" / "confusion_model_int8_onnx.png").is_file()


def test_verify_passes_the_micro_exports_with_default_gates(micro_run):
    out = verify_run(micro_run, log=lambda *_: None)
    assert out["passed"], out["failures"]
    assert set(out["files"]) == {"model_fp32.tflite", "model_int8.tflite", "model_fp32.onnx", "model_int8.onnx"}
    for name in ("model_fp32.tflite", "model_fp32.onnx"):
        assert out["files"][name]["prob_abs_diff"]["max"] < 1e-4


def test_verify_fails_on_a_sabotaged_int8_export(micro_run, tmp_path, monkeypatch):
    """An int8 file calibrated with the wrong normalisation (0-1 instead of 0-255) must fail the gate.

    The gate can only fail if the reference varies: no constant answer may reach the 98%
    agreement the gate asks for, which the micro model guarantees and this test checks first.
    """
    ref = json.loads((micro_run / "test_predictions.json").read_text())
    share = np.bincount(np.asarray(ref["probs"]).argmax(1)).max() / len(ref["probs"])
    assert share <= 0.75, "the reference must not be (nearly) constant, or sabotage could go unnoticed"
    run = tmp_path / "sabotage"
    shutil.copytree(micro_run, run, ignore=shutil.ignore_patterns("exports", "verify", "bench"))
    from mri_edge.export import pipeline

    real = export_lib.calibration_set
    monkeypatch.setattr(pipeline, "calibration_set",
                        lambda *a, **k: ((real(*a, **k)[0] / 255.0).astype(np.float32), real(*a, **k)[1]))
    results, failures = export_lib.export_run(run, ("tflite",), ("int8",), calib_size=16, log=lambda *_: None,
                                              workers=1)
    assert not failures
    res = CliRunner().invoke(main, ["verify", str(run)])
    assert res.exit_code == 1, res.output
    assert "model_int8.tflite" in res.output and "FAIL" in res.output
    parity = json.loads((run / "parity.json").read_text())
    r = parity["files"]["model_int8.tflite"]
    assert not parity["passed"] and r["fail_reasons"] and len(r["failed_gates"]) == len(r["fail_reasons"])
    assert "quantization moves the answers" in res.output  # the hint, found by the failed gates' names


def test_predict_cli_on_odd_and_corrupt_images(exported_run, synth_data, tmp_path):
    from PIL import Image

    good = next((synth_data / "Testing" / "meningioma").glob("*.jpg"))
    Image.open(good).convert("RGBA").save(tmp_path / "rgba.png")
    Image.open(good).convert("CMYK").save(tmp_path / "cmyk.jpg")
    (tmp_path / "corrupt.jpg").write_bytes(good.read_bytes()[:50])
    model = exported_run / "exports" / "model_int8.tflite"
    res = CliRunner().invoke(main, ["predict", str(model), str(good), str(tmp_path), "--out", str(tmp_path / "p")])
    assert res.exit_code == 1
    assert "corrupt.jpg" in res.output and "ERROR" in res.output and "3 classified, 1 failed" in res.output
    written = json.loads((tmp_path / "p" / "predictions.json").read_text())  # --out: the same answers, kept
    assert written["images"] == 4 and written["failed"] == 1 and written["runtime"] in res.output
    assert [r["image"] for r in written["predictions"]] == [str(good)] + [str(q) for q in sorted(
        tmp_path.glob("*.*"))]
    assert "error" in written["predictions"][2] and written["predictions"][0]["label"] in res.output
    md = (tmp_path / "p" / "predictions.md").read_text()
    assert md.count("\n| ") == 5 and "3 classified, 1 failed" in md
    res = CliRunner().invoke(main, ["predict", str(model), str(good), "--top-k", "9"])  # 4 classes: top-4
    assert res.output.startswith("model: model_int8.tflite (runtime ") and "  top-4\n" in res.output, res.output
    res = CliRunner().invoke(main, ["predict", str(model), str(good), "--json"])
    assert res.exit_code == 0
    rec = json.loads(res.output.strip().splitlines()[-1])
    assert rec["label"] in rec["probabilities"] and len(rec["top_k"]) == 3
    # The same image through Keras (the run folder) and the fp32 ONNX file: the same answer
    answers = []
    for m in (exported_run, exported_run / "exports" / "model_fp32.onnx"):
        res = CliRunner().invoke(main, ["predict", str(m), str(good), "--json"])
        assert res.exit_code == 0, res.output
        answers.append(json.loads(res.output.strip().splitlines()[-1]))
    assert answers[0]["label"] == answers[1]["label"]
    assert all(abs(answers[0]["probabilities"][k] - p) < 1e-4 for k, p in answers[1]["probabilities"].items())
    res = CliRunner().invoke(main, ["predict", str(tmp_path / "nope.tflite"), str(good)])
    assert res.exit_code != 0
    # The interpreter's built-in kernels (--xnnpack off) round int8 otherwise but answer alike;
    # the option means nothing to other runtimes and says so.
    res = CliRunner().invoke(main, ["predict", str(model), str(good), "--json", "--xnnpack", "off"])
    assert res.exit_code == 0, res.output
    builtin = json.loads(res.output.strip().splitlines()[-1])
    assert max(abs(builtin["probabilities"][k] - v) for k, v in rec["probabilities"].items()) < 0.05
    res = CliRunner().invoke(main, ["predict", str(exported_run / "exports" / "model_fp32.onnx"), str(good),
                                    "--xnnpack", "off"])
    assert res.exit_code != 0 and "applies to .tflite files only" in res.output


def test_bench_quick_has_consistent_statistics(exported_run, tmp_path):
    model = exported_run / "exports" / "model_int8.tflite"
    onnx = exported_run / "exports" / "model_int8.onnx"
    manifest = json.loads((exported_run / "split_manifest.json").read_text())
    image = Path(manifest["root"]) / manifest["splits"]["test"][0][0]
    res = CliRunner().invoke(main, ["bench", str(model), str(onnx), "--batch", "1,2", "--threads", "1",
                                    "--warmup", "1", "--runs", "8", "--out", str(tmp_path / "b"), "--image", str(image)])
    assert res.exit_code == 0, res.output
    out = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert out["schema_version"] == 1 and out["machine"]["cores"] >= 1
    assert len(out["rows"]) == 4 and not out["errors"]
    for r in out["rows"]:
        assert r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"]
        for key in ("load_s", "first_inference_ms", "mean_ms", "std_ms", "throughput_img_s", "peak_rss_added_mb",
                    "size_mb", "runtime_label"):
            assert key in r
        assert r["runs"] == 8 and r["load_s"] > 0 and r["mean_ms"] > 0 and r["std_ms"] >= 0
        assert r["throughput_img_s"] == pytest.approx(r["batch"] * 1e3 / r["p50_ms"])
        assert r["size_mb"] == pytest.approx((model.parent / Path(r["model"]).name).stat().st_size / 1e6, abs=0.01)
        # end to end (decode + resize + invoke) at batch 1, from the --image given
        assert (r["e2e_p50_ms"] > 0) if r["batch"] == 1 else r["e2e_p50_ms"] is None
    runtimes = {s["runtime"] for s in out["skipped"]}
    assert "onnxruntime-cuda" in runtimes  # no GPU here: listed as skipped, not an error
    if ov.available(for_export=True):
        res = CliRunner().invoke(main, ["bench", str(exported_run / "exports" / "model_int8.xml"), "--batch", "1,2",
                                        "--threads", "1", "--warmup", "1", "--runs", "4", "--out", str(tmp_path / "o")])
        assert res.exit_code == 0, res.output
        rows = json.loads((tmp_path / "o" / "bench.json").read_text())["rows"]
        assert sorted((r["runtime_label"], r["batch"]) for r in rows) == [("openvino", 1), ("openvino", 2)]
        assert rows[0]["size_mb"] > (exported_run / "exports" / "model_int8.xml").stat().st_size / 1e6  # .bin counted
    assert (tmp_path / "b" / "bench.md").is_file() and (tmp_path / "b" / "bench.png").is_file()
    res = CliRunner().invoke(main, ["bench", str(model), "--batch", "1", "--threads", "1", "--runs", "3", "--warmup", "0",
                                    "--out", str(tmp_path / "c"), "--compare", str(tmp_path / "b" / "bench.json")])
    assert res.exit_code == 0 and "speed-up" in res.output
    assert "| same file |" in res.output and "| yes |" in res.output  # the same file, by its recorded hash


def test_verify_on_the_validation_split_leaves_the_test_report_alone(exported_run, tmp_path):
    fp32 = exported_run / "exports" / "model_fp32.tflite"
    out = verify_run(exported_run, files=[fp32], split="val", log=lambda *_: None)
    val_dir = exported_run / "verify" / "val"
    assert out["split"] == "val" and out["passed"] and out["files"]["model_fp32.tflite"]["agreement"] == 1.0
    manifest = json.loads((exported_run / "split_manifest.json").read_text())
    assert out["n_test"] == len(manifest["splits"]["val"]) > 0
    # --file: the report of just that file goes to verify/val/selected/
    assert (val_dir / "selected" / "parity.json").is_file()
    assert "validation images" in (val_dir / "selected" / "parity.md").read_text()
    ref = json.loads((val_dir / "keras_predictions.json").read_text())
    assert ref["paths"] == [p for p, _ in manifest["splits"]["val"]]
    # every file, on the validation split: its report goes to verify/val/, the test split's stays as it was
    run = tmp_path / "run"
    shutil.copytree(exported_run, run, ignore=lambda d, names: [n for n in names if Path(d).name == "exports"
                                                                and n not in ("model_fp32.tflite", "exports.json")])
    (run / "parity.json").write_text('{"the test report": 1}')
    out = verify_run(run, split="val", explain_images=0, log=lambda *_: None)
    assert out["files"].keys() == {"model_fp32.tflite"} and not out["selected_files_only"]
    assert json.loads((run / "verify" / "val" / "parity.json").read_text())["split"] == "val"
    assert (run / "parity.json").read_text() == '{"the test report": 1}'
    res = CliRunner().invoke(main, ["verify", str(exported_run), "--split", "val", "--dedup",
                                    str(exported_run / "split_manifest.json")])
    assert res.exit_code == 1 and "leave it out with --split val" in res.output


def test_the_ece_gate_ignores_confidences_that_cross_a_bin_edge_by_a_hair():
    from mri_edge import metrics
    from mri_edge.verify import compare, ece_moved

    def probs(top):  # class 0 on top with probability `top`, the rest shared
        return np.array([[t] + [(1 - t) / 3] * 3 for t in top])

    # 20 wrong answers just above the 7/15 bin edge, 20 right ones in the bin below, 20 confident right ones
    top = np.array([7 / 15 + 0.001] * 20 + [0.41] * 20 + [0.9] * 20)
    labels = np.array([1] * 20 + [0] * 40)
    keras = probs(top)
    paths = [str(i) for i in range(60)]
    nudged = compare(["a", "b", "c", "d"], labels, keras, probs(top - np.r_[[0.002] * 20, [0] * 40]), paths)
    cal = nudged["calibration"]
    assert cal["ece_delta"] < -0.1 and abs(cal["ece_delta_keras_bins"]) < 0.002  # the bins moved, calibration did not
    assert not ece_moved(cal, 0.01)
    shifted = compare(["a", "b", "c", "d"], labels, keras, probs(top + np.r_[[0.08] * 20, [0] * 40]), paths)
    assert ece_moved(shifted["calibration"], 0.01)
    assert metrics.calibration_metrics(labels, keras, binned_by=keras.max(1)) == metrics.calibration_metrics(labels, keras)


def test_bench_times_end_to_end_on_the_first_image_that_decodes(tmp_path):
    from mri_edge.bench import first_readable

    broken, good = tmp_path / "0.jpg", tmp_path / "1.png"
    broken.write_bytes(b"\xff\xd8 broken")
    import cv2

    cv2.imwrite(str(good), np.zeros((8, 8), np.uint8))
    assert first_readable([broken, good]) == str(good) and first_readable([broken]) is None
