"""Groups of near-identical images, and a validation split that holds out whole groups.

Two images are near twins when their 64x64 grey thumbnails, each contrast-normalised, have
a correlation of at least `threshold`; groups are the connected components of that graph
(the same thumbnails and correlation as the audit's nearest-neighbour probe). A randomly
carved validation split of a dataset with several slices per subject puts a near twin of
almost every validation image into training, so validation accuracy measures recognition;
holding out whole groups removes the twins (docs/data.md has the measurements).
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from . import preprocess
from .config import TrainConfig
from .progress import Progress

THUMB = 64
LEVELS = 50.0  # grey levels per standard deviation of a normalised thumbnail


def thumbnail(rgb: np.ndarray) -> np.ndarray:
    """(64, 64) float32 grey thumbnail of an RGB uint8 image (area interpolation)."""
    import cv2  # noqa: PLC0415

    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    return cv2.resize(grey, (THUMB, THUMB), interpolation=cv2.INTER_AREA).astype(np.float32)


def normalise(thumbs: np.ndarray) -> np.ndarray:
    """Per-image contrast normalisation (rows), so a re-encode with shifted levels still matches."""
    t = thumbs.reshape(len(thumbs), -1)
    mu = t.mean(1, keepdims=True)
    sd = t.std(1, keepdims=True) + 1e-6
    return ((t - mu) / sd * LEVELS).astype(np.float32)


def correlation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of every row of a with every row of b (normalised thumbnails)."""
    return (a @ b.T) / (a.shape[1] * LEVELS**2)


def nearest(query: np.ndarray, ref: np.ndarray, block: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """(row of `ref` most correlated with each row of `query`, that correlation), computed
    `block` queries at a time so memory stays at block x len(ref)."""
    index = np.empty(len(query), np.int64)
    best = np.empty(len(query), np.float32)
    for s in range(0, len(query), block):
        sim = correlation(query[s:s + block], ref)
        j = sim.argmax(1)
        index[s:s + block], best[s:s + block] = j, sim[np.arange(len(j)), j]
    return index, best


def read_thumbnails(paths: list[str], label: str = "reading thumbnails") -> tuple[np.ndarray, np.ndarray]:
    """(normalised thumbnails, readable mask); unreadable files get a zero row."""
    def one(p):
        try:
            return thumbnail(preprocess.load_image(p))
        except preprocess.ImageError:
            return None

    out = np.zeros((len(paths), THUMB * THUMB), np.float32)
    ok = np.zeros(len(paths), bool)
    with Progress(len(paths), label) as bar, ThreadPoolExecutor(8) as pool:
        for i, t in enumerate(pool.map(one, paths, chunksize=16)):
            if t is not None:
                out[i], ok[i] = normalise(t[None])[0], True
            bar.update()
    return out, ok


def components(thumbs: np.ndarray, threshold: float, ok: np.ndarray | None = None, block: int = 1024) -> np.ndarray:
    """Group id of each row: connected components of the graph of pairs with correlation >=
    threshold (blockwise, so memory stays at block x N). Unreadable rows stay alone."""
    n = len(thumbs)
    parent = np.arange(n)

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    ok = np.ones(n, bool) if ok is None else ok
    for s in range(0, n, block):
        sim = correlation(thumbs[s:s + block], thumbs)
        ii, jj = np.nonzero(sim >= threshold)
        for a, b in zip(ii + s, jj):
            if a < b and ok[a] and ok[b]:
                ra, rb = find(a), find(b)
                if ra != rb:
                    parent[ra] = rb
    return np.array([find(i) for i in range(n)])


def grouped_indices(groups: np.ndarray, labels, fraction: float, seed: int,
                    names: list[str] | None = None, usable: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """Indices to hold out: whole groups, class by class (a group counts for its majority
    class) until each class has about `fraction` of its images held out. A group more than
    twice the share still missing is skipped (it would take too much of a small class).
    Rows not `usable` (images that cannot be read) are never held out and count for nothing:
    training skips them, and held out they would leave the split short of what it claims.

    Groups are taken in the order of a seeded hash of their first member's name (its class
    folder and file name; its row without `names`), not of a random permutation of the group
    list: another machine's decoder can put one pair on the other side of the threshold, and
    a permutation of a list one group shorter differs everywhere, while a hash order moves
    only the groups that pair touches; names also keep the order when a file is added."""
    labels = np.asarray(labels)
    usable = np.ones(len(labels), bool) if usable is None else np.asarray(usable, bool)
    ids = np.unique(groups[usable])
    members = {g: np.flatnonzero((groups == g) & usable) for g in ids}
    majority = {g: int(np.bincount(labels[m]).argmax()) for g, m in members.items()}

    def order(g) -> bytes:
        first = members[g][0]
        key = "/".join(Path(names[first]).parts[-2:]) if names is not None else str(first)
        return hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()

    held = []
    for c in np.unique(labels):
        need = fraction * ((labels == c) & usable).sum()
        for g in sorted((g for g in ids if majority[g] == c), key=order):
            if need <= 0:
                break
            if len(members[g]) > max(2 * need, 1):
                continue
            held += members[g].tolist()
            need -= len(members[g])
    sizes = np.array([len(m) for m in members.values()])
    info = {"groups": int(len(ids)), "largest_group": int(sizes.max()), "singletons": int((sizes == 1).sum()),
            "order": "blake2b(seed:first member's class folder/file name)" if names is not None
                     else "blake2b(seed:first row)",
            "held_out_groups": int(len(set(groups[held].tolist()))) if held else 0,
            **({"unreadable": int((~usable).sum())} if not usable.all() else {})}
    return np.array(sorted(held), dtype=int), info


def holdout_probe(thumbs: np.ndarray, labels, held: np.ndarray) -> dict:
    """1-NN accuracy of held-out rows against the rest, and their median best correlation:
    near 100% means the held-out images have twins in what remains."""
    labels = np.asarray(labels)
    mask = np.zeros(len(labels), bool)
    mask[held] = True
    if not mask.any() or mask.all():
        return {"nn_accuracy": None, "median_best_correlation": None, "n": int(mask.sum())}
    rest = np.flatnonzero(~mask)
    q = np.flatnonzero(mask)
    j, best = nearest(thumbs[q], thumbs[rest])
    pred = labels[rest][j]
    return {"nn_accuracy": float((pred == labels[q]).mean()), "median_best_correlation": float(np.median(best)),
            "n": int(len(q))}


def validation_probes(thumbs, split_of, labels, threshold: float, log, fraction: float = TrainConfig.val_fraction,
                      seed: int = TrainConfig.seed, names: list[str] | None = None) -> dict:
    """1-NN probe of a validation split carved from training at random and one carved by
    whole groups (`--val-split grouped`), beside the test split's: the split whose probe is
    near the test's is the one that can select models for the test's kind of images."""
    from .data import DataError, stratified_carve  # noqa: PLC0415

    train = np.flatnonzero(split_of == "train")
    if len(train) < 10:
        return {}
    t_thumbs, t_labels = thumbs[train], labels[train]
    # the carve `--val-split random` makes, on row numbers instead of paths
    try:
        random_held = np.array(stratified_carve(list(range(len(train))), t_labels.tolist(), fraction, seed)[1].paths)
    except DataError:  # a class with a single training image cannot be carved: no random probe
        random_held = np.zeros(0, int)
    ids = components(t_thumbs, threshold)
    grouped_held, info = grouped_indices(ids, t_labels, fraction, seed,
                                         [names[i] for i in train] if names is not None else None)
    out = {"random": holdout_probe(t_thumbs, t_labels, random_held),
           "grouped": {**holdout_probe(t_thumbs, t_labels, grouped_held), **info, "threshold": threshold}}
    test = np.flatnonzero(split_of == "test")
    if len(test):
        j, best = nearest(thumbs[test], t_thumbs)
        out["test"] = {"nn_accuracy": float((t_labels[j] == labels[test]).mean()),
                       "median_best_correlation": float(np.median(best)), "n": int(len(test))}
    shown = ", ".join(f"{k} {v['nn_accuracy']:.1%}" for k, v in out.items() if v.get("nn_accuracy") is not None)
    log(f"  1-NN probe of validation carved at random / by groups (threshold {threshold}) / test: {shown}")
    return out


def grouped_carve(paths: list[str], labels: list[int], fraction: float, seed: int,
                  threshold: float) -> tuple:
    """Hold out whole groups of near-identical images, stratified by class; the record says how
    many groups there were and what a 1-NN probe gets on the held-out part."""
    from .data import DataError, split_off  # noqa: PLC0415

    if not 0 < fraction < 1:
        raise DataError(f"--val-fraction must be between 0 and 1, got {fraction}")
    thumbs, ok = read_thumbnails(paths, "grouping training images")
    ids = components(thumbs, threshold, ok)
    held, info = grouped_indices(ids, labels, fraction, seed, paths, usable=ok)
    if not len(held):
        raise DataError("--val-split grouped: every group of near-identical images is more than twice the "
                        "validation share; a higher --group-threshold makes smaller groups")
    mask = np.zeros(len(paths), bool)
    mask[held] = True
    info.update({"method": "grouped", "threshold": threshold, "fraction": fraction,
                 "probe": holdout_probe(thumbs, labels, held)})
    return *split_off(paths, labels, mask), info


def describe_carve(manifest: dict) -> str:
    """How a run's validation split was made, in words, from its split manifest: train's log
    line, the training report's and the model card's."""
    how, n_val = manifest.get("val_split") or {}, len(manifest["splits"].get("val") or [])
    if how.get("refit"):
        rest = describe_carve({**manifest, "val_split": {k: v for k, v in how.items() if k != "refit"}})
        return f"{rest}; trained on as well (--refit), so its numbers are not held-out ones"
    if not manifest.get("val_carved_from_train"):
        return f"validation: the dataset's own validation folder ({n_val} images)"
    if "kept_from" in how:
        return (f"validation: the same {n_val} images as the run this one started from ({how['kept_from']}, given as "
                f"--weights; a {how.get('method', 'random')} carve), kept rather than carved anew, since the starting "
                "weights were fitted on the rest")
    if how.get("method") == "grouped":
        return (f"validation: {how['held_out_groups']} of {how['groups']} groups of near-identical images held out "
                f"whole ({how['probe']['n']} images; a 1-NN probe gets {how['probe']['nn_accuracy']:.1%} of them)")
    return (f"validation: {n_val} images carved from training at random; on data with several slices per subject "
            "they have near twins in training (--val-split grouped holds out whole groups of them)")
