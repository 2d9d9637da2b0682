import json
import shutil

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from mri_edge.audit import leakage_free_mask
from mri_edge.cli import main
from mri_edge.synth import write_dataset


@pytest.fixture(scope="module")
def leaky(tmp_path_factory):
    """Phantoms with planted leaks: a byte copy, a re-encoded copy and a copy under another label."""
    root = write_dataset(tmp_path_factory.mktemp("leaky"), "tumor", n_train=8, n_test=3, size=96, seed=4)
    tr = root / "Training"
    shutil.copy(tr / "glioma" / "glioma_0000.jpg", root / "Testing" / "glioma" / "copy.jpg")
    img = cv2.imread(str(tr / "meningioma" / "meningioma_0001.jpg"), cv2.IMREAD_GRAYSCALE)
    brighter = np.clip(img.astype(np.float32) * 1.1 + 5, 0, 255).astype(np.uint8)
    cv2.imwrite(str(root / "Testing" / "meningioma" / "reencoded.png"), brighter)
    shutil.copy(tr / "pituitary" / "pituitary_0002.jpg", tr / "notumor" / "mislabeled.jpg")
    (root / "Training" / "glioma" / "broken.jpg").write_bytes(b"\xff\xd8junk")
    # 12-bit pixels in a 16-bit PNG: refused by the decoder (nearly black as 16-bit data), so unusable
    cv2.imwrite(str(tr / "glioma" / "twelve_bit.png"), (img.astype(np.uint16) * 16))
    (root / "Testing" / "glioma" / ".ipynb_checkpoints").mkdir()  # junk: passed over, and said so
    shutil.copy(tr / "glioma" / "glioma_0000.jpg", root / "Testing" / "glioma" / ".ipynb_checkpoints" / "c.jpg")
    (tr / "glioma" / "notes.txt").write_text("scanner settings")
    shutil.copy(tr / "glioma" / "glioma_0000.jpg", tr / "stray.jpg")  # outside any class folder
    return root


def test_audit_finds_planted_leaks(leaky, tmp_path):
    res = CliRunner().invoke(main, ["data", "audit", str(leaky), "--task", "tumor", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    a = json.loads((tmp_path / "audit.json").read_text())
    assert a["counts"]["test"]["Glioma"] == 4 and a["counts"]["train"]["No Tumor"] == 9
    assert a["corrupt"] == ["Training/glioma/broken.jpg", "Training/glioma/twelve_bit.png"]
    assert a["ignored"] == ["Testing/glioma/.ipynb_checkpoints/c.jpg", "Training/glioma/notes.txt", "Training/stray.jpg"]
    assert "Ignored by discovery (hidden, checkpoint copies, OS debris, not images, outside class folders): 3 (" in \
        (tmp_path / "audit.md").read_text()
    assert a["exact_duplicates"]["pairs_by_split"].get("test-train") == 1
    md = (tmp_path / "audit.md").read_text()  # counts in words, not Python dicts
    assert "pairs by split: test-train (1)" in md and "{" not in md and "1000000000" not in md
    assert list(a["near_duplicates"]["candidate_mad_histogram"])[::7] == ["0-1", ">10"]
    assert "near duplicates train-test: images compared" in res.output  # the slow step shows progress
    leaked = set(a["leaked"]["test"])
    assert {"Testing/glioma/copy.jpg", "Testing/meningioma/reencoded.png"} <= leaked
    assert len(leaked) == 2, leaked  # distinct phantoms are not confused with copies
    conflicts = {(c["a"], c["b"]) for c in a["label_conflicts"]}
    assert any("mislabeled.jpg" in x or "mislabeled.jpg" in y for x, y in conflicts)
    assert a["leakage_free"]["test"] == 12
    nn = a["nearest_neighbour_probe"]
    assert nn["n_test"] == 14 and nn["n_reference"] == 33 and 0 <= nn["accuracy"] <= 1
    assert set(nn["recall_by_class"]) == {"Glioma", "Meningioma", "No Tumor", "Pituitary"}
    assert (tmp_path / "audit.md").is_file() and (tmp_path / "duplicate_pairs.png").is_file()
    import csv  # every pair with its files, so that a user can find (and remove) them

    with open(tmp_path / "duplicates.csv", newline="") as f:
        pairs = list(csv.DictReader(f))
    assert a["pairs_csv"] == "duplicates.csv" and "(duplicates.csv)" in md
    assert sum(r["kind"] == "exact" for r in pairs) == sum(a["exact_duplicates"]["pairs_by_split"].values())
    assert {r["b"] for r in pairs} | {r["a"] for r in pairs} >= leaked
    assert all(float(r["mad"]) <= a["near_duplicates"]["pixel_mad_threshold"] for r in pairs)
    paths = [str(p) for p in sorted((leaky / "Testing").rglob("*.*")) if ".ipynb_checkpoints" not in p.parts]
    mask = leakage_free_mask(tmp_path / "audit.json", paths)
    assert mask.sum() == 12 and len(mask) == 14


def test_nearest_neighbour_probe_tells_copies_from_new_images():
    from mri_edge.audit import nearest_neighbour_probe
    from mri_edge.groups import normalise

    rng = np.random.default_rng(0)
    train = rng.normal(128, 40, (40, 64 * 64)).astype(np.float32)
    labels_train = np.arange(40) % 4
    copies = train[:20] + rng.normal(0, 5, (20, 64 * 64)).astype(np.float32)  # seen images, slightly changed
    unseen = rng.normal(128, 40, (20, 64 * 64)).astype(np.float32)
    thumbs = normalise(np.concatenate([train, copies, unseen]))
    labels = np.concatenate([labels_train, labels_train[:20], (np.arange(20) + 1) % 4])
    ref = np.arange(40)
    names = ["a", "b", "c", "d"]
    seen = nearest_neighbour_probe(thumbs, labels, np.arange(40, 60), ref, np.ones(20, bool), names)
    new = nearest_neighbour_probe(thumbs, labels, np.arange(60, 80), ref, np.zeros(20, bool), names)
    assert seen["accuracy"] == 1.0 and seen["median_best_correlation"] > 0.9
    assert new["accuracy"] < 0.6 and new["median_best_correlation"] < 0.2
    assert new["leakage_free_accuracy"] is None and seen["majority_class_rate"] == 0.25


def test_an_audit_matches_moved_or_symlinked_copies_and_refuses_another_dataset(tmp_path):
    import os

    from mri_edge.audit import AuditError, leakage_free_mask

    ours, other = tmp_path / "ours", tmp_path / "other"
    for d in (ours, other):
        (d / "test" / "a").mkdir(parents=True)
    for i in range(3):
        (ours / "test" / "a" / f"{i}.png").write_bytes(b"x")
    audit = tmp_path / "audit.json"
    audit.write_text(json.dumps({"data_dir": str(ours), "leaked": {"test": ["test/a/1.png"]}}))
    tests = [str(ours / "test" / "a" / f"{i}.png") for i in range(3)]
    assert leakage_free_mask(audit, tests).tolist() == [True, False, True]
    moved = tmp_path / "moved"  # a copy elsewhere whose images are symlinks into the original
    (moved / "test" / "a").mkdir(parents=True)
    for i in range(3):
        os.symlink(ours / "test" / "a" / f"{i}.png", moved / "test" / "a" / f"{i}.png")
    assert leakage_free_mask(audit, [str(moved / "test" / "a" / f"{i}.png") for i in range(3)], moved).tolist() == \
        [True, False, True]
    with pytest.raises(AuditError, match="1 of the 1 test files it lists as leaked are not in"):
        leakage_free_mask(audit, [str(other / "test" / "a" / "0.png")], other)
    # an audit with no leaked test file to miss: told apart by the test images it counted
    audit.write_text(json.dumps({"data_dir": str(other), "leaked": {"test": []}, "counts": {"train": {"a": 3}}}))
    with pytest.raises(AuditError, match="it audited 0 test images of .*, fewer than the 3 evaluated here"):
        leakage_free_mask(audit, tests, ours)
    audit.write_text(json.dumps({"data_dir": str(ours), "leaked": {"test": []}, "counts": {"test": {"a": 3}}}))
    assert leakage_free_mask(audit, tests).all()
