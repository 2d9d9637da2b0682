"""How far to trust one answer: temperature-scaled probabilities, an abstention threshold,
conformal prediction sets and a familiarity check (how unlike the training images an image's
pooled features are: the files' second output, `runtime.FEATURES`). The record (`Trust`) travels in every exported file's metadata
(and in a run folder's trust.json for its model.keras), and every runtime applies it through
`Trust.apply`, so the same image gets the same calibrated answer from each file.

Standard library and numpy only: the on-device runtime imports it. The fitting functions
(`fit_temperature`, `choose_threshold`, `conformal_quantile`) run on a workstation in
`mri-edge calibrate`; they are here beside `apply` so fit and use cannot drift apart.

Temperature is applied to the files' probability outputs (every mri-edge graph ends in a
softmax): softmax(log p / T) equals softmax(z / T) for the logits z, because log p differs
from z by a constant per image. Probabilities are floored at `FLOOR` first: an int8 softmax
output rounds small probabilities to 0, and log 0 has no temperature.
"""

from __future__ import annotations

import base64
import math
from dataclasses import asdict, dataclass, field

import numpy as np

from .errors import MriEdgeError


class TrustError(MriEdgeError, ValueError):
    """Data a fit cannot be made on (too few images)."""

FLOOR = 1e-6
REVIEW = "uncertain - refer for review"
REFER_ALL = float(np.nextafter(1.0, 2.0))  # a threshold above every probability: every answer is referred


NOT_CALIBRATED = "not calibrated: probabilities are the model's raw softmax (run `mri-edge calibrate`)"


def threshold_text(threshold: float, short: bool = False) -> str:
    """The abstention threshold as every report writes it: four decimals (an answer printed as
    0.996 can sit under a threshold printed so too), or what REFER_ALL means (`short`: in a
    few words, for a plot's title)."""
    if threshold >= REFER_ALL:
        return ("none met the target: every answer referred" if short else
                "1 (no threshold met the target on held-out images: every answer is referred)")
    return f"{threshold:.4f}"


def review_text(warnings: list[str]) -> str:
    """How every output marks a referred answer: REVIEW, then the warnings that caused it, if any."""
    return REVIEW + (": " + "; ".join(warnings) if warnings else "")


def set_text(classes: list[str], coverage: float) -> str:
    """A conformal prediction set as every output writes it."""
    return f"set ({coverage:.0%}): {' or '.join(classes)}"


def scale(probs: np.ndarray, temperature: float) -> np.ndarray:
    """(N, K) probabilities -> temperature-scaled probabilities (float32; T = 1 is exact)."""
    probs = np.asarray(probs, np.float32)
    if temperature == 1.0:
        return probs
    z = np.log(np.clip(probs.astype(np.float64), FLOOR, 1.0)) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    """Negative log-likelihood of the true labels (each probability floored at 1e-12)."""
    p = np.asarray(probs, np.float64)[np.arange(len(labels)), np.asarray(labels)]
    return float(-np.log(np.clip(p, 1e-12, 1.0)).mean())


T_RANGE = (0.25, 10.0)


def fit_temperature(probs: np.ndarray, labels: np.ndarray, lo: float = T_RANGE[0], hi: float = T_RANGE[1]) -> float:
    """The temperature that minimises the negative log-likelihood of `labels` (golden-section
    search over log T; NLL is unimodal in T for temperature scaling). Bounded: on held-out
    images the model gets all right, the likelihood grows without end as T -> 0, and a
    temperature fitted to that would make every later answer look certain."""
    labels = np.asarray(labels)
    if len(labels) == 0:
        raise TrustError("no held-out images to fit a temperature on")
    f = lambda log_t: nll(scale(probs, math.exp(log_t)), labels)  # noqa: E731
    a, b = math.log(lo), math.log(hi)
    g = (math.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(60):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(d)
    return float(math.exp((a + b) / 2))


def coverage_risk(probs: np.ndarray, labels: np.ndarray) -> dict:
    """The coverage-risk curve of answering only above a confidence threshold: for each
    threshold (the images' own confidences, highest first), the share answered, the error
    among them and its count. Lists of equal length, ordered by falling threshold."""
    probs = np.asarray(probs)
    conf = probs.max(1)
    wrong = (probs.argmax(1) != np.asarray(labels)).astype(int)
    order = np.argsort(-conf, kind="stable")
    k = np.arange(1, len(conf) + 1)
    errors = np.cumsum(wrong[order])
    return {"threshold": conf[order].tolist(), "coverage": (k / len(conf)).tolist(),
            "risk": (errors / k).tolist(), "errors": errors.tolist()}


def at_threshold(probs: np.ndarray, labels: np.ndarray, threshold: float, also: np.ndarray | None = None) -> dict:
    """Coverage, risk (error among accepted answers) and accepted-answer accuracy at a threshold;
    `also`: a second (N,) bool condition for accepting (the familiarity check's)."""
    probs = np.asarray(probs)
    accept = probs.max(1) >= threshold
    if also is not None:
        accept &= also
    right = probs.argmax(1) == np.asarray(labels)
    n_acc = int(accept.sum())
    # no accepted answer has no error rate: None (JSON null), written "n/a" by coverage_risk_text
    risk = float((~right[accept]).mean()) if n_acc else None
    return {"threshold": float(threshold), "n": int(len(accept)), "accepted": n_acc,
            "coverage": float(accept.mean()) if len(accept) else 0.0, "risk": risk,
            "accepted_accuracy": 1.0 - risk if n_acc else None}


def coverage_risk_parts(a: dict | None, percent: bool = False) -> tuple[str, str]:
    """(coverage, risk) of an at_threshold result as the reports write them: fractions to 3 and 4
    decimals, or percentages; "n/a" for the risk of a threshold that accepts nothing."""
    if not a:
        return "", ""
    if a["risk"] is None:
        risk = "n/a"
    else:
        risk = f"{a['risk']:.2%}" if percent else f"{a['risk']:.4f}"
    return (f"{a['coverage']:.1%}" if percent else f"{a['coverage']:.3f}"), risk


def coverage_risk_text(a: dict | None, percent: bool = False) -> str:
    """"coverage / risk" in one cell (coverage_risk_parts)."""
    return " / ".join(coverage_risk_parts(a, percent)) if a else ""


def binomial_cdf(errors: int, n: int, p: float) -> float:
    """P(X <= errors) for X ~ Binomial(n, p), exact: the terms' logarithms from the ratio of
    neighbouring terms, summed in log space (no overflow for any n)."""
    if errors >= n or p <= 0:
        return 1.0
    if p >= 1:
        return 0.0
    i = np.arange(errors)
    log_terms = n * math.log1p(-p) + np.concatenate(
        [[0.0], np.cumsum(np.log((n - i) / (i + 1)) + math.log(p) - math.log1p(-p))])
    return float(min(1.0, np.exp(np.logaddexp.reduce(log_terms))))


def fewest_to_certify(max_risk: float, confidence: float) -> int | float:
    """The fewest accepted held-out answers, all right, that show an error of at most max_risk
    with this confidence: (1 - max_risk) ** n <= 1 - confidence (inf for max_risk 0)."""
    if max_risk <= 0:
        return math.inf
    if max_risk >= 1:
        return 1
    return math.ceil(math.log(1 - confidence) / math.log1p(-max_risk))


def choose_threshold(probs: np.ndarray, labels: np.ndarray, max_risk: float | None = None,
                     coverage: float | None = None, confidence: float | None = None) -> float:
    """The abstention threshold on (calibrated) top-1 confidence, from held-out data.

    max_risk: the lowest threshold whose accepted answers have an error of at most max_risk,
    counting one error more than observed ((errors + 1) / (accepted + 1)), so that a small
    held-out set does not promise a risk it never measured. coverage: the threshold that
    accepts that share of the held-out images. No threshold meets max_risk -> REFER_ALL.

    max_risk with confidence: a test instead of an estimate. The hypotheses are "answering the
    k most confident images has an error above max_risk", in the fixed order k = m, m + 1, ...,
    where m = `fewest_to_certify` (no test of fewer images can pass, so starting earlier would
    only stop at once). Each is tested by an exact one-sided binomial test at level
    1 - confidence and the first that is not rejected ends the search (fixed-sequence testing,
    as in Learn then Test, Angelopoulos et al. 2021). When the error grows as the threshold
    falls, the thresholds that break max_risk come after those that hold it, and the search
    can pass one only by passing the first, which happens with probability at most
    1 - confidence: the chosen threshold holds max_risk on new images like the held-out ones
    with that confidence. Only cuts between distinct confidences are thresholds.
    """
    if (max_risk is None) == (coverage is None):
        raise TrustError("give exactly one of max_risk and coverage")
    if confidence is not None and max_risk is None:
        raise TrustError("confidence goes with max_risk")
    conf = np.asarray(probs).max(1)
    if coverage is not None:
        if coverage >= 1:
            return 0.0
        return float(np.quantile(conf, 1 - coverage, method="higher"))
    curve = coverage_risk(probs, labels)
    thr = np.asarray(curve["threshold"])
    k = np.arange(1, len(thr) + 1)
    errors = np.asarray(curve["errors"])
    cut = np.append(thr[1:] < thr[:-1], True)  # only cut between distinct confidences
    if confidence is None:
        ok = cut & ((errors + 1) / (k + 1) <= max_risk)
        return float(thr[np.flatnonzero(ok)[-1]]) if ok.any() else REFER_ALL
    if max_risk >= 1:
        return 0.0
    chosen = REFER_ALL
    for j in np.flatnonzero(cut & (k >= fewest_to_certify(max_risk, confidence))):
        if binomial_cdf(int(errors[j]), int(k[j]), max_risk) > 1 - confidence:
            break
        chosen = float(thr[j])
    return chosen


def describe_target(target: dict) -> str:
    """The threshold's target (trust.json's fitted_on.target) in words, for the reports."""
    if "coverage" not in target and "max_risk" not in target:
        return "not recorded"
    if "coverage" in target:
        return f"answer {target['coverage']:.0%} of held-out images"
    if "confidence" in target:
        return f"error at most {target['max_risk']:.1%} with {target['confidence']:.0%} confidence, by binomial tests"
    return f"error at most {target['max_risk']:.1%} on held-out images, estimated"


def aps_scores(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The score of each row's label: the probability mass of the classes ranked above it.
    This is the adaptive-prediction-set score of Romano et al. (2020) with its random share
    of the label's own mass fixed at 0, so the same image always gets the same set; the
    coverage guarantee holds for any score, and the ties at 0 (correct top-1 answers) only
    raise the coverage."""
    probs = np.asarray(probs, np.float64)
    p_true = probs[np.arange(len(labels)), np.asarray(labels)]
    return (probs * (probs > p_true[:, None])).sum(1)


def conformal_quantile(probs: np.ndarray, labels: np.ndarray, alpha: float) -> float:
    """Split-conformal quantile of the APS score: a set that takes classes by falling
    probability until their mass reaches it holds the true class with probability >= 1 -
    alpha on new images exchangeable with the held-out ones (Vovk et al.; Angelopoulos &
    Bates 2021). APS rather than the 1 - p(true) score: its sets grow on uncertain images
    instead of shrinking to nothing."""
    scores = aps_scores(probs, labels)
    n = len(scores)
    level = math.ceil((n + 1) * (1 - alpha)) / n
    if level > 1:
        return 1.0  # too few held-out images for this alpha: every class is in every set
    return float(np.quantile(scores, level, method="higher"))


def prediction_sets(probs: np.ndarray, q: float) -> list[list[int]]:
    """The conformal set of each row: classes by falling probability while the mass before
    them is at most q (so the top class is always in it)."""
    probs = np.asarray(probs, np.float64)
    out = []
    for row in probs:
        order = np.argsort(-row, kind="stable")
        before = np.concatenate([[0.0], np.cumsum(row[order])[:-1]])
        out.append([int(k) for i, k in enumerate(order) if i == 0 or before[i] <= q + 1e-9])
    return out


def set_coverage(probs: np.ndarray, labels: np.ndarray, q: float) -> dict:
    sets = prediction_sets(probs, q)
    hit = [int(y) in s for s, y in zip(sets, np.asarray(labels))]
    sizes = np.array([len(s) for s in sets])
    return {"coverage": float(np.mean(hit)) if hit else 0.0, "mean_size": float(sizes.mean()) if len(sizes) else 0.0,
            "singletons": float((sizes == 1).mean()) if len(sizes) else 0.0}


def fit_familiarity(features: np.ndarray, labels: np.ndarray, dims: int) -> dict:
    """What `distance` needs to tell how unlike the training images an image is, from the
    pooled features of training images: the class centres and a whitening projection onto
    the `dims` main directions of the features' spread within their class (a Mahalanobis
    distance with one covariance for all classes, Lee et al. 2018). The model's confidence
    cannot tell this: an MRI of another kind gets answers as confident as its own kind's.
    Fewer directions than features: the covariance of 1024 features from a few thousand
    images is poorly known in its smallest directions, and those would dominate the distance."""
    f = np.asarray(features, np.float64).reshape(len(features), -1)
    labels = np.asarray(labels)
    classes = np.unique(labels)
    means = np.stack([f[labels == c].mean(0) for c in classes])
    spread = f - means[np.searchsorted(classes, labels)]
    eigval, eigvec = np.linalg.eigh(spread.T @ spread / len(f))
    k = min(dims, len(eigval), len(f) - len(classes))
    if k < 1:
        raise TrustError("too few training images to fit the familiarity check")
    eigval, eigvec = eigval[::-1][:k], eigvec[:, ::-1][:, :k]
    projection = (eigvec / np.sqrt(np.maximum(eigval, eigval[0] * 1e-6))).astype(np.float16)
    return {"projection": base64.b64encode(projection.astype("<f2").tobytes()).decode("ascii"),
            "shape": list(projection.shape), "centres": (means @ projection.astype(np.float64)).tolist()}


def distance(features: np.ndarray, record: dict) -> np.ndarray:
    """(N,) distance of each image's pooled features to the nearest class centre of the
    training images: the root mean square of its whitened coordinates over the record's
    directions (standard deviations of the training spread; about 1 for an image like them)."""
    shape = tuple(record["shape"])
    projection = np.frombuffer(base64.b64decode(record["projection"]), "<f2").reshape(shape).astype(np.float64)
    z = np.asarray(features, np.float64).reshape(len(features), -1) @ projection
    d2 = ((z[:, None, :] - np.asarray(record["centres"])[None]) ** 2).sum(-1).min(1)
    return np.sqrt(d2 / shape[1])


def fitted_for(record: dict | None, model_sha: str | None) -> bool:
    """Whether a calibration record (trust.json, or the copy in an exported file) was fitted for
    the trained model whose model.keras has SHA-256 `model_sha`: the one rule by which export,
    verify, calibrate and the .keras back end apply a record or refuse it. A record or a model
    whose hash is unknown cannot be matched, so it does not apply."""
    return bool(record and model_sha) and (record.get("fitted_on") or {}).get("source_model_sha256") == model_sha


@dataclass
class Trust:
    """What `mri-edge calibrate` stores: temperature, abstention threshold (on calibrated top-1
    probability) and the conformal quantile, with where they were fitted."""

    temperature: float = 1.0
    threshold: float | None = None
    alpha: float | None = None
    conformal_q: float | None = None
    fitted_on: dict = field(default_factory=dict)
    # `fit_familiarity`'s record, its "limit" (the distance above which an image is referred as
    # unlike the training images) and how that was chosen; None: no check
    familiarity: dict | None = None

    @classmethod
    def from_meta(cls, meta: dict) -> "Trust | None":
        record = meta.get("trust")
        if not record:
            return None
        return cls(**{k: record[k] for k in cls.__dataclass_fields__ if k in record})

    def to_dict(self) -> dict:
        out = asdict(self)
        if out["familiarity"] is None:  # records without the check read and compare as they were written
            del out["familiarity"]
        return out

    def apply(self, probs: np.ndarray) -> np.ndarray:
        return scale(probs, self.temperature)

    def uncertain(self, calibrated: np.ndarray) -> np.ndarray:
        """(N,) bool: answers below the abstention threshold (none without a threshold)."""
        if self.threshold is None:
            return np.zeros(len(calibrated), bool)
        return np.asarray(calibrated).max(1) < self.threshold

    def decision_metrics(self, calibrated: np.ndarray, labels: np.ndarray) -> dict:
        """Abstention at the stored threshold and the conformal sets' coverage on labelled images."""
        out = {}
        if self.threshold is not None:
            out["abstention"] = at_threshold(calibrated, labels, self.threshold)
        if self.conformal_q is not None:
            out["sets"] = set_coverage(calibrated, labels, self.conformal_q)
        return out

    def distances(self, features: np.ndarray | None) -> np.ndarray | None:
        """(N,) `distance` of each image, or None without a familiarity record or features."""
        if self.familiarity is None or features is None:
            return None
        return distance(features, self.familiarity)

    def unfamiliar(self, features: np.ndarray | None = None, distances: np.ndarray | None = None) -> np.ndarray | None:
        """(N,) bool: images farther from the training images than the stored limit, from their
        features or their `distances` when those are at hand."""
        d = self.distances(features) if distances is None else distances
        return None if d is None or self.familiarity is None else d > self.familiarity["limit"]

    @property
    def sets_single(self) -> bool:
        """Every set is the top class alone (quantile 0: held-out error under alpha), so a set says
        no more than the answer: predict and explain do not print them."""
        return self.conformal_q == 0.0

    def sets(self, calibrated: np.ndarray) -> list[list[int]] | None:
        return None if self.conformal_q is None else prediction_sets(calibrated, self.conformal_q)
