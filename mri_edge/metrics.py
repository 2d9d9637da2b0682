"""Test metrics shared by evaluate, verify, calibrate, bench and the model card: accuracy, per-class
and macro scores, calibration (ECE, Brier, NLL, reliability bins), bootstrap and Wilson intervals."""

from __future__ import annotations

import math

import numpy as np

from .trust import nll


def classification_metrics(y_true, y_pred, class_names: list[str]) -> dict:
    """Accuracy, per-class/macro/weighted precision-recall-F1-support, sensitivity/specificity, confusion."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support  # noqa: PLC0415

    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    labels = list(range(len(class_names)))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    cm = confusion_matrix(y_true, y_pred, labels=labels)
    per_class = {}
    total = cm.sum()
    for i, name in enumerate(class_names):
        tp = cm[i, i]
        fn = cm[i].sum() - tp
        fp = cm[:, i].sum() - tp
        tn = total - tp - fn - fp
        per_class[name] = {
            "precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i]),
            "sensitivity": float(r[i]),
            "specificity": float(tn / (tn + fp)) if tn + fp else 0.0,
        }
    out = {"accuracy": float((y_true == y_pred).mean()) if len(y_true) else 0.0, "n": int(len(y_true))}
    for avg in ("macro", "weighted"):
        pa, ra, fa, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, average=avg, zero_division=0)
        out[avg] = {"precision": float(pa), "recall": float(ra), "f1": float(fa), "support": int(len(y_true))}
    out["per_class"] = per_class
    out["confusion_matrix"] = cm.tolist()
    return out


ECE_BINS = 15


def calibration_metrics(y_true, probs, bins: int = ECE_BINS, binned_by=None) -> dict:
    """How far confidence matches accuracy: expected calibration error (top-1 confidence in
    `bins` equal-width bins, weighted by their share of images), maximum calibration error,
    multi-class Brier score and negative log-likelihood, and the reliability-diagram bins.
    `binned_by` (another model's top-1 confidences) puts each image in that model's bin."""
    y_true = np.asarray(y_true)
    probs = np.asarray(probs, np.float64)
    conf = probs.max(1)
    hit = (probs.argmax(1) == y_true).astype(float)
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(conf if binned_by is None else binned_by, edges[1:-1], right=True), 0, bins - 1)
    rows, ece, mce = [], 0.0, 0.0
    for b in range(bins):
        m = which == b
        if not m.any():
            continue
        gap = abs(hit[m].mean() - conf[m].mean())
        ece += m.mean() * gap
        mce = max(mce, gap)
        rows.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "n": int(m.sum()),
                     "confidence": float(conf[m].mean()), "accuracy": float(hit[m].mean())})
    onehot = np.eye(probs.shape[1])[y_true]
    return {"ece": float(ece), "mce": float(mce), "brier": float(((probs - onehot) ** 2).sum(1).mean()),
            "nll": nll(probs, y_true),
            "mean_confidence": float(conf.mean()), "accuracy": float(hit.mean()), "bins": bins,
            "reliability": rows}


def bootstrap_ci(values: np.ndarray, n_boot: int = 2000, seed: int = 0, alpha: float = 0.05,
                 groups=None) -> list[float]:
    """Percentile bootstrap CI of the mean of per-sample values (e.g. correctness or paired deltas).
    With `groups` (one id per value) whole groups are resampled, not samples: the cluster
    bootstrap, for samples that are not independent (near-identical slices of one subject)."""
    if len(values := np.asarray(values, float)) == 0:
        return [0.0, 0.0]
    rng = np.random.default_rng(seed)
    if groups is None:
        means = values[rng.integers(0, len(values), (n_boot, len(values)))].mean(axis=1)
    else:
        _, ids = np.unique(np.asarray(groups), return_inverse=True)
        sums, sizes = np.bincount(ids, weights=values), np.bincount(ids)
        picks = rng.integers(0, len(sizes), (n_boot, len(sizes)))
        means = sums[picks].sum(axis=1) / sizes[picks].sum(axis=1)
    return [float(np.quantile(means, alpha / 2)), float(np.quantile(means, 1 - alpha / 2))]


def with_cis(y_true, y_pred, class_names: list[str], seed: int) -> dict:
    """classification_metrics with the bootstrap 95% CIs of accuracy and macro-F1: a test report
    (or its leakage-free part)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    return {**classification_metrics(y_true, y_pred, class_names),
            "accuracy_ci95": bootstrap_ci(y_pred == y_true, seed=seed),
            "macro_f1_ci95": macro_f1_ci(y_true, y_pred, len(class_names), seed=seed)}


def stratified_resamples(labels, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n) row indices, each class's rows drawn among themselves: every resample keeps each
    class's count, as the test split was made (a class missing from a resample would score F1 0)."""
    labels, rng = np.asarray(labels), np.random.default_rng(seed)
    out = np.empty((n_boot, len(labels)), int)
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        out[:, rows] = rows[rng.integers(0, len(rows), (n_boot, len(rows)))]
    return out


def macro_f1_ci(y_true, y_pred, k: int, n_boot: int = 2000, seed: int = 0, alpha: float = 0.05) -> list[float]:
    """Percentile bootstrap CI of macro-F1 over `k` classes (`stratified_resamples`), each resample
    scored as classification_metrics scores (F1 = 2TP / (2TP + FP + FN); a class never present: 0)."""
    y_true, y_pred = np.asarray(y_true, int), np.asarray(y_pred, int)
    if not len(y_true):
        return [0.0, 0.0]
    idx = stratified_resamples(y_true, n_boot, seed)
    codes = (np.arange(n_boot)[:, None] * k + y_true[idx]) * k + y_pred[idx]  # one confusion matrix per resample
    cm = np.bincount(codes.ravel(), minlength=n_boot * k * k).reshape(n_boot, k, k)
    tp, denom = np.diagonal(cm, axis1=1, axis2=2), cm.sum(2) + cm.sum(1)
    f1 = np.divide(2 * tp, denom, out=np.zeros(tp.shape), where=denom > 0).mean(1)
    return [float(np.quantile(f1, alpha / 2)), float(np.quantile(f1, 1 - alpha / 2))]


def wilson(k: int, n: int, z: float = 1.96) -> list[float]:
    """95% Wilson score interval of a proportion k/n."""
    if n == 0:
        return [0.0, 0.0]
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return [max(0.0, c - h), min(1.0, c + h)]


def per_class_ci(cm: list[list[int]], names: list[str]) -> list[dict]:
    """Sensitivity and specificity of each class with 95% Wilson intervals, from a confusion matrix."""
    total = sum(map(sum, cm))
    out = []
    for i, n in enumerate(names):
        tp = cm[i][i]
        pos = sum(cm[i])
        fp = sum(cm[r][i] for r in range(len(names))) - tp
        neg = total - pos
        out.append({"class": n, "support": pos, "sensitivity": tp / pos if pos else None,
                    "sensitivity_ci95": wilson(tp, pos), "specificity": (neg - fp) / neg if neg else None,
                    "specificity_ci95": wilson(neg - fp, neg)})
    return out
