import json
import os

import numpy as np
import pytest

from mri_edge import data, feed
from mri_edge.errors import MriEdgeError
from mri_edge.tasks import TaskError, resolve_classes


def make_tree(root, splits, classes, n=3, size=40):
    import cv2

    rng = np.random.default_rng(0)
    for s in splits:
        for c in classes:
            d = root / s / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                cv2.imwrite(str(d / f"{i}.png"), rng.integers(0, 255, (size, size), dtype=np.uint8))
    return root


@pytest.mark.parametrize("folders", [
    ["glioma", "meningioma", "notumor", "pituitary"],
    ["Glioma", "Meningioma", "No Tumor", "Pituitary"],
    ["glioma_tumor", "meningioma-tumor", "no_tumor", "PITUITARY TUMOR"],
])
def test_tumor_folder_spellings(folders):
    keys, names, mapping = resolve_classes("tumor", folders)
    assert names == ["Glioma", "Meningioma", "No Tumor", "Pituitary"]
    assert sorted(mapping.values()) == [0, 1, 2, 3]


def test_alzheimer_folders_map_in_severity_order():
    _, names, mapping = resolve_classes(
        "alzheimer", ["MildDemented", "ModerateDemented", "NonDemented", "Very_Mild_Demented"])
    assert names == ["No Dementia", "Very Mild Dementia", "Mild Dementia", "Moderate Dementia"]
    assert mapping["MildDemented"] == 2 and mapping["Very_Mild_Demented"] == 1


def test_unknown_missing_and_duplicate_classes_are_clear_errors():
    with pytest.raises(TaskError, match="not classes of task"):
        resolve_classes("tumor", ["glioma", "meningioma", "notumor", "pituitary", "cats"])
    with pytest.raises(TaskError, match="no folder for class"):
        resolve_classes("tumor", ["glioma", "meningioma", "notumor"])
    with pytest.raises(TaskError, match="both map"):
        resolve_classes("tumor", ["glioma", "Glioma_Tumor", "meningioma", "notumor", "pituitary"])


def test_custom_task_takes_sorted_folders():
    keys, names, mapping = resolve_classes("custom", ["b", "a", "c"])
    assert names == ["a", "b", "c"] and mapping == {"a": 0, "b": 1, "c": 2}


@pytest.mark.parametrize("names", [
    ("Training", "Validation", "Testing"), ("train", "val", "test"), ("TRAIN", "valid", "TEST"),
    ("training", "validation", "testing"),
])
def test_split_spellings(tmp_path, names):
    make_tree(tmp_path, names, ["x", "y"])
    found = data.find_splits(tmp_path)
    assert set(found) == {"train", "val", "test"}
    ds = data.discover(tmp_path, "custom")
    assert not ds.val_carved and len(ds.splits["val"].paths) == 6


def test_missing_train_and_missing_folder(tmp_path):
    with pytest.raises(data.DataError, match="not found"):
        data.discover(tmp_path / "nope", "custom")
    make_tree(tmp_path, ["Testing"], ["x", "y"])
    with pytest.raises(data.DataError, match="no training split"):
        data.discover(tmp_path, "custom")


def test_empty_class_folder(tmp_path):
    make_tree(tmp_path, ["Training"], ["x", "y"])
    (tmp_path / "Training" / "z").mkdir()
    with pytest.raises(data.DataError, match="has no images$"):
        data.discover(tmp_path, "custom")
    (tmp_path / "Training" / "z" / ".ipynb_checkpoints").mkdir()
    (tmp_path / "Training" / "z" / ".ipynb_checkpoints" / "0-checkpoint.png").write_bytes(b"x")
    (tmp_path / "Training" / "z" / "notes.txt").write_text("x")
    with pytest.raises(data.DataError, match=r"has no images \(2 other file\(s\) ignored"):
        data.discover(tmp_path, "custom")


def test_mismatched_classes_between_splits(tmp_path):
    make_tree(tmp_path, ["Training"], ["x", "y"])
    make_tree(tmp_path, ["Testing"], ["x", "y", "z"])  # Testing sorts first: train is still the reference
    with pytest.raises(data.DataError, match=r"only Training has none, only Testing has \['z'\]"):
        data.discover(tmp_path, "custom")
    other = tmp_path / "other"  # only the names that differ are listed; spelling variants match
    make_tree(other, ["Training"], ["lesion a", "normal"])
    make_tree(other, ["Testing"], ["Lesion_A", "normal-x"])
    with pytest.raises(data.DataError, match=r"only Training has \['normal'\], only Testing has \['normal-x'\]"):
        data.discover(other, "custom")


def test_train_spells_the_class_names(tmp_path):
    make_tree(tmp_path, ["Training"], ["Healthy", "tumour"])
    make_tree(tmp_path, ["Testing"], ["healthy", "tumour"])
    assert data.discover(tmp_path, "custom").class_names == ["Healthy", "tumour"]


def test_unreadable_images_leave_the_split_manifest(tmp_path):
    from mri_edge.run import RunFolder

    make_tree(tmp_path / "d", ["Training", "Testing"], ["a", "b"], n=4)
    run = RunFolder(tmp_path / "run")
    run.path.mkdir()
    ds = data.discover(tmp_path / "d", "custom", val_fraction=0.25)
    (run.path / "split_manifest.json").write_text(json.dumps(ds.manifest()))
    broken = data.rel_path(ds.splits["test"].paths[0], tmp_path / "d")
    assert run.leave_out_unreadable({"test": [broken], "train": []}) == {"test": [broken]}
    m = run.manifest()
    assert len(m["splits"]["test"]) == 7 and m["unreadable"] == {"test": [broken]}
    assert run.leave_out_unreadable({}) == {"test": [broken]}  # resumed or evaluated again: still on record
    assert run.manifest() == m


def test_carved_validation_is_stratified_and_deterministic(tmp_path):
    make_tree(tmp_path, ["Training", "Testing"], ["a", "b", "c"], n=20)
    d1 = data.discover(tmp_path, "custom", val_fraction=0.1, seed=7)
    d2 = data.discover(tmp_path, "custom", val_fraction=0.1, seed=7)
    d3 = data.discover(tmp_path, "custom", val_fraction=0.1, seed=8)
    assert d1.val_carved
    assert d1.splits["val"].paths == d2.splits["val"].paths
    assert d1.splits["val"].paths != d3.splits["val"].paths
    assert np.bincount(d1.splits["val"].labels).tolist() == [2, 2, 2]
    assert not set(d1.splits["val"].paths) & set(d1.splits["train"].paths)
    m = d1.manifest()
    json.dumps(m)
    assert len(m["splits"]["train"]) == 54 and m["val_carved_from_train"]


def test_corrupt_files_are_skipped_counted_or_strict(tmp_path):
    make_tree(tmp_path, ["Training"], ["a", "b"], n=4)
    (tmp_path / "Training" / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (tmp_path / "Training" / "b" / "notes.txt").write_text("hello")
    ds = data.discover(tmp_path, "custom", val_fraction=0.2)
    split = data.Split("all", ds.splits["train"].paths + ds.splits["val"].paths,
                       ds.splits["train"].labels + ds.splits["val"].labels)
    dec = data.decode_split(split, 32, tmp_path / "cache")
    # notes.txt is not an image by its suffix: discovery ignores it; broken.jpg is skipped and listed
    assert len(dec.skipped) == 1 and dec.images.shape == (8, 32, 32, 3)
    assert {os.path.basename(s["path"]) for s in dec.skipped} == {"broken.jpg"}
    with pytest.raises(data.DataError, match="unreadable"):
        data.decode_split(split, 32, tmp_path / "cache2", strict=True)


def test_decode_cache_is_reused(tmp_path):
    make_tree(tmp_path, ["Training"], ["a", "b"], n=3)
    ds = data.discover(tmp_path, "custom", val_fraction=0.34)
    cache = tmp_path / "cache"
    first = data.decode_split(ds.splits["train"], 32, cache)
    files = list(cache.glob("*.npz"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    second = data.decode_split(ds.splits["train"], 32, cache)
    assert files[0].stat().st_mtime_ns == mtime
    assert np.array_equal(first.images, second.images)
    data.decode_split(ds.splits["train"], 48, cache)
    assert len(list(cache.glob("*.npz"))) == 2


def test_class_weights_are_balanced():
    labels = np.array([0] * 30 + [1] * 10)
    w = feed.class_weights(labels, 3)
    assert w[0] == pytest.approx(40 / (2 * 30)) and w[1] == pytest.approx(40 / (2 * 10)) and w[2] == 1.0


def test_class_weight_modes():
    labels = np.array([0] * 98 + [1] * 2)
    assert feed.class_weights(labels, 3)[1] == pytest.approx(25.0)
    sq = feed.class_weights(labels, 3, "sqrt")
    assert sq[1] == pytest.approx(5.0) and sq[0] == pytest.approx((100 / 196) ** 0.5) and sq[2] == 1.0
    assert feed.class_weights(labels, 3, "none") == {0: 1.0, 1: 1.0, 2: 1.0}
    with pytest.raises(MriEdgeError, match="balanced, sqrt, none"):
        feed.class_weights(labels, 3, "inverse")


def test_mixup_blends_images_labels_and_weights_with_one_weight_per_batch():
    from mri_edge.feed import make_batches

    images = (np.arange(16, dtype=np.uint8) * 10).reshape(16, 1, 1, 1).repeat(3, axis=3)
    labels = np.arange(16) % 4
    weights = {0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0}
    plain = make_batches(images, labels, 4, 8, shuffle=True, seed=1, sample_weights=weights)
    mixed = make_batches(images, labels, 4, 8, shuffle=True, seed=1, sample_weights=weights, mixup=0.4)
    blends = set()
    for i in range(len(mixed)):
        (x0, y0, w0), (x, y, w) = plain[i], mixed[i]
        np.testing.assert_allclose(y.sum(1), 1.0, rtol=1e-6)
        own = y[np.arange(len(y)), y0.argmax(1)]  # weight of the image's own class
        lam = own.min()
        assert 0.5 <= lam <= 1.0 and np.allclose(own[own < 1.0 - 1e-6], lam)  # one weight for the batch
        # each image is lam * itself + (1 - lam) * another image of the same batch
        other = (x[:, 0, 0, 0] - lam * x0[:, 0, 0, 0]) / max(1.0 - lam, 1e-6)
        assert lam == 1.0 or set(np.round(other).astype(int)) <= set(x0[:, 0, 0, 0].astype(int))
        classes = (other / 10).round().astype(int) % 4
        np.testing.assert_allclose(w, lam * w0 + (1 - lam) * np.array([weights[c] for c in classes]), rtol=1e-5)
        blends.add(round(float(lam), 4))
    assert len(blends) == len(mixed) and min(blends) < 1.0  # a fresh weight per batch, and blended
    mixed.set_epoch(0)
    again = mixed[0][0].copy()
    mixed.set_epoch(0)
    assert np.array_equal(mixed[0][0], again)  # the same blend after a restart of the epoch


def test_cutmix_pastes_one_box_per_batch_and_weighs_labels_by_its_area():
    from mri_edge.feed import make_batches

    images = (np.arange(32, dtype=np.uint8) * 7)[:, None, None, None].repeat(8, 1).repeat(8, 2).repeat(3, 3)
    labels = np.arange(32) % 4
    weights = {0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0}
    plain = make_batches(images, labels, 4, 8, shuffle=True, seed=1, sample_weights=weights)
    kinds = set()
    for mixup in (0.0, 0.4):
        mixed = make_batches(images, labels, 4, 8, shuffle=True, seed=1, sample_weights=weights, mixup=mixup,
                             cutmix=1.0)
        for i in range(len(mixed)):
            (x0, y0, w0), (x, y, w) = plain[i], mixed[i]
            assert x.dtype == y.dtype == w.dtype == np.float32  # whichever blend the batch drew
            own = y[np.arange(len(y)), y0.argmax(1)]
            lam = own.min()
            kept = x == x0[:, :1, :1, :1]  # pixels that are still the image's own
            pasted = ~kept.all(axis=(0, 3))  # the box: where some image took its partner's pixels
            if not (x % 7 == 0).all():  # a convex blend: mixup's batch, when both are on
                kinds.add("mixup")
                continue
            kinds.add("cutmix")
            rows, cols = np.nonzero(pasted)
            if len(rows):  # one rectangle, the same for the whole batch, the rest untouched
                box = np.zeros_like(pasted)
                box[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] = True
                assert np.array_equal(box, pasted)
                assert kept[:, ~box].all()
            other = x[:, rows.min(), cols.min(), 0] if len(rows) else x0[:, 0, 0, 0]
            area = box.sum() / 64 if len(rows) else 0.0
            assert 0.5 <= lam <= 1.0 and lam == pytest.approx(1.0 - area)  # the label weight is the area kept
            classes = (other / 7).round().astype(int) % 4
            assert np.allclose(own[classes != y0.argmax(1)], lam)  # partners of another class share the label
            np.testing.assert_allclose(w, lam * w0 + (1 - lam) * np.array([weights[c] for c in classes]), rtol=1e-5)
    assert kinds == {"mixup", "cutmix"}


def test_training_objective_smooths_labels_and_decays_weights():
    import keras

    from mri_edge.model import objective

    plain, smooth = objective(1e-3), objective(1e-3, weight_decay=0.05, label_smoothing=0.2)
    assert type(plain["optimizer"]).__name__ == "Adam" and type(smooth["optimizer"]).__name__ == "AdamW"
    assert smooth["optimizer"].weight_decay == pytest.approx(0.05)
    y, p = np.array([[0.0, 1.0, 0.0, 0.0]]), np.array([[0.1, 0.7, 0.1, 0.1]])
    target = np.array([[0.05, 0.85, 0.05, 0.05]])  # 0.2 spread over 4 classes
    expected = -(target * np.log(p)).sum()
    assert float(keras.ops.convert_to_numpy(smooth["loss"](y, p))) == pytest.approx(expected, rel=1e-5)
    assert float(keras.ops.convert_to_numpy(plain["loss"](y, p))) == pytest.approx(-np.log(0.7), rel=1e-5)


def test_a_folder_that_cannot_be_listed_is_an_error_not_a_smaller_dataset(synth_data, monkeypatch):
    from pathlib import Path

    locked = synth_data / "Training" / "glioma"
    real = os.access
    monkeypatch.setattr(data.os, "access", lambda p, mode: Path(p) != locked and real(p, mode))  # root reads all
    with pytest.raises(data.DataError, match="glioma: cannot be read \\(permission denied\\)"):
        data.discover(synth_data, "tumor")


def test_predict_reads_a_folder_with_an_unlistable_subfolder_and_says_so(synth_data, tmp_path, monkeypatch):
    import shutil
    from pathlib import Path

    from mri_edge.predict import expand_inputs

    shutil.copy(next((synth_data / "Testing").rglob("*.jpg")), tmp_path / "a.jpg")
    (tmp_path / "lost+found").mkdir()
    real = os.access
    monkeypatch.setattr(data.os, "access", lambda p, mode: Path(p).name != "lost+found" and real(p, mode))
    inputs = expand_inputs([tmp_path])
    assert inputs.paths == [tmp_path / "a.jpg"]
    assert any("1 folder(s) not read (permission denied)" in n and "lost+found" in n for n in inputs.notes)
