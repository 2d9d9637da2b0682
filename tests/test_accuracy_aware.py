"""Accuracy-aware int8 (`export --max-drop`): the stage search's choice, the recipe in the
file's metadata, and the refusal of the option where no file would use it."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from click.testing import CliRunner


def test_the_search_keeps_the_cheapest_stages_that_meet_the_budget(monkeypatch, tmp_path):
    from mri_edge.export import accuracy, onnx as onnx_backend
    import onnxruntime.quantization.shape_inference as si

    stages = {"conv2": {"nodes": ["a"], "mac_share": 0.6}, "conv5": {"nodes": ["b"], "mac_share": 0.05},
              "head": {"nodes": ["c"], "mac_share": 0.001}}
    gain = {"a": 0.05, "b": 0.02, "c": 0.03}
    made = {}

    def fake_int8(src, path, *a, nodes_to_exclude=(), **k):
        Path(path).write_bytes(b"x")
        made[str(path)] = 0.94 + sum(gain[n] for n in nodes_to_exclude)

    monkeypatch.setattr(si, "quant_pre_process", lambda *a, **k: None)
    monkeypatch.setattr(accuracy, "onnx_stages", lambda path: stages)
    monkeypatch.setattr(onnx_backend, "onnx_int8", fake_int8)
    monkeypatch.setattr(accuracy, "onnx_agreement", lambda path, *a: made[str(path)])
    val = (np.zeros((10, 4, 4, 3), np.uint8), np.eye(4)[np.arange(10) % 4])
    out = tmp_path / "out.onnx"
    recipe = accuracy.onnx_accuracy_aware(tmp_path / "fp32.onnx", out, None, val, 2.0, "percentile", 1, tmp_path)
    # budget 0.98: head (+0.03 for 0.1% of the compute) then conv5 (+0.02) reach 0.99; conv2 is never needed
    assert recipe["float_stages"] == ["head", "conv5"] and recipe["within_budget"]
    assert abs(recipe["held_out_agreement"] - 0.99) < 1e-9 and recipe["plain_agreement"] == 0.94
    assert abs(recipe["float_mac_share"] - 0.051) < 1e-9 and out.is_file()
    # an unreachable budget keeps the best agreement found and says it is over budget
    gain.update(a=0.01, b=0.005, c=0.005)
    recipe = accuracy.onnx_accuracy_aware(tmp_path / "fp32.onnx", out, None, val, 0.0, "percentile", 1, tmp_path)
    assert not recipe["within_budget"] and recipe["held_out_agreement"] == max(s["agreement"] for s in recipe["steps"])


def test_max_drop_records_its_recipe_and_is_refused_where_unused(micro_run, tmp_path):
    from mri_edge.cli import main
    from mri_edge.runtime import read_metadata

    run = tmp_path / "run"
    shutil.copytree(micro_run, run)
    res = CliRunner().invoke(main, ["export", str(run), "--format", "tflite", "--max-drop", "1"])
    assert res.exit_code == 1 and "--max-drop applies to int8 onnx/openvino files" in res.output
    res = CliRunner().invoke(main, ["export", str(run), "--format", "onnx", "--quantize", "int8", "--max-drop", "0",
                                    "--calib-size", "16"])
    assert res.exit_code == 0, res.output
    recipe = read_metadata(run / "exports" / "model_int8.onnx")["accuracy_aware"]
    assert recipe["max_drop_pts"] == 0 and recipe["held_out_images"] == 4
    assert recipe["within_budget"] == (recipe["held_out_agreement"] >= 1.0)
    assert "kept in float" in res.output


def test_debug_quant_writes_a_per_layer_report(micro_run, tmp_path):
    import json

    from mri_edge.cli import main
    from tests.test_reports import check

    run = tmp_path / "run"
    shutil.copytree(micro_run, run)
    res = CliRunner().invoke(main, ["verify", str(run), "--debug-quant", "--explain-images", "0"])
    assert res.exit_code == 0, res.output
    out = json.loads((run / "verify" / "quant_debug.json").read_text())
    assert out["images"] == 4 and len(out["tensors"]) >= 3
    depths = [r["depth"] for r in out["tensors"]]
    assert depths == sorted(depths) and all(r["relative_error"] >= 0 for r in out["tensors"])
    assert "Per-layer int8 error" in check(run / "verify" / "quant_debug.md")
    assert (run / "verify" / "quant_debug.png").is_file()


def test_float_head_keeps_float_probabilities_out_of_int8_files(micro_run, tmp_path):
    from mri_edge.cli import main
    from mri_edge.runtime import open_model

    run = tmp_path / "run"
    shutil.copytree(micro_run, run)
    res = CliRunner().invoke(main, ["export", str(run), "--format", "tflite", "--format", "onnx", "--quantize", "int8",
                                    "--float-head", "--calib-size", "16"])
    assert res.exit_code == 0, res.output
    keras = open_model(run / "model.keras")
    from mri_edge import data
    from mri_edge.run import RunFolder

    m = RunFolder(run).manifest()
    imgs = data.decode_images(keras, m["root"], [r for r, _ in m["splits"]["test"]], "test images")
    ref = keras.run(imgs)
    for name in ("model_int8.tflite", "model_int8.onnx"):
        f = open_model(run / "exports" / name)
        assert f.meta["float_head"] is True and f.meta["output"]["dtype"] == "float32", name
        probs = f.run(imgs)
        # not on the 1/256 grid of a uint8 softmax
        assert np.abs(probs * 256 - np.round(probs * 256)).max() > 1e-3, name
        assert (probs.argmax(1) == ref.argmax(1)).all(), name
    res = CliRunner().invoke(main, ["export", str(run), "--format", "openvino", "--float-head"])
    assert res.exit_code == 1 and "--float-head applies to int8" in res.output
