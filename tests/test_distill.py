"""Knowledge distillation (`train --teacher`): the targets, the teacher's checks, a run end to end."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import TINY


def test_targets_mix_the_labels_with_the_teachers_answers_on_the_blended_batch():
    from mri_edge import feed, mixup

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (12, 8, 8, 3), dtype=np.uint8)
    labels = np.arange(12) % 3
    seen = []

    def teacher(x):  # answers depend on the image, so a target built from another batch would not match
        seen.append(x.copy())
        m = x.mean(axis=(1, 2, 3))
        return np.stack([m / 255, 1 - m / 255, np.zeros_like(m)], 1).astype(np.float32)

    batches = feed.make_batches(images, labels, 3, 6, shuffle=True, seed=5, mixup=0.4, teacher=teacher,
                                distill_weight=0.75)
    batches.set_epoch(2)
    x, y = batches[1]
    idx = batches.order[6:12]
    other, lam, box = mixup.plan(idx, 0.4, 0.0, (5, 2, 1), (8, 8))
    blended = mixup.blend(images[idx].astype(np.float32), images[other], lam, box)
    eye = np.eye(3, dtype=np.float32)
    label = lam * eye[labels[idx]] + (1 - lam) * eye[labels[other]]
    np.testing.assert_allclose(seen[-1], blended)  # the teacher saw the blend the student trains on
    np.testing.assert_allclose(x, blended)
    np.testing.assert_allclose(y, 0.25 * label + 0.75 * teacher(blended), rtol=1e-6)
    np.testing.assert_allclose(y.sum(1), 1.0, rtol=1e-6)
    plain = feed.make_batches(images, labels, 3, 6, shuffle=False)[0][1]  # without a teacher: the labels
    np.testing.assert_array_equal(plain, eye[labels[:6]])


def _manifest(run):
    return json.loads((run / "split_manifest.json").read_text())


def test_a_teacher_must_hold_out_the_students_images_and_match_its_classes_and_size(micro_run):
    from mri_edge.distill import Teacher, TeacherError

    names = json.loads((micro_run / "labels.json").read_text())["class_names"]
    own = _manifest(micro_run)
    assert Teacher(micro_run, names, TINY, own).record["members"] == 1  # the same splits: accepted
    other = copy.deepcopy(own)  # a student that holds out 3 images the teacher trained on
    moved, other["splits"]["train"] = other["splits"]["train"][:3], other["splits"]["train"][3:]
    other["splits"]["val"] += moved
    with pytest.raises(TeacherError, match="trained on 3 of this run's validation and 0 of its test images"):
        Teacher(micro_run, names, TINY, other)
    with pytest.raises(TeacherError, match="its classes"):
        Teacher(micro_run, names[::-1], TINY, own)
    with pytest.raises(TeacherError, match=f"it takes {TINY} px images, this run 64 px"):
        Teacher(micro_run, names, 64, own)
    with pytest.raises(TeacherError, match="has no model.keras"):
        Teacher(micro_run / "exports", names, TINY, own)


@pytest.mark.slow  # an optional training lever that trains (5 s with the small backbone): full suite
def test_train_with_a_teacher_records_it_and_a_bad_teacher_fails_before_anything_is_written(
        small_backbone, micro_run, synth_data, cache_dir, tmp_path, monkeypatch):
    from mri_edge import distill
    from mri_edge.cli import main
    from mri_edge.files import sha256_file

    mixed = []  # the targets training got: (labels, teacher's answers, targets)
    original = distill.targets
    monkeypatch.setattr(distill, "targets", lambda y, t, w: mixed.append((y, t, original(y, t, w))) or mixed[-1][2])

    common = ["train", "--task", "tumor", "--data-dir", str(synth_data), "--weights", "none", "--image-size",
              str(TINY), "--epochs-head", "0", "--epochs-finetune", "1", "--dense-units", "8", "--batch-size", "64",
              "--limit-per-class", "4", "--cache-dir", str(cache_dir), "--eager"]
    res = CliRunner().invoke(main, [*common, "--out", str(tmp_path / "bad"), "--teacher", str(tmp_path / "nothing")])
    assert res.exit_code == 1 and "--teacher" in res.output and len(res.output.strip().splitlines()) == 1, res.output
    assert not (tmp_path / "bad").exists()
    res = CliRunner().invoke(main, [*common, "--out", str(tmp_path / "bad"), "--distill-weight", "0.5"])
    assert res.exit_code == 2 and "give --teacher RUN too" in res.output and not (tmp_path / "bad").exists()
    res = CliRunner().invoke(main, [*common, "--out", str(tmp_path / "student"), "--teacher", str(micro_run),
                                    "--distill-weight", "0.6", "--mixup", "0.2"])
    assert res.exit_code == 0, res.output
    assert f"distilling from {micro_run} (1 model(s), test accuracy" in res.output
    assert mixed and all(np.allclose(out, 0.4 * y + 0.6 * t) for y, t, out in mixed)
    assert not np.allclose(mixed[0][2], mixed[0][0])  # the teacher moved the targets off the labels
    cfg = json.loads((tmp_path / "student" / "config.json").read_text())
    assert (cfg["teacher"], cfg["distill_weight"]) == (str(micro_run), 0.6)
    assert cfg["distillation"]["model_sha256"] == sha256_file(micro_run / "model.keras")
    from mri_edge.card import write_card

    write_card(tmp_path / "student")
    assert f"teacher {micro_run} (distill weight 0.6)" in (tmp_path / "student" / "model_card.md").read_text()


def test_a_resumed_student_refuses_a_teacher_that_changed(micro_run):
    from mri_edge import distill
    from mri_edge.config import TrainConfig
    from mri_edge.data import dataset_from_manifest

    cfg = TrainConfig("tumor", ".", image_size=TINY, teacher=str(micro_run))
    dataset = dataset_from_manifest(_manifest(micro_run))
    sha = distill.load(cfg, dataset, log=lambda *_: None).record["model_sha256"]
    assert distill.load(cfg, dataset, lambda *_: None, {"model_sha256": sha}) is not None
    with pytest.raises(distill.TeacherError, match="not the model this run started with"):
        distill.load(cfg, dataset, lambda *_: None, {"model_sha256": "0" * 64})
