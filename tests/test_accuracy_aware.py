"""Accuracy-aware int8 (`export --max-drop`): the stage search's choice, the recipe in the
file's metadata, and the refusal of the option where no file would use it."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner


def test_the_search_keeps_the_cheapest_stages_that_meet_the_budget():
    from mri_edge.export.accuracy import stage_search

    stages = {"conv2": {"nodes": ["a"], "mac_share": 0.949, "param_share": 0.969, "cost": 0.6},
              "conv5": {"nodes": ["b"], "mac_share": 0.05, "param_share": 0.03, "cost": 0.05},
              "head": {"nodes": ["c"], "mac_share": 0.001, "param_share": 0.001, "cost": 0.001}}
    gain = {"conv2": 0.05, "conv5": 0.02, "head": 0.03}
    tried = []

    def attempt(kept, mode="full"):
        tried.append(tuple(kept))
        return {"agreement": 0.94 + sum(gain[s] for s in kept), "accuracy": 0.9, "accuracy_drop_pts": 0.0}, kept

    chosen, cand, steps = stage_search(stages, attempt, 2.0, [])
    # budget 0.98: head (+0.03 for 0.1% of the compute) then conv5 (+0.02) reach 0.99; conv2 is never needed
    assert chosen["float_stages"] == ["head", "conv5"] and cand == ["head", "conv5"]
    assert abs(chosen["agreement"] - 0.99) < 1e-9 and steps[0]["agreement"] == 0.94
    assert abs(chosen["float_mac_share"] - 0.051) < 1e-9
    assert len(tried) == len(set(tried))  # a candidate measured alone is not built again
    # an unreachable budget keeps the best candidate found, which is not within it
    gain.update(conv2=0.01, conv5=0.005, head=0.005)
    chosen, _, steps = stage_search(stages, attempt, 0.0, [])
    partial = [s["agreement"] for s in steps if len(s["float_stages"]) < len(stages)]
    assert chosen["agreement"] < 1 and chosen["agreement"] == max(partial) < max(s["agreement"] for s in steps)


def search_where_one_node_matters(stages: dict, node: str) -> tuple[dict, list, list[tuple]]:
    """stage_search at a 0.5-point budget where only keeping `node` in float brings agreement
    from 99% to 100%: (chosen step, its candidate, every candidate built, in order)."""
    from mri_edge.export.accuracy import stage_search

    tried = []

    def attempt(kept, mode="full"):
        tried.append(tuple(kept))
        in_float = {n for s in kept for n in stages[s]["nodes"]}
        return {"agreement": 0.99 + 0.01 * (node in in_float), "accuracy": 0.9, "accuracy_drop_pts": 0.0}, list(kept)

    chosen, cand, _ = stage_search(stages, attempt, 0.5, [])
    return chosen, cand, tried


def test_a_stage_kept_in_float_is_halved_while_a_half_holds_the_budget():
    """Kept whole, conv2 costs all of its dense layers; here one layer is what matters, and the
    search narrows conv2 to it, the transition after the block going with the last layers."""
    from mri_edge.export.stages import dense_layers, halves, part, stages_from

    nodes = [("CONV_2D", f"net/conv2_block{i}_1_conv", 10, 1) for i in range(1, 5)] + [
        ("CONV_2D", "net/pool2_conv", 5, 1), ("CONV_2D", "net/conv3_block1_1_conv", 40, 4),
        ("MEAN", "net/avg_pool", 0, 0), ("FULLY_CONNECTED", "net/dense", 1, 1)]
    stages = stages_from(nodes, ("MEAN",))
    assert sorted(stages) == ["conv2", "conv3", "head"] and abs(stages["conv2"]["mac_share"] - 45 / 86) < 1e-9
    chosen, cand, tried = search_where_one_node_matters(stages, "net/conv2_block2_1_conv")
    assert chosen["float_stages"] == ["conv2.2"] == cand and abs(chosen["float_mac_share"] - 10 / 86) < 1e-9
    # the first layer alone first (it fails, early), then halves: 1-2 holds, 1 is known to fail, 2 holds
    assert [t for t in tried if "conv2" in "".join(t)][-3:] == [("conv2.1",), ("conv2.1-2",), ("conv2.2",)]
    assert stages["conv2.3-4"]["nodes"] == ["net/conv2_block3_1_conv", "net/conv2_block4_1_conv", "net/pool2_conv"]
    assert halves(stages, "conv2.2") == [] and halves(stages, "conv3") == []  # one dense layer: nothing to halve
    # a part named by its layers is the same wherever it is built (a recipe read back by a benchmark)
    fresh = stages_from(nodes, ("MEAN",))
    assert part(fresh, "conv2.3-4") == "conv2.3-4" and fresh["conv2.3-4"]["nodes"] == stages["conv2.3-4"]["nodes"]
    assert part(fresh, "conv2.1") == "conv2.1" and fresh["conv2.1"]["nodes"] == ["net/conv2_block1_1_conv"]
    # in an ensemble a transition goes with its own member's last layer
    assert dense_layers(["member_0/conv2_block3_x", "member_1/conv2_block1_x", "member_0/pool2_conv", "pre"]) == [3, 1, 3, 3]


def test_a_stage_whose_first_layer_alone_holds_the_budget_skips_the_halves_between():
    """Each half that holds the budget costs a complete score: when the first dense layer alone
    holds it, the search takes it without scoring the halves in between (1-4, 1-2)."""
    from mri_edge.export.stages import stages_from

    nodes = [("CONV_2D", f"net/conv2_block{i}_1_conv", 10, 1) for i in range(1, 9)] + [
        ("CONV_2D", "net/conv3_block1_1_conv", 40, 4)]
    chosen, cand, tried = search_where_one_node_matters(stages_from(nodes, ("MEAN",)), "net/conv2_block1_1_conv")
    assert chosen["float_stages"] == ["conv2.1"] == cand
    assert [t for t in tried if "conv2." in "".join(t)] == [("conv2.1",)]


def test_the_weight_only_file_counts_each_stage_once_after_halving():
    """Only every stage in float holds the budget (no int8 file), so halving is tried, fails,
    and the weight-only file is the last resort: its stages are the graph's, not its halves."""
    from mri_edge.export.accuracy import stage_search
    from mri_edge.export.stages import stages_from, whole

    nodes = [("CONV_2D", f"net/conv2_block{i}_1_conv", 10, 1) for i in range(1, 5)] + [
        ("CONV_2D", "net/conv3_block1_1_conv", 40, 4)]
    stages = stages_from(nodes, ("MEAN",))

    def attempt(kept, mode="full"):
        return {"agreement": 1.0 if sorted(kept) == ["conv2", "conv3"] else 0.98, "accuracy": 0.9,
                "accuracy_drop_pts": 0.0}, list(kept)

    def weight_only(mode):
        return {"agreement": 0.999, "accuracy": 0.9, "accuracy_drop_pts": 0.0}, "weight-only"

    chosen, cand, steps = stage_search(stages, attempt, 0.5, [], weight_only)
    assert any("." in s for s in stages)  # halves were tried
    assert cand == "weight-only" and chosen["float_stages"] == whole(stages) == ["conv2", "conv3"]
    assert abs(chosen["float_mac_share"] - 1.0) < 1e-9


def test_a_stage_whose_error_others_hide_is_tried_after_them():
    """The input normalisation alone gains nothing while the blocks are int8, yet its error is
    all that is left once they are in float: the search must still try it."""
    from mri_edge.export.accuracy import stage_search

    stages = {"body": {"nodes": ["n"], "mac_share": 0.0, "param_share": 0.0, "cost": 0.0},
              "conv2": {"nodes": ["a"], "mac_share": 0.55, "param_share": 0.05, "cost": 0.55},
              "conv3": {"nodes": ["b"], "mac_share": 0.4, "param_share": 0.65, "cost": 0.65},
              "conv5": {"nodes": ["c"], "mac_share": 0.05, "param_share": 0.3, "cost": 0.3}}

    def attempt(kept, mode="full"):
        blocks = sum(s in kept for s in ("conv2", "conv3"))
        agreement = 0.95 + 0.02 * blocks + (0.01 if blocks == 2 and "body" in kept else 0.0)
        return {"agreement": agreement, "accuracy": 0.9, "accuracy_drop_pts": 0.0}, kept

    chosen, _, steps = stage_search(stages, attempt, 0.5, [])
    assert chosen["float_stages"] == ["conv2", "conv3", "body"] and abs(chosen["agreement"] - 1.0) < 1e-9
    without = [st for st in steps if st["float_stages"] == ["conv2", "conv3"]]
    assert without and abs(without[0]["agreement"] - 0.99) < 1e-9  # over the budget without it


def test_a_file_with_all_compute_in_float_is_never_chosen():
    """Keeping every stage in float usually holds the budget, but that is a float file named
    int8, and so is one that leaves only a stage without MACs or weights (the input
    normalisation) in int8: the search keeps the best candidate that quantizes compute or
    weights, over budget."""
    from mri_edge.export.accuracy import stage_search, within

    stages = {"body": {"nodes": ["n"], "mac_share": 0.0, "param_share": 0.0, "cost": 0.0},
              "conv2": {"nodes": ["a"], "mac_share": 0.6, "param_share": 0.3, "cost": 0.6},
              "conv3": {"nodes": ["b"], "mac_share": 0.4, "param_share": 0.7, "cost": 0.7}}

    def attempt(kept, mode="full"):
        return {"agreement": 0.95 + 0.02 * ("conv2" in kept) + 0.03 * ("conv3" in kept) + 0.001 * ("body" in kept),
                "accuracy": 0.9, "accuracy_drop_pts": 0.0}, list(kept)

    chosen, cand, steps = stage_search(stages, attempt, 0.5, [])
    measured = {tuple(sorted(st["float_stages"])): st for st in steps}
    assert within(measured[("body", "conv2", "conv3")], 0.5)  # measured, and within the budget
    assert within(measured[("conv2", "conv3")], 0.5)  # body back in int8: still no int8 compute
    assert sorted(chosen["float_stages"]) == ["body", "conv3"] == sorted(cand)  # conv2's compute is int8
    assert not within(chosen, 0.5)


def test_a_stage_a_later_one_made_unnecessary_goes_back_to_int8():
    from mri_edge.export.accuracy import stage_search

    stages = {"body": {"nodes": ["n"], "mac_share": 0.0, "param_share": 0.0, "cost": 0.0},
              "conv2": {"nodes": ["a"], "mac_share": 0.6, "param_share": 0.3, "cost": 0.6},
              "conv3": {"nodes": ["b"], "mac_share": 0.4, "param_share": 0.7, "cost": 0.7}}

    def attempt(kept, mode="full"):  # body only helps with conv2 in float; conv3 helps a little alone
        agreement = 0.95 + 0.02 * ("conv2" in kept) + 0.01 * ("conv3" in kept) + \
            0.03 * ("body" in kept and "conv2" in kept)
        return {"agreement": agreement, "accuracy": 0.9, "accuracy_drop_pts": 0.0}, kept

    chosen, _, steps = stage_search(stages, attempt, 0.5, [])
    assert ["conv2", "conv3", "body"] in [st["float_stages"] for st in steps]  # the greedy order
    assert chosen["float_stages"] == ["conv2", "body"]  # conv3 was not needed once body was in float


def test_the_budget_bounds_accuracy_as_well_as_agreement():
    from mri_edge.export.accuracy import stage_search, within
    from mri_edge.export.heldout import HeldOut

    labels = np.arange(100) % 4
    held = HeldOut(np.zeros((100, 2, 2, 3), np.uint8), np.eye(4)[labels], labels)  # Keras is right on every image
    wrong = np.eye(4)[(labels + 1) % 4]
    probs = np.eye(4)[labels].copy()
    probs[:2] = wrong[:2]  # 2 flips, both errors: 98% agreement, accuracy -2 points
    s = held.score(probs)
    assert s["agreement"] == 0.98 and abs(s["accuracy_drop_pts"] - 2.0) < 1e-9
    assert within(s, 2.0) and not within(s, 1.0)
    ref2 = np.eye(4)[labels].copy()
    ref2[2:4] = wrong[2:4]  # Keras wrong on two images that the candidate gets right: flips that gain accuracy
    s2 = HeldOut(held.x, ref2, labels).score(np.eye(4)[labels])
    assert s2["agreement"] == 0.98 and abs(s2["accuracy_drop_pts"] + 2.0) < 1e-9 and within(s2, 2.0)

    def attempt(kept, mode="full"):  # agreement within budget from the start, but accuracy only with conv5 in float
        drop = 0.0 if "conv5" in kept else 1.5
        return {"agreement": 0.995, "accuracy": 0.9, "accuracy_drop_pts": drop}, kept

    stages = {"conv4": {"nodes": ["a"], "mac_share": 0.2, "param_share": 0.1, "cost": 0.2},
              "conv5": {"nodes": ["b"], "mac_share": 0.02, "param_share": 0.3, "cost": 0.3}}
    chosen, _, _ = stage_search(stages, attempt, 1.0, [])
    assert chosen["float_stages"] == ["conv5"]

    def attempt2(kept, mode="full"):  # either stage alone restores accuracy: the one with fewer weights wins
        drop = 0.0 if kept else 1.5
        return {"agreement": 0.995, "accuracy": 0.9, "accuracy_drop_pts": drop}, kept

    chosen, _, _ = stage_search(stages, attempt2, 1.0, [])
    assert chosen["float_stages"] == ["conv4"]  # conv5 costs 2% of the compute but 30% of the weights


def indexed_held_out(n: int, seed: int = 0):
    """A HeldOut whose image i holds the value i (n <= 256), with Keras right on each image and
    its top-2 margins, for candidates that answer by image index."""
    from mri_edge.export.heldout import HeldOut

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    margin = rng.uniform(0.0, 0.9, n)
    ref = np.zeros((n, 4))
    ref[np.arange(n), labels] = 0.5 + margin / 2
    ref[np.arange(n), (labels + 1) % 4] = 0.5 - margin / 2  # top-2 margin = margin
    return HeldOut(np.arange(n)[:, None, None, None].astype(np.uint8).repeat(3, -1), ref, labels), margin


def flip(held, which: np.ndarray) -> np.ndarray:
    """The Keras probabilities with the answers of `which` changed."""
    probs = held.ref.copy()
    probs[which] = np.roll(held.ref[which], 1, axis=1)
    return probs


def test_a_score_stops_once_out_of_budget_starting_with_the_smallest_margins():
    from mri_edge.export.accuracy import within

    held, margin = indexed_held_out(250)
    flipped = margin < 0.05  # a candidate that changes the answers of the closest calls
    probs = flip(held, flipped)
    seen = []

    def run(x):
        idx = x[:, 0, 0, 0].astype(int)
        seen.extend(margin[idx])
        return probs[idx]

    full = held.score(probs)
    assert flipped.sum() > 2 and not within(full, 1.0)
    early = held.score_until(run, 1.0, chunk=32)
    assert early["stopped_after"] == 32 and len(seen) == 32  # the first chunk held enough flips
    assert max(seen) <= np.sort(margin)[31] + 1e-12  # and it was the 32 smallest margins
    assert early["agreement"] >= full["agreement"] and early["flip_bound"] <= full["flip_bound"] and not within(early, 1.0)
    assert not within({**early, "agreement": 1.0, "accuracy_drop_pts": 0.0}, 1.0)  # a stopped score never holds
    seen.clear()
    assert held.score_until(run, 100.0) == full and len(seen) == 250  # never out of budget: all run
    assert held.score_until(run) == full


def test_a_score_that_crosses_the_limit_in_its_last_chunk_is_complete():
    held, margin = indexed_held_out(200, seed=1)
    widest = np.argsort(margin)[-3:]  # flips only where the model is surest: the last chunk
    probs = flip(held, widest)
    score = held.score_until(lambda x: probs[x[:, 0, 0, 0].astype(int)], 1.0, chunk=64)
    assert "stopped_after" not in score and score == held.score(probs)


@pytest.mark.parametrize("n, pts, k", [(10, 0.0, 0), (100, 0.5, 0), (375, 18.4, 69), (523, 1.0, 5), (1279, 2.5, 31)])
def test_the_budget_holds_exactly_at_its_limit(n, pts, k):
    """k flips of n are the most a budget of pts points allows, float rounding aside
    (375 x 18.4 / 100 is 68.99999999999999 in floats)."""
    from mri_edge.export.accuracy import within

    assert within({"agreement": 1 - k / n, "accuracy_drop_pts": 0.0}, pts)
    assert within({"agreement": 1.0, "flip_bound": k / n, "accuracy_drop_pts": 0.0}, pts)
    assert not within({"agreement": 1 - (k + 1) / n, "accuracy_drop_pts": 0.0}, pts)
    assert not within({"agreement": 1.0, "flip_bound": (k + 1) / n, "accuracy_drop_pts": 0.0}, pts)


def test_greedy_steps_may_stop_early_but_ranked_scores_are_complete():
    """The first candidate, each stage alone and the over-budget fallback are ranked by
    quality, so their scores are complete; the greedy steps only need to know whether they
    hold the budget."""
    from mri_edge.export.accuracy import stage_search, within

    stages = {s: {"nodes": [s], "mac_share": c, "param_share": c, "cost": c}
              for s, c in (("conv2", 0.5), ("conv3", 0.3), ("conv4", 0.2))}
    truth = {(): 0.95, ("conv2",): 0.96, ("conv3",): 0.962, ("conv4",): 0.961, ("conv3", "conv4"): 0.97,
             ("conv2", "conv3", "conv4"): 1.0, ("conv2", "conv3"): 0.975, ("conv2", "conv4"): 0.965}
    calls = []

    def attempt(kept, mode="full"):
        calls.append((tuple(kept), mode))
        agreement = truth[tuple(sorted(kept))]
        if mode == "early" and agreement < 0.995:  # a stopped score: its upper bound can rank above the true best
            return {"agreement": 0.994, "accuracy": 0.9, "accuracy_drop_pts": 0.0, "stopped_after": 64}, list(kept)
        return {"agreement": agreement, "accuracy": 0.9, "accuracy_drop_pts": 0.0}, list(kept)

    chosen, cand, steps = stage_search(stages, attempt, 0.5, [])
    assert not within(chosen, 0.5)
    assert [mode for kept, mode in calls if len(kept) <= 1] == ["first", "rank", "rank", "rank"]
    assert any(mode == "early" for _, mode in calls)  # the greedy steps: may stop
    assert not any("stopped_after" in st for st in steps if len(st["float_stages"]) < 3)  # the fallbacks, completed
    assert sorted(cand) == ["conv2", "conv3"] and abs(chosen["agreement"] - 0.975) < 1e-9  # the true best
    # the first, three added (conv4, conv3, conv2 by gain per cost), three put back: completing keeps them all
    assert [st["float_stages"] for st in steps] == [[], ["conv4"], ["conv4", "conv3"], ["conv4", "conv3", "conv2"],
                                                    ["conv4", "conv3"], ["conv4", "conv2"], ["conv3", "conv2"]]
    assert all("alone_gain" in st for st in steps[1:4])


def test_a_stage_is_ranked_on_the_images_where_answers_move():
    """Ranking a stage alone runs the images the first candidate changed and the closest
    calls, with the first candidate's answers elsewhere: exact for a candidate that changes
    nothing else, and an upper bound of its agreement when it does."""
    from mri_edge.export.accuracy import Scoring, within

    held, margin = indexed_held_out(250, seed=3)
    first_flips = margin < 0.1
    first = flip(held, first_flips)
    fixed = first_flips.copy()
    fixed[np.flatnonzero(first_flips)[::2]] = False  # the stage alone fixes half of the first's flips
    seen = []

    def runner(probs):
        def run(x):
            idx = x[:, 0, 0, 0].astype(int)
            seen.extend(idx.tolist())
            return probs[idx]
        return run

    scoring = Scoring(held, 1.0)
    assert scoring(runner(first), "first") == held.score(first) and len(seen) == 250
    seen.clear()
    cand = flip(held, fixed)
    est = scoring(runner(cand), "rank")
    assert est == {**held.score(cand), "ranked_on": len(seen)} and 64 <= len(seen) < 250
    assert set(np.flatnonzero(first_flips)) <= set(seen) and set(np.argsort(margin)[:64]) <= set(seen)
    assert not within({**est, "agreement": 1.0, "accuracy_drop_pts": 0.0}, 1.0)  # an estimate never holds
    sure = fixed.copy()
    sure[np.argmax(margin)] = True  # it also changes the answer Keras is surest of: not run, so not seen
    assert scoring(runner(flip(held, sure)), "rank")["agreement"] > held.score(flip(held, sure))["agreement"]


def test_over_budget_only_scores_that_could_still_rank_first_are_completed():
    """A ranking or stopped score counts what it did not run as unchanged, so its agreement
    bounds the candidate's quality: the fallback completes scores best bound first and stops
    once no bound beats the best complete score. A ranking score, whose other images are the
    first candidate's, bounds neither: the greedy step measures the candidate again."""
    from mri_edge.export.accuracy import stage_search, within

    stages = {s: {"nodes": [s], "mac_share": c, "param_share": c, "cost": c}
              for s, c in (("conv2", 0.5), ("conv3", 0.3), ("conv4", 0.2))}
    truth = {(): 0.95, ("conv2",): 0.96, ("conv3",): 0.962, ("conv4",): 0.961, ("conv3", "conv4"): 0.98,
             ("conv2", "conv3", "conv4"): 0.99}
    bound = {("conv4",): 0.97, ("conv3", "conv4"): 0.985, ("conv2", "conv3", "conv4"): 0.994}
    calls = []

    def attempt(kept, mode="full"):
        calls.append((tuple(kept), mode))
        key = tuple(sorted(kept))
        if mode == "early" and truth[key] < 0.995:  # out of the budget: stopped, with an upper bound
            return {"agreement": bound[key], "accuracy": 0.9, "accuracy_drop_pts": 0.0, "stopped_after": 64}, list(kept)
        extra = {"ranked_on": 50} if mode == "rank" else {}
        agreement = truth[key]
        return {"agreement": agreement, "accuracy": 0.9, "accuracy_drop_pts": 0.0, **extra}, list(kept)

    chosen, cand, steps = stage_search(stages, attempt, 0.5, [])
    assert calls == [((), "first"), (("conv2",), "rank"), (("conv3",), "rank"), (("conv4",), "rank"),
                     (("conv4",), "early"), (("conv4", "conv3"), "early"), (("conv4", "conv3", "conv2"), "early"),
                     (("conv4", "conv3"), "full")]  # conv4 alone (bound 0.97) cannot beat 0.98: never completed
    assert cand == ["conv4", "conv3"] and abs(chosen["agreement"] - 0.98) < 1e-9 and not within(chosen, 0.5)
    assert "stopped_after" in steps[1] and steps[1]["float_stages"] == ["conv4"]
    truth[("conv4",)] = 0.996  # a ranking score that looks within the budget is measured again
    calls.clear()
    chosen, cand, _ = stage_search(stages, attempt, 0.5, [])
    assert (("conv4",), "early") in calls


def test_the_tflite_search_scores_greedy_steps_in_chunks(monkeypatch):
    """The wiring: tflite_accuracy_aware hands score_until a function of the images it is given."""
    from mri_edge.export import tflite

    stages = {s: {"nodes": [s], "mac_share": c, "param_share": c, "cost": c}
              for s, c in (("conv1", 0.1), ("conv2", 0.5), ("conv3", 0.4))}
    monkeypatch.setattr(tflite, "tflite_stages", lambda calibrated: stages)
    held, margin = indexed_held_out(200, seed=2)
    sizes = []

    def probs(candidate, x=None):
        idx = np.arange(200) if x is None else x[:, 0, 0, 0].astype(int)
        sizes.append(len(idx))
        wrong = np.zeros(200, bool) if set(candidate) >= {"conv1", "conv2"} else margin < 0.1
        return flip(held, wrong)[idx]

    fb, recipe = tflite.tflite_accuracy_aware(b"", lambda nodes: tuple(nodes), lambda fb, w: fb, held, 0.5, probs)
    assert set(fb) == {"conv1", "conv2"} and recipe["within_budget"]
    assert 64 in sizes and any("stopped_after" in st for st in recipe["steps"])  # a greedy step stopped early
    assert sizes[0] == 200 and all(0 < n < 200 for n in sizes[1:4])  # the first complete, the stages ranked on fewer


def test_densenet_stages_from_tflite_and_onnx_names():
    from mri_edge.export.stages import stage_names

    names = [("PAD", "m/densenet121/zero_padding2d/Pad"), ("CONV_2D", "m/densenet121/conv1_relu/Relu;m/conv1_bn"),
             ("MAX_POOL_2D", "m/densenet121/pool1/MaxPool2d"), ("CONV_2D", "m/densenet121/conv2_block1_1_relu/Relu"),
             ("CONV_2D", "m/densenet121/conv2_block1_2_conv/convolution1"), ("AVG", "m/densenet121/pool2_pool/AvgPool"),
             ("CONV_2D", "m/densenet121/conv3_block1_1_relu/Relu"), ("DEPTHWISE_CONV_2D", "m/densenet121/relu/Relu;bn"),
             ("MEAN", "m/avg_pool/Mean"), ("FULLY_CONNECTED", "m/head_dense/MatMul")]
    assert stage_names(names, ("MEAN",)) == ["body", "conv1", "conv1", "conv2", "conv2", "conv2", "conv3", "conv3",
                                              "head", "head"]
    # an ensemble: the second member's blocks follow the first member's head
    two = [("CONV_2D", "e/member_1/densenet121/conv1_relu/Relu"), ("MEAN", "e/member_1/avg_pool/Mean"),
           ("FULLY_CONNECTED", "e/member_1/head_dense/MatMul"), ("CONV_2D", "e/member_2/densenet121/conv1_relu/Relu"),
           ("CONV_2D", "e/member_2/densenet121/conv2_block1_1_relu/Relu"), ("MEAN", "e/member_2/avg_pool/Mean"),
           ("ADD", "e/probabilities/add")]
    assert stage_names(two, ("MEAN",)) == ["conv1", "head", "head", "conv1", "conv2", "head", "head"]
    # members interleaved, an unnamed op with the member before it, the final mean with the last member's head
    mixed = [("SUB", "e/member_2/imagenet_normalization/Sub"), ("CONV_2D", "e/member_1/densenet121/conv1_relu/Relu"),
             ("CONV_2D", "Conv__7"), ("CONV_2D", "e/member_2/densenet121/conv1_relu/Relu"),
             ("MEAN", "e/member_1/avg_pool/Mean"), ("CONV_2D", "e/member_2/densenet121/conv2_block1_1_relu/Relu"),
             ("CONV_2D", "Conv__9"), ("MEAN", "e/member_2/avg_pool/Mean"), ("ADD", "e/probabilities/add")]
    assert stage_names(mixed, ("MEAN",)) == ["body", "conv1", "conv1", "conv1", "head", "conv2", "conv2", "head",
                                              "head"]


def test_max_drop_records_its_recipe_and_is_refused_where_unused(micro_run, tmp_path):
    from mri_edge.cli import main
    from mri_edge.backends import read_metadata

    run = tmp_path / "run"
    shutil.copytree(micro_run, run)
    res = CliRunner().invoke(main, ["export", str(run), "--format", "tflite", "--quantize", "fp16", "--max-drop", "1"])
    assert res.exit_code == 1 and "--max-drop applies to int8 tflite/onnx/openvino files" in res.output
    res = CliRunner().invoke(main, ["export", str(run), "--format", "onnx", "--format", "tflite", "--quantize", "int8",
                                    "--max-drop", "0", "--calib-size", "16", "--workers", "2"])
    assert res.exit_code == 0, res.output
    for name in ("model_int8.onnx", "model_int8.tflite"):
        meta = read_metadata(run / "exports" / name)
        recipe = meta["accuracy_aware"]
        # what the metadata says is stored is what the search kept
        stored = "fp16" if recipe.get("float_weights_check", {}).get("within_budget") else "fp32"
        assert meta.get("float_weights") == recipe.get("float_weights") == (
            stored if recipe["float_stages"] else None), recipe
        assert recipe["max_drop_pts"] == 0 and recipe["held_out_images"] == 4, name
        assert recipe["within_budget"] == (recipe["held_out_agreement"] >= 1.0 and
                                           recipe["held_out_accuracy_drop_pts"] <= 0), name
        assert set(recipe["stages"]) == {"body", "head"} and recipe["steps"][0]["float_stages"] == [], name
    assert "in float: " in res.output
    for fmt in ("ONNX", "TFLite"):  # each candidate, as the worker processes measure it
        assert f"int8 {fmt} search: nothing in float: held-out agreement" in res.output, res.output
    res = CliRunner().invoke(main, ["export", str(run), "--format", "onnx", "--quantize", "int8", "--max-drop", "0",
                                    "--calib-size", "16", "--workers", "1", "--float-head", "--float-weights", "int8"])
    assert res.exit_code == 0 and "int8 ONNX search: head in float: held-out agreement" in res.output, res.output
    # an ONNX file that runs int8 operations stores the float parts' weights as fp16, never int8,
    # and its metadata says what the file holds
    import onnx

    meta = read_metadata(run / "exports" / "model_int8.onnx")
    halves = [t for t in onnx.load(str(run / "exports" / "model_int8.onnx")).graph.initializer
              if t.data_type == onnx.TensorProto.FLOAT16]
    if meta.get("weight_only"):
        assert meta["float_weights"] == "int8" and not halves
    else:
        assert meta["float_weights"] == meta["accuracy_aware"]["float_weights"] in ("fp16", "fp32")
        assert bool(halves) == (meta["float_weights"] == "fp16"), meta["accuracy_aware"].get("float_weights_check")
    from mri_edge import progress

    assert progress._note_sink is None  # the in-process export let go of its log


def test_max_size_and_hybrid_are_refused_without_max_drop_or_a_file_to_use_them(micro_run):
    """--max-size needs --max-drop, an int8 TFLite or ONNX file and a limit above 0, --hybrid
    --max-drop and an int8 TFLite file; each refusal comes before anything is made."""
    from mri_edge.cli import main

    run = micro_run
    for args, why in ((["--format", "onnx", "--quantize", "int8", "--max-size", "5"], "add --max-drop"),
                      (["--format", "onnx", "--quantize", "int8", "--max-drop", "1", "--max-size", "0"],
                       "Invalid value for '--max-size'"),
                      (["--format", "tflite", "--quantize", "fp16", "--max-size", "5"],
                       "--max-size applies to int8 tflite/onnx files"),
                      (["--format", "tflite", "--quantize", "int8", "--hybrid"], "add --max-drop"),
                      (["--format", "onnx", "--quantize", "int8", "--max-drop", "1", "--hybrid"],
                       "--hybrid applies to int8 tflite files")):
        res = CliRunner().invoke(main, ["export", str(run), *args])
        assert res.exit_code in (1, 2) and why in res.output, res.output  # 2: click's own range check


@pytest.mark.slow  # two accuracy-aware searches and their weight-only files: 14 s
def test_max_size_is_recorded_where_no_file_can_meet_it(micro_run, tmp_path):
    """A limit no file can meet (one byte): the weight-only file is built, is over it too (so it
    is not scored), and the chosen file is written with its recipe saying so, in TFLite and ONNX;
    an OpenVINO file converted from the ONNX file says whose size was checked."""
    import importlib.util

    from mri_edge.cli import main
    from mri_edge.backends import read_metadata

    run = tmp_path / "run"
    shutil.copytree(micro_run, run)

    openvino = ["--format", "openvino"] if importlib.util.find_spec("openvino") else []
    res = CliRunner().invoke(main, ["export", str(run), "--format", "onnx", "--format", "tflite", *openvino,
                                    "--quantize", "int8", "--max-drop", "0", "--max-size", "0.000001",
                                    "--calib-size", "16", "--workers", "1"])
    assert res.exit_code == 0, res.output
    if openvino:  # converted from the ONNX file: its choice, but the ONNX file's size is not this file's
        recipe = read_metadata(run / "exports" / "model_int8.xml")["accuracy_aware"]
        assert recipe["size_checked_on"] == "model_int8.onnx" and recipe["max_size_mb"] == 1e-6
        assert "size_mb" not in recipe and "within_size" not in recipe and "weight_only_size_mb" not in recipe
    for name, search in (("model_int8.onnx", "ONNX"), ("model_int8.tflite", "TFLite")):
        recipe = read_metadata(run / "exports" / name)["accuracy_aware"]
        assert recipe["max_size_mb"] == 1e-6 and not recipe["within_size"] and not recipe["weight_only"], name
        assert 0 < recipe["size_mb"] <= (run / "exports" / name).stat().st_size / 1e6, name
        assert not any(st.get("weight_only") for st in recipe["steps"]), name  # over the limit too: not scored
        line = next(x for x in res.output.splitlines() if f"int8 {search} search: {WEIGHT_ONLY_LINE}, " in x)
        assert "MB, for --max-size 1e-06 MB" in line and line.endswith(": over the limit too (not scored)"), line
        assert 0 < recipe["weight_only_size_mb"] < recipe["size_mb"], name
        assert any(line.strip().startswith(f"{name}:") and line.endswith("over --max-size 1e-06 MB)")
                   for line in res.output.splitlines()), res.output


WEIGHT_ONLY_LINE = "weight-only int8 (every operation in float, weights int8)"


def two_stage_graph(monkeypatch) -> tuple[np.ndarray, object]:
    """`tflite_accuracy_aware`'s graph replaced by two stages, conv1 (node "c1", cheap) and conv2
    ("c2"), and ten held-out images of two classes that Keras gets right: (labels, held)."""
    from mri_edge.export import accuracy, tflite

    stages = {"conv1": {"nodes": ["c1"], "mac_share": 0.1, "param_share": 0.1, "cost": 0.1},
              "conv2": {"nodes": ["c2"], "mac_share": 0.5, "param_share": 0.5, "cost": 0.5}}
    monkeypatch.setattr(tflite, "tflite_stages", lambda calibrated: stages)
    labels = np.arange(10) % 2
    return labels, accuracy.HeldOut(np.zeros((10, 2, 2, 3), np.uint8), np.eye(2)[labels], labels)


def sized_candidates(labels: np.ndarray, flips_weight_only: int, c1_holds: bool = True):
    """A fake TFLite quantizer, weight store and interpreter whose files are bytes of a known
    size: 1000 bytes per node kept in float (float32 weights), 50 for a weight-only file; the
    answers hold only with conv1 ("c1") in float (or not at all), and the weight-only file flips as told."""
    def pack(nodes, weights: str) -> bytes:
        body = f"{'|'.join(nodes)}:{weights}".encode()
        return body.ljust(50 if weights == "int8" else 100 + 1000 * len(nodes))

    def unpack(fb: bytes) -> tuple[list[str], str]:
        nodes, weights = fb.rstrip().decode().split(":")
        return nodes.split("|") if nodes else [], weights

    def probs(fb, x=None):
        nodes, weights = unpack(fb)
        if weights == "int8":
            wrong = flips_weight_only
        else:
            wrong = 0 if "c1" in nodes and c1_holds else 3
        return np.eye(2)[(labels + (np.arange(10) < wrong)) % 2]

    return (lambda nodes: pack(nodes, "fp32")), (lambda fb, w: pack(unpack(fb)[0], w)), probs


@pytest.mark.parametrize("max_size, flips_weight_only, written", [(0.01, 0, "chosen"), (0.0005, 0, "weight-only"),
                                                                   (0.0005, 1, "chosen"), (0.00001, 0, "chosen")])
def test_a_file_over_max_size_gives_way_to_the_weight_only_file(monkeypatch, max_size, flips_weight_only, written):
    """conv1 in float holds the budget at 1100 bytes; under a smaller limit the weight-only file
    (50 bytes) replaces it when it holds the budget and the limit, and its recipe says what it
    replaced; otherwise the chosen file is written, marked over the limit."""
    from mri_edge.export import tflite

    labels, held = two_stage_graph(monkeypatch)
    quantize, store, probs = sized_candidates(labels, flips_weight_only)
    fb, recipe = tflite.tflite_accuracy_aware(b"", quantize, store, held, 5.0, probs, float_weights="fp32",
                                              max_size_mb=max_size)
    tried = [st for st in recipe["steps"] if st.get("weight_only")]
    # measured only for a file over the limit, and only when the weight-only file (50 bytes) is under it
    assert len(tried) == (0.00005 <= max_size < 0.0011)
    assert ("weight_only_size_mb" in recipe) == (max_size < 0.00005)
    assert recipe["size_mb"] == len(fb) / 1e6 and recipe["max_size_mb"] == max_size
    if written == "weight-only":
        assert recipe["weight_only"] and recipe["float_weights"] == "int8" and recipe["within_size"] and len(fb) == 50
        assert recipe["instead_of"] == {"float_stages": ["conv1"], "float_weights": "fp32", "size_mb": 0.0011,
                                        "held_out_agreement": 1.0}
        assert recipe["within_budget"] and recipe["held_out_agreement"] == 1.0
    else:
        assert recipe["float_stages"] == ["conv1"] and not recipe["weight_only"] and len(fb) == 1100
        assert recipe["within_size"] == (max_size >= 0.0011) and "instead_of" not in recipe


def test_a_weight_only_file_the_search_chose_is_not_measured_again_for_max_size(monkeypatch):
    """Nothing with int8 compute holds, so the search's last resort is the weight-only file; over
    the limit, within_size keeps it (it is the smallest) without scoring it a second time."""
    from mri_edge.export import tflite

    labels, held = two_stage_graph(monkeypatch)
    quantize, store, probs = sized_candidates(labels, 0, c1_holds=False)
    fb, recipe = tflite.tflite_accuracy_aware(b"", quantize, store, held, 5.0, probs, float_weights="int8",
                                              max_size_mb=0.00001)
    assert recipe["weight_only"] and len(fb) == 50 and recipe["within_budget"]
    assert recipe["within_size"] is False and "instead_of" not in recipe
    assert sum(bool(st.get("weight_only")) for st in recipe["steps"]) == 1


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


def test_a_relu_folded_by_the_quantizer_is_compared_after_the_relu(tmp_path):
    """onnxruntime's QDQ quantizer drops a Relu after a Conv (the QuantizeLinear clamps at zero)
    and the Relu's output name then holds the Conv's output: compared as it is, every Relu of
    DenseNet showed a relative error near 1."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    from mri_edge.export.debug import onnx_layer_errors

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Transpose", ["image"], ["nchw"], perm=[0, 3, 1, 2]),
         helper.make_node("Conv", ["nchw", "w"], ["conv"], pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["conv"], ["relu"]),
         helper.make_node("GlobalAveragePool", ["relu"], ["pool"]),
         helper.make_node("Flatten", ["pool"], ["probabilities"])],
        "g", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 8, 8, 3])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [1, 4])], [w])
    fp32, int8 = tmp_path / "f.onnx", tmp_path / "q.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), fp32)
    x = rng.uniform(0, 1, (8, 8, 8, 3)).astype(np.float32)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(x)

        def get_next(self):
            v = next(self.it, None)
            return None if v is None else {"image": v[None]}

    quantize_static(str(fp32), str(int8), Reader(), quant_format=QuantFormat.QDQ)
    assert "Relu" not in {n.op_type for n in onnx.load(int8).graph.node}  # folded, the case at hand
    rows = {r["tensor"]: r for r in onnx_layer_errors(fp32, int8, x, np.zeros(8, int), tmp_path, n=8)["tensors"]}
    assert rows["relu"]["relative_error"] < 0.1, rows["relu"]  # 0.51 when compared before the Relu


@pytest.mark.slow  # four exports (14 s): the fast tier stays under 2 minutes on 2 cores
def test_float_head_keeps_float_probabilities_out_of_int8_files(micro_run, tmp_path):
    from mri_edge.cli import main
    from mri_edge.backends import open_model

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
    # the head's dense weights are stored as float16 behind a DEQUANTIZE (--float-weights fp16)
    tfl = open_model(run / "exports" / "model_int8.tflite")
    assert tfl.meta["float_weights"] == "fp16"
    assert [d["shape"][0] for d in tfl.interp.get_tensor_details() if d["dtype"] == np.float16] == [4]
    import onnx  # and the ONNX file's, behind a Cast

    proto = onnx.load(str(run / "exports" / "model_int8.onnx"))
    assert open_model(run / "exports" / "model_int8.onnx").meta["float_weights"] == "fp16"
    assert [t.dims[-1] for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16] == [4]  # MatMul
    res = CliRunner().invoke(main, ["export", str(run), "--format", "openvino", "--float-head"])
    assert res.exit_code == 1 and "--float-head applies to int8" in res.output
    res = CliRunner().invoke(main, ["export", str(run), "--format", "tflite", "--float-weights", "int8"])
    assert res.exit_code == 1 and "add --float-head or --max-drop" in res.output


def test_openvino_int8_from_the_int8_onnx_file(micro_run, tmp_path):
    pytest.importorskip("openvino")
    from mri_edge.cli import main
    from mri_edge.backends import open_model

    run = tmp_path / "run"
    shutil.copytree(micro_run, run)
    res = CliRunner().invoke(main, ["export", str(run), "--format", "openvino", "--quantize", "int8",
                                    "--openvino-int8", "onnx"])
    assert res.exit_code == 1 and "plan it too (--format onnx --quantize int8)" in res.output
    # auto (the default): from the int8 ONNX file, as it is planned too
    res = CliRunner().invoke(main, ["export", str(run), "--format", "onnx", "--format", "openvino", "--quantize",
                                    "int8", "--float-head", "--calib-size", "16"])
    assert res.exit_code == 0, res.output
    onnx_file, ov_file = (open_model(run / "exports" / n) for n in ("model_int8.onnx", "model_int8.xml"))
    assert ov_file.meta["int8_from"].startswith("model_int8.onnx") and ov_file.meta["float_head"] is True
    assert ov_file.meta["weight_bits"] == 7 and "calibration_range" in onnx_file.meta
    x = np.random.default_rng(0).integers(0, 256, (6, *onnx_file.meta["input_size"], 3)).astype(np.float32)
    # the same int8 graph on two runtimes: the same answers, probabilities within int8 rounding
    a, b = onnx_file.run(x), ov_file.run(x)
    assert (a.argmax(1) == b.argmax(1)).all() and np.abs(a - b).max() < 0.05
    # the head's float16 weights: OpenVINO folds their Casts into float32 constants
    from mri_edge.export.onnx import FP16_AS_FP32

    assert onnx_file.meta["float_weights"] == "fp16" and ov_file.meta["float_weights"] == FP16_AS_FP32
    # run's chunks (3 x 24 for 70 images) compile once per batch size, and later calls reuse them
    many = np.concatenate([x] * 12)[:70]
    first = ov_file.run(many)
    compiled = dict(ov_file._requests)
    assert sorted(compiled) == [6, 24] and np.allclose(ov_file.run(many), first)
    assert all(ov_file._requests[k] is compiled[k] for k in compiled)
    # an int8 ONNX file exported again alone leaves the OpenVINO file converted from the old one: said
    res = CliRunner().invoke(main, ["export", str(run), "--format", "onnx", "--quantize", "int8", "--calib-size", "16"])
    assert res.exit_code == 0 and "model_int8.xml was converted from the model_int8.onnx this export" in res.output
    res = CliRunner().invoke(main, ["export", str(run), "--format", "openvino", "--quantize", "int8",
                                    "--calib-size", "16"])  # auto without an int8 ONNX file: NNCF
    assert res.exit_code == 0, res.output
    assert "int8_from" not in open_model(run / "exports" / "model_int8.xml").meta


def test_weights_of_float_operations_are_stored_as_fp16_or_int8_and_run_the_same():
    """store_float_weights: each float conv/dense weight behind a DEQUANTIZE, the graph's
    answers within the storage's rounding, under XNNPACK and the built-in kernels alike."""
    import keras
    import tensorflow as tf

    from mri_edge.export.formats import ExportError
    from mri_edge.export.rewrite import store_float_weights
    from mri_edge.interpreters import load_interpreter_class, no_delegate_resolver

    keras.utils.set_random_seed(0)
    inp = keras.Input((16, 16, 3), batch_size=1)
    x = keras.layers.Conv2D(32, 3, activation="relu")(inp)
    x = keras.layers.DepthwiseConv2D(1)(x)  # one value per channel: stays float32 as int8
    x = keras.layers.DepthwiseConv2D(5, padding="same")(x)  # 25 per channel: int8 along axis 3
    x = keras.layers.Conv2D(32, 3, activation="relu")(x)
    out = keras.layers.Dense(4)(keras.layers.GlobalAveragePooling2D()(x))
    fb = tf.lite.TFLiteConverter.from_keras_model(keras.Model(inp, out)).convert()
    xs = np.random.default_rng(0).normal(size=(5, 16, 16, 3)).astype(np.float32)
    cls = load_interpreter_class()[0]

    def run(model: bytes, **kw) -> tuple[np.ndarray, list[str]]:
        interp = cls(model_content=model, **kw)
        interp.allocate_tensors()
        i, o = interp.get_input_details()[0]["index"], interp.get_output_details()[0]["index"]
        ys = []
        for v in xs:
            interp.set_tensor(i, v[None])
            interp.invoke()
            ys.append(interp.get_tensor(o)[0].copy())
        return np.array(ys), [op["op_name"] for op in interp._get_ops_details()]

    ref, ops = run(fb)
    assert "DEQUANTIZE" not in ops
    fp16, int8 = store_float_weights(fb, "fp16"), store_float_weights(fb, "int8")
    assert len(int8) < len(fp16) < len(fb) - 4000  # 13.7 kB of float32 conv weights
    scale = np.abs(ref).max()
    for model, dequantized, tol in ((fp16, 5, 2e-3), (int8, 4, 3e-2)):  # int8: the 1x32 depthwise stays float32
        for kw in ({}, {"experimental_op_resolver_type": no_delegate_resolver(cls)}):
            y, ops = run(model, **kw)
            assert np.abs(y - ref).max() < tol * scale, (tol, kw)
            assert np.abs(y - ref).max() > 0  # the weights were rounded: not the float32 graph
        assert ops.count("DEQUANTIZE") == dequantized
    assert np.abs(run(int8)[0] - ref).max() > np.abs(run(fp16)[0] - ref).max()
    # dynamic (a benchmark's variant): conv and dense weights int8 with no DEQUANTIZE (hybrid
    # operations), the depthwise ones fp16 behind one; activations rounded too, so looser
    y, ops = run(store_float_weights(fb, "dynamic"))
    assert ops.count("DEQUANTIZE") == 2
    assert np.abs(run(int8)[0] - ref).max() < np.abs(y - ref).max() < 3e-2 * scale
    with pytest.raises(ExportError, match="fp16, int8 or dynamic"):
        store_float_weights(fb, "int4")

    # a buffer shared by two weight tensors (the converter deduplicates constants) stays for
    # the second after the first is rewritten; the conversion metadata buffers stay too
    from tensorflow.lite.tools import flatbuffer_utils

    depthwise = [t for t in flatbuffer_utils.convert_bytearray_to_object(int8).subgraphs[0].tensors
                 if t.name.endswith(b"/int8") and list(t.shape) == [1, 5, 5, 32]]
    assert len(depthwise) == 1 and depthwise[0].quantization.quantizedDimension == 3
    assert len(depthwise[0].quantization.scale) == 32
    m = flatbuffer_utils.convert_bytearray_to_object(fb)
    sg = m.subgraphs[0]
    w = sg.tensors[sg.operators[-3].inputs[1]]  # the second Conv2D's weights
    twin = flatbuffer_utils.convert_bytearray_to_object(fb).subgraphs[0].tensors[0]
    twin.name, twin.shape, twin.type, twin.buffer, twin.quantization = b"twin", w.shape, w.type, w.buffer, None
    sg.tensors.append(twin)  # an unused tensor on the same buffer
    rewritten = flatbuffer_utils.convert_bytearray_to_object(
        store_float_weights(bytes(flatbuffer_utils.convert_object_to_bytearray(m)), "fp16"))
    assert len(rewritten.buffers[w.buffer].data) == 4 * int(np.prod(w.shape))
    assert all(len(rewritten.buffers[e.buffer].data) for e in rewritten.metadata or [])
    # DEQUANTIZE of per-channel int8 (version 5) needs LiteRT/TFLite 2.7.0: the file says so
    version = {e.name: bytes(m.buffers[e.buffer].data).rstrip(b"\0") for m in
               [flatbuffer_utils.convert_bytearray_to_object(int8)] for e in m.metadata}[b"min_runtime_version"]
    assert version == b"2.7.0"

    # hybrid (export --hybrid): the named convolution reads its int8 weights directly (no
    # DEQUANTIZE: LiteRT's hybrid kernel quantizes its input per image); fp32 leaves the rest as it is
    first_conv = next(d for d in cls(model_content=fb)._get_ops_details() if d["op_name"] == "CONV_2D")
    name = {t["index"]: t["name"] for t in cls(model_content=fb).get_tensor_details()}[first_conv["outputs"][0]]
    for dtype, dequantized in (("fp32", 0), ("int8", 3)):
        hybrid = store_float_weights(fb, dtype, hybrid=[name])
        y, ops = run(hybrid)
        assert ops.count("DEQUANTIZE") == dequantized, dtype
        assert 0 < np.abs(y - ref).max() < 3e-2 * scale, dtype
        # the hybrid convolution under its own opcode, CONV_2D version 5 (LiteRT 2.4.0), as the
        # converter writes for dynamic-range files; the float one keeps version 1
        m = flatbuffer_utils.convert_bytearray_to_object(hybrid)
        sg = m.subgraphs[0]
        versions = sorted((m.operatorCodes[op.opcodeIndex].version, sg.tensors[op.inputs[1]].type)
                          for op in sg.operators if m.operatorCodes[op.opcodeIndex].builtinCode == 3)  # CONV_2D
        assert versions == [(1, 0), (5, 9)], dtype  # (version, FLOAT32 / INT8 weights)
        assert len(m.operatorCodes) == len({op.opcodeIndex for op in sg.operators})  # none left unused
        assert {e.name: bytes(m.buffers[e.buffer].data).rstrip(b"\0") for e in m.metadata}[
            b"min_runtime_version"] == (b"2.7.0" if dtype == "int8" else b"2.4.0"), dtype
    # 864 weights: 3.5 kB as float32, 0.9 kB as int8 plus its per-channel scales
    assert len(store_float_weights(fb, "fp32", hybrid=[name])) < len(fb) - 1500
    with pytest.raises(ExportError, match="fp16, int8 or dynamic"):
        store_float_weights(fb, "fp32")  # nothing to do without hybrid operations


def test_hybrid_runs_float_stages_as_dynamic_range_int8_only_within_budget(monkeypatch):
    """--hybrid: after the search and the weights' storage, each float stage with compute is
    tried as dynamic-range int8, the most multiply-adds first (never the head), and kept so only
    if the file still holds the budget; a stage whose file comes out unchanged is skipped. The
    recipe's held-out figures are the written file's, and export's line says which stages run so."""
    from mri_edge.export import accuracy, pool, tflite

    stages = {"head": {"nodes": ["h"], "mac_share": 0.001, "param_share": 0.05, "cost": 0.05},
              "conv1": {"nodes": ["c1"], "mac_share": 0.1, "param_share": 0.1, "cost": 0.1},
              "conv2": {"nodes": ["c2"], "mac_share": 0.5, "param_share": 0.4, "cost": 0.5},
              "conv3": {"nodes": ["c3"], "mac_share": 0.3, "param_share": 0.3, "cost": 0.3}}
    monkeypatch.setattr(tflite, "tflite_stages", lambda calibrated: stages)
    labels = np.arange(100) % 2
    images = np.zeros((100, 2, 2, 3), np.uint8)
    images[:, 0, 0, 0] = np.arange(100)  # each image says which it is: a score may run only some
    held = accuracy.HeldOut(images, np.eye(2)[labels] * 0.9 + 0.05, labels)

    def quantize(nodes):
        return ("|".join(sorted(nodes)) + ":fp32:").encode()

    def store(fb, weights, hybrid=()):  # conv3 has nothing a hybrid kernel runs: the rewrite leaves it
        return f"{fb.decode().split(':')[0]}:{weights}:{'|'.join(n for n in hybrid if n != 'c3')}".encode()

    def probs(fb, x=None):  # holds with conv1-conv3 out of static int8; conv2 hybrid flips 1 of 100, conv1 30
        nodes, _, hybrid = fb.decode().split(":")
        nodes, hybrid = nodes.split("|"), hybrid.split("|")
        wrong = 0 if {"c1", "c2", "c3"} <= set(nodes) else 40
        wrong = max(wrong, 30 if "c1" in hybrid else 1 if "c2" in hybrid else 0)
        idx = (held.x if x is None else x)[:, 0, 0, 0].astype(int)
        return np.eye(2)[(labels[idx] + (idx < wrong)) % 2]

    fb, recipe = tflite.tflite_accuracy_aware(b"", quantize, store, held, 10.0, probs, float_head=True,
                                              float_weights="int8", hybrid=True)
    assert sorted(recipe["float_stages"]) == ["conv1", "conv2", "conv3", "head"] and recipe["within_budget"]
    checks = recipe["hybrid_checks"]
    assert [c["hybrid_stages"] for c in checks] == [["conv2"], ["conv2", "conv3"], ["conv2", "conv1"]]
    assert [c.get("within_budget") for c in checks] == [True, None, False] and "skipped" in checks[1]
    assert recipe["hybrid_stages"] == ["conv2"] and recipe["hybrid_mac_share"] == 0.5
    assert fb == b"c1|c2|c3|h:int8:c2" and recipe["size_mb"] == len(fb) / 1e6
    assert recipe["held_out_agreement"] == checks[0]["agreement"] == 0.99  # the written file's score
    assert pool.float_parts(recipe).startswith("in float: head, conv1, conv3; dynamic-range int8: conv2 (99.00%")
    _, plain = tflite.tflite_accuracy_aware(b"", quantize, store, held, 10.0, probs, float_head=True,
                                            float_weights="int8")
    assert "hybrid_stages" not in plain and plain["held_out_agreement"] == 1.0  # off unless asked
    # nothing to try on a weight-only or over-budget file: said in the recipe, nothing built
    for out, why in (({"weight_only": True, "within_budget": True}, "weight-only"),
                     ({"weight_only": False, "within_budget": False}, "over budget")):
        assert accuracy.hybrid_step(out, b"file", stages, 10.0, None, None)[0] is None
        assert out["hybrid_stages"] == [] and why in out["hybrid_skipped"]


@pytest.mark.parametrize("fp16_flips, stored", [(0, "fp16"), (1, "fp32")])
def test_stages_are_chosen_with_float32_weights_and_stored_smaller_only_within_budget(monkeypatch, fp16_flips, stored):
    """The search never sees rounded weights; the chosen file keeps fp16 weights only if that
    file is still within the budget on held-out images."""
    from mri_edge.export import tflite

    labels, held = two_stage_graph(monkeypatch)
    built, stores = [], []

    def quantize(nodes):
        built.append(tuple(nodes))
        return (tuple(nodes), "fp32")

    def store(candidate, weights):  # a rewrite of the file already built, not a new quantization
        stores.append((candidate, weights))
        return (candidate[0], weights)

    def probs(candidate, x=None):
        nodes, weights = candidate
        wrong = 0 if "c1" in nodes else 3  # conv1 in float is all it takes
        wrong += fp16_flips if weights == "fp16" else 0
        return np.eye(2)[(labels + (np.arange(10) < wrong)) % 2]

    fb, recipe = tflite.tflite_accuracy_aware(b"", quantize, store, held, 5.0, probs, float_weights="fp16")
    assert len(built) == len(set(built)) and stores == [((("c1",), "fp32"), "fp16")]
    assert recipe["float_stages"] == ["conv1"] and recipe["float_weights"] == stored
    assert fb == (("c1",), stored) and recipe["float_weights_check"]["within_budget"] == (stored == "fp16")


@pytest.mark.parametrize("flips, stored", [({"int8": 0, "fp16": 0}, "int8"), ({"int8": 1, "fp16": 0}, "fp16"),
                                           ({"int8": 1, "fp16": 1}, "fp32")])
def test_int8_weights_that_leave_the_budget_give_way_to_fp16(monkeypatch, flips, stored):
    from mri_edge.export import tflite

    labels, held = two_stage_graph(monkeypatch)

    def probs(candidate, x=None):
        nodes, weights = candidate
        wrong = (0 if "c1" in nodes else 3) + flips.get(weights, 0)
        return np.eye(2)[(labels + (np.arange(10) < wrong)) % 2]

    fb, recipe = tflite.tflite_accuracy_aware(b"", lambda nodes: (tuple(nodes), "fp32"),
                                                lambda fb, w: (fb[0], w), held, 5.0, probs, float_weights="int8")
    assert fb == (("c1",), stored) and recipe["float_weights"] == stored
    check = recipe["float_weights_check"]
    assert check["weights"] == ("int8" if stored == "int8" else "fp16")
    assert check.get("instead_of", {}).get("weights") == (None if stored == "int8" else "int8")


def test_int8_weights_keep_a_dearer_set_that_holds_with_them_before_fp16(monkeypatch):
    """Halving narrows conv2 to its layer 2, but int8 weights there flip an answer unless layer 1
    is in float too: the file keeps layers 1-2 (within the budget, int8 weights) rather than
    layer 2 with fp16 weights, since int8 weights were asked for the smallest file."""
    from mri_edge.export import accuracy, tflite
    from mri_edge.export.stages import stages_from

    nodes = [("CONV_2D", f"net/conv2_block{i}_1_conv", 10, 10) for i in range(1, 5)] + [
        ("CONV_2D", "net/conv3_block1_1_conv", 40, 40)]
    stages = stages_from(nodes, ("MEAN",))
    monkeypatch.setattr(tflite, "tflite_stages", lambda calibrated: stages)
    labels = np.arange(10) % 2
    held = accuracy.HeldOut(np.zeros((10, 2, 2, 3), np.uint8), np.eye(2)[labels], labels)

    def probs(candidate, x=None):
        in_float, weights = candidate
        wrong = 0 if "net/conv2_block2_1_conv" in in_float else 3
        wrong += weights == "int8" and "net/conv2_block1_1_conv" not in in_float
        return np.eye(2)[(labels + (np.arange(10) < wrong)) % 2]

    fb, recipe = tflite.tflite_accuracy_aware(b"", lambda nodes: (tuple(nodes), "fp32"),
                                                lambda fb, w: (fb[0], w), held, 5.0, probs, float_weights="int8")
    assert recipe["float_stages"] == ["conv2.1-2"] and recipe["float_weights"] == "int8"
    assert fb == (("net/conv2_block1_1_conv", "net/conv2_block2_1_conv"), "int8")
    check = recipe["float_weights_check"]
    assert check["within_budget"] and check["instead_of"]["weights"] == "int8" and not check["instead_of"]["within_budget"]
    assert any(st["float_stages"] == ["conv2.2"] for st in recipe["steps"])  # the cheaper set was found first


def test_weight_only_int8_is_the_last_resort_before_going_over_budget():
    """With weight_only given, a search that finds no file with int8 compute inside the budget
    tries every operation in float with int8 weights, and takes it if that holds; it is never
    built when a cheaper candidate holds, and never kept over budget."""
    from mri_edge.export.accuracy import stage_search, within

    stages = {"conv2": {"nodes": ["a"], "mac_share": 0.6, "param_share": 0.3, "cost": 0.6},
              "conv3": {"nodes": ["b"], "mac_share": 0.4, "param_share": 0.7, "cost": 0.7}}
    built = []

    def attempt(kept, mode="full"):  # each block in float gains 0.02: only all-float (0.99) reaches 0.995 - never
        return {"agreement": 0.95 + 0.02 * len(kept), "accuracy": 0.9, "accuracy_drop_pts": 0.0}, list(kept)

    def weight_only(agreement):
        def build(mode="early"):
            built.append(agreement)
            return {"agreement": agreement, "accuracy": 0.9, "accuracy_drop_pts": 0.0}, "weight-only file"
        return build

    chosen, cand, steps = stage_search(stages, attempt, 0.5, [], weight_only(0.998))
    assert cand == "weight-only file" and chosen["weight_only"] and within(chosen, 0.5)
    assert chosen["float_param_share"] == 0.0 and abs(chosen["float_mac_share"] - 1.0) < 1e-9
    assert steps[-1] == chosen and built == [0.998]  # measured once, last
    # over budget it is never the fallback, even with the best quality of all (0.993 against 0.97)
    chosen, cand, _ = stage_search(stages, attempt, 0.5, [], weight_only(0.993))
    assert cand != "weight-only file" and not within(chosen, 0.5) and built[-1] == 0.993
    assert sorted(cand) == ["conv2"]  # the best candidate with int8 compute (conv3 in int8)
    # not needed: a file with int8 compute holds the budget, and no weight-only file is built
    chosen, cand, _ = stage_search(stages, attempt, 3.0, [], weight_only(0.998))
    assert cand != "weight-only file" and not chosen.get("weight_only") and built == [0.998, 0.993]


def test_float16_weights_of_a_quantized_onnx_file_fold_at_load(tmp_path):
    """onnx_store_weights (fp16): only the float32 weights (the operations kept in float; an int8
    weight behind its DequantizeLinear stays) become float16 behind a Cast, which onnxruntime
    folds into a float32 weight when it loads the file: no Cast runs per call."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from mri_edge.export.formats import ExportError
    from mri_edge.export.rewrite import onnx_store_weights

    rng = np.random.default_rng(1)
    w_q = rng.integers(-127, 128, (6, 3, 3, 3)).astype(np.int8)
    w_gemm = rng.normal(0, 0.3, (4, 6)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["wq", "s", "z"], ["wc"], axis=0),
         helper.make_node("Conv", ["x", "wc"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["r"]),
         helper.make_node("GlobalAveragePool", ["r"], ["g"]), helper.make_node("Flatten", ["g"], ["f"]),
         helper.make_node("Gemm", ["f", "wg"], ["y"], transB=1)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])],
        [numpy_helper.from_array(w_q, "wq"), numpy_helper.from_array(np.full(6, 0.01, np.float32), "s"),
         numpy_helper.from_array(np.zeros(6, np.int8), "z"), numpy_helper.from_array(w_gemm, "wg")])
    src, dst = tmp_path / "mixed.onnx", tmp_path / "fp16.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(src))
    assert onnx_store_weights(src, dst, "fp16") == 1
    stored = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(dst)).graph.initializer}
    assert stored["wg_fp16"].dtype == np.float16 and stored["wq"].dtype == np.int8 and "wg" not in stored
    x = rng.normal(0, 1, (5, 3, 8, 8)).astype(np.float32)
    ref = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "as_run.onnx")
    out = ort.InferenceSession(str(dst), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.abs(out - ref).max() < 1e-3 * np.abs(ref).max()
    assert "Cast" not in {n.op_type for n in onnx.load(str(tmp_path / "as_run.onnx")).graph.node}
    with pytest.raises(ExportError, match="fp16 or int8"):
        onnx_store_weights(src, dst, "fp32")


def test_weight_only_onnx_stores_int8_weights_and_runs_like_the_float_file(tmp_path):
    """onnx_store_weights (int8): each Conv/Gemm/MatMul weight int8 per output channel behind a
    DequantizeLinear, the same answers as the float file; the runtime folds them at load."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from mri_edge.export.rewrite import onnx_store_weights

    rng = np.random.default_rng(0)
    w_conv = rng.normal(0, 0.3, (6, 3, 3, 3)).astype(np.float32) * rng.uniform(0.01, 1, (6, 1, 1, 1)).astype(np.float32)
    w_gemm = rng.normal(0, 0.3, (4, 6)).astype(np.float32)  # transB=1: rows are the outputs
    w_mm = rng.normal(0, 0.3, (4, 3)).astype(np.float32)  # MatMul: columns are the outputs
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "wc"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["r"]),
         helper.make_node("GlobalAveragePool", ["r"], ["g"]), helper.make_node("Flatten", ["g"], ["f"]),
         helper.make_node("Gemm", ["f", "wg"], ["h"], transB=1), helper.make_node("MatMul", ["h", "wm"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])],
        [numpy_helper.from_array(w, n) for w, n in ((w_conv, "wc"), (w_gemm, "wg"), (w_mm, "wm"))])
    src, dst = tmp_path / "float.onnx", tmp_path / "weight_only.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(src))
    assert onnx_store_weights(src, dst, "int8") == 3
    proto = onnx.load(str(dst))
    dq = {n.output[0]: n for n in proto.graph.node if n.op_type == "DequantizeLinear"}
    assert {k: v.attribute[0].i for k, v in dq.items()} == {"wc": 0, "wg": 0, "wm": 1}
    stored = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    assert all(stored[f"{k}_int8"].dtype == np.int8 for k in dq) and not {"wc", "wg", "wm"} & set(stored)
    assert np.abs(stored["wc_int8"]).reshape(6, -1).max(1).tolist() == [127] * 6  # each channel its own scale
    x = rng.normal(0, 1, (5, 3, 8, 8)).astype(np.float32)
    ref = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    so = ort.SessionOptions()
    so.add_session_config_entry("session.disable_quant_qdq", "1")  # as onnx_model.OnnxModel runs such a file
    so.optimized_model_filepath = str(tmp_path / "as_run.onnx")
    for opts in (ort.SessionOptions(), so):  # folded at load or dequantized per call: the same numbers
        out = ort.InferenceSession(str(dst), opts, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        assert np.abs(out - ref).max() < 0.02 * np.abs(ref).max()
    # with QDQ fusions off, onnxruntime folds every DequantizeLinear into a float32 weight at load
    assert "DequantizeLinear" not in {n.op_type for n in onnx.load(str(tmp_path / "as_run.onnx")).graph.node}


def test_an_export_that_only_weight_only_int8_holds_writes_that_file(micro_run, tmp_path, monkeypatch):
    """End to end, in-process (--workers 1), with the budget made to hold for the weight-only
    candidate alone: both files record it, the ONNX file runs with its weight dequantization
    folded at load, and both answer as the Keras model does."""
    from mri_edge import data
    from mri_edge.cli import main
    from mri_edge.export import accuracy
    from mri_edge.run import RunFolder
    from mri_edge.backends import open_model

    monkeypatch.setattr(accuracy, "within", lambda score, max_drop_pts: bool(score.get("weight_only")))
    run = tmp_path / "run"
    shutil.copytree(micro_run, run)
    import importlib.util

    names = ["model_int8.onnx", "model_int8.tflite"] + (["model_int8.xml"] if importlib.util.find_spec("openvino") else [])
    formats = [a for n in names for a in ("--format", {".onnx": "onnx", ".tflite": "tflite", ".xml": "openvino"}[
        Path(n).suffix])]
    res = CliRunner().invoke(main, ["export", str(run), *formats, "--quantize", "int8", "--max-drop", "0.5",
                                    "--float-weights", "int8", "--calib-size", "16", "--workers", "1"])
    assert res.exit_code == 0, res.output
    rows = [line for line in res.output.splitlines() if line.startswith("| model_int8")]  # export's table
    assert len(rows) == len(names) and all("every operation (weight-only int8: int8 weights, float compute)" in r and "weights int8" in r
                                           for r in rows), res.output
    keras = open_model(run / "model.keras")
    m = RunFolder(run).manifest()
    imgs = data.decode_images(keras, m["root"], [r for r, _ in m["splits"]["test"]], "test images")
    ref = keras.run(imgs)
    for name in names:  # the same metadata in every format (OpenVINO's converted from the ONNX file)
        f = open_model(run / "exports" / name)
        recipe = f.meta["accuracy_aware"]
        assert f.meta["weight_only"] is True and recipe["weight_only"] and recipe["float_param_share"] == 0.0, name
        assert f.meta["float_weights"] == recipe["float_weights"] == "int8", name
        assert f.meta["calibration_range"].startswith("none") and "calibration_images" not in f.meta, name
        assert (f.run(imgs).argmax(1) == ref.argmax(1)).all(), name
    onnx_file = open_model(run / "exports" / "model_int8.onnx")
    assert onnx_file.meta["weight_bits"] == 8 and onnx_file.meta["accuracy_aware"]["steps"][-1]["int8_weights"] > 0
    assert onnx_file.sess.get_session_options().get_session_config_entry("session.disable_quant_qdq") == "1"
    assert "QuantizeLinear" not in {n.op_type for n in __import__("onnx").load(
        str(run / "exports" / "model_int8.onnx")).graph.node}  # no int8 activations anywhere


def test_the_candidates_of_one_onnx_search_share_one_range_pass(micro_run, tmp_path, monkeypatch):
    """The activation ranges do not depend on what stays in float: onnx_int8 computes them once
    per `ranges` path, and a file made from the kept ranges is the file made from fresh ones."""
    import onnx

    from mri_edge.export import onnx as onnx_backend

    calls = []
    real = onnx_backend.onnx_ranges
    monkeypatch.setattr(onnx_backend, "onnx_ranges", lambda *a, **k: calls.append(1) or real(*a, **k))
    calib = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3)).astype(np.uint8)
    src, ranges = micro_run / "exports" / "model_fp32.onnx", tmp_path / "ranges.json"
    for name, kept in (("a", ranges), ("b", ranges), ("fresh", None)):
        onnx_backend.onnx_int8(src, tmp_path / f"{name}.onnx", calib, workdir=tmp_path, ranges=kept)
    assert len(calls) == 2 and ranges.is_file()  # "b" reused what "a" computed
    init = [{t.name: t.SerializeToString() for t in onnx.load(str(tmp_path / f"{n}.onnx")).graph.initializer}
            for n in ("b", "fresh")]
    assert init[0] == init[1]


def test_openvino_max_drop_without_an_int8_onnx_file_uses_nncf_accuracy_control(micro_run, tmp_path):
    """`--format openvino --max-drop` alone: NNCF's accuracy control, scored on the held-out
    images as the other formats are, its recipe (operations reverted) in the file's metadata."""
    pytest.importorskip("nncf")
    from mri_edge.cli import main
    from mri_edge.backends import open_model

    run = tmp_path / "run"
    shutil.copytree(micro_run, run)
    res = CliRunner().invoke(main, ["export", str(run), "--format", "openvino", "--quantize", "int8",
                                    "--max-drop", "1", "--calib-size", "16", "--workers", "1"])
    assert res.exit_code == 0, res.output
    meta = open_model(run / "exports" / "model_int8.xml").meta
    recipe = meta["accuracy_aware"]
    assert recipe["method"].startswith("NNCF quantize_with_accuracy_control") and "int8_from" not in meta
    assert recipe["held_out_images"] == 4 and recipe["float_nodes"] == len(recipe["float_ops"])
    assert recipe["within_budget"] == (recipe["held_out_agreement"] >= 0.99 and recipe["held_out_accuracy_drop_pts"] <= 1)
    assert "int8 OpenVINO accuracy control: model 2 on 4 held-out images" in res.output  # NNCF's steps, line by line


def test_a_weight_only_file_that_is_all_there_is_gets_a_complete_score():
    """A base that keeps every stage in float leaves the weight-only file as the only file
    with something in int8: over budget it is kept, and its score, stopped early while it
    could still hold the budget, is completed rather than reported as a bound."""
    from mri_edge.export.accuracy import stage_search

    stages = {"head": {"nodes": ["h"], "mac_share": 1.0, "param_share": 1.0, "cost": 1.0}}
    calls = []

    def attempt(kept, mode="full"):
        return {"agreement": 0.99, "accuracy": 0.9, "accuracy_drop_pts": 0.0}, list(kept)

    def weight_only(mode):
        calls.append(mode)
        if mode == "early":
            return {"agreement": 0.98, "accuracy": 0.9, "accuracy_drop_pts": 0.0, "stopped_after": 64}, "stopped"
        return {"agreement": 0.97, "accuracy": 0.9, "accuracy_drop_pts": 0.0}, "complete"

    chosen, cand, steps = stage_search(stages, attempt, 0.5, ["head"], weight_only)
    assert calls == ["early", "full"] and cand == "complete" and chosen["weight_only"]
    assert "stopped_after" not in chosen and chosen["agreement"] == 0.97 and steps[-1] == chosen


def test_over_budget_the_search_keeps_the_best_bound_not_the_best_count():
    """Scores with a flip bound are ranked by it: a candidate with more counted agreement but a
    wider bound loses."""
    from mri_edge.export.accuracy import stage_search, within

    stages = {s: {"nodes": [s], "mac_share": c, "param_share": c, "cost": c} for s, c in (("conv2", 0.5), ("conv3", 0.3))}
    scores = {(): (0.99, 0.03), ("conv2",): (1.0, 0.02), ("conv3",): (0.995, 0.01), ("conv2", "conv3"): (1.0, 0.015)}

    def attempt(kept, mode="full"):
        agreement, bound = scores[tuple(sorted(kept))]
        return {"agreement": agreement, "flip_estimate": bound / 2, "flip_bound": bound, "accuracy": 0.9,
                "accuracy_drop_pts": 0.0}, list(kept)

    chosen, cand, _ = stage_search(stages, attempt, 0.5, [])
    assert cand == ["conv3"] and not within(chosen, 0.5)
