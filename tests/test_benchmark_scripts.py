"""The logic of the benchmark scripts that choose between Alzheimer candidates
(benchmarks/rank_runs.py, benchmarks/knn_blend.py, benchmarks/prior_shift.py), on tiny inputs."""

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import knn_blend  # noqa: E402
import prior_shift  # noqa: E402
import rank_runs  # noqa: E402

from mri_edge.groups import normalise  # noqa: E402
from mri_edge.run import RunFolder  # noqa: E402


def test_vote_weighs_neighbours_by_correlation():
    rng = np.random.default_rng(0)
    base = rng.normal(size=64 * 64).astype(np.float32)
    noise = rng.normal(size=(6, 64 * 64)).astype(np.float32)
    # two class-1 thumbnails at correlation ~0.9988 with the query, four class-0 ones at ~0.995
    ref = normalise(base + noise * np.array([[0.1], [0.1], [0.1], [0.1], [0.05], [0.05]], np.float32))
    labels = np.array([0, 0, 0, 0, 1, 1])
    query = normalise(base[None])
    p1 = knn_blend.vote(query, ref, labels, 1, 2)
    assert p1[0].tolist() == [0.0, 1.0]  # the nearest alone
    p6 = knn_blend.vote(query, ref, labels, 6, 2)
    assert p6[0].argmax() == 0 and 0.5 < p6[0, 0] < 4 / 6  # four slightly farther outvote two, by less than a count
    assert np.isclose(p6.sum(), 1.0)


def test_prior_shift_moves_answers_toward_common_classes_by_tau():
    prior = np.array([0.7, 0.2, 0.1])
    probs = np.array([[1 / 3, 1 / 3, 1 / 3], [0.3, 0.6, 0.1]])
    assert np.allclose(prior_shift.adjusted(probs, prior, 0.0), probs)  # tau 0: the model as it is
    assert np.allclose(prior_shift.adjusted(probs, prior, 1.0)[0], prior)  # an undecided model answers the prior
    shifted = prior_shift.adjusted(probs, prior, 1.0)[1]  # 0.3 * 0.7 against 0.6 * 0.2: the common class wins
    assert shifted.argmax() == 0 and np.isclose(shifted.sum(), 1.0)


def test_ranks_put_the_highest_first():
    assert rank_runs.ranks([0.5, 0.7, 0.6]) == [3, 1, 2]


def _run(path: Path, train: list[str], val: list[str], weights: str = "none") -> RunFolder:
    path.mkdir()
    (path / "split_manifest.json").write_text(json.dumps({
        "root": str(path.parent / "data"), "class_names": ["a", "b"],
        "splits": {"train": [[r, 0] for r in train], "val": [[r, 0] for r in val], "test": []}}))
    (path / "config.json").write_text(json.dumps({"task": "custom", "image_size": 32, "weights": weights}))
    return RunFolder(path)


def test_a_candidate_started_from_a_run_that_saw_the_held_out_images_is_marked_or_not_rankable(tmp_path):
    data = tmp_path / "data"
    held = {(data / r).resolve() for r in ("x1.png", "x2.png")}
    # the ancestor kept its epoch on x1 (its validation split) and trained on t1 only
    ancestor = _run(tmp_path / "ancestor", ["t1.png"], ["x1.png"])
    fresh = _run(tmp_path / "fresh", ["t1.png", "t2.png"], ["x1.png", "x2.png"])
    child = _run(tmp_path / "child", ["t1.png"], ["x1.png", "x2.png"], weights=str(ancestor.path / "model.keras"))
    assert [held & s for s in rank_runs.images_seen(fresh)] == [set(), set()]
    # chosen on x1 through its start, fitted on none of the held-out images: ranked, marked
    assert [held & s for s in rank_runs.images_seen(child)] == [set(), {(data / "x1.png").resolve()}]
    # a start that trained on x2 makes its descendants unrankable
    carve = _run(tmp_path / "carve", ["t1.png", "x2.png"], ["t2.png"])
    grandchild = _run(tmp_path / "grandchild", ["t1.png"], ["x1.png", "x2.png"], weights=str(carve.path / "model.keras"))
    assert [held & s for s in rank_runs.images_seen(grandchild)] == [{(data / "x2.png").resolve()}, set()]
    # an ensemble has seen what any member has seen, whatever its own config's `weights` says
    both = _run(tmp_path / "both", ["t1.png"], ["x1.png", "x2.png"])
    config = json.loads(both.config_path.read_text())
    config["ensemble"] = {"members": [{"run": str(fresh.path)}, {"run": str(grandchild.path)}]}
    both.config_path.write_text(json.dumps(config))
    assert [held & s for s in rank_runs.images_seen(both)] == [{(data / "x2.png").resolve()}, set()]
    # a student learned from a teacher that kept its epoch on x1: marked; one whose teacher is
    # not on this machine (trained elsewhere) counts as chosen on all the held-out images
    for name, teacher in (("student", ancestor.path), ("student2", tmp_path / "elsewhere")):
        student = _run(tmp_path / name, ["t1.png"], ["x1.png", "x2.png"])
        config = json.loads(student.config_path.read_text())
        student.config_path.write_text(json.dumps({**config, "teacher": str(teacher)}))
        chosen = {data / "x1.png"} if name == "student" else {data / "x1.png", data / "x2.png"}
        assert [held & s for s in rank_runs.images_seen(student)] == [set(), {c.resolve() for c in chosen}]


def test_test_images_are_matched_to_their_nearest_training_or_held_out_image(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(1)
    data = tmp_path / "data"
    data.mkdir()
    faces = {name: rng.integers(0, 256, (48, 48, 3), dtype=np.uint8) for name in ("t1", "t2", "h1")}
    for name, px in faces.items():
        Image.fromarray(px).save(data / f"{name}.png")
    # each test image is a slightly noisy copy of one training or held-out image
    for name, twin in (("q1", "t2"), ("q2", "h1"), ("q3", "t1")):
        noisy = np.clip(faces[twin].astype(int) + rng.integers(-8, 9, (48, 48, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(data / f"{name}.png")
    manifest = {"root": str(data), "class_names": ["a", "b"], "val_split": {"method": "grouped", "threshold": 0.99},
                "splits": {"train": [["t1.png", 0], ["t2.png", 1]], "val": [["h1.png", 0]],
                           "test": [["q1.png", 1], ["q2.png", 0], ["q3.png", 0]]}}
    held, vote, _ = rank_runs.near_twins(manifest)
    assert held.tolist() == [False, True, False]
    assert vote.tolist() == [1, 0, 0]  # the labels of t2, h1, t1


def test_held_out_images_are_grouped_with_their_twins(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(2)
    data = tmp_path / "data"
    data.mkdir()
    a, b = (rng.integers(0, 256, (48, 48, 3), dtype=np.uint8) for _ in range(2))
    twin = np.clip(a.astype(int) + rng.integers(-4, 5, a.shape), 0, 255).astype(np.uint8)
    for name, px in (("h1", a), ("h2", b), ("h3", twin)):
        Image.fromarray(px).save(data / f"{name}.png")
    manifest = {"root": str(data), "val_split": {"method": "grouped", "threshold": 0.99},
                "splits": {"train": [], "val": [["h1.png", 0], ["h2.png", 1], ["h3.png", 0]], "test": [["h2.png", 1]]}}
    _, _, ids = rank_runs.near_twins(manifest)
    ids = ids.tolist()
    assert ids[0] == ids[2] != ids[1]
