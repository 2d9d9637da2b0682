"""Accuracy-aware int8 (`export --max-drop PTS`): keep the parts of the graph that move
decisions most in float until the int8 file stays within the budget on held-out images: top-1
agreement with the Keras model at least 1 - PTS/100 with 95% confidence (`heldout.flip_estimate`),
and accuracy at most PTS points below the Keras model's. The recipe (what stayed in float, why, what it cost) goes into the file's
metadata.

- OpenVINO: NNCF's `quantize_with_accuracy_control`, which ranks quantized operations by
  their effect on the metric and reverts them one by one (the maintained tool for this;
  `openvino.openvino_accuracy_aware`, scored with this module's `HeldOut` and `quality`).
- TFLite and ONNX: one search over the stages of the graph (stem, dense blocks, head;
  `stage_search`, scored by `Scoring`), through each converter's own way of keeping operations
  in float (the MLIR quantizer's `denylisted_nodes`, `tflite.tflite_accuracy_aware`;
  onnxruntime's `nodes_to_exclude`, `onnx.onnx_accuracy_aware`). NNCF's
  ONNX path is not used: it writes per-channel activation zero points on this graph's
  pooling-as-depthwise convolutions, which onnxruntime cannot run.

Held-out images: the run's validation split with its Keras probabilities and labels (grouped
with `--val-split grouped`, so that they behave like new subjects).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from .heldout import HeldOut, agrees_enough, assured
from .stages import float_cost, halves, whole

WEIGHT_ONLY = "weight-only int8 (every operation in float, weights int8)"
METRIC = "top-1 agreement with Keras (95% lower bound from paired margins and changes) and accuracy drop, validation split"


class Scoring:
    """How `stage_search` scores a candidate, by what the search needs of it (`mode`): "first",
    complete, and the probabilities kept for ranking; "rank", a stage alone
    (`HeldOut.score_moving`); "early", whether it holds the budget, stopping once out of it
    (`HeldOut.score_until`); "full", complete."""

    def __init__(self, held: HeldOut, max_drop_pts: float):
        self.held, self.max_drop_pts, self.first, self.moving = held, max_drop_pts, None, None

    def __call__(self, run: Callable[[np.ndarray], np.ndarray], mode: str) -> dict:
        if mode == "early":
            return self.held.score_until(run, self.max_drop_pts)
        if mode == "rank" and self.first is not None:
            return self.held.score_moving(run, self.first, self.moving)
        probs = run(self.held.x)
        if mode == "first":  # the images a ranking runs, found once
            self.first = np.asarray(probs, np.float32)
            self.moving = self.held.moving(self.first)
        return self.held.score(probs)


def within(score: dict, max_drop_pts: float) -> bool:
    """Inside the budget: `assured` agreement (1 - the 95% flip bound) and accuracy each lose at
    most max_drop_pts points (never a score that stopped early or ranked a stage: only a
    complete score holds)."""
    return (not {"stopped_after", "ranked_on"} & set(score) and agrees_enough(score, max_drop_pts)
            and score["accuracy_drop_pts"] <= max_drop_pts + 1e-9)


def quality(score: dict) -> float:
    """One number for ranking candidates: the worse of `assured` and 1 - accuracy drop."""
    return min(assured(score), 1 - max(0.0, score["accuracy_drop_pts"]) / 100)


def step_cost(step: dict) -> float:
    """float_cost of a measured candidate (a step of `stage_search`)."""
    return float_cost(step["float_mac_share"], step["float_param_share"])


def int8_counts(step: dict) -> bool:
    """Leaves compute or weights in int8 (all stages in float, the weightless input normalisation aside, do not)."""
    return min(step["float_mac_share"], step["float_param_share"]) < 1 - 1e-9


def stage_search(stages: dict[str, dict], attempt: Callable[[list[str], str], tuple[dict, object]], max_drop_pts: float,
                 base: list[str], weight_only: Callable[[str], tuple[dict, object]] | None = None,
                 note: Callable[[str], None] = lambda line: None) -> tuple[dict, object, list[dict]]:
    """The cheapest set of stages kept in float whose candidate is within the budget
    (docs/int8.md). Returns (chosen step, its candidate, every step).

    attempt(kept, mode) builds the candidate with those stages in float and returns (score,
    candidate), scored as `mode` asks (`Scoring`). `base` stays in float in every candidate
    (the head with --float-head). 1: each other stage is ranked alone. 2: stages are added in
    order of quality gained per share of compute or weights given back to float, then those
    that gained nothing alone, cheapest first (their error can be hidden by the others'),
    until the budget holds. 3: each kept stage goes back to int8 in turn, the most expensive
    first, and stays there if the budget still holds. 4: each stage kept in float is narrowed
    to its first dense layer if that alone holds the budget; else it is halved by its dense
    layers (`halves`, which adds the halves to `stages`) while one half alone holds the budget.
    A candidate with all compute and weights in float is no int8 file: it is measured, and step
    3 may start from it, but it is chosen only when nothing else was measured. When nothing
    holds, weight_only(mode) (if given) builds the last resort, every weight int8 and every
    operation float, chosen within budget (or if alone);
    else the best candidate that quantizes something is kept, over budget: scores that stopped
    early or ranked a stage (upper bounds of quality) are completed, best bound first, while
    they could still beat the best complete one."""
    tried: dict[tuple, tuple[dict, object]] = {}
    need = {"rank": 0, "early": 1, "full": 2, "first": 2}  # what each mode needs of level()

    def level(score: dict) -> int:  # what the score can answer: ranking, over budget, everything
        return 0 if "ranked_on" in score else 1 if "stopped_after" in score else 2

    def step(kept: list[str], mode: str = "full") -> tuple[dict, object]:
        have = tried.get(tuple(kept))
        if have is None or level(have[0]) < need[mode]:
            score, cand = attempt(kept, mode)
            note(describe(f"{', '.join(kept) or 'nothing'} in float", score, max_drop_pts))
            tried[tuple(kept)] = ({"float_stages": list(kept), **score,
                                   "float_mac_share": sum(stages[k]["mac_share"] for k in kept),
                                   "float_param_share": sum(stages[k]["param_share"] for k in kept)}, cand)
        st, cand = tried[tuple(kept)]
        return dict(st), cand

    first, cand = step(list(base), "first")
    steps, candidates = [first], [cand]

    def greedy(kept: list[str]) -> dict:  # a step of 2-4: measured (early stop) and recorded
        st, cand = step(kept, "early")
        steps.append(st)
        candidates.append(cand)
        return st

    if not within(first, max_drop_pts):
        alone = {}
        for s in stages:
            if s not in base:
                alone[s] = quality(step(base + [s], "rank")[0]) - quality(first)
        order = sorted((s for s in alone if alone[s] > 0), key=lambda s: -alone[s] / max(stages[s]["cost"], 1e-4))
        order += sorted((s for s in alone if alone[s] <= 0), key=lambda s: stages[s]["cost"])
        kept = list(base)
        for s in order:
            kept.append(s)
            st = greedy(kept)
            st["alone_gain"] = {k: alone[k] for k in kept if k in alone}
            if within(st, max_drop_pts):
                break
        if within(steps[-1], max_drop_pts):  # what a later stage made unnecessary goes back to int8
            for s in sorted((k for k in kept if k not in base), key=lambda k: -stages[k]["cost"]):
                fewer = [k for k in kept if k != s]
                if within(greedy(fewer), max_drop_pts):
                    kept = fewer
            for s in sorted((k for k in kept if k not in base), key=lambda k: -stages[k]["cost"]):
                narrowed = smallest = s
                while parts := halves(stages, smallest):
                    smallest = parts[0]
                # The first dense layer alone, tried first: a part that holds the budget is a
                # complete score, one that does not usually stops early, so when it holds it saves
                # the complete scores of every half between it and the stage.
                trial = [smallest if k == s else k for k in kept]
                if smallest != s and within(greedy(trial), max_drop_pts):
                    kept = trial
                    continue
                while True:  # the first half that holds the budget alone replaces it, then is halved
                    for half in halves(stages, narrowed):
                        trial = [half if k == narrowed else k for k in kept]
                        if within(greedy(trial), max_drop_pts):
                            kept, narrowed = trial, half
                            break
                    else:
                        break

    def eligible() -> tuple[list[int], list[int]]:
        int8 = [i for i, st in enumerate(steps) if int8_counts(st)] or list(range(len(steps)))
        return int8, [i for i in int8 if within(steps[i], max_drop_pts)]

    int8, ok = eligible()
    if not ok and weight_only is not None:
        score, cand = weight_only("early")
        note(describe(WEIGHT_ONLY, score, max_drop_pts))
        steps.append(weight_only_step(stages, score))
        candidates.append(cand)
        int8, ok = eligible()
    cost = [step_cost(st) for st in steps]
    fallback = [i for i in int8 if not steps[i].get("weight_only")] or int8  # weight-only: no int8 compute
    if not ok:  # the fallback is ranked by quality: complete the scores that could still rank first
        best = max((quality(steps[i]) for i in fallback if level(steps[i]) == 2), default=-1.0)
        for i in sorted((i for i in fallback if level(steps[i]) < 2 and not steps[i].get("weight_only")),
                        key=lambda i: -assured(steps[i])):
            if assured(steps[i]) < best:
                break  # an upper bound of its quality, and of every one after it
            gain = {k: v for k, v in steps[i].items() if k == "alone_gain"}
            steps[i], candidates[i] = step(steps[i]["float_stages"])
            steps[i].update(gain)
            best = max(best, quality(steps[i]))
    complete = [i for i in fallback if level(steps[i]) == 2]
    if not ok and not complete:  # only the weight-only file, stopped early: a base that keeps the rest in float
        score, candidates[fallback[-1]] = weight_only("full")
        steps[fallback[-1]] = {**{k: v for k, v in steps[fallback[-1]].items() if k != "stopped_after"}, **score}
        complete = [fallback[-1]]
    chosen = min(ok, key=cost.__getitem__) if ok else max(complete, key=lambda i: quality(steps[i]))
    return steps[chosen], candidates[chosen], steps


def weight_only_step(stages: dict[str, dict], score: dict) -> dict:
    """The search's record of the weight-only candidate: every stage's operations in float, every weight int8."""
    graph = whole(stages)
    return {"float_stages": graph, **score, "weight_only": True,
            "float_mac_share": sum(stages[s]["mac_share"] for s in graph), "float_param_share": 0.0}


def within_size(written: object, out: dict, size_mb: Callable[[object], float], max_size_mb: float | None,
                weight_only: Callable[[str], tuple[dict, object]], steps: list[dict], stages: dict[str, dict],
                held: HeldOut, max_drop_pts: float, note: Callable[[str], None] = lambda line: None
                ) -> tuple[object, dict]:
    """(file, recipe) under `export --max-size`: the file the search chose, its float weights
    stored (`store_weights`), when it is at most max_size_mb; else the weight-only int8 file,
    the smallest the search makes, when that one holds both the budget and the limit; else the
    chosen file, its recipe saying it is over the limit. Sizes are the model's bytes before the
    metadata is added (its own few kB, and calibrate's record: about 0.2 MB for DenseNet121).
    The recipe gets `size_mb`, and with a limit `max_size_mb`, `within_size` and, for a
    weight-only file that replaced the chosen one, what it replaced (`instead_of`). The weight-only
    file is built before it is scored (`weight_only(None)`: no score), and one over the limit
    too is not scored: its size alone rules it out (`weight_only_size_mb` records it)."""
    out["size_mb"] = size_mb(written)
    if max_size_mb is None:
        return written, out
    out.update(max_size_mb=max_size_mb, within_size=out["size_mb"] <= max_size_mb)
    if out["within_size"] or out["weight_only"] or any(st.get("weight_only") for st in steps):
        return written, out  # (a weight-only step the search measured did not hold, or it would be the file)
    size = size_mb(weight_only(None)[1])
    if size > max_size_mb:
        note(f"{WEIGHT_ONLY}, {size:.2f} MB, for --max-size {max_size_mb:g} MB: over the limit too (not scored)")
        out["weight_only_size_mb"] = size
        return written, out
    score, cand = weight_only("early")
    note(describe(f"{WEIGHT_ONLY}, {size:.2f} MB, for --max-size {max_size_mb:g} MB", score, max_drop_pts))
    steps.append({**weight_only_step(stages, score), "size_mb": size})
    if not within(score, max_drop_pts):
        return written, out
    replaced = {k: out[k] for k in ("float_stages", "float_weights", "size_mb", "held_out_agreement") if k in out}
    if out.get("hybrid_stages"):
        replaced["hybrid_stages"] = out["hybrid_stages"]
    out = recipe(out["method"], steps[-1], steps, stages, held, max_drop_pts)
    out.update(size_mb=size, max_size_mb=max_size_mb, within_size=True, instead_of=replaced)
    return cand, out


def accuracy_change(drop_pts: float) -> str:
    """'accuracy +0.19 pts' for a held-out accuracy drop of -0.19 points (never -0.00)."""
    return f"accuracy {0.0 - drop_pts:+.2f} pts"


def flips_text(score: dict) -> str:
    """', flips 0.21% expected (<= 0.41% at 95%)' for a score with a flip estimate (a stopped
    score: ', flips >= 0.52% at 95%', its bound so far; a ranking score: its estimate), else ''."""
    if "flip_bound" not in score:
        return ""
    if "stopped_after" in score:
        return f", flips >= {score['flip_bound']:.2%} at 95%"
    if "ranked_on" in score:  # the first candidate's answers stand in elsewhere: neither a bound nor a rate
        return f", flips {score['flip_estimate']:.2%} expected"
    return f", flips {score['flip_estimate']:.2%} expected (<= {score['flip_bound']:.2%} at 95%)"


def describe(what: str, score: dict, max_drop_pts: float) -> str:
    """One progress line per candidate of the search: what it keeps in float and its score."""
    if "stopped_after" in score:
        return (f"{what}: held-out agreement <= {score['agreement']:.2%}{flips_text(score)} "
                f"(stopped after {score['stopped_after']} images: over budget)")
    if "ranked_on" in score:
        return (f"{what}: held-out agreement <= {score['agreement']:.2%}{flips_text(score)}, "
                f"{accuracy_change(score['accuracy_drop_pts'])} (ranking: run where answers move, "
                f"{score['ranked_on']} images)")
    return (f"{what}: held-out agreement {score['agreement']:.2%}{flips_text(score)}, "
            f"{accuracy_change(score['accuracy_drop_pts'])}, {'within' if within(score, max_drop_pts) else 'over'} budget")


def recipe(method: str, chosen: dict, steps: list[dict], stages: dict[str, dict], held: HeldOut,
           max_drop_pts: float) -> dict:
    """What goes into the file's metadata (`accuracy_aware`) and export's table."""
    graph = set(whole(stages))  # and of the parts the search added, only those chosen
    return {"method": method, "max_drop_pts": max_drop_pts, "held_out_images": int(len(held.x)), "metric": METRIC,
            "float_stages": chosen["float_stages"],
            "float_nodes": sum(len(stages[s]["nodes"]) for s in chosen["float_stages"]),
            "float_mac_share": chosen["float_mac_share"], "float_param_share": chosen["float_param_share"],
            "weight_only": bool(chosen.get("weight_only")), **({"float_weights": "int8"} if chosen.get("weight_only") else {}),
            "held_out_agreement": chosen["agreement"],
            **{f"held_out_{k}": chosen[k] for k in ("flip_estimate", "flip_bound") if k in chosen},
            "held_out_accuracy_drop_pts": chosen["accuracy_drop_pts"], "plain_agreement": steps[0]["agreement"],
            "plain_accuracy_drop_pts": steps[0]["accuracy_drop_pts"], "within_budget": within(chosen, max_drop_pts),
            "steps": steps, "stages": {s: {"nodes": len(v["nodes"]), "mac_share": v["mac_share"],
                                           "param_share": v["param_share"]} for s, v in stages.items()
                                       if s in graph or s in chosen["float_stages"]}}


def store_weights(out: dict, chosen: dict, steps: list[dict], stages: dict[str, dict], held: HeldOut,
                  max_drop_pts: float, scoring: Scoring, float_weights: str,
                  store: Callable[[list[str], str], tuple[object, Callable[[np.ndarray], np.ndarray]]]
                  ) -> tuple[object | None, dict]:
    """(file, recipe) with the float operations' weights of the chosen file stored as
    float_weights, if it stays within the budget; (None, recipe) when the chosen file is kept as
    it is (float32 weights, nothing in float, or a weight-only file, whose weights are int8).
    The stages were chosen with float32 weights; store(kept, weights) builds the file with
    those stages in float and their weights stored so, and returns it with a function that runs it.
    int8 weights that move the cheapest set out of the budget: a dearer set within it that holds
    with them (one that step 3 or 4 of `stage_search` then narrowed), else fp16 weights, which
    rarely move a file out. One check for TFLite and ONNX (which asks for fp16 where int8 was
    asked: `rewrite.onnx_store_weights`)."""
    if out["weight_only"] or not chosen["float_stages"]:
        return None, out  # int8 weights already, or nothing in float
    out["float_weights"] = "fp32"
    if float_weights == "fp32" or not out["within_budget"]:
        return None, out
    tries = [(chosen, float_weights)]
    if float_weights == "int8":
        dearer = sorted((st for st in steps if st is not chosen and within(st, max_drop_pts)
                         and not st.get("weight_only") and int8_counts(st)), key=step_cost)
        tries += [(st, "int8") for st in dearer] + [(chosen, "fp16")]
    failed = None
    for step, weights in tries:
        stored, run = store(step["float_stages"], weights)
        score = scoring(run, "early")
        check = {"weights": weights, **score, "within_budget": within(score, max_drop_pts)}
        if failed:
            check["instead_of"] = failed
        out["float_weights_check"] = check
        if check["within_budget"]:  # the recipe then describes the file written
            if step is not chosen:
                out = recipe(out["method"], step, steps, stages, held, max_drop_pts)
                out["float_weights_check"] = check
            out["float_weights"] = weights
            describe_written(out, check)
            return stored, out
        failed = failed or check
    return None, out


def describe_written(out: dict, score: dict) -> None:
    """The recipe's held-out figures become those of the file written, a complete score."""
    for key in ("agreement", "flip_estimate", "flip_bound", "accuracy_drop_pts"):
        if key in score:
            out[f"held_out_{key}"] = score[key]
        else:
            out.pop(f"held_out_{key}", None)


def hybrid_step(out: dict, written: object, stages: dict[str, dict], max_drop_pts: float, scoring: Scoring,
                build: Callable[[list[str]], tuple[object, Callable[[np.ndarray], np.ndarray]]],
                note: Callable[[str], None] = lambda line: None) -> tuple[object | None, dict]:
    """(file, recipe) for `export --hybrid`: the written file's float stages that hold
    convolutions, the most multiply-adds first, each run as dynamic-range int8 (int8 weights read
    directly by LiteRT's hybrid kernels, activations quantized per image at run time) if the
    file still holds the budget; (None, recipe) when none does or nothing is to try. written is
    the file the recipe describes so far; build(hybrid) returns the file with those stages
    hybrid, its other float operations' weights stored as the recipe says, and a function that
    runs it. The head (float probabilities out)
    and the weightless input normalisation stay float; a stage whose file comes out unchanged
    (nothing in it that a hybrid kernel runs) is skipped. The recipe gets `hybrid_stages` (a
    subset of `float_stages`), their share of the multiply-adds, and every check
    (`hybrid_checks`); with nothing to try, why (`hybrid_skipped`)."""
    if out["weight_only"] or not out["within_budget"]:
        why = "a weight-only file" if out["weight_only"] else "the file is over budget"
        out.update(hybrid_stages=[], hybrid_checks=[], hybrid_skipped=why)
        return None, out
    order = sorted((s for s in out["float_stages"] if s != "head" and stages[s]["mac_share"] > 0),
                   key=lambda s: -stages[s]["mac_share"])
    kept, current, held, checks = [], written, None, []  # current: to tell a stage that changes nothing
    for s in order:
        fb, run = build(kept + [s])
        if fb == current:
            note(f"{s}: nothing in it runs as dynamic-range int8 (skipped)")
            checks.append({"hybrid_stages": kept + [s], "skipped": "nothing in it runs as dynamic-range int8"})
            continue
        score = scoring(run, "early")
        ok = within(score, max_drop_pts)
        note(describe(f"{', '.join(kept + [s])} dynamic-range int8", score, max_drop_pts))
        checks.append({"hybrid_stages": kept + [s], **score, "within_budget": ok})
        if ok:
            kept, held, current = kept + [s], score, fb
    out.update(hybrid_stages=kept, hybrid_mac_share=sum(stages[s]["mac_share"] for s in kept), hybrid_checks=checks)
    if held is None:
        return None, out
    describe_written(out, held)
    return current, out


def mark_weight_only(meta: dict) -> None:
    """The metadata of a weight-only int8 file, the same for TFLite, ONNX and OpenVINO: its
    weights are int8 and no activation range went into it."""
    for key in ("calibration_images", "calibration_manifest_sha256"):
        meta.pop(key, None)
    meta.update(weight_only=True, float_weights="int8",
                calibration_range="none: weight-only int8, every activation float32")
