"""Self-supervised pretraining (`mri-edge pretrain`): the loss, the probe, and a pretrain folder
that `train --weights` starts from, with the held-out and test images never read."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import TINY


def _nt_xent_reference(z1, z2, t):
    z = np.concatenate([z1, z2]).astype(np.float64)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    n = len(z1)
    out = []
    for i in range(2 * n):
        logits = np.array([z[i] @ z[j] / t for j in range(2 * n) if j != i])
        others = [j for j in range(2 * n) if j != i]
        pair = others.index((i + n) % (2 * n))
        out.append(np.log(np.exp(logits).sum()) - logits[pair])
    return np.array(out)


def test_nt_xent_is_the_cross_entropy_of_each_view_against_its_pair():
    import keras

    from mri_edge.pretrain import contrastive_loss, nt_xent

    rng = np.random.default_rng(0)
    z1, z2 = rng.normal(size=(5, 7)).astype(np.float32), rng.normal(size=(5, 7)).astype(np.float32)
    got = keras.ops.convert_to_numpy(nt_xent(z1, z2, 0.3))
    np.testing.assert_allclose(got, _nt_xent_reference(z1, z2, 0.3), rtol=1e-4)
    both = np.concatenate([z1, z2], axis=1)  # the model's output: the two projections side by side
    mean = float(keras.ops.convert_to_numpy(contrastive_loss(0.3)(np.zeros((5, 1)), both)))
    assert mean == pytest.approx(got.mean(), rel=1e-5)
    same = float(keras.ops.convert_to_numpy(contrastive_loss(0.3)(None, np.concatenate([z1, z1], axis=1))))
    assert same < mean  # identical views are the loss's optimum direction


def test_knn_probe_counts_neighbours_by_cosine_similarity():
    from mri_edge.pretrain import knn_accuracy

    train_f = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9], [0.2, 1.0]], np.float32)
    train_y = np.array([0, 0, 1, 1, 1])
    held_f = np.array([[10, 1], [1, 8], [1, 1.05]], np.float32)  # scale does not matter, direction does
    held_y = np.array([0, 1, 0])
    r = knn_accuracy(train_f, train_y, held_f, held_y, k=3)
    assert r["nn1"] == pytest.approx(2 / 3)  # the third is nearest to a class-1 image
    assert r["knn3"] == pytest.approx(2 / 3)


@pytest.mark.slow  # an optional training lever: 17-24 s on 2 cores, so in the full suite
def test_pretrain_reads_only_training_images_and_train_starts_from_its_encoder(
        small_backbone, synth_data, cache_dir, tmp_path, monkeypatch):
    from mri_edge import data
    from mri_edge.cli import main
    from mri_edge.model import load_model

    decoded = []  # the splits pretraining decodes: training (fitted) and validation (probed), never test
    original = data.decode_split
    monkeypatch.setattr(data, "decode_split", lambda split, *a, **k: decoded.append(split.name) or original(split, *a, **k))
    out = tmp_path / "ssl"
    common = ["--task", "tumor", "--data-dir", str(synth_data), "--image-size", str(TINY), "--cache-dir",
              str(cache_dir), "--eager"]
    res = CliRunner().invoke(main, ["pretrain", *common, "--weights", "none", "--batch-size", "8", "--epochs", "2",
                                    "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert sorted(set(decoded)) == ["train", "val"]
    monkeypatch.setattr(data, "decode_split", original)
    assert "held-out k-NN probe" in res.output
    assert f"--weights {out / 'encoder.keras'} --image-size {TINY} ..." in res.output
    result = json.loads((out / "pretrain.json").read_text())
    assert result["epochs"] == 2 and len(result["history"]) == 3  # before, and after each epoch
    assert all(np.isfinite(r["loss"]) for r in result["history"][1:])
    fitted = json.loads((out / "split_manifest.json").read_text())["splits"]
    assert list(fitted) == ["train"]
    run_out = tmp_path / "run"
    res = CliRunner().invoke(main, ["train", *common, "--weights", str(out / "encoder.keras"), "--epochs-head", "1",
                                    "--epochs-finetune", "0", "--dense-units", "8", "--batch-size", "64",
                                    "--out", str(run_out)])
    assert res.exit_code == 0, res.output
    assert "was fitted on" not in res.output  # the same carve: no held-out or test image was pretrained on
    held = json.loads((run_out / "split_manifest.json").read_text())["splits"]
    assert {p for p, _ in fitted["train"]} == {p for p, _ in held["train"]}
    base = load_model(out / "encoder.keras").get_layer("densenet121").get_weights()
    trained = load_model(run_out / "model.keras").get_layer("densenet121").get_weights()
    kernels = [i for i, w in enumerate(base) if w.ndim == 4]
    assert all(np.array_equal(base[i], trained[i]) for i in kernels)  # the head phase kept the encoder's backbone
    assert "![curves](pretrain_curves.png)" in (out / "pretrain.md").read_text()
    assert (out / "pretrain_curves.png").stat().st_size > 0

    # another seed keeps the encoder's carve (data.kept_carve): its held-out images stay untrained on
    again = ["train", *common, "--weights", str(out / "encoder.keras"), "--epochs-head", "1",
             "--epochs-finetune", "0", "--dense-units", "8", "--seed", "7"]
    res = CliRunner().invoke(main, [*again, "--out", str(tmp_path / "kept")])
    assert res.exit_code == 0 and "kept rather than carved anew" in res.output and "was fitted on" not in res.output, res.output
    assert json.loads((tmp_path / "kept" / "split_manifest.json").read_text())["splits"]["train"] == fitted["train"]
    # from other data (an image removed since), a new carve holds out images the encoder was fitted on: said
    manifest = json.loads((out / "split_manifest.json").read_text())
    manifest["splits"]["train"].append(["glioma/removed.png", 0])
    (out / "split_manifest.json").write_text(json.dumps(manifest))
    res = CliRunner().invoke(main, [*again, "--out", str(tmp_path / "other")])
    assert res.exit_code == 0, res.output
    assert "was fitted on" in res.output and "so its validation results are optimistic" in res.output
    res = CliRunner().invoke(main, ["train", *common, "--weights", "none", "--epochs-finetune", "1", "--force",
                                    "--out", str(out)])  # a pretrain folder keeps what its encoder was fitted on
    assert res.exit_code == 1 and "is a pretrain folder" in res.output
    assert "was fitted on" in (tmp_path / "other" / "train_report.md").read_text()
    res = CliRunner().invoke(main, ["evaluate", str(tmp_path / "other")])
    assert res.exit_code == 0, res.output
    assert "was fitted on" in (tmp_path / "other" / "train_report.md").read_text()  # evaluate keeps the warning
    from mri_edge import distill
    from mri_edge.run import RunFolder

    other = RunFolder(tmp_path / "other")  # as a teacher it is refused for its own split: its start saw those images
    assert distill.overlap(distill.trained_on(other), other.manifest())["val"] > 0


def test_pretrain_refuses_a_used_folder_and_too_few_images_before_writing(synth_data, cache_dir, tmp_path):
    from mri_edge.cli import main

    used = tmp_path / "used"
    used.mkdir()
    (used / "encoder.keras").write_bytes(b"kept")
    common = ["pretrain", "--task", "tumor", "--data-dir", str(synth_data), "--image-size", str(TINY),
              "--cache-dir", str(cache_dir)]
    res = CliRunner().invoke(main, [*common, "--out", str(used)])
    assert res.exit_code == 1 and "already holds a pretrained encoder" in res.output
    assert len(res.output.strip().splitlines()) == 1 and (used / "encoder.keras").read_bytes() == b"kept"
    res = CliRunner().invoke(main, [*common, "--batch-size", "64", "--out", str(tmp_path / "few")])
    assert res.exit_code == 1 and "fewer than two batches" in res.output
    assert not (tmp_path / "few").exists()
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.keras").write_bytes(b"trained")
    res = CliRunner().invoke(main, [*common, "--out", str(run), "--force"])  # --force never takes a run folder
    assert res.exit_code == 1 and "is a training run folder" in res.output
    assert sorted(p.name for p in run.iterdir()) == ["model.keras"]
