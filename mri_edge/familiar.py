"""The familiarity check of `mri-edge calibrate`: how far an image's pooled features lie from
the training images' (`trust.fit_familiarity`, `trust.distance`), and the limit above which
an answer is referred for review as "unlike the training images".

Fitted once, with the calibration's reference model, on a class-stratified sample of training
images; the limit is the distance that refers a chosen share of the held-out images (new
subjects; on the shipped models test images are referred at about three times that share).
Every exported file then measures its own
distances through its own runtime and is reported: a file whose features moved under int8
refers a different share. An image set of another kind (--foreign) reports the share it
catches; nothing is fitted on it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import report, trust
from .config import CalibrateConfig
from .data import list_images


SEED = 0  # a fixed sample: calibrating again fits the same record


def training_rows(manifest: dict, n: int, seed: int = SEED) -> list:
    """About n training rows of the split manifest (at least one per class), the same share of
    each class, chosen at random."""
    rows = manifest["splits"]["train"]
    if len(rows) <= n:
        return list(rows)
    rng = np.random.default_rng(seed)
    labels = np.array([y for _, y in rows])
    keep = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        keep += rng.choice(idx, max(1, round(n * len(idx) / len(rows))), replace=False).tolist()
    return [rows[i] for i in sorted(keep)]


def check_foreign(folder: str | Path) -> list[Path]:
    """The images of a --foreign folder (any depth; junk ignored); a one-line error if there are none."""
    from .calibrate import CalibrateError  # noqa: PLC0415

    folder = Path(folder)
    if not folder.is_dir():
        raise CalibrateError(f"--foreign {folder}: " + ("not a folder" if folder.exists() else "does not exist"))
    paths = list_images(folder)
    if not paths:
        raise CalibrateError(f"--foreign {folder}: no images in it (any depth)")
    return paths


def foreign_images(model, folder: str | Path, limit: int, seed: int = SEED) -> np.ndarray:
    """Up to `limit` images from a folder of another kind (`check_foreign`), decoded under the
    model's preprocessing, chosen at random when there are more."""
    paths = check_foreign(folder)
    if len(paths) > limit:
        paths = [paths[i] for i in sorted(np.random.default_rng(seed).choice(len(paths), limit, replace=False))]
    from .data import decode_images  # noqa: PLC0415

    return decode_images(model, Path(folder), [str(p.relative_to(folder)) for p in paths], "foreign images", "")


def features(model, images: np.ndarray, what: str) -> np.ndarray | None:
    return model.predict_arrays(images, 32, calibrated=False, label=f"{model.path.name} on {what}", features=True)[1]


def fit(ref_feats_train: np.ndarray, y_train: np.ndarray, ref_feats_held: np.ndarray, cfg: CalibrateConfig) -> dict:
    """The familiarity record: `trust.fit_familiarity` on training features, with the limit that
    refers cfg.unfamiliar_rate of the held-out images."""
    record = trust.fit_familiarity(ref_feats_train, y_train, cfg.familiar_dims)
    held = trust.distance(ref_feats_held, record)
    record["limit"] = float(np.quantile(held, 1 - cfg.unfamiliar_rate, method="higher"))
    record["fitted_on"] = {"training_images": int(len(y_train)), "held_out_images": int(len(held)),
                           "refer_rate": cfg.unfamiliar_rate,  # the target; the reports give each file's share
                           "held_out_referred": float((held > record["limit"]).mean())}
    return record


def referred(record: trust.Trust, feats: np.ndarray | None, probs: np.ndarray | None = None,
             labels: np.ndarray | None = None) -> dict | None:
    """Share of images the stored limit refers, with their median distance; with labelled
    probabilities, what predict answers with the threshold and the check together."""
    d = record.distances(feats)
    if d is None:
        return None
    unlike = record.unfamiliar(distances=d)
    out = {"n": int(len(unlike)), "referred": float(unlike.mean()), "median_distance": float(np.median(d))}
    if probs is not None and labels is not None and record.threshold is not None:
        out["answered"] = trust.at_threshold(record.apply(probs), labels, record.threshold, ~unlike)
    return out


KAPPA_LEVEL = 0.95  # verify holds the referrals' kappa to this one-sided upper bound (kappa_upper)


def _kappa_of_counts(n: int, referred_a: int, both: np.ndarray, only_b: np.ndarray) -> np.ndarray:
    """Cohen's kappa from the cells of two bool decisions over n images: referred_a by the first,
    `both` of those by the second too, `only_b` by the second alone."""
    observed = (both + (n - referred_a - only_b)) / n
    pa, pb = referred_a / n, (both + only_b) / n
    chance = pa * pb + (1 - pa) * (1 - pb)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(chance >= 1.0, (observed == 1.0).astype(float), (observed - chance) / (1.0 - chance))


def kappa(a: np.ndarray, b: np.ndarray) -> float:
    """Cohen's kappa of two (N,) bool decisions: their agreement beyond what their rates alone
    give. Agreement alone says little when few images are referred (a check that never fires
    agrees on 99% of images where 1% should be referred); kappa is 0 for it. 1.0 (or 0.0) when
    one decision is constant, for identical (or different) decisions; 0.0 for no images."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    if not len(a):
        return 0.0
    return float(_kappa_of_counts(len(a), int(a.sum()), np.array((a & b).sum()), np.array((~a & b).sum())))


def kappa_upper(a: np.ndarray, b: np.ndarray, n_boot: int = 2000, seed: int = 0, level: float = KAPPA_LEVEL) -> float:
    """One-sided upper bootstrap bound of `kappa(a, b)`. Where few images are referred, kappa
    jumps with one image: of 200 test images with 4 referred, one swapped at the limit each way
    gives 0.75. The images are resampled within those `a` refers and those it does not, so each
    resample keeps a's referrals: a check `b` that never fires has kappa 0 in every resample,
    however few images a refers. (Counts are drawn, not images: the same bootstrap, no N x
    n_boot index matrix.)"""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    n, k = len(a), int(a.sum())
    if not n:
        return 0.0
    rng = np.random.default_rng(seed)
    both = rng.binomial(k, b[a].mean() if k else 0.0, n_boot)
    only_b = rng.binomial(n - k, b[~a].mean() if n > k else 0.0, n_boot)
    return float(np.quantile(_kappa_of_counts(n, k, both, only_b), level))


def gate(fam: dict, min_agreement: float, min_kappa: float) -> str | None:
    """Why verify fails a file's familiarity check (`parity`'s record), or None: the file and
    Keras refer different images more often than the top-1 agreement gate allows, or their
    kappa is below min_kappa even at its upper bound."""
    if "agreement" not in fam or (fam["agreement"] >= min_agreement and fam["kappa_upper"] >= min_kappa):
        return None
    return (f"familiarity check moved: it refers {fam['only_file']} images Keras does not and misses "
            f"{fam['only_keras']} (agreement {fam['agreement']:.4f}, minimum {min_agreement}; kappa "
            f"{fam['kappa']:.3f}, {KAPPA_LEVEL:.0%} upper bound {fam['kappa_upper']:.3f}, minimum {min_kappa})")


def parity(record: trust.Trust, keras_feats: np.ndarray, file_feats: np.ndarray) -> dict:
    """Whether the check survives export (`mri-edge verify`): the file's stored limit applied to
    the Keras model's features and to the file's own, image by image."""
    from .explain import rank_correlation  # noqa: PLC0415

    dk, df = record.distances(keras_feats), record.distances(file_feats)
    uk, uf = record.unfamiliar(distances=dk), record.unfamiliar(distances=df)
    return {"n": int(len(dk)), "limit": float(record.familiarity["limit"]),
            "referred": float(uf.mean()), "keras_referred": float(uk.mean()),
            "agreement": float((uk == uf).mean()), "kappa": kappa(uk, uf), "kappa_upper": kappa_upper(uk, uf),
            "only_keras": int((uk & ~uf).sum()), "only_file": int((~uk & uf).sum()),
            "rank_correlation": rank_correlation(dk, df),
            "distance_change": {"median": float(np.median(np.abs(df - dk))), "max": float(np.abs(df - dk).max())}}


def summary_lines(record: trust.Trust, results: dict) -> list[str]:
    """calibrate's console lines on the check: the limit, and each file's referred shares."""
    if not record.familiarity:
        return []
    lines = [f"familiarity: images farther than {record.familiarity['limit']:.2f} from the training images' "
             "features are referred; referred per file:"]
    for name, res in results.items():
        fam = res.get("familiarity") or {}
        parts = [f"{split.replace('_', '-')} {r['referred']:.1%} of {r['n']}" for split, r in fam.items() if r]
        lines.append(f"  {name}: {', '.join(parts) or 'no features output (no check)'}")
    return lines


def without_arrays(record: dict) -> dict:
    """A trust record for reports: the familiarity check's projection and centres (trust.json
    and every file's metadata hold them) left out."""
    fam = record.get("familiarity")
    if not fam:
        return record
    return {**record, "familiarity": {k: v for k, v in fam.items() if k not in ("projection", "centres")}}


def markdown(out: dict) -> list[str]:
    """The calibration report's section on the familiarity check."""
    fam = out["trust"].get("familiarity")
    if not fam:
        return ["No familiarity check: the reference model has no single global pooling to take features from "
                "(an ensemble), or the files were exported before they had a features output.", ""]
    def answered(r) -> str:
        return trust.coverage_risk_text((r or {}).get("answered"), percent=True)

    rows = [[name, *[f"{r[s]['referred']:.1%} of {r[s]['n']}" if r.get(s) else "" for s in
                     ("held_out", "test", "foreign")], answered(r.get("test"))]
            for name, res in out["files"].items() if (r := res.get("familiarity"))]
    fit_on = fam["fitted_on"]
    foreign = out.get("foreign")
    return [
        "## Familiarity: images unlike the training images", "",
        f"The pooled features of {fit_on['training_images']} training images give the class centres and the "
        f"{fam['shape'][1]} main directions of their spread; an image farther than **{fam['limit']:.2f}** (root mean "
        "square, in standard deviations of that spread) from every centre is marked "
        f"\"{trust.REVIEW}\" as unlike the training images. The limit was set to refer "
        f"{fit_on['refer_rate']:.1%} of the held-out images (it refers {fit_on.get('held_out_referred', 0):.1%} of "
        f"these {fit_on['held_out_images']}). Confidence cannot tell this: an MRI of another kind gets "
        "answers as confident as the model's own kind. The last column is what predict answers on test, threshold "
        "and check together (coverage / error among the answers).", "",
        report.md_table(["file", "held-out referred", "test referred",
                         f"foreign referred ({foreign})" if foreign else "foreign referred (no --foreign)",
                         "test answered / risk"], rows), ""]
