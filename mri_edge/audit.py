"""`mri-edge data audit`: counts, image properties, corrupt files and train/test leakage.

Exact duplicates are found by content hash. Near duplicates (re-encoded, resized,
visually identical copies) are found in two steps: a 64-bit difference hash proposes
candidate pairs (brain slices look alike, so many unrelated pairs pass it), then a
pixel-level check on 64x64 grayscale thumbnails confirms a pair only when the mean
absolute difference is below a threshold (reported in audit.json).
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import numpy as np

from . import groups, preprocess, report
from .audit_report import markdown
from .config import GROUP_THRESHOLD, HASH_MAX_DISTANCE, PIXEL_MAD_THRESHOLD
from .errors import MriEdgeError
from .files import sha256_bytes
from .integrity import image_format
from .data import check_outside, discover, find_splits, rel_path
from .progress import Progress
from .run import AUDIT_FILES



class AuditError(MriEdgeError):
    pass


def _image_info(path: str):
    """(sha256, format, mode, (w, h), thumbnail) or an error string."""
    try:
        raw = Path(path).read_bytes()
    except OSError:
        return "", "unreadable", None, None, None
    sha = sha256_bytes(raw)
    fmt = image_format(raw) or Path(path).suffix.lstrip(".").lower()
    import cv2  # noqa: PLC0415

    try:
        # the same pixel cap as every other reader: a decompression bomb is refused undecoded
        header = preprocess.header_size(raw)
        if header:
            preprocess.check_size(*header, str(path))
        arr = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_UNCHANGED) if raw else None
        if arr is not None:
            preprocess.check_size(arr.shape[1], arr.shape[0], str(path))
            thumb = groups.thumbnail(preprocess.to_rgb_uint8(arr, bgr=arr.ndim == 3))  # values training can read
    except (preprocess.ImageError, cv2.error):  # (OpenCV's own pixel cap, from the header)
        arr = None
    if arr is None:
        return sha, fmt, None, None, None
    mode = {2: "L"}.get(arr.ndim, {3: "RGB", 4: "RGBA", 1: "L"}.get(arr.shape[2] if arr.ndim == 3 else 1, "?"))
    if arr.ndim == 3 and arr.shape[2] == 3 and np.array_equal(arr[:, :, 0], arr[:, :, 1]) and np.array_equal(arr[:, :, 1], arr[:, :, 2]):
        mode = "RGB (grey content)"
    if arr.dtype == np.uint16:
        mode += " 16-bit"
    return sha, fmt, mode, (arr.shape[1], arr.shape[0]), thumb


def dhash(thumb: np.ndarray) -> np.uint64:
    import cv2  # noqa: PLC0415

    small = cv2.resize(thumb, (9, 8), interpolation=cv2.INTER_AREA)
    bits = (small[:, 1:] > small[:, :-1]).ravel()
    return np.uint64(int("".join("1" if b else "0" for b in bits), 2))


def _popcount64(x: np.ndarray) -> np.ndarray:
    x = x - ((x >> np.uint64(1)) & np.uint64(0x5555555555555555))
    x = (x & np.uint64(0x3333333333333333)) + ((x >> np.uint64(2)) & np.uint64(0x3333333333333333))
    x = (x + (x >> np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    return (x * np.uint64(0x0101010101010101)) >> np.uint64(56)


def near_pairs(hashes_a, thumbs_a, hashes_b, thumbs_b, same: bool, max_dist: int, mad_thr: float,
               label: str = "near duplicates"):
    """Candidate pairs by dHash distance, confirmed by pixel MAD. Returns (pairs, n_candidates, mads).
    The audit's slowest step (Alzheimer train-train: 12 million candidates): it shows progress."""
    na = len(hashes_a)
    confirmed, candidates, mads = [], 0, []
    with Progress(na, f"{label}: images compared") as bar:
        for start in range(0, na, 256):
            block = hashes_a[start:start + 256, None] ^ hashes_b[None, :]
            dist = _popcount64(block)
            ii, jj = np.nonzero(dist <= max_dist)
            ii = ii + start
            if same:
                keep = ii < jj
                ii, jj = ii[keep], jj[keep]
            candidates += len(ii)
            for s in range(0, len(ii), 20000):
                a, b = ii[s:s + 20000], jj[s:s + 20000]
                mad = np.abs(thumbs_a[a] - thumbs_b[b]).mean(1)
                mads.append(mad)
                ok = mad <= mad_thr
                confirmed += [(int(x), int(y), float(m)) for x, y, m in zip(a[ok], b[ok], mad[ok])]
            bar.update(len(block))
    return confirmed, candidates, (np.concatenate(mads) if mads else np.zeros(0))


def nearest_neighbour_probe(thumbs: np.ndarray, labels: np.ndarray, query: np.ndarray, reference: np.ndarray,
                            clean: np.ndarray, names: list[str]) -> dict:
    """Label each test image with the class of its most correlated training thumbnail.

    This classifier learns nothing, so a rate far above the majority class suggests that
    the test split rewards recognising images or subjects seen in training, which a
    check for copies does not reveal (or that the classes differ in plain pixel layout).
    `query`/`reference` index test/training rows of `thumbs`; `clean` marks the queries
    with no exact or near copy in training.
    """
    ref, ref_labels = thumbs[reference], labels[reference]
    j, best = groups.nearest(thumbs[query], ref)
    pred = ref_labels[j]
    truth = labels[query]
    hit = pred == truth
    recall = {n: float(hit[truth == c].mean()) for c, n in enumerate(names) if (truth == c).any()}
    return {"accuracy": float(hit.mean()),
            "leakage_free_accuracy": float(hit[clean].mean()) if clean.any() else None,
            "majority_class_rate": float(np.bincount(truth, minlength=len(names)).max() / len(truth)),
            "recall_by_class": recall, "median_best_correlation": float(np.median(best)),
            "n_test": int(len(query)), "n_reference": int(len(reference))}


@dataclass
class Item:
    """One image file of the dataset and what reading it told."""

    split: str
    path: str
    label: int
    rel: str
    sha: str = ""
    fmt: str = ""
    mode: str | None = None
    size: tuple | None = None
    thumb: np.ndarray | None = None


def _read(root: Path, task: str) -> tuple[list[Item], list[str], list[str]]:
    """(items, class names, split names) of the folders as they are on disk, training's images in
    the order train lists them: the grouped probe's carve takes groups by their first member."""
    ds = discover(root, task, carve=False)
    items = [Item(name, p, y, rel_path(p, root)) for name, s in ds.splits.items() for p, y in zip(s.paths, s.labels)]
    with Progress(len(items), "reading images") as bar, ThreadPoolExecutor(8) as pool:
        for it, info in zip(items, pool.map(lambda it: _image_info(it.path), items, chunksize=32)):
            it.sha, it.fmt, it.mode, it.size, it.thumb = info
            bar.update()
    return items, ds.class_names, list(dict.fromkeys(it.split for it in items))


def _conflict(a: Item, b: Item, names: list[str], kind: str, **extra) -> dict:
    return {"a": a.rel, "b": b.rel, "label_a": names[a.label], "label_b": names[b.label], "kind": kind, **extra}


def _exact_duplicates(items: list[Item], names: list[str]) -> tuple[list[list[int]], Counter, list[dict]]:
    """(groups of identical files, pairs by split pair, label conflicts)."""
    by_sha = defaultdict(list)
    for i, it in enumerate(items):
        if it.thumb is not None:
            by_sha[it.sha].append(i)
    exact_groups = [g for g in by_sha.values() if len(g) > 1]
    pairs, conflicts = Counter(), []
    for g in exact_groups:
        for x in range(len(g)):
            for y in range(x + 1, len(g)):
                a, b = items[g[x]], items[g[y]]
                pairs["-".join(sorted((a.split, b.split)))] += 1
                if a.label != b.label:
                    conflicts.append(_conflict(a, b, names, "exact"))
    return exact_groups, pairs, conflicts


def _near_duplicates(items: list[Item], idx: np.ndarray, thumbs: np.ndarray, split_names: list[str], names,
                     max_dist: int, mad_thr: float, log):
    """(pairs (i, j, mad) of item indices, stats by split pair, every candidate's MAD, label conflicts),
    checked across every pair of splits and within each split."""
    hashes = np.array([dhash(items[i].thumb) for i in idx], dtype=np.uint64)
    split_of = np.array([items[i].split for i in idx])
    near, stats, all_mads, conflicts = [], {}, [], []
    for ai, sa in enumerate(split_names):
        for sb in split_names[ai:]:
            ma, mb = np.flatnonzero(split_of == sa), np.flatnonzero(split_of == sb)
            pairs, cand, mads = near_pairs(hashes[ma], thumbs[ma], hashes[mb], thumbs[mb], sa == sb, max_dist, mad_thr,
                                           f"near duplicates {sa}-{sb}")
            all_mads.append(mads)
            confirmed = [(idx[ma[x]], idx[mb[y]], m) for x, y, m in pairs]
            n_exact = sum(1 for i, j, _ in confirmed if items[i].sha == items[j].sha)
            stats[f"{sa}-{sb}"] = {"hash_candidates": cand, "confirmed": len(confirmed),
                                   "of_which_byte_identical": n_exact}
            for i, j, m in confirmed:
                near.append((i, j, m))
                if items[i].label != items[j].label and items[i].sha != items[j].sha:
                    conflicts.append(_conflict(items[i], items[j], names, "near", mad=m))
            log(f"  {sa}-{sb}: {cand} hash candidates, {len(confirmed)} confirmed near duplicates "
                f"({n_exact} byte-identical)")
    return near, stats, (np.concatenate(all_mads) if all_mads else np.zeros(0)), conflicts


def _leaked(items: list[Item], near, exact_groups) -> dict[str, set]:
    """Evaluation images (val or test) with an exact or near copy in a split the model learned
    or was selected on (training; validation too, for test images)."""
    leaked = {"test": set(), "val": set()}

    def leaks(a: int, b: int) -> bool:
        sa, sb = items[a].split, items[b].split
        return sa in leaked and (sb == "train" or (sa == "test" and sb == "val"))

    for i, j, _ in near:
        for a, b in ((i, j), (j, i)):
            if leaks(a, b):
                leaked[items[a].split].add(items[a].rel)
    for g in exact_groups:
        for a in g:
            if any(leaks(a, b) for b in g if b != a):
                leaked[items[a].split].add(items[a].rel)
    return leaked


def ignored_files(root: Path, read: set[str]) -> list[str]:
    """Files in the split folders that discovery passed over (`read`: those it took, relative
    to root): hidden, checkpoint copies, OS debris, not images, files outside class folders,
    links that lead nowhere."""
    return sorted(rel for folder in find_splits(root).values() for p in folder.rglob("*")
                  if (p.is_file() or p.is_symlink()) and (rel := rel_path(str(p), root)) not in read)


def audit(data_dir, task: str = "custom", out_dir=None, max_dist: int = HASH_MAX_DISTANCE,
          mad_thr: float = PIXEL_MAD_THRESHOLD, log=print, group_threshold: float = GROUP_THRESHOLD) -> dict:
    root = Path(data_dir)
    if out_dir:
        check_outside(root, out_dir)
    items, names, split_names = _read(root, task)
    counts = defaultdict(Counter)
    for it in items:
        counts[it.split][names[it.label]] += 1
    ok = [it for it in items if it.thumb is not None]
    if not ok:
        raise AuditError(f"{root}: none of its {len(items)} image files can be decoded (all corrupt or unsupported)")
    exact_groups, exact_pairs, conflicts = _exact_duplicates(items, names)
    idx = np.array([i for i, it in enumerate(items) if it.thumb is not None])
    thumbs = groups.normalise(np.stack([items[i].thumb for i in idx]))
    near, stats, mads, near_conflicts = _near_duplicates(items, idx, thumbs, split_names, names, max_dist, mad_thr,
                                                         log)
    conflicts += near_conflicts
    leaked = _leaked(items, near, exact_groups)
    split_of = np.array([items[i].split for i in idx])
    labels = np.array([items[i].label for i in idx])
    probe = None
    query, reference = np.flatnonzero(split_of == "test"), np.flatnonzero(split_of != "test")
    if len(query) and len(reference):
        clean = np.array([items[idx[k]].rel not in leaked["test"] for k in query])
        probe = nearest_neighbour_probe(thumbs, labels, query, reference, clean, names)
        log(f"  nearest-neighbour probe: a raw-pixel 1-NN classifier gets {probe['accuracy']:.1%} of test images "
            f"right (majority class {probe['majority_class_rate']:.1%})")
    out = {
        "data_dir": str(root.resolve()), "task": task, "class_names": names,
        "counts": {s: dict(c) for s, c in counts.items()},
        "image_sizes": dict(Counter(f"{it.size[0]}x{it.size[1]}" for it in ok).most_common(20)),
        "modes": dict(Counter(it.mode for it in ok)), "formats": dict(Counter(it.fmt for it in items)),
        "corrupt": [it.rel for it in items if it.thumb is None],
        "ignored": ignored_files(root, {it.rel for it in items}),
        "exact_duplicates": {"groups": len(exact_groups), "pairs_by_split": dict(exact_pairs)},
        "near_duplicates": {"method": f"dHash-64 Hamming <= {max_dist} proposes; confirmed when the mean absolute "
                                      f"difference of contrast-normalised 64x64 grey thumbnails <= {mad_thr}",
                            "hash_max_distance": max_dist, "pixel_mad_threshold": mad_thr, "by_split_pair": stats,
                            "candidate_mad_quantiles": {q: float(np.quantile(mads, q / 100)) if len(mads) else None
                                                        for q in (1, 5, 25, 50)},
                            # A gap in this histogram around the threshold is what makes the threshold safe.
                            "candidate_mad_histogram": {f"{max(lo, 0)}-{hi}" if hi < 1e9 else f">{lo}":
                                                        int(((mads > lo) & (mads <= hi)).sum())
                                                        for lo, hi in ((-1, 1), (1, 2), (2, 3), (3, 4), (4, 6),
                                                                       (6, 8), (8, 10), (10, 1e9))}},
        "label_conflicts": conflicts[:500], "n_label_conflicts": len(conflicts),
        "nearest_neighbour_probe": probe,
        "validation_probes": groups.validation_probes(thumbs, split_of, labels, group_threshold, log,
                                                      names=[items[i].rel for i in idx]),
        "leaked": {s: sorted(v) for s, v in leaked.items()},
        "leakage_free": {s: sum(1 for it in items if it.split == s and it.rel not in leaked[s])
                         for s in leaked if s in split_names},
    }
    if out_dir:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        out["pairs_plot"] = _plot_pairs(near, items, names, out_dir / "duplicate_pairs.png", root)
        out["pairs_csv"] = _write_pairs(exact_groups, near, items, names, out_dir / "duplicates.csv")
        report.write_json(out_dir / AUDIT_FILES[0], out)
        report.write_text(out_dir / AUDIT_FILES[1], markdown(out))
    return out


def _write_pairs(exact_groups, near, items: list[Item], names, path: Path) -> str:
    """duplicates.csv: every pair of identical files and every confirmed near pair not already
    identical, with splits, classes and pixel MAD: the files to look at or remove."""
    def row(kind, i, j, mad):
        a, b = items[i], items[j]
        return {"kind": kind, "a": a.rel, "b": b.rel, "split_a": a.split, "split_b": b.split,
                "class_a": names[a.label], "class_b": names[b.label], "mad": round(float(mad), 3)}

    rows = [row("exact", i, j, 0.0) for g in exact_groups for i, j in combinations(g, 2)]
    rows += [row("near", i, j, m) for i, j, m in near if items[i].sha != items[j].sha]
    report.write_csv(path, rows, ["kind", "a", "b", "split_a", "split_b", "class_a", "class_b", "mad"])
    return path.name


def _plot_pairs(near, items: list[Item], names, path: Path, root: Path, n: int = 6) -> str | None:
    """The PNG's file name, or None where there is no pair to show (and no PNG)."""
    cross = [p for p in near if items[p[0]].split != items[p[1]].split]
    cross.sort(key=lambda p: -p[2])  # the least similar confirmed pairs say most about the threshold
    pick = cross[:n] if cross else near[:n]
    if not pick:
        return path.unlink(missing_ok=True)  # None, and no earlier audit's pairs beside this audit.md
    plt = report._plt()
    fig, axes = plt.subplots(len(pick), 2, figsize=(5, 2.5 * len(pick)))
    axes = np.atleast_2d(axes)
    for row, (i, j, m) in zip(axes, pick):
        for ax, k in zip(row, (i, j)):
            ax.imshow(preprocess.load_image(root / items[k].rel))
            ax.set_title(f"{items[k].split}: {names[items[k].label]}\n{Path(items[k].rel).name} (MAD {m:.2f})",
                         fontsize=7)
            ax.axis("off")
    fig.tight_layout()
    report.save_figure(fig, path, 100)
    return path.name


def read_audit(audit_json) -> dict:
    """An audit.json of `mri-edge data audit`, checked before anything uses it (one-line errors)."""
    from .files import read_json  # noqa: PLC0415

    try:
        a = read_json(audit_json, "--dedup", ("data_dir", "leaked"))
    except MriEdgeError as e:
        raise AuditError(f"{e} (expected an audit.json from `mri-edge data audit`)") from None
    if not isinstance(a["leaked"], dict) or not all(isinstance(v, list) for v in a["leaked"].values()):
        raise AuditError(f"--dedup {audit_json}: its 'leaked' entry is not a mapping of file lists; "
                         "expected an audit.json from `mri-edge data audit`")
    return a


def leakage_free_mask(audit_json, paths, root=None) -> np.ndarray:
    """True for evaluation images that have no exact or near copy in training/validation.

    Images are matched by their path relative to the data folder (`root`, the audit's own by
    default), so a moved, copied or symlinked copy of the audited dataset matches too. An audit
    whose leaked test files are not in that folder is of another dataset: refused, since it
    would call every image leakage-free."""
    a = read_audit(audit_json)
    root = os.path.abspath(root if root is not None else a["data_dir"])
    audited = sum((a.get("counts") or {}).get("test", {}).values())
    if "counts" in a and audited < len(paths):  # no leaked file to miss: an audit with fewer test images, or none
        raise AuditError(f"--dedup {audit_json}: it audited {audited} test images of {a['data_dir']}, fewer than the "
                         f"{len(paths)} evaluated here: an audit of another dataset, or of this one before images were "
                         "added? Audit it again with `mri-edge data audit`")
    leaked_test = a["leaked"].get("test", [])
    missing = [r for r in leaked_test if not os.path.exists(os.path.join(root, r))]
    if missing:
        raise AuditError(f"--dedup {audit_json}: {len(missing)} of the {len(leaked_test)} test files it lists as "
                         f"leaked are not in {root} (e.g. {missing[0]}): an audit of another dataset? Audit this "
                         "one with `mri-edge data audit`")
    leaked = {Path(r).as_posix() for rows in a["leaked"].values() for r in rows}
    mask = np.array([Path(rel_path(p, Path(root))).as_posix() not in leaked for p in paths])
    if not mask.any():
        raise AuditError("--dedup: every test image has a copy in training; no leakage-free subset left")
    return mask
