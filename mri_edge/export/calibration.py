"""int8 calibration data: which training images, their manifest and hash, the validation
reference for choosing between int8 variants, and the robust range rule every int8 file uses."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .. import preprocess
from ..files import sha256_bytes
from ..data import per_class_indices
from ..run import RunFolder
from .formats import ExportError

CALIB_QUANTILE = 0.99


def calibration_set(run_dir: Path, cfg: dict, n: int, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """Up to n training images, stratified by class, decoded by the training contract.

    Only the training split of the run's manifest is read: calibrating on validation
    or test images would leak them into the deployed file.
    """
    manifest = RunFolder(run_dir).manifest()
    root = Path(manifest["root"])
    rows = manifest["splits"].get("train") or []
    if not rows:
        raise ExportError("int8 calibration needs the run's training split, and its manifest has none")
    size = int(cfg["image_size"])
    images, used = [], []
    for i in calibration_indices([y for _, y in rows], n, seed):
        rel = rows[i][0]
        try:
            images.append(preprocess.load_image(root / rel, size))
            used.append(rel)
        except preprocess.ImageError:
            continue
    if not images:
        raise ExportError("no readable training image for int8 calibration")
    return np.stack(images), used


def calibration_indices(labels, n: int, seed: int = 0) -> list[int]:
    """Sorted indices of up to n images: the same number from each class (all of a smaller
    class), topped up at random to n. Export calibrates on these; `train --quant-aware`
    measures its simulated ranges on them too."""
    orders, rng = per_class_indices(labels, seed)
    per = max(1, n // len(orders))
    pick = [i for idx in orders.values() for i in idx[:per].tolist()]
    rest = np.setdiff1d(np.arange(len(labels)), pick)
    pick += rng.permutation(rest)[: max(0, n - len(pick))].tolist()
    return sorted(pick)


def calibration_manifest(used: list[str], size: int, calib_range: str) -> tuple[dict, dict]:
    """(calibration_manifest.json, the calibration entries of each int8 file's metadata)."""
    manifest = {"split": "train", "n": len(used), "image_size": size, "files": used}
    meta = {"calibration_manifest_sha256": sha256_bytes(json.dumps(manifest).encode()),
            "calibration_images": len(used),
            "calibration_range": "min/max over all images" if calib_range == "minmax" else
            f"{CALIB_QUANTILE:.0%} quantile of per-image activation extremes (TFLite and ONNX)"}
    return manifest, meta


def robust_ranges(lo: np.ndarray, hi: np.ndarray, quantile: float = CALIB_QUANTILE) -> tuple[np.ndarray, np.ndarray]:
    """Activation ranges from per-image extremes (images x tensors): the `quantile` of the
    per-image maxima and the 1-quantile of the minima, so the most extreme 1% of calibration
    images saturate instead of stretching every range. A range that touched zero keeps zero."""
    new_lo = np.quantile(lo, 1 - quantile, axis=0)
    new_hi = np.quantile(hi, quantile, axis=0)
    new_lo = np.where(lo.min(axis=0) <= 0, np.minimum(new_lo, 0.0), new_lo)
    return new_lo, np.maximum(new_hi, new_lo + 1e-6)

def per_image_extremes(a: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    if a.ndim and a.shape[0] == n:
        flat = a.reshape(n, -1)
        return flat.min(axis=1), flat.max(axis=1)
    return np.full(n, a.min()), np.full(n, a.max())  # not batched (a constant): same for every image
