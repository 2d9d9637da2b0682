"""The learning-rate schedule and the time budget of a training phase (no Keras here)."""

from __future__ import annotations

import math
import time


def lr_at(epoch: int, total: int, base: float, warmup: int, progress: float | None = None) -> float:
    """Linear warm-up, then cosine decay to 1% of the base rate.

    `progress` (0-1, the share of a time budget used) replaces the epoch count as the
    position on the cosine once warm-up is over.
    """
    if warmup and epoch < warmup:
        return base * (epoch + 1) / (warmup + 1)
    if progress is not None:
        t = min(1.0, max(0.0, progress))
    else:
        span = max(1, total - warmup)
        t = min(1.0, (epoch - warmup) / span)
    return base * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * t)))


def phase_budgets(phases: list[dict], budget_s: float | None) -> list[float | None]:
    """Split a time budget over the phases in proportion to their epochs."""
    if not budget_s:
        return [None] * len(phases)
    total = sum(p["epochs"] for p in phases) or 1
    return [budget_s * p["epochs"] / total for p in phases]


class PhaseClock:
    """Time-budget bookkeeping of one phase: progress for the schedule, when to stop."""

    def __init__(self, budget_s: float | None, now=time.time, elapsed_s: float = 0.0):
        self.budget_s = budget_s
        self.now = now
        # A resumed phase continues its cosine where the interrupted run left it.
        self.start = now() - elapsed_s
        self.epoch_times: list[float] = []
        self._epoch_start = self.start

    def progress(self) -> float | None:
        if not self.budget_s:
            return None
        return (self.now() - self.start) / self.budget_s

    def epoch_started(self) -> None:
        self._epoch_start = self.now()

    def epoch_ended(self) -> bool:
        """Record the epoch; True when another epoch would overrun the budget."""
        t = self.now()
        self.epoch_times.append(t - self._epoch_start)
        if not self.budget_s:
            return False
        # The slowest of the last epochs, leaving out the first (graph tracing, warm-up)
        # once there are others: measured 180 s first vs 110-144 s later on 2 cores.
        recent = self.epoch_times[1:] or self.epoch_times
        typical = max(recent[-3:])
        return (t - self.start) + typical > self.budget_s


