"""Mixup (Zhang et al. 2018): train on convex blends of two images and of their labels.

Drawn once per global batch from (seed, epoch, batch), so every worker of a distributed run
and a resumed run blend the same pairs with the same weight as one device would.
"""

from __future__ import annotations

import numpy as np


def partners(idx: np.ndarray, alpha: float, key: tuple[int, int, int]) -> tuple[np.ndarray, float]:
    """(the image each of `idx` is blended with, the weight of its own image) for one batch."""
    rng = np.random.default_rng([*key, 1])  # 1: a stream apart from the epoch's shuffle
    lam = float(rng.beta(alpha, alpha))
    return idx[rng.permutation(len(idx))], max(lam, 1.0 - lam)  # the image's own label stays the larger
