"""Bad input and interruptions: a one-line error, a non-zero exit, nothing lost or left inconsistent."""

import json
import os
import re
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from mri_edge import data
from mri_edge.cli import main
from mri_edge.errors import MriEdgeError
from mri_edge.run import RunError, RunFolder


def invoke(*args):
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert "Traceback" not in res.output, res.output
    return res


def test_train_refuses_a_folder_that_is_not_its_run(synth_data, tmp_path):
    shipped = tmp_path / "copy-of-artifacts-tumor"
    shipped.mkdir()
    (shipped / "model_int8.tflite").write_bytes(b"x")
    (shipped / "report.md").write_text("# old report\n")
    res = invoke("train", "--task", "tumor", "--data-dir", synth_data, "--weights", "none", "--out", shipped)
    assert res.exit_code == 1 and "not empty and not a run of `mri-edge train`" in res.output
    assert "model_int8.tflite" in res.output and "--force" in res.output
    assert (shipped / "report.md").read_text() == "# old report\n"
    file_out = tmp_path / "a-file"
    file_out.write_text("")
    res = invoke("train", "--task", "tumor", "--data-dir", synth_data, "--weights", "none", "--out", file_out)
    assert res.exit_code != 0 and "Traceback" not in res.output
    # the start of a run interrupted before its first epoch is its own: it may be restarted
    header_only = RunFolder(tmp_path / "restart")
    header_only.path.mkdir()
    for name in ("config.json", "labels.json", "split_manifest.json"):
        (header_only.path / name).write_text("{}")
    header_only.check_new_run()
    (header_only.path / "checkpoint.keras").write_bytes(b"x")
    (header_only.path / "state.json").write_text("{}")
    with pytest.raises(RunError, match="unfinished run; continue it with"):
        header_only.check_new_run(force=True)


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"data_dir": "/x"}', '{"data_dir": "/x", "leaked": 3}'])
def test_a_malformed_dedup_file_is_refused_before_training(synth_data, tmp_path, content):
    bad = tmp_path / "audit.json"
    bad.write_text(content)
    out = tmp_path / "run"
    res = invoke("train", "--task", "tumor", "--data-dir", synth_data, "--weights", "none", "--out", out,
                 "--dedup", bad)
    assert res.exit_code == 1 and "--dedup" in res.output and "audit.json" in res.output
    assert not out.exists()  # refused before anything was written


def test_resume_checks_the_saved_dedup_path_first(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"task": "tumor", "data_dir": "x", "image_size": 32,
                                                 "dedup": str(tmp_path / "gone.json")}))
    (run / "state.json").write_text(json.dumps({"phase": 0, "epoch": 1}))
    (run / "checkpoint.keras").write_bytes(b"x")
    res = invoke("train", "--resume", run)
    assert res.exit_code == 1 and "--dedup" in res.output and "not found" in res.output
    res = invoke("train", "--resume", run, "--lr", "0.01", "--epochs-finetune", "3")  # would be ignored: refused
    assert res.exit_code == 2 and "drop --epochs-finetune, --lr" in res.output


def test_resume_without_a_finished_epoch_says_start_again(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    res = invoke("train", "--resume", run)  # the task comes from the run
    assert res.exit_code == 1 and "no finished epoch to resume from" in res.output
    (run / "config.json").unlink()  # a dataset's folder, say
    res = invoke("train", "--resume", run)
    assert res.exit_code == 1 and "not a run folder of `mri-edge train` (no config.json)" in res.output


def test_train_needs_task_and_data_without_resume(synth_data):
    for args in (["--task", "tumor"], ["--data-dir", synth_data]):
        res = invoke("train", *args)
        assert res.exit_code == 2 and "--task and --data-dir are required" in res.output


def test_an_interrupt_before_the_first_epoch_does_not_suggest_resume(synth_data, tmp_path, monkeypatch):
    from mri_edge import train as train_lib

    def interrupted(cfg, **kw):
        RunFolder(cfg.out).path.mkdir(parents=True)
        (RunFolder(cfg.out).path / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(train_lib, "train", interrupted)
    res = invoke("train", "--task", "tumor", "--data-dir", synth_data, "--out", tmp_path / "r")
    assert res.exit_code == 130 and "nothing to resume" in res.output and "--resume" not in res.output


def test_a_damaged_cache_file_is_rebuilt(synth_data, tmp_path):
    split = data.discover(synth_data, "tumor").splits["test"]
    first = data.decode_split(split, 32, tmp_path)
    (npz,) = tmp_path.glob("*.npz")
    npz.write_bytes(b"PK\x03\x04 this is not a zip any more")
    again = data.decode_split(split, 32, tmp_path)
    assert np.array_equal(first.images, again.images)
    with np.load(npz) as z:  # rewritten whole
        assert z["images"].shape == first.images.shape


def test_data_discovery_ignores_hidden_folders_and_os_junk(tmp_path):
    from mri_edge.synth import write_dataset

    root = write_dataset(tmp_path / "d", "tumor", n_train=3, n_test=2, size=32)
    before = {s: list(v.paths) for s, v in data.discover(root, "tumor").splits.items()}
    glioma = root / "Testing" / "glioma"
    (glioma / ".ipynb_checkpoints").mkdir()
    shutil.copy(next(glioma.glob("*.jpg")), glioma / ".ipynb_checkpoints" / "x-checkpoint.jpg")
    (glioma / ".DS_Store").write_bytes(b"\x00")
    (glioma / "Thumbs.db").write_bytes(b"\x00")
    (glioma / "notes.txt").write_text("scanner log")
    (root / "Training" / "__MACOSX").mkdir()
    (root / ".hidden-split").mkdir()
    after = {s: list(v.paths) for s, v in data.discover(root, "tumor").splits.items()}
    assert after == before


def test_data_synth_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "real" / "Training" / "glioma").mkdir(parents=True)
    res = invoke("data", "synth", "--out", tmp_path / "real", "--n-train", "2", "--n-test", "1")
    assert res.exit_code == 1 and "not empty" in res.output
    assert not list((tmp_path / "real").rglob("*.jpg"))


def test_audit_caps_pixels_and_handles_an_all_corrupt_folder(tmp_path, monkeypatch):
    from mri_edge import audit, preprocess
    from mri_edge.synth import write_dataset

    root = write_dataset(tmp_path / "d", "tumor", n_train=3, n_test=2, size=48)
    monkeypatch.setattr(preprocess, "MAX_PIXELS", 40 * 40)  # every 48x48 phantom is now "too large"
    with pytest.raises(audit.AuditError, match="none of its 20 image files can be decoded"):
        audit.audit(root, "tumor", None, log=lambda *_: None)
    monkeypatch.setattr(preprocess, "MAX_PIXELS", 50_000_000)
    for p in root.rglob("*.jpg"):
        p.write_bytes(b"\xff\xd8 broken")
    res = invoke("data", "audit", root, "--task", "tumor", "--out", tmp_path / "a")
    assert res.exit_code == 1 and "can be decoded" in res.output


def test_corrupt_run_files_are_one_line_errors(micro_run, synth_data, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(micro_run, run)
    (run / "split_manifest.json").write_text('{"root": "/x", "splits": ')
    res = invoke("verify", run)
    assert res.exit_code == 1 and "split manifest" in res.output and "not valid JSON" in res.output
    shutil.copy(micro_run / "split_manifest.json", run / "split_manifest.json")
    (run / "labels.json").write_text("[]")
    res = invoke("predict", run, next(synth_data.rglob("*.jpg")))
    assert res.exit_code == 1 and "run labels" in res.output and "expected a JSON object" in res.output
    (run / "test_predictions.json").write_text("")
    res = invoke("verify", run)
    assert res.exit_code == 1 and "test predictions" in res.output


def test_verify_file_writes_its_own_report_and_a_broken_file_is_a_fail_row(micro_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(micro_run, run)
    res = invoke("verify", run)
    assert res.exit_code == 0, res.output
    full = (run / "parity.json").read_bytes()
    res = invoke("verify", run, "--file", run / "exports" / "model_fp32.tflite")
    assert res.exit_code == 0 and "only the files named by --file" in res.output
    assert (run / "parity.json").read_bytes() == full
    selected = json.loads((run / "verify" / "selected" / "parity.json").read_text())
    assert list(selected["files"]) == ["model_fp32.tflite"] and selected["selected_files_only"]
    # a named file that is not a model at all: one line before any work, nothing written
    fake, notes = tmp_path / "fake.tflite", tmp_path / "notes.txt"
    fake.write_text("not a model")
    notes.write_text("not a model")
    shutil.rmtree(run / "verify" / "selected")
    for bad, why in ((fake, "not a TFLite file"), (notes, "not an exported model file")):
        res = invoke("verify", run, "--file", bad)
        assert res.exit_code == 1 and why in res.output and len(res.output.strip().splitlines()) == 1, res.output
    assert not (run / "verify" / "selected").exists()
    data_ = (run / "exports" / "model_int8.onnx").read_bytes()
    (run / "exports" / "model_int8.onnx").write_bytes(data_[: len(data_) // 2])
    gone = run / "verify" / "confusion_model_gone_xml.png"  # a file exported once and since removed
    gone.write_bytes(b"")
    res = invoke("verify", run)
    assert res.exit_code == 1 and not gone.exists()
    assert (run / "verify" / "confusion_model_fp32_tflite.png").is_file()
    parity = json.loads((run / "parity.json").read_text())
    assert set(parity["files"]) == {"model_fp32.tflite", "model_int8.tflite", "model_fp32.onnx", "model_int8.onnx"}
    assert not parity["files"]["model_int8.onnx"]["passed"] and "truncated" in parity["files"]["model_int8.onnx"]["error"]
    assert all(parity["files"][f]["passed"] for f in ("model_fp32.tflite", "model_int8.tflite", "model_fp32.onnx"))


def test_bench_skips_a_row_that_cannot_run_and_checks_compare_first(micro_run, tmp_path):
    good = micro_run / "exports" / "model_int8.tflite"
    tampered = tmp_path / "model_int8.tflite"
    data_ = bytearray(good.read_bytes())
    data_[len(data_) // 3] ^= 0x33
    tampered.write_bytes(bytes(data_))
    args = ["--batch", "1", "--threads", "1", "--warmup", "0", "--runs", "2"]
    res = invoke("bench", good, tampered, *args, "--out", tmp_path / "b")
    assert res.exit_code == 0, res.output
    assert "skipped (failed)" in res.output and "differ from what `mri-edge export` recorded" in res.output
    assert "end-to-end timing (e2e) skipped: give --image" in res.output  # files alone lend no image
    out = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert len(out["rows"]) == 1 and len(out["errors"]) == 1
    res = invoke("bench", good, tampered, *args, "--out", tmp_path / "b", "--strict")
    assert res.exit_code == 1
    res = invoke("bench", tampered, *args, "--out", tmp_path / "c")
    assert res.exit_code == 1 and "every row" in res.output and "keeps what it held" not in res.output
    assert "| model |" not in res.output and not (tmp_path / "c").exists(), res.output  # no empty table
    fake = tmp_path / "fake.tflite"
    fake.write_text("not a model")
    res = invoke("bench", fake, *args, "--out", tmp_path / "c")  # refused before any row runs
    assert res.exit_code == 1 and "not a TFLite file" in res.output and len(res.output.strip().splitlines()) == 1
    from mri_edge import ov

    if ov.available():  # an .xml its runtime cannot read: refused up front too
        (tmp_path / "fake.xml").write_text("<net/>")
        (tmp_path / "fake.bin").write_bytes(b"")
        res = invoke("bench", tmp_path / "fake.xml", *args, "--out", tmp_path / "c")
        assert res.exit_code == 1 and "not a loadable OpenVINO IR" in res.output, res.output
        assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "c").exists()
    earlier = (tmp_path / "b" / "bench.json").read_bytes()
    res = invoke("bench", tampered, *args, "--out", tmp_path / "b")  # no row runs: the earlier report stays
    assert res.exit_code == 1 and f"nothing written, {tmp_path / 'b'} keeps what it held" in res.output
    assert (tmp_path / "b" / "bench.json").read_bytes() == earlier
    bad = tmp_path / "old.json"
    bad.write_text('{"rows": [{"model": 1}]}')
    res = invoke("bench", good, *args, "--compare", bad, "--out", tmp_path / "d")
    assert res.exit_code == 1 and "--compare" in res.output and not (tmp_path / "d").exists()


def test_export_refuses_an_option_no_planned_file_uses(micro_run):
    res = invoke("export", micro_run, "--format", "onnx", "--bn-scales", "per-channel")
    assert res.exit_code == 1 and "--bn-scales applies to int8 tflite files" in res.output
    res = invoke("export", micro_run, "--format", "tflite", "--quantize", "fp16", "--calib-size", "10")
    assert res.exit_code == 1 and "--calib-size applies to int8" in res.output
    res = invoke("export", micro_run, "--format", "tflite", "--opset", "15")
    assert res.exit_code == 1 and "--opset applies to onnx/openvino files" in res.output


def test_an_out_folder_that_cannot_be_written_is_refused_before_any_work(micro_run, tmp_path, monkeypatch):
    from mri_edge import files

    (tmp_path / "a_file").write_text("x")
    res = invoke("demo", "--out", tmp_path / "a_file" / "demo")
    assert res.exit_code == 2 and "is not a folder that can be entered" in res.output
    assert files.writable(tmp_path)
    image = next((micro_run.parent.parent).rglob("*.jpg"), None) or next(micro_run.rglob("*.png"))
    monkeypatch.setattr(files, "writable", lambda folder: False)  # a read-only mount (root ignores modes)
    res = invoke("data", "audit", tmp_path, "--out", tmp_path / "audit")
    assert res.exit_code == 2 and "cannot write in" in res.output and not (tmp_path / "audit").exists()
    res = invoke("predict", micro_run / "exports" / "model_int8.tflite", image, "--out", tmp_path / "p")
    assert res.exit_code == 2 and "cannot write in" in res.output and "Glioma" not in res.output  # nothing ran
    # the run folder's own outputs (exports/, verify, calibration/, bench/): refused before the work
    for command in (["export", micro_run, "--format", "onnx"], ["verify", micro_run], ["calibrate", micro_run],
                    ["bench", micro_run, "--quick"], ["evaluate", micro_run], ["card", micro_run]):
        res = invoke(*command)
        assert res.exit_code == 1 and "cannot write in" in res.output and len(res.output.strip().splitlines()) == 1, \
            (command, res.output)


def test_a_report_that_cannot_be_written_is_one_line_and_the_card_refuses_damaged_reports(micro_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(micro_run, run)
    (run / "model_card.md").mkdir()  # the card's place is taken by a folder: the write fails (OSError)
    res = invoke("card", run)
    assert res.exit_code == 1 and "model_card.md" in res.output and len(res.output.strip().splitlines()) == 1
    (run / "model_card.md").rmdir()
    assert invoke("card", run).exit_code == 0
    card = (run / "model_card.md").read_bytes()
    (run / "test_report.json").write_text('{"n": ')  # damaged: the card would lose its results
    res = invoke("card", run)
    assert res.exit_code == 1 and "cannot write the model card" in res.output and "not valid JSON" in res.output
    assert (run / "model_card.md").read_bytes() == card
    res = invoke("card", tmp_path)  # a folder that is no run (e.g. an audit's): said so, in one line
    assert res.exit_code == 1 and f"{tmp_path}: not a run folder (no config.json" in res.output
    assert len(res.output.strip().splitlines()) == 1
    shutil.copy(micro_run / "test_report.json", run / "test_report.json")
    model = run / "exports" / "model_int8.tflite"
    whole = model.read_bytes()
    for damage in (whole[:1000], whole[:100] + bytes([whole[100] ^ 1]) + whole[101:]):  # truncated; one bit off
        model.write_bytes(damage)  # the card must not vouch for it with the whole file's parity and hash
        res = invoke("card", run)
        assert res.exit_code == 1 and "cannot write the model card" in res.output and "model_int8.tflite" in \
            res.output and len(res.output.strip().splitlines()) == 1, res.output
        assert (run / "model_card.md").read_bytes() == card
    model.write_bytes(whole)
    import sys

    with pytest.MonkeyPatch.context() as mp:  # a device install without onnxruntime: not damage, the card is written
        mp.setitem(sys.modules, "onnxruntime", None)
        res = invoke("card", run)
        assert res.exit_code == 0, res.output


def test_a_damaged_model_keras_and_a_binary_json_are_one_line_errors(micro_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(micro_run, run)
    png = next((run).rglob("*.png"))
    res = invoke("verify", run, "--dedup", png)
    assert res.exit_code == 1 and "not a JSON file (binary content)" in res.output
    model = run / "model.keras"
    model.write_bytes(model.read_bytes()[:2000])  # still starts as a zip archive
    res = invoke("evaluate", run)
    assert res.exit_code == 1 and "a damaged or truncated .keras file" in res.output


def test_options_that_cannot_work_stop_train_before_it_writes(synth_data, tmp_path):
    res = invoke("train", "--task", "tumor", "--data-dir", synth_data, "--unfreeze", "abc", "--out", tmp_path / "t")
    assert res.exit_code == 1 and "--unfreeze abc" in res.output and not (tmp_path / "t").exists()


def test_a_config_made_in_python_keeps_the_bounds_of_the_command_line(synth_data, tmp_path):
    from mri_edge.config import PretrainConfig, TrainConfig
    from mri_edge.train import train

    for bad, says in (({"batch_size": 0}, "--batch-size 0: must be at least 1"), ({"lr": -1.0}, "--lr -1.0: must be "
                      "above 0"), ({"epochs_finetune": -3}, "--epochs-finetune -3: must be at least 0"),
                      ({"val_fraction": 1.0}, "--val-fraction 1.0: must be below 1"),
                      ({"label_smoothing": float("nan")}, "--label-smoothing nan: must be a finite number"),
                      ({"val_split": "rand"}, "--val-split rand: choose one of random, grouped")):
        with pytest.raises(MriEdgeError, match=re.escape(says)):
            train(TrainConfig(task="tumor", data_dir=str(synth_data), out=str(tmp_path / "t"), **bad))
        assert not (tmp_path / "t").exists()
    with pytest.raises(MriEdgeError, match="--temperature 0: must be above 0"):
        PretrainConfig(task="tumor", data_dir=str(synth_data), out=str(tmp_path / "p"), temperature=0)


def test_audit_reads_a_dataset_of_linked_images(tmp_path, monkeypatch):
    from mri_edge.synth import write_dataset

    real = write_dataset(tmp_path / "real", "tumor", n_train=3, n_test=2, size=48)
    linked = tmp_path / "linked"
    for image in real.rglob("*.jpg"):
        target = linked / image.relative_to(real)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            target.symlink_to(image)
        except OSError:
            pytest.skip("this file system has no symbolic links")
    (linked / "Training" / "notumor" / "self.jpg").symlink_to("self.jpg")  # a link to itself: named, not a crash
    monkeypatch.chdir(tmp_path)  # a relative data folder, as typed
    res = invoke("data", "audit", "linked", "--task", "tumor", "--out", tmp_path / "a")
    assert res.exit_code == 0, res.output
    assert "Training/notumor/self.jpg" in (tmp_path / "a" / "audit.md").read_text()
    # no near-duplicate pair to draw: no PNG, and neither the output nor audit.md names one
    assert not (tmp_path / "a" / "duplicate_pairs.png").exists() and "duplicate_pairs.png" not in res.output
    assert "duplicate_pairs.png" not in (tmp_path / "a" / "audit.md").read_text()
    assert json.loads((tmp_path / "a" / "audit.json").read_text())["counts"]
    one = next(linked.rglob("*.jpg"))  # a link keeps its own path, inside the folder
    assert data.rel_path(str(one), linked) == one.relative_to(linked).as_posix()


def test_explain_keeps_one_overlay_per_image_when_names_repeat_and_predict_names_an_empty_pattern(
        micro_run, tmp_path, monkeypatch):
    manifest = RunFolder(micro_run).manifest()
    src = f"{manifest['root']}/{manifest['splits']['test'][0][0]}"
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        shutil.copy(src, tmp_path / folder / "scan.jpg")
    model = micro_run / "exports" / "model_int8.tflite"
    out = tmp_path / "x"
    res = invoke("explain", model, tmp_path / "a" / "scan.jpg", tmp_path / "b" / "scan.jpg", "--out", out, "--grid", "2")
    assert res.exit_code == 0, res.output
    pngs = [r["png"] for r in json.loads((out / "explain.json").read_text())["images"]]
    assert len(set(pngs)) == 2 and all((out / p).is_file() for p in pngs)
    res = invoke("predict", model, tmp_path / "c" / "*.jpg")
    assert res.exit_code == 1 and "the pattern matches no file" in res.output
    # a pattern picks the images among its matches, its folders walked as folders; --verbose may follow the command
    (tmp_path / "a" / "readme.txt").write_text("not a scan")
    monkeypatch.delenv("MRI_EDGE_VERBOSE", raising=False)  # --verbose sets it; the test's end unsets it
    res = invoke("predict", "--verbose", model, tmp_path / "a" / "*")
    assert res.exit_code == 0 and "1 classified, 0 failed" in res.output, res.output
    res = invoke("predict", model, tmp_path / "[ab]")
    assert res.exit_code == 0 and "2 classified, 0 failed" in res.output, res.output
    res = invoke("predict", model, tmp_path / "a" / "*.txt")
    assert res.exit_code == 1 and "matches no image file" in res.output
    # a pattern that names nothing fails as a missing file does: the other images are classified
    res = invoke("predict", "--json", model, tmp_path / "c" / "*.jpg", tmp_path / "a" / "scan.jpg")
    lines = [json.loads(line) for line in res.stdout.splitlines()]
    assert res.exit_code == 1 and "1 of 2 image(s) could not be read" in res.stderr, res.output
    assert "the pattern matches no file" in lines[0]["error"] and lines[1]["label"]
    assert lines[1]["model"] == str(model) and lines[1]["runtime"]  # each line says what answered
    # a folder's files that are not images by their suffix are named; a broken link fails when read
    shutil.copy(src, tmp_path / "a" / "IM0001")
    (tmp_path / "a" / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (tmp_path / "a" / "NOTES").symlink_to(tmp_path / "nowhere")  # not an image by its name: only noted
    res = invoke("predict", model, tmp_path / "a", tmp_path / "a" / "scan.jpg")  # (a file named twice: read once)
    assert res.exit_code == 1 and "1 classified, 1 failed" in res.stdout, res.output
    assert "3 file(s) not read, not images by their suffix (IM0001, NOTES, readme.txt)" in res.stderr
    (tmp_path / "s").mkdir()
    shutil.copy(src, tmp_path / "s" / "IM0001")
    res = invoke("predict", model, tmp_path / "s")  # only files without a suffix: the note comes with the failed row
    assert res.exit_code == 1 and "1 file(s) not read" in res.output and "a folder with no image file" in res.output
    res = invoke("predict", model, tmp_path / "s", tmp_path / "a" / "scan.jpg")  # beside an image: a failed row too
    assert res.exit_code == 1 and "1 classified, 1 failed" in res.stdout and "a folder with no image file" in res.stdout
    res = invoke("predict", model, tmp_path / "a" / "IM0001")  # named, it is read
    assert res.exit_code == 0 and "1 classified, 0 failed" in res.stdout
    # a file name that is not UTF-8 is written escaped into the Markdown report
    odd = tmp_path / "odd"
    odd.mkdir()
    try:
        shutil.copy(src, odd / os.fsdecode(b"bad\xffname.jpg"))
    except OSError:
        pytest.skip("this file system refuses file names that are not UTF-8")
    res = invoke("predict", "--json", model, odd, "--out", tmp_path / "p")  # (JSON: ASCII, whatever the name)
    assert res.exit_code == 0, res.output
    assert "bad\\udcffname.jpg" in (tmp_path / "p" / "predictions.md").read_text()


def test_explain_writes_nothing_when_no_image_can_be_read_and_marks_referred_answers(micro_run, tmp_path):
    import cv2
    from markdown_it import MarkdownIt

    from tests.test_reports import check

    model = micro_run / "exports" / "model_int8.tflite"
    junk = tmp_path / "junk.png"
    junk.write_text("not an image")
    out = tmp_path / "x"
    res = invoke("explain", model, junk, tmp_path / "missing.jpg", "--out", out, "--grid", "2")
    assert res.exit_code == 1 and "no image could be read" in res.output and not out.exists()
    spaced = tmp_path / "26 (19).png"  # the Alzheimer dataset's file names; a blank image, which predict refers
    spaced.write_bytes(cv2.imencode(".png", np.full((64, 64, 3), 90, np.uint8))[1].tobytes())
    res = invoke("explain", model, spaced, junk, "--out", out, "--grid", "2")
    assert res.exit_code == 1 and "1 of 2 image(s) could not be read" in res.output
    row = json.loads((out / "explain.json").read_text())["images"][0]
    assert row["uncertain"] and row["warnings"] == ["blank image (no contrast)"]  # the answer as predict gives it
    assert "[uncertain - refer for review: blank image (no contrast)]" in res.output
    text = check(out / "explain.md")
    assert "| uncertain - refer for review: blank image (no contrast) |" in text and "not calibrated" in text
    html = MarkdownIt("commonmark").enable("table").render(text)
    png = row["png"].replace(" ", "%20")  # a name with a space and brackets still makes a link and an image
    assert f'href="{png}"' in html and f'<img src="{png}"' in html, html


def test_the_index_page_says_when_a_report_describes_a_file_exported_again(micro_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(micro_run, run)
    rows = {"model_int8.tflite": {"passed": True, "model_sha256": "0" * 64}, "model_fp32.tflite": {"passed": True}}
    (run / "parity.json").write_text(json.dumps({"files": rows, "passed": True}))
    index = (RunFolder(run).write_index()).read_text()
    assert "2 of 2 files pass" in index and "Out of date for model_int8.tflite (exported again since)" in index
    assert "training_curves.png" not in (run / "train_report.md").read_text()  # none made: no dangling link


def test_evaluate_on_a_run_whose_data_moved_says_to_give_data_dir(micro_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(micro_run, run)
    manifest = json.loads((run / "split_manifest.json").read_text())
    (run / "split_manifest.json").write_text(json.dumps({**manifest, "root": str(tmp_path / "gone")}))
    res = invoke("evaluate", run)
    assert res.exit_code == 1 and "give --data-dir where the data is now" in res.output


def test_a_failed_int8_file_gets_a_hint_and_a_failed_fp32_file_does_not():
    from mri_edge.verify import failure_hint

    out = {"n_test": 200, "files": {
        "model_int8.tflite": {"quantization": "int8", "failed_gates": ["agreement"]},
        "model_fp32.tflite": {"quantization": "none", "failed_gates": ["agreement"]},
        "model_dynamic.tflite": {"quantization": "dynamic", "failed_gates": ["stale"]}}}  # not a quantization failure
    hint = failure_hint(out)
    assert hint.startswith("\nmodel_int8.tflite: quantization moves") and "0.50 points of 200" in hint
    assert "--max-drop" in hint and "model_fp32" not in hint and "model_dynamic" not in hint
    del out["files"]["model_int8.tflite"]
    assert failure_hint(out) == ""


def test_the_demo_writes_its_verdict_beside_the_run(tmp_path):
    import json

    from mri_edge.demo import write_summary

    write_summary(tmp_path, tmp_path / "run", ["parity: model_int8.onnx: agreement 0.97 < 0.98"], False, 90.0)
    out = json.loads((tmp_path / "demo.json").read_text())
    assert out["passed"] is False and out["problems"] == ["parity: model_int8.onnx: agreement 0.97 < 0.98"]
    md = (tmp_path / "demo.md").read_text()
    assert "FAILED: parity: model_int8.onnx" in md and "](run/report.md)" in md and "1.5 min" in md
    write_summary(tmp_path, tmp_path / "run", [], False, 90.0)
    assert json.loads((tmp_path / "demo.json").read_text())["passed"] is True
    assert "every exported file passed its parity gate" in (tmp_path / "demo.md").read_text()


def test_the_demo_collects_what_failed_and_exits_1_naming_it(tmp_path, monkeypatch):
    from mri_edge import bench, calibrate, card, demo, export, verify
    from mri_edge.errors import MriEdgeError

    def refused(*a, **k):
        raise MriEdgeError("refused here")

    monkeypatch.setattr(export, "export_run", lambda *a, **k: ([], [{"file": "model_int8.onnx", "error": "boom"}]))
    monkeypatch.setattr(export, "table", lambda results: "")
    monkeypatch.setattr(calibrate, "calibrate_run", refused)
    monkeypatch.setattr(verify, "verify_run", lambda *a, **k: {"failures": ["model_int8.tflite: agreement 0.90"]})
    monkeypatch.setattr(verify, "summary_table", lambda out: "")
    monkeypatch.setattr(bench, "bench", refused)
    monkeypatch.setattr(card, "write_card", lambda run_dir: None)
    problems = demo.downstream(tmp_path / "run", log=lambda *_: None, show=lambda *_: None)
    assert problems == ["export of model_int8.onnx failed (boom)", "calibrate: refused here",
                        "parity: model_int8.tflite: agreement 0.90", "bench: refused here"]
    monkeypatch.setattr(demo, "run_demo", lambda *a, **k: (tmp_path / "run", problems))
    res = CliRunner().invoke(main, ["demo", "--out", str(tmp_path / "demo")])
    assert res.exit_code == 1 and "demo FAILED: export of model_int8.onnx failed (boom); calibrate" in res.output


def test_a_write_clears_what_a_killed_write_of_the_same_file_left_behind(tmp_path):
    """A SIGKILL between mkstemp and the rename leaves a hidden temporary file: the next write
    of that file removes it once it is old enough not to be another writer's at work."""
    import os
    import time

    from mri_edge.files import STALE_S, atomic_write_text

    left = tmp_path / ".report.md.k1ll3d_x.tmp"  # what atomic_path names its temporary files (mkstemp)
    working = tmp_path / ".report.md.4tw0rk_x.tmp"
    other = tmp_path / ".state.json.0ld_abcd.tmp"
    longer = tmp_path / ".report.md.bak.k1ll3d_x.tmp"  # a hidden file of another name
    for f in (left, working, other, longer):
        f.write_text("partial")
    old = time.time() - STALE_S - 60
    for f in (left, other, longer):
        os.utime(f, (old, old))
    atomic_write_text(tmp_path / "report.md", "whole")
    assert (tmp_path / "report.md").read_text() == "whole"
    assert not left.exists() and working.exists() and other.exists() and longer.exists()  # this file's, old ones


def test_a_run_folder_is_written_by_one_command_at_a_time(micro_run, synth_data, tmp_path):
    """A second writing command on a folder another one holds is refused at once (two exports,
    export and calibrate, two trains with one --out, all wrote over each other); the lock goes
    with the process that held it, a killed one included."""
    import subprocess
    import sys

    run, empty = tmp_path / "run", tmp_path / "out"
    shutil.copytree(micro_run, run)
    empty.mkdir()
    code = ("import sys, time\nfrom mri_edge.run import RunFolder\n"
            "with RunFolder(sys.argv[1]).lock('export'), RunFolder(sys.argv[2]).lock('train'):\n"
            "    print('held', flush=True)\n    time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(run), str(empty)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for args in (["export", run, "--format", "tflite"], ["calibrate", run], ["verify", run], ["evaluate", run]):
            res = invoke(*args)
            assert res.exit_code == 1 and f"{run} is in use by `mri-edge export (pid {holder.pid})`" in res.output, \
                res.output
        res = invoke("train", "--task", "tumor", "--data-dir", synth_data, "--weights", "none", "--out", empty)
        assert res.exit_code == 1 and f"{empty} is in use by `mri-edge train (pid {holder.pid})`" in res.output
    finally:
        holder.kill()
        holder.wait()
    with RunFolder(run).lock("verify"):  # killed: no lock left behind
        assert (run / ".lock").read_text() == f"verify (pid {os.getpid()})"
    assert (run / ".lock").read_text() == ""


def test_verify_with_a_damaged_model_keras_says_so_once(micro_run, tmp_path):
    """Not one 'exported from another model.keras' row per file: the damage, in one line."""
    run = tmp_path / "run"
    shutil.copytree(micro_run, run)
    data = (run / "model.keras").read_bytes()
    (run / "model.keras").write_bytes(data[: len(data) // 2])
    res = invoke("verify", run)
    assert res.exit_code == 1 and "model.keras: a damaged or truncated .keras file" in res.output, res.output
    assert "another model.keras" not in res.output and not (run / "parity.json").exists()


def test_export_rebuilds_a_damaged_index_from_the_files(micro_run, tmp_path):
    """A damaged exports.json is not replaced by an index of the one file exported now: its rows
    come back from every file's own metadata (without the seconds only its export knew)."""
    run = tmp_path / "run"
    shutil.copytree(micro_run, run)
    index = run / "exports" / "exports.json"
    before = {r["file"]: r["sha256"] for r in json.loads(index.read_text())["exports"]}
    index.write_text(index.read_text()[:50])
    res = invoke("export", run, "--format", "tflite", "--quantize", "fp16", "--workers", "1")
    assert res.exit_code == 0 and "was damaged: its rows are rebuilt" in res.output, res.output
    rows = {r["file"]: r for r in json.loads(index.read_text())["exports"]}
    assert set(rows) == set(before) | {"model_fp16.tflite"}
    assert all(rows[f]["sha256"] == before[f] and rows[f]["seconds"] is None for f in before if f != "model_fp16.tflite")


def test_a_lock_refused_touches_nothing_of_its_holder(tmp_path):
    """A command refused by another's lock leaves the holder's folder and lock alone (a failed
    train removes only folders it made and held: test_model's --unfreeze test)."""
    import subprocess
    import sys

    held = tmp_path / "held"
    held.mkdir()
    code = ("import sys, time\nfrom mri_edge.run import RunFolder\nwith RunFolder(sys.argv[1]).lock('train'):\n"
            "    print('held', flush=True)\n    time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(held)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(MriEdgeError, match="in use by `mri-edge train"):
            with RunFolder(held).lock("train"):
                pass
        assert (held / ".lock").read_text() == f"train (pid {holder.pid})"  # the holder's name stays
    finally:
        holder.kill()
        holder.wait()


def test_an_output_folder_inside_the_dataset_is_refused_before_anything_is_written(synth_data, tmp_path):
    inside = synth_data / "Training" / "glioma" / "out"
    for args in (("data", "audit", synth_data, "--out", inside),
                 ("train", "--task", "tumor", "--data-dir", synth_data, "--weights", "none", "--out", inside),
                 ("pretrain", "--task", "tumor", "--data-dir", synth_data, "--out", inside)):
        res = invoke(*args)
        assert res.exit_code == 1 and "is inside the dataset's Training folder" in res.output, res.output
        assert not inside.exists()


def test_an_interrupted_explain_writes_the_overlays_it_finished_with_their_report(micro_run, tmp_path, monkeypatch):
    from mri_edge import explain

    manifest = RunFolder(micro_run).manifest()
    images = [f"{manifest['root']}/{rel}" for rel, _ in manifest["splits"]["test"][:3]]
    real, calls = explain.occlusion, []

    def stopped_on_the_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    model = micro_run / "exports" / "model_int8.tflite"
    earlier = explain.explain_images(model, images[1:], tmp_path / "x", grid=2, log=lambda *_: None)
    earlier_pngs = sorted(r["png"] for r in earlier["images"])
    monkeypatch.setattr(explain, "occlusion", stopped_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        explain.explain_images(model, images, tmp_path / "x", grid=2, log=lambda *_: None)
    out = json.loads((tmp_path / "x" / "explain.json").read_text())
    assert out["interrupted"] and [r["image"] for r in out["images"]] == images[:1]
    # the earlier explain's overlays stay, named, and the next whole explain removes them
    assert out["kept_from_earlier"] == earlier_pngs
    assert sorted(p.name for p in (tmp_path / "x").glob("*.png")) == sorted([out["images"][0]["png"], *earlier_pngs])
    assert "Interrupted after 1 of 3 images; the overlays of an earlier explain here are kept" in \
        (tmp_path / "x" / "explain.md").read_text()
    monkeypatch.undo()
    again = explain.explain_images(model, images[:1], tmp_path / "x", grid=2, log=lambda *_: None)
    assert sorted(p.name for p in (tmp_path / "x").glob("*.png")) == [again["images"][0]["png"]]


def test_a_demo_folder_is_begun_again_after_an_interrupt_and_a_finished_one_is_kept(tmp_path):
    import subprocess
    import sys

    from mri_edge.demo import DemoError, prepare

    out = tmp_path / "demo"
    prepare(out)
    (out / "run").mkdir()
    (out / "run" / "state.json").write_text("{}")  # interrupted in training: no model.keras
    code = ("import sys, time\nfrom mri_edge.run import RunFolder\nwith RunFolder(sys.argv[1]).lock('train'):\n"
            "    print('held', flush=True)\n    time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(out / "run")], stdout=subprocess.PIPE, text=True)
    try:  # a demo still training there: refused, nothing removed
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(MriEdgeError, match="is in use by `mri-edge train"):
            prepare(out)
        assert (out / "run" / "state.json").is_file()
    finally:
        holder.kill()
        holder.wait()
    assert prepare(out) == out / "data" and not (out / "run").exists()
    (out / "run").mkdir()
    (out / "run" / "model.keras").write_bytes(b"x")
    with pytest.raises(DemoError, match="already holds a finished demo run"):
        prepare(out)
    assert (out / "run" / "model.keras").is_file()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(DemoError, match="not empty and not a demo folder"):
        prepare(tmp_path / "other")


def test_a_failed_or_interrupted_first_export_or_verify_leaves_no_empty_folder(micro_run, tmp_path, monkeypatch):
    from mri_edge.export import export_run, pipeline
    from mri_edge.verify import VerifyError, verify_run

    run = tmp_path / "run"
    shutil.copytree(micro_run, run, ignore=shutil.ignore_patterns("exports", "verify", "parity.*"))
    with pytest.raises(VerifyError, match="no exported files"):
        verify_run(run, log=lambda *_: None)
    assert not (run / "verify").exists()

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "calibration_set", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_run(run, ("tflite",), ("int8",), "uint8", calib_size=4, log=lambda *_: None)
    assert not (run / "exports").exists()
