"""`mri-edge ensemble`: runs averaged into one model that is a run folder of its own, so its
exported file is one graph giving the mean of the members' probabilities."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from mri_edge.cli import main


@pytest.fixture
def two_runs(micro_run, tmp_path):
    """micro_run and a copy whose classifier is another one (same splits, other answers; its
    feature scaled too, or the TFLite converter merges the two identical bodies into one)."""
    from mri_edge.model import load_model

    a, b = tmp_path / "a", tmp_path / "b"
    for run in (a, b):
        shutil.copytree(micro_run, run, ignore=shutil.ignore_patterns("exports", "verify", "bench"))
    net = load_model(b / "model.keras")
    head = net.get_layer("logits")
    w, bias = head.get_weights()
    head.set_weights([w[:, ::-1].copy(), bias[::-1].copy()])  # the classes' lines in the other order
    conv = net.get_layer("brightness")
    conv.set_weights([v * 1.05 for v in conv.get_weights()])
    net.save(b / "model.keras")
    return a, b


def test_the_ensemble_is_the_mean_of_its_members_through_keras_and_tflite(two_runs, tmp_path):
    from mri_edge.model import load_model
    from mri_edge.export import export_run
    from mri_edge.interpreters import load_interpreter_class
    from mri_edge.backends import open_model

    a, b = two_runs
    out = tmp_path / "ens"
    saved = (a / "config.json").read_text()
    (a / "config.json").write_text(json.dumps({**json.loads(saved), "mixup": 0.3}))  # one member's regulariser
    try:
        res = CliRunner().invoke(main, ["ensemble", str(a), str(b), "--out", str(out)])
    finally:
        (a / "config.json").write_text(saved)
    assert res.exit_code == 0, res.output
    assert "test accuracy" in res.output and f"mri-edge export {out}" in res.output
    x = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    member = [np.asarray(load_model(r / "model.keras")(x.astype(np.float32))) for r in (a, b)]
    assert np.abs(member[0] - member[1]).max() > 0.1  # two different models, or the check below is empty
    mean = (member[0] + member[1]) / 2
    ens = load_model(out / "model.keras")
    assert np.abs(np.asarray(ens(x.astype(np.float32))) - mean).max() < 1e-6
    config = json.loads((out / "config.json").read_text())
    assert [m["run"] for m in config["ensemble"]["members"]] == [str(a), str(b)]
    assert config["preprocessing"] == json.loads((a / "config.json").read_text())["preprocessing"]
    report = json.loads((out / "test_report.json").read_text())
    preds = json.loads((out / "test_predictions.json").read_text())
    assert report["accuracy"] == pytest.approx(float(np.mean(np.argmax(preds["probs"], 1) == preds["labels"])))
    assert "ensemble: the mean of the probabilities of 2 runs" in (out / "train_report.md").read_text()
    assert config["weights"] == "ensemble" and "weights_stored" not in config  # nothing speaks for one member
    assert config.get("mixup", 0.0) == 0.0  # the first member's recipe is not the ensemble's
    res = CliRunner().invoke(main, ["ensemble", str(out), str(a), "--out", str(tmp_path / "again")])
    assert res.exit_code == 1 and "would count twice" in res.output  # a member inside an ensemble, given again
    res = CliRunner().invoke(main, ["ensemble", str(a), str(b), "--out", str(out)])
    assert res.exit_code == 1 and "already holds a trained model" in res.output
    assert CliRunner().invoke(main, ["card", str(out)]).exit_code == 0
    assert f"the mean of the probabilities of 2 runs, `{a}`" in (out / "model_card.md").read_text()
    results, failures = export_run(out, ("tflite",), ("none", "int8"), "uint8", calib_size=16, float_head=True,
                                   log=lambda *_: None, workers=1)
    assert not failures, failures
    got = open_model(out / "exports" / "model_fp32.tflite").run(x)
    assert np.abs(got - mean).max() < 1e-4  # one file, every member inside
    # --float-head: each member's head in float, every member's body int8 (the head once began
    # at the first global pooling, leaving the members after the first in float)
    interp = load_interpreter_class()[0](model_path=str(out / "exports" / "model_int8.tflite"))
    dtypes = {d["index"]: np.dtype(d["dtype"]) for d in interp.get_tensor_details()}
    weights = {kind: [dtypes[op["inputs"][1]] for op in interp._get_ops_details() if op["op_name"] == kind]
               for kind in ("CONV_2D", "FULLY_CONNECTED")}
    assert weights == {"CONV_2D": [np.int8, np.int8], "FULLY_CONNECTED": [np.float32, np.float32]}


def test_runs_that_cannot_be_averaged_are_refused(two_runs, tmp_path):
    a, b = two_runs
    runner = CliRunner()

    def refused(*args):
        res = runner.invoke(main, ["ensemble", *map(str, args)])
        assert res.exit_code == 1 and res.output.startswith("Error: ") and len(res.output.splitlines()) == 1, \
            res.output
        return res.output

    assert "at least two runs" in refused(a, "--out", tmp_path / "x")
    assert "given twice" in refused(a, a, "--out", tmp_path / "x")
    assert "one of the members" in refused(a, b, "--out", b)
    manifest = json.loads((b / "split_manifest.json").read_text())
    manifest["splits"]["val"] = manifest["splits"]["val"][1:]
    (b / "split_manifest.json").write_text(json.dumps(manifest))
    assert "different val splits" in refused(a, b, "--out", tmp_path / "x")
    config = json.loads((b / "config.json").read_text())
    (b / "config.json").write_text(json.dumps({**config, "image_size": 64}))
    assert "different input sizes" in refused(a, b, "--out", tmp_path / "x")
    labels = json.loads((b / "labels.json").read_text())
    (b / "labels.json").write_text(json.dumps({**labels, "class_names": labels["class_names"][::-1]}))
    assert "different classes" in refused(a, b, "--out", tmp_path / "x")
    (b / "model.keras").unlink()
    assert "has no model.keras" in refused(a, b, "--out", tmp_path / "x")
    assert not (tmp_path / "x").exists()  # nothing written for a refused ensemble
