"""Mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019): train on blends of two images and
of their labels, mixup as a convex blend of the whole images, CutMix as a box of one pasted
into the other, its label weight the share of the area each image keeps. In both the weight
drawn from Beta(a, a) is folded to its larger half, so each image's own label stays the
larger share (CutMix boxes cover at most half the image, unlike timm's).

Drawn once per global batch from (seed, epoch, batch), so every worker of a distributed run
and a resumed run blend the same pairs with the same weight and box as one device would.
Written here rather than taken from timm or keras_cv: those act on framework tensors inside
the step, and the blends must be drawn per global batch before the workers' cut.
"""

from __future__ import annotations

import numpy as np

Box = tuple[int, int, int, int]  # rows y0:y1, columns x0:x1 of the image taken from the partner


def plan(idx: np.ndarray, mixup: float, cutmix: float, key: tuple[int, int, int],
         size: tuple[int, int]) -> tuple[np.ndarray, float, Box | None]:
    """(the image each of `idx` is blended with, the weight of its own image and label, the
    CutMix box or None for mixup) for one batch of images of `size` (height, width). With both
    on, each batch takes one of the two with even odds, as timm does."""
    rng = np.random.default_rng([*key, 1])  # 1: a stream apart from the epoch's shuffle
    cut = cutmix > 0 and (mixup <= 0 or rng.random() < 0.5)
    alpha = cutmix if cut else mixup
    lam = float(rng.beta(alpha, alpha))
    other, lam = idx[rng.permutation(len(idx))], max(lam, 1.0 - lam)  # the image's own label stays the larger
    if not cut:
        return other, lam, None
    h, w = size
    ch, cw = int(h * np.sqrt(1.0 - lam)), int(w * np.sqrt(1.0 - lam))
    cy, cx = int(rng.integers(h)), int(rng.integers(w))
    y0, y1 = np.clip([cy - ch // 2, cy + ch // 2], 0, h)
    x0, x1 = np.clip([cx - cw // 2, cx + cw // 2], 0, w)
    # A box cut by the border is smaller than drawn: the label weight follows the area pasted.
    return other, float(1.0 - (y1 - y0) * (x1 - x0) / (h * w)), (int(y0), int(y1), int(x0), int(x1))


def blend(own: np.ndarray, other: np.ndarray, lam: float, box: Box | None) -> np.ndarray:
    """A batch of images (N, H, W, C) blended with their partners as `plan` drew them."""
    other = other.astype(own.dtype)  # the cache's uint8 partners, in the batch's float32
    if box is None:
        return lam * own + (1.0 - lam) * other
    y0, y1, x0, x1 = box
    out = own.copy()
    out[:, y0:y1, x0:x1] = other[:, y0:y1, x0:x1]
    return out
