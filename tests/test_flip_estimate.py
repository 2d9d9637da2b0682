"""The flip estimate the accuracy-aware search holds int8 files to (`heldout.flip_estimate`):
more precise than counting flips where its model holds, a bound that covers, a lower bound for
a score that has run only some images, and deaf to changes far from the boundary."""

from __future__ import annotations

import numpy as np
from scipy.stats import norm


def probs_of(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def draw(rng, n: int, sd: float) -> tuple[np.ndarray, np.ndarray, float]:
    """(Keras, candidate) probabilities of n images whose top-1 margins are exponential (mean
    3 nats) and whose changes are normal with this sd, and the true flip rate of such images."""
    m = rng.exponential(3.0, n)
    d = rng.normal(0.0, sd, n)
    base = np.column_stack([m, np.zeros(n), np.full(n, -9.0), np.full(n, -9.0)])
    cand = base.copy()
    cand[:, 0] += d
    grid = np.linspace(0, 60, 60001)  # E[Phi(-m / sd)] for m ~ Exp(mean 3)
    true = float((norm.cdf(-grid / sd) * np.exp(-grid / 3.0) / 3.0).sum() * (grid[1] - grid[0]))
    return probs_of(base), probs_of(cand), true


def test_pairing_estimates_the_flip_rate_better_than_counting_and_its_bound_covers():
    from mri_edge.export.heldout import flip_estimate

    rng = np.random.default_rng(1)
    err_est, err_count, covered = [], [], 0
    for _ in range(60):
        ref, cand, true = draw(rng, 500, 0.5)  # a true rate of 6.0%: 30 flips in 500
        estimate, bound = flip_estimate(ref, cand)
        count = float((cand.argmax(1) != ref.argmax(1)).mean())
        err_est.append((estimate - true) ** 2)
        err_count.append((count - true) ** 2)
        covered += bound >= true
        assert bound >= count - 1e-12 and bound >= estimate
    assert np.mean(err_est) < 0.5 * np.mean(err_count)  # measured: 0.35
    assert covered >= 51  # of 60 at 95% confidence (measured 58)


def test_a_partly_run_score_is_a_lower_bound_of_the_complete_one():
    from mri_edge.export.heldout import flip_estimate

    rng = np.random.default_rng(2)
    ref, cand, _ = draw(rng, 300, 0.8)
    full = flip_estimate(ref, cand)
    for run in (0, 30, 150, 299):
        part = np.asarray(ref, np.float32).copy()  # images not run count as unchanged
        order = rng.permutation(300)[:run]
        part[order] = cand[order]
        est, bound = flip_estimate(ref, part)
        assert est <= full[0] + 1e-12 and bound <= full[1] + 1e-12
    assert flip_estimate(ref, ref) == (0.0, 0.0)


def test_changes_far_from_the_boundary_lend_nothing():
    """An answer the model is sure of (20 nats) whose runner-up moves by 15 nats, as the log of
    a rounded tiny probability does, flips nothing and adds no change to the pairs."""
    from mri_edge.export.heldout import changes, flip_estimate, margins

    rng = np.random.default_rng(3)
    ref, _, _ = draw(rng, 200, 0.5)
    logits = np.log(ref)  # every other answer stays as it is
    logits[:20] = [20.0, 0.0, -9.0, -9.0]
    noisy = logits.copy()
    noisy[:20, 1] = 15.0  # the runner-up of the sure answers jumps
    _, m = margins(probs_of(logits))
    d = changes(probs_of(logits), probs_of(noisy))
    assert np.allclose(d[:20], -15.0, atol=1e-3) and (m[:20] > 19).all()
    assert flip_estimate(probs_of(logits), probs_of(noisy)) == (0.0, 0.0)


def test_the_bound_is_never_below_the_flips_agreement_counts():
    """Far from the boundary no change is paired, yet a flip there still counts; so do a tie
    that argmax breaks away from Keras's answer (int8 probabilities come in steps of 1/256)
    and a NaN answer."""
    from mri_edge.export.heldout import flip_estimate

    sure = probs_of(np.tile([12.0, 0.0, -9.0, -9.0], (50, 1)))  # every margin 12 nats
    cand = sure.copy()
    cand[7] = probs_of(np.array([[0.0, 20.0, -9.0, -9.0]]))[0]  # one answer turned by 20 nats
    assert flip_estimate(sure, cand) == (0.0, 1 / 50)
    ref = np.tile([0.45, 0.55], (10, 1))
    assert flip_estimate(ref, np.full((10, 2), 0.5))[1] == 1.0  # argmax 0, Keras 1
    assert flip_estimate(ref, np.full((10, 2), np.nan)) == (1.0, 1.0)


def test_a_score_stops_on_the_bound_before_any_answer_flips():
    """Changes that bring every close call 90% of the way to the boundary flip nothing
    themselves, but paired with the closer calls they do: the bound is over a 1-point budget
    after the first chunk."""
    from mri_edge.export.heldout import HeldOut

    rng = np.random.default_rng(4)
    m = rng.uniform(0.05, 1.0, 256)
    logits = np.column_stack([m, np.zeros(256), np.full(256, -9.0), np.full(256, -9.0)])
    moved = logits.copy()
    moved[:, 0] -= 0.9 * m
    ref, cand = probs_of(logits), probs_of(moved)
    held = HeldOut(np.arange(256)[:, None, None, None].astype(np.uint8).repeat(3, -1), ref, np.zeros(256, int))
    score = held.score_until(lambda x: cand[x[:, 0, 0, 0].astype(int)], 1.0, chunk=64)
    assert score["stopped_after"] == 64 and score["agreement"] == 1.0 and score["flip_bound"] > 0.01
