"""Synthetic MRI-like phantoms in the Kaggle folder layout, for demos and tests.

Each image is an axial "slice": skull ring, brain tissue with texture, two lateral
ventricles and cortical sulci. Tumor classes add a lesion with a class-specific
look and place; dementia stages enlarge ventricles and widen sulci. Random pose,
size, contrast and noise keep the task learnable but not trivial.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import MriEdgeError
from .tasks import TASKS

FOLDERS = {
    "tumor": ["glioma", "meningioma", "notumor", "pituitary"],
    "alzheimer": ["NonDemented", "VeryMildDemented", "MildDemented", "ModerateDemented"],
}
SPLITS = ("Training", "Testing")


def _smooth_noise(rng, size: int, scale: int) -> np.ndarray:
    import cv2  # noqa: PLC0415

    small = rng.normal(0, 1, (max(2, size // scale), max(2, size // scale))).astype(np.float32)
    return cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC)


def phantom(rng: np.random.Generator, task: str, cls: int, size: int = 128) -> np.ndarray:
    """One grayscale uint8 slice of class `cls` (index into TASKS[task])."""
    import cv2  # noqa: PLC0415

    img = np.zeros((size, size), np.float32)
    c = size / 2 + rng.normal(0, size * 0.02, 2)
    ax = np.array([size * rng.uniform(0.36, 0.42), size * rng.uniform(0.42, 0.47)])
    angle = rng.normal(0, 8)
    center = (float(c[0]), float(c[1]))

    def ell(canvas, cen, axes, ang, val, thick=-1):
        cv2.ellipse(canvas, (int(cen[0]), int(cen[1])), (max(1, int(axes[0])), max(1, int(axes[1]))),
                    ang, 0, 360, float(val), thick, lineType=cv2.LINE_AA)

    ell(img, center, ax, angle, 0.95, thick=max(2, size // 40))  # skull
    brain = np.zeros_like(img)
    ell(brain, center, ax * 0.9, angle, 1.0)
    tissue = 0.55 + 0.08 * _smooth_noise(rng, size, 6) + 0.04 * _smooth_noise(rng, size, 2)
    img = np.where(brain > 0.5, tissue, img)
    # Grey-matter rim and sulci: dark radial clefts whose width grows with atrophy.
    atrophy = cls if task == "alzheimer" else rng.integers(0, 2) * 0.3
    n_sulci = 18
    for k in range(n_sulci):
        t = 2 * np.pi * k / n_sulci + rng.normal(0, 0.1)
        r0, r1 = 0.62 + rng.uniform(-0.05, 0.05), 0.9
        p0 = (c[0] + r0 * ax[0] * np.cos(t), c[1] + r0 * ax[1] * np.sin(t))
        p1 = (c[0] + r1 * ax[0] * np.cos(t), c[1] + r1 * ax[1] * np.sin(t))
        w = max(1, int(size / 128 * (1 + 1.3 * atrophy + rng.uniform(0, 0.6))))
        cv2.line(img, (int(p0[0]), int(p0[1])), (int(p1[0]), int(p1[1])), 0.12, w, lineType=cv2.LINE_AA)
    # Lateral ventricles: butterfly pair, enlarged with dementia stage.
    grow = 1.0 + (0.45 * atrophy if task == "alzheimer" else 0.0) + rng.uniform(-0.1, 0.1)
    for side in (-1, 1):
        vc = (c[0] + side * ax[0] * 0.16 * grow, c[1] - ax[1] * 0.05)
        ell(img, vc, (ax[0] * 0.08 * grow, ax[1] * 0.28 * grow), angle + side * 15, 0.1)
    if task == "alzheimer" and cls >= 2:
        # Hippocampal/temporal widening shows as dark gaps near the base.
        for side in (-1, 1):
            ell(img, (c[0] + side * ax[0] * 0.5, c[1] + ax[1] * 0.45), (ax[0] * 0.06 * cls, ax[1] * 0.04 * cls),
                0, 0.1)
    if task == "tumor":
        name = TASKS["tumor"][cls][0]
        if name == "glioma":
            # Irregular infiltrating mass with a bright rim and surrounding oedema, inside a hemisphere.
            side = rng.choice([-1, 1])
            lc = (c[0] + side * ax[0] * rng.uniform(0.3, 0.5), c[1] + ax[1] * rng.uniform(-0.3, 0.3))
            r = size * rng.uniform(0.07, 0.12)
            oedema = np.zeros_like(img)
            ell(oedema, lc, (r * 1.8, r * 1.5), rng.uniform(0, 180), 1.0)
            blob = (_smooth_noise(rng, size, 10) > -0.2) & (oedema > 0.5)
            img = np.where(blob, img * 0.75 + 0.1, img)
            ell(img, lc, (r, r * rng.uniform(0.7, 1.0)), rng.uniform(0, 180), 0.9, thick=max(1, size // 64))
            ell(img, lc, (r * 0.6, r * 0.5), 0, 0.35)
        elif name == "meningioma":
            # Bright, well-defined round mass attached to the skull.
            t = rng.uniform(0, 2 * np.pi)
            lc = (c[0] + 0.8 * ax[0] * np.cos(t), c[1] + 0.8 * ax[1] * np.sin(t))
            r = size * rng.uniform(0.06, 0.1)
            ell(img, lc, (r, r), 0, 0.92 + rng.uniform(-0.05, 0.05))
        elif name == "pituitary":
            # Small bright lesion at the midline, low in the slice (sella turcica).
            lc = (c[0] + rng.normal(0, size * 0.01), c[1] + ax[1] * rng.uniform(0.55, 0.7))
            r = size * rng.uniform(0.035, 0.06)
            ell(img, lc, (r * 1.2, r), 0, 0.95)
    img = img * rng.uniform(0.8, 1.15) + rng.uniform(-0.05, 0.05)
    img += rng.normal(0, 0.03, img.shape)
    img = cv2.GaussianBlur(img, (3, 3), 0.6)
    m = cv2.getRotationMatrix2D(center, rng.normal(0, 6), rng.uniform(0.92, 1.05))
    img = cv2.warpAffine(img, m, (size, size), borderValue=0.0)
    return np.clip(img * 255, 0, 255).astype(np.uint8)


def write_dataset(out: str | Path, task: str = "tumor", n_train: int = 60, n_test: int = 20,
                  size: int = 128, seed: int = 0, progress=None) -> Path:
    """Write Training/ and Testing/ class folders of JPEG phantoms; returns the root."""
    import cv2  # noqa: PLC0415

    if task not in FOLDERS:
        raise MriEdgeError(f"synthetic data exists for tasks {', '.join(FOLDERS)}, not {task!r}")
    root = Path(out)
    rng = np.random.default_rng(seed)
    for split, n in zip(SPLITS, (n_train, n_test)):
        for cls, folder in enumerate(FOLDERS[task]):
            d = root / split / folder
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = phantom(rng, task, cls, size)
                cv2.imwrite(str(d / f"{folder}_{i:04d}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 92])
                if progress:
                    progress()
    return root
