"""The grouped validation split: whole groups of near-identical images held out together."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mri_edge import data, groups


def make_subjects(root, n_subjects=6, slices=4, seed=0):
    """Each 'subject' is a few near-identical slices (one phantom plus noise), two classes."""
    from mri_edge.synth import phantom

    rng = np.random.default_rng(seed)
    for split, n in (("Training", n_subjects), ("Testing", 2)):
        for cls, name in enumerate(("glioma", "meningioma", "notumor", "pituitary")):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for s in range(n):
                base = phantom(rng, "tumor", cls, 64).astype(np.float32)
                for k in range(slices):
                    img = np.clip(base + rng.normal(0, 2, base.shape), 0, 255).astype(np.uint8)
                    Image.fromarray(img).save(d / f"s{s:02d}_{k}.png")
    return root


def test_grouped_split_keeps_every_group_on_one_side(tmp_path):
    root = make_subjects(tmp_path / "d")
    ds = data.discover(root, "tumor", val_fraction=0.2, val_split="grouped", group_threshold=0.95)
    subject = lambda p: p.rsplit("/", 2)[-2] + "/" + p.rsplit("/", 1)[-1].split("_")[0]  # noqa: E731
    train = {subject(p) for p in ds.splits["train"].paths}
    val = {subject(p) for p in ds.splits["val"].paths}
    assert val and not train & val  # no subject on both sides
    assert len(ds.splits["val"].paths) == 4 * len(val)  # all 4 slices of each held-out subject
    assert set(ds.splits["val"].labels) == {0, 1, 2, 3}  # stratified by class
    how = ds.val_split
    assert how["method"] == "grouped" and how["groups"] == 24 and how["largest_group"] == 4
    # held out whole, the validation images have no twin left in training; carved at random they do
    assert how["probe"]["median_best_correlation"] < 0.95
    rnd = data.discover(root, "tumor", val_fraction=0.2)
    thumbs, _ = groups.read_thumbnails(rnd.splits["train"].paths + rnd.splits["val"].paths)
    labels = rnd.splits["train"].labels + rnd.splits["val"].labels
    held = np.arange(len(rnd.splits["train"].paths), len(labels))
    assert groups.holdout_probe(thumbs, labels, held)["median_best_correlation"] > 0.95
    json.dumps(ds.manifest())  # the record travels in split_manifest.json
    assert ds.manifest()["val_split"]["method"] == "grouped"
    again = data.discover(root, "tumor", val_fraction=0.2, val_split="grouped", group_threshold=0.95)
    assert again.splits["val"].paths == ds.splits["val"].paths  # seeded


def test_components_join_chains_and_leave_unreadable_rows_alone():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(1, 64))
    rows = np.concatenate([a, a + 0.05 * rng.normal(size=(1, 64)), rng.normal(size=(2, 64))])
    thumbs = groups.normalise(rows)
    ids = groups.components(thumbs, 0.9)
    assert ids[0] == ids[1] and len({ids[1], ids[2], ids[3]}) == 3
    ok = np.array([True, False, True, True])
    ids = groups.components(thumbs, 0.9, ok)
    assert ids[0] != ids[1]


def test_one_pair_joined_elsewhere_moves_only_its_own_groups():
    # Another machine's decoder can put one pair on the other side of the threshold: the two
    # groups it joins may change sides, every other group must stay where it was.
    rng = np.random.default_rng(1)
    n = 400
    labels = rng.integers(0, 3, n)
    ids = np.arange(n)  # every image its own group
    held, _ = groups.grouped_indices(ids, labels, 0.1, seed=42)
    a, b = next((i, j) for i in range(n) for j in range(i + 1, n) if labels[i] == labels[j])
    joined = ids.copy()
    joined[b] = joined[a]
    held2, info = groups.grouped_indices(joined, labels, 0.1, seed=42)
    assert info["groups"] == n - 1
    moved = set(held.tolist()) ^ set(held2.tolist())
    # the joined group, and where its class's quota ends: a few images of that class alone
    assert len(moved) <= 4 and {int(labels[i]) for i in moved} <= {int(labels[a])}
    assert len(held) and not np.array_equal(held, groups.grouped_indices(ids, labels, 0.1, seed=7)[0])


def test_names_keep_the_carve_when_a_file_is_added():
    rng = np.random.default_rng(2)
    n = 300
    labels = rng.integers(0, 3, n)
    names = [f"/data/train/c{y}/img{i:04d}.jpg" for i, y in enumerate(labels)]
    held, info = groups.grouped_indices(np.arange(n), labels, 0.1, 42, names)
    # one more file sorted first: every row shifts by one, the chosen names do not
    names2 = ["/elsewhere/train/c0/aaa.jpg"] + [n_.replace("/data/", "/elsewhere/") for n_ in names]
    labels2 = np.concatenate([[0], labels])
    held2, _ = groups.grouped_indices(np.arange(n + 1), labels2, 0.1, 42, names2)
    chosen = {"/".join(names[i].split("/")[-2:]) for i in held}
    chosen2 = {"/".join(names2[i].split("/")[-2:]) for i in held2}
    assert len(chosen ^ chosen2) <= 3 and "class folder" in info["order"]


def test_unreadable_images_are_never_held_out_and_count_for_nothing():
    rng = np.random.default_rng(3)
    n = 200
    labels = rng.integers(0, 2, n)
    usable = np.ones(n, bool)
    usable[::5] = False  # a fifth of the files cannot be read: each its own group, as components() leaves them
    held, info = groups.grouped_indices(np.arange(n), labels, 0.1, 42, usable=usable)
    assert len(held) and usable[held].all() and info["unreadable"] == 40 and info["groups"] == 160
    for c in (0, 1):  # the share is of the images training can use
        assert abs((labels[held] == c).sum() - 0.1 * ((labels == c) & usable).sum()) <= 1
    assert "unreadable" not in groups.grouped_indices(np.arange(n), labels, 0.1, 42)[1]


def test_a_run_started_from_another_runs_weights_keeps_its_carve(tmp_path):
    """A new carve (another seed, share or carve version) would validate on images the starting
    weights were fitted on; the run of those weights held out its own, and those are kept."""
    root = make_subjects(tmp_path / "d")
    first = data.discover(root, "tumor", val_fraction=0.2, val_split="grouped", group_threshold=0.95, seed=1)
    start = tmp_path / "run"
    start.mkdir()
    (start / "split_manifest.json").write_text(json.dumps(first.manifest()))
    (start / "model.keras").write_bytes(b"")
    moved = tmp_path / "elsewhere"
    (root).rename(moved)  # the same images read from another folder: matched by their paths inside it
    later = data.discover(moved, "tumor", val_fraction=0.3, seed=7, weights=str(start / "model.keras"))
    rel = lambda ds, s: sorted(data.rel_path(p, Path(ds.root)) for p in ds.splits[s].paths)  # noqa: E731
    assert rel(later, "val") == rel(first, "val") and rel(later, "train") == rel(first, "train")
    assert later.val_split["kept_from"] == str(start / "split_manifest.json")
    assert later.val_split["method"] == "grouped" and later.val_carved
    assert "as the run this one started from" in groups.describe_carve(later.manifest())
    assert "groups of near-identical images held out whole" in groups.describe_carve(first.manifest())
    own = first.manifest() | {"val_carved_from_train": False}
    assert groups.describe_carve(own) == f"validation: the dataset's own validation folder ({len(first.splits['val'].paths)} images)"
    # a finished run lists its unreadable images apart; a pretrain folder its held-out ones
    m = first.manifest()
    gone = m["splits"]["val"].pop(0)[0]
    m["unreadable"] = {"val": [gone]}
    m["splits"], m["held_out"] = {"train": m["splits"]["train"]}, m["splits"]["val"]
    (start / "split_manifest.json").write_text(json.dumps(m))
    again = data.discover(moved, "tumor", seed=7, weights=str(start / "model.keras"))
    assert rel(again, "val") == rel(first, "val") and "kept_from" in again.val_split
    (start / "split_manifest.json").write_text(json.dumps(first.manifest()))
    # fresh carves where the start cannot have seen these images or is not a run's
    assert "kept_from" not in data.discover(moved, "custom", weights=str(start / "model.keras")).val_split
    assert "kept_from" not in data.discover(moved, "tumor", weights=str(tmp_path / "model.keras")).val_split
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(moved / "Training" / "glioma" / "new.png")
    fresh = data.discover(moved, "tumor", val_fraction=0.3, seed=7, weights=str(start / "model.keras"))
    assert "kept_from" not in fresh.val_split and fresh.val_split["method"] == "random"


def test_calibrate_rebuilds_a_kept_carve_only_from_its_start(tmp_path):
    from mri_edge.calibrate import CalibrateError, split_manifest
    from mri_edge.run import RunFolder

    root = make_subjects(tmp_path / "d")
    first = data.discover(root, "tumor", val_fraction=0.2, val_split="grouped", group_threshold=0.95, seed=1)
    start = tmp_path / "start"
    start.mkdir()
    (start / "split_manifest.json").write_text(json.dumps(first.manifest()))
    run = tmp_path / "run"
    run.mkdir()
    config = {"task": "tumor", "image_size": 64, "val_split": "random", "seed": 7, "weights": str(start / "model.keras")}
    (run / "config.json").write_text(json.dumps(config))
    fresh = split_manifest(RunFolder(run), str(root), log=lambda *_: None)  # carved afresh: so it was trained
    assert "kept_from" not in fresh["val_split"]
    (run / "split_manifest.json").unlink()
    (run / "config.json").write_text(json.dumps({**config, "val_kept_from": str(start / "split_manifest.json")}))
    kept = split_manifest(RunFolder(run), str(root), log=lambda *_: None)
    assert kept["splits"]["val"] == first.manifest()["splits"]["val"]
    (run / "split_manifest.json").unlink()
    (start / "split_manifest.json").unlink()
    with pytest.raises(CalibrateError, match="not here"):
        split_manifest(RunFolder(run), str(root), log=lambda *_: None)


def test_the_audits_probes_hold_out_the_carves_train_makes(tmp_path):
    """data audit's "which validation split behaves like test" imitates train's carves (`--val-split
    grouped` and `random`): the same images held out, so each probe is that of the carve a run gets."""
    from mri_edge import audit

    # a random carve of this data takes some groups' first images (which the order hashes): a
    # probe that read training in another order held out other groups (median 0.786 against 0.824)
    root = make_subjects(tmp_path / "d", n_subjects=10, slices=2, seed=1)
    ds = data.discover(root, "tumor", val_split="grouped", group_threshold=0.95)
    probes = audit.audit(root, "tumor", log=lambda *_: None, group_threshold=0.95)["validation_probes"]
    probe = probes["grouped"]
    assert probe["n"] == len(ds.splits["val"].paths)
    assert probe["held_out_groups"] == ds.val_split["held_out_groups"]
    assert probe["median_best_correlation"] == pytest.approx(ds.val_split["probe"]["median_best_correlation"])
    assert probe["nn_accuracy"] == pytest.approx(ds.val_split["probe"]["nn_accuracy"])
    # and the random probe is the probe of the carve `--val-split random` makes
    rnd = data.discover(root, "tumor")
    thumbs, _ = groups.read_thumbnails(rnd.splits["train"].paths + rnd.splits["val"].paths)
    held = np.arange(len(rnd.splits["train"].paths), len(thumbs))
    want = groups.holdout_probe(thumbs, rnd.splits["train"].labels + rnd.splits["val"].labels, held)
    assert probes["random"]["n"] == want["n"] == len(rnd.splits["val"].paths)
    assert probes["random"]["median_best_correlation"] == pytest.approx(want["median_best_correlation"])
