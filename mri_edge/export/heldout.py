"""Held-out images as the accuracy-aware search scores a candidate on them (`HeldOut`), and how
often an int8 file changes the Keras model's answer on new images (`flip_estimate`): an
estimate from the held-out images and its one-sided 95% upper bound, which is what the budget
is held to (docs/int8.md#how-flips-are-counted).

An answer flips where int8's change to the image's top-1 logit margin (d: the float answer's
log-probability minus the best other class's, int8 minus Keras) is below minus the Keras margin
(m). A count of held-out flips uses n such pairs and cannot resolve the goals: 574 images hold
0.17% (one flip) or 0.52% (three). Where the changes have about the same spread whatever the
margin, each held-out margin can be paired with every held-out change, and the estimated flip
rate is the share of the n x n pairs with m_i + d_j < 0. On the tumor model (plain int8 file:
a standard deviation of 0.40-0.60 nats in every margin band under 8 nats), for 19 sets of
stages kept in float, this estimate from the 574 held-out images was on average 0.08 points
from the test split's counted flip rate (at most 0.19), where the held-out count was 0.23 off
(at most 0.36), and the bound held the test rate for 18 of the 19
(`benchmarks/flip_estimate.py`). Where changes grow near the boundary (the Alzheimer model:
0.43 nats under 0.25 nats of margin, 0.26 at 5-8), pairing underestimates; the bound is never
below the counted rate, so there it is the count.

Only images with a margin under LOCAL lend their change to the pairs: a flip needs a change as
large as the margin, and far from the boundary the log of a tiny runner-up probability is
mostly rounding. The bound resamples images (bootstrap, fixed seed).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Callable

import numpy as np

LOCAL = 8.0  # nats: a runner-up probability 3e-4 of the top one's
CONFIDENCE = 0.95
RESAMPLES = 400


def margins(ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(top class, top-1 logit margin in nats) of each image under probabilities ref."""
    logp = np.log(np.maximum(np.asarray(ref, np.float32), 1e-30))
    top = logp.argmax(1)
    rest = logp.copy()
    rest[np.arange(len(top)), top] = -np.inf
    return top, logp[np.arange(len(top)), top] - rest.max(1)


def changes(ref: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """d: how much probs moved each image's margin of ref's top class over the best other class
    (negative: towards a flip; below -m: flipped)."""
    top, m = margins(ref)
    logq = np.log(np.maximum(np.asarray(probs, np.float32), 1e-30))
    lead = logq[np.arange(len(top)), top][:, None] - logq
    lead[np.arange(len(top)), top] = np.inf
    return lead.min(1) - m


def flip_rate(m: np.ndarray, d: np.ndarray) -> float:
    """Share of (margin, change) pairs that flip, the changes taken from images under LOCAL."""
    local = np.sort(d[m < LOCAL])
    if not len(local):
        return 0.0
    return float(np.searchsorted(local, -m, side="left").sum() / (len(m) * len(local)))


def flip_estimate(ref: np.ndarray, probs: np.ndarray) -> tuple[float, float]:
    """(estimated flip rate, its one-sided CONFIDENCE upper bound) of probs against ref.

    Images left as ref (d = 0) add no flip, and the resamples depend only on the number of
    images: so a score that has run only some images is a lower bound of both, and can stop
    once the bound is out of budget (`HeldOut.score_until`). The floor is the flips counted as
    agreement counts them (argmax: a tie goes to the lower class); a NaN answer is a flip."""
    top, m = margins(ref)
    if not len(m):
        return 0.0, 0.0
    d = changes(ref, probs)
    d = np.where(np.isnan(d), -np.inf, d)
    counted = float((np.asarray(probs, np.float32).argmax(1) != top).mean())
    rng = np.random.default_rng(0)
    draws = [flip_rate(m[k], d[k]) for k in (rng.integers(0, len(m), len(m)) for _ in range(RESAMPLES))]
    return flip_rate(m, d), max(float(np.quantile(draws, CONFIDENCE)), counted)


def assured(score: dict) -> float:
    """The agreement the budget counts on: 1 - the flip rate's 95% bound where the score has
    one (`HeldOut.score`), else the agreement counted."""
    return 1 - score["flip_bound"] if "flip_bound" in score else score["agreement"]


def agrees_enough(score: dict, max_drop_pts: float) -> bool:  # an upper bound below it: out of budget
    return assured(score) >= 1 - max_drop_pts / 100 - 1e-12


def margin_order(probs: np.ndarray) -> np.ndarray:
    """Images by top-2 margin, smallest first: where int8 changes answers."""
    srt = np.sort(probs, 1)
    return np.argsort(srt[:, -1] - srt[:, -2], kind="stable")


@dataclass
class HeldOut:
    """Validation images (uint8), the Keras model's probabilities on them and their labels."""

    x: np.ndarray
    ref: np.ndarray
    labels: np.ndarray

    @cached_property
    def top(self) -> np.ndarray:  # in float32, as flip_estimate reads ref
        return np.asarray(self.ref, np.float32).argmax(1)

    @cached_property
    def order(self) -> np.ndarray:  # by the Keras model's top-2 margin
        return margin_order(self.ref)

    def score(self, probs: np.ndarray) -> dict:
        """Agreement and accuracy, counted, and the flip rate expected on new images with its
        95% bound (`heldout.flip_estimate`), which is what the budget is held to (`assured`)."""
        pred = np.asarray(probs).argmax(1)
        acc, ref_acc = float((pred == self.labels).mean()), float((self.top == self.labels).mean())
        estimate, bound = flip_estimate(self.ref, probs)
        return {"agreement": float((pred == self.top).mean()), "accuracy": acc,
                "accuracy_drop_pts": 100 * (ref_acc - acc), "flip_estimate": estimate, "flip_bound": bound}

    def score_until(self, run: Callable[[np.ndarray], np.ndarray], max_drop_pts: float | None = None,
                    chunk: int = 64) -> dict:
        """score(run(x)); with max_drop_pts, images run in chunks in `order` and scoring stops
        once the flip bound of the images run so far is out of the budget: the others, counted
        as unchanged, can only raise it. Such a score is an upper bound of agreement and
        `assured` and has `stopped_after`, the images run; `within` never holds for it."""
        if max_drop_pts is None:
            return self.score(run(self.x))
        probs = self.ref.astype(np.float32)  # images not run count as unchanged
        for start in range(0, len(self.order), chunk):
            idx = self.order[start:start + chunk]
            probs[idx] = run(self.x[idx])
            if start + chunk < len(self.order):
                score = self.score(probs)
                if not agrees_enough(score, max_drop_pts):
                    return {**score, "stopped_after": start + len(idx)}
        return self.score(probs)

    def moving(self, first: np.ndarray, chunk: int = 64) -> np.ndarray:
        """Where answers move: the images the first candidate (probabilities `first`) changed and
        the `chunk` smallest top-2 margins of Keras and of `first`."""
        return np.unique(np.concatenate([np.flatnonzero(first.argmax(1) != self.top), self.order[:chunk],
                                         margin_order(first)[:chunk]]))

    def score_moving(self, run: Callable[[np.ndarray], np.ndarray], first: np.ndarray, idx: np.ndarray) -> dict:
        """score(run(x)) estimated on images `idx` (`moving`), to rank stages; `first` stands in
        elsewhere (so the counted agreement is an upper bound, the flip bound an estimate). It
        records `ranked_on`, the images run, and `within` never holds for it."""
        if len(idx) == len(self.x):
            return self.score(run(self.x))
        probs = np.array(first, np.float32)
        probs[idx] = run(self.x[idx])
        return {**self.score(probs), "ranked_on": int(len(idx))}
