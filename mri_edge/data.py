"""Dataset discovery, stratified splits and the decoded-image cache (training batches: feed.py)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import preprocess
from .config import GROUP_THRESHOLD, TrainConfig
from .errors import MriEdgeError
from .files import atomic_path
from .progress import Progress
from .runtime import usable_cores
from .tasks import resolve_classes

SPLIT_NAMES = {
    "train": ("train", "training"),
    "val": ("val", "valid", "validation"),
    "test": ("test", "testing"),
}


class DataError(MriEdgeError, ValueError):
    """The dataset folder is missing, empty or inconsistent."""


class DataMovedError(DataError):
    """An image a run's split manifest lists cannot be read now: nothing can be checked on it."""


RE_ROOT = "if the dataset moved, `mri-edge evaluate RUN --data-dir WHERE` re-roots the run"


def decode_images(model, root: Path, paths: list[str], what: str, moved: str = RE_ROOT) -> np.ndarray:
    """(N, S, S, 3) uint8: the manifest's images under `model`'s preprocessing contract; `moved`:
    what to do when one cannot be read (the caller's own way to point at the data)."""
    size = model.image_size
    imgs = np.zeros((len(paths), size, size, 3), np.uint8)
    with Progress(len(imgs), f"decoding {what} ({size} px)") as bar:
        for i, rel in enumerate(paths):
            try:
                imgs[i] = model.preprocess(Path(root) / rel)
            except Exception as e:
                raise DataMovedError(f"{what[:-1] if what.endswith('s') else what} {Path(root) / rel} cannot be "
                                     f"read now ({e})" + (f"; {moved}" if moved else "")) from None
            bar.update()
    return imgs


@dataclass
class Split:
    name: str
    paths: list[str]
    labels: list[int]


@dataclass
class Dataset:
    root: str
    task: str
    class_keys: list[str]
    class_names: list[str]
    splits: dict[str, Split]
    val_carved: bool = False
    notes: list[str] = field(default_factory=list)
    val_split: dict = field(default_factory=dict)  # how validation was carved (method, grouping, probe)

    def manifest(self) -> dict:
        """Which file went to which split, relative to the data root."""
        root = Path(self.root)
        return {
            "root": str(root.resolve()),
            "task": self.task,
            "class_names": self.class_names,
            "val_carved_from_train": self.val_carved,
            **({"val_split": self.val_split} if self.val_split else {}),
            "splits": {
                name: [[rel_path(p, root), int(y)] for p, y in zip(s.paths, s.labels)]
                for name, s in self.splits.items()
            },
        }


def rel_path(p: str, root: Path) -> str:
    """An image's path inside its dataset folder (a link keeps its own: resolved, it may leave it)."""
    with contextlib.suppress(ValueError):
        return str(Path(p).absolute().relative_to(root.absolute()))
    try:
        path = Path(p).resolve()
    except (OSError, RuntimeError):  # a link that leads to itself: named by its own path
        return str(Path(p).absolute())
    with contextlib.suppress(ValueError):
        return str(path.relative_to(root.resolve()))
    return str(path)


def find_splits(data_dir: str | Path) -> dict[str, Path]:
    """Locate train/val/test folders under data_dir, whatever their spelling and case."""
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"data folder {'is a file, not a folder' if root.exists() else 'not found'}: {root}")
    found: dict[str, Path] = {}
    for child in sorted(root.iterdir()):
        if not child.is_dir() or child.name.startswith("."):
            continue
        n = child.name.lower().replace("-", "").replace("_", "").replace(" ", "")
        for split, names in SPLIT_NAMES.items():
            if n in names:
                if split in found:
                    raise DataError(f"two folders for the {split} split: {found[split].name!r} and {child.name!r}")
                found[split] = child
    if "train" not in found:
        raise DataError(f"no training split in {root} (expected a folder named Training or train)")
    return found


def check_outside(data_dir: str | Path, out: str | Path, option: str = "--out") -> None:
    """Refuse an output folder inside the dataset's split folders: what a command writes there
    (plots, reports, a model) would be read back as images of a class by the next one."""
    splits = find_splits(data_dir)
    where = Path(out).resolve()
    for split in splits.values():
        if where.is_relative_to(split.resolve()):
            raise DataError(f"{option} {out} is inside the dataset's {split.name} folder: its files would be read "
                            "as images of a class; write it elsewhere")


# Files and folders that are never images of a dataset: OS and tool debris.
JUNK_NAMES = {"__macosx", "thumbs.db", "desktop.ini", ".ds_store", "__pycache__"}


def is_hidden(rel: Path) -> bool:
    """A hidden path component (.ipynb_checkpoints/, .DS_Store, ._x.jpg) or OS debris."""
    return any(part.startswith(".") or part.lower() in JUNK_NAMES for part in rel.parts)


def is_junk(rel: Path) -> bool:
    """Hidden (`is_hidden`), or a file that is not an image by its suffix."""
    return is_hidden(rel) or rel.suffix.lower() not in preprocess.IMAGE_SUFFIXES


def list_images(class_dir: Path, unlisted: list[Path] | None = None) -> list[Path]:
    """Image files under a class folder, at any depth; junk (see is_junk) is ignored. A folder
    that cannot be listed (rglob passes over it) is an error, since its images would be left out
    of a dataset, or goes into `unlisted` when given (predict's folders)."""
    found = list(class_dir.rglob("*"))
    for d in [class_dir, *(p for p in found if p.is_dir() and not is_hidden(p.relative_to(class_dir)))]:
        if not os.access(d, os.R_OK | os.X_OK):
            if unlisted is None:
                raise DataError(f"{d}: cannot be read (permission denied); its images would be left out of the dataset")
            unlisted.append(d)
    return sorted(p for p in found if p.is_file() and not is_junk(p.relative_to(class_dir)))


def scan_split(split_dir: Path, task: str) -> tuple[list[str], list[str], list[str], list[int]]:
    """(class keys, class names, paths, labels) for one split folder."""
    folders = sorted(p for p in split_dir.iterdir()
                     if p.is_dir() and not p.name.startswith(".") and p.name.lower() not in JUNK_NAMES)
    if not folders:
        raise DataError(f"{split_dir} has no class folders")
    keys, names, mapping = resolve_classes(task, [f.name for f in folders])
    paths, labels = [], []
    for f in folders:
        files = list_images(f)
        if not files:
            ignored = sum(1 for q in f.rglob("*") if q.is_file())
            raise DataError(f"class folder {f} has no images" + (f" ({ignored} other file(s) ignored: hidden, "
                            "checkpoint copies or not images by their suffix)" if ignored else ""))
        paths += [str(p) for p in files]
        labels += [mapping[f.name]] * len(files)
    return keys, names, paths, labels


def per_class_indices(labels, seed: int) -> tuple[dict[int, np.ndarray], np.random.Generator]:
    """Each class's indices in a seeded random order, and the generator for further draws: the
    one stratified sampler (the validation carve, --limit-per-class and the int8 calibration set
    each take slices of these orders)."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    return {int(c): rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)}, rng


def stratified_carve(paths: list[str], labels: list[int], fraction: float, seed: int, names: list[str] | None = None):
    """Split off `fraction` of each class (at least one image per class), reproducibly."""
    if not 0 < fraction < 1:
        raise DataError(f"--val-fraction must be between 0 and 1, got {fraction}")
    held = np.zeros(len(paths), bool)
    for c, idx in per_class_indices(labels, seed)[0].items():
        if len(idx) < 2:
            raise DataError(f"class {repr(names[c]) if names else c} has {len(idx)} training image(s): a validation "
                            "split cannot be carved from it (it needs at least 2)")
        held[idx[:max(1, int(round(fraction * len(idx))))]] = True
    return split_off(paths, labels, held)


def split_off(paths: list[str], labels: list[int], held: np.ndarray) -> tuple[Split, Split]:
    """(train, val): the images not held out and those held out (mask `held`), in their order."""
    return tuple(Split(name, [p for p, k in zip(paths, m) if k], [y for y, k in zip(labels, m) if k])
                 for name, m in (("train", ~held), ("val", held)))


VAL_SPLITS = ("random", "grouped")


def kept_carve(train: Split, root: Path, task: str, weights: str | None) -> tuple[Split, Split, dict] | None:
    """The validation carve of the run whose model.keras `weights` is, when it was carved from these
    same training images: kept, because a new carve (another seed, share, threshold or version of
    the carve) would validate on images the starting weights were fitted on."""
    from .run import RunFolder  # noqa: PLC0415

    manifest = RunFolder(Path(str(weights)).parent).manifest_path
    if Path(str(weights)).suffix != ".keras" or not manifest.is_file():
        return None
    try:
        prior = json.loads(manifest.read_text())
        held = prior["splits"].get("val", prior.get("held_out"))  # a pretrain folder records its carve apart
        rows = {s: {rel for rel, _ in r} | set((prior.get("unreadable") or {}).get(s, []))
                for s, r in (("train", prior["splits"]["train"]), ("val", held))}
    except (OSError, ValueError, KeyError, TypeError):
        return None  # not a run's manifest: the start is checked by distill.weights_seen
    if is_refit(prior):
        return None  # it trained on its carve too: nothing of it is held out (distill.weights_seen says so)
    rel = [rel_path(p, root) for p in train.paths]
    if not prior.get("val_carved_from_train") or prior.get("task") != task or set(rel) != rows["train"] | rows["val"]:
        return None  # other data (another task, images added or removed, --limit-per-class): a carve of its own
    how = {**prior.get("val_split", {"method": "random"}), "kept_from": str(manifest)}
    return *split_off(train.paths, train.labels, np.array([r in rows["val"] for r in rel])), how


def discover(data_dir: str | Path, task: str, val_fraction: float = TrainConfig.val_fraction,
             seed: int = TrainConfig.seed, val_split: str = TrainConfig.val_split, group_threshold: float = GROUP_THRESHOLD,
             weights: str | None = None, carve: bool = True) -> Dataset:
    """The dataset's splits, in the order scan_split lists them. Without a validation folder (and unless
    not `carve`: the folders as they are, for the audit, whose probes imitate the carve), validation is carved from training:
    the carve of the run whose model.keras `weights` is, if it carved these training images
    (`kept_carve`); else `random` takes a stratified share of images, `grouped` whole groups of
    near-identical images (so that validation behaves like new subjects, not like twins of training)."""
    if val_split not in VAL_SPLITS:
        raise DataError(f"--val-split must be one of {', '.join(VAL_SPLITS)}, not {val_split!r}")
    found = find_splits(data_dir)
    per_split = {}
    reference = None
    for name in sorted(found, key=lambda n: n != "train"):  # train first: its classes (and spelling) are the reference
        keys, names, paths, labels = scan_split(found[name], task)
        if reference is None:
            reference = (keys, names)
        elif keys != reference[0]:
            only = [[n for k, n in zip(a, ns) if k not in b] for a, ns, b in ((reference[0], reference[1], keys),
                                                                            (keys, names, reference[0]))]
            raise DataError(f"class folders differ between splits: only {found['train'].name} has {only[0] or 'none'}, "
                            f"only {found[name].name} has {only[1] or 'none'} (names match ignoring case, spaces, - and _)")
        per_split[name] = Split(name, paths, labels)
    keys, names = reference
    splits = {"train": per_split["train"]}
    carved, how = False, {}
    kept = None if "val" in per_split or not carve else kept_carve(per_split["train"], Path(data_dir), task, weights)
    if "val" in per_split:
        splits["val"] = per_split["val"]
    elif not carve:
        pass  # the training folder whole, in its listed order
    elif kept or val_split == "grouped":
        from .groups import grouped_carve  # noqa: PLC0415
        splits["train"], splits["val"], how = kept or grouped_carve(per_split["train"].paths, per_split["train"].labels,
                                                                    val_fraction, seed, group_threshold)
        carved = True
    else:
        splits["train"], splits["val"] = stratified_carve(
            per_split["train"].paths, per_split["train"].labels, val_fraction, seed, names
        )
        carved, how = True, {"method": "random", "fraction": val_fraction}
    if "test" in per_split:
        splits["test"] = per_split["test"]
    return Dataset(str(data_dir), task, keys, names, splits, carved, val_split=how)


def refit(dataset: Dataset) -> Dataset:
    """`train --refit`: the validation images join training (kept as the validation split too,
    for the reports, which say so); the manifest records it (val_split.refit)."""
    train, val = dataset.splits["train"], dataset.splits["val"]
    dataset.splits["train"] = Split("train", train.paths + val.paths, train.labels + val.labels)
    dataset.val_split = {**dataset.val_split, "refit": True}
    return dataset


def is_refit(manifest: dict) -> bool:
    """Whether a split manifest's run trained on its validation images too (`refit`)."""
    return bool((manifest.get("val_split") or {}).get("refit"))


def limit_split(split: Split, n: int | None, seed: int) -> Split:
    """At most n images per class (--limit-per-class), the same ones for a given seed."""
    if not n:
        return split
    keep = sorted(i for idx in per_class_indices(split.labels, seed)[0].values() for i in idx[:n].tolist())
    return Split(split.name, [split.paths[i] for i in keep], [split.labels[i] for i in keep])


def dataset_from_manifest(manifest: dict) -> Dataset:
    root = Path(manifest["root"])
    splits = {
        name: Split(name, [str(root / rel) for rel, _ in rows], [int(y) for _, y in rows])
        for name, rows in manifest["splits"].items()
    }
    return Dataset(str(root), manifest["task"], [], manifest["class_names"], splits,
                   manifest.get("val_carved_from_train", False), val_split=manifest.get("val_split", {}))


# ---------------------------------------------------------------- decoding + cache

def default_cache_dir() -> Path:
    return Path(os.environ.get("MRI_EDGE_CACHE", Path.home() / ".cache" / "mri-edge"))


def _cache_key(paths: list[str], image_size: int) -> str:
    h = hashlib.sha256()
    h.update(f"v{preprocess.CONTRACT_VERSION}|d{preprocess.DECODE_VERSION}|{preprocess.resize_method()}|{image_size}|"
             .encode())
    for p in paths:
        st = os.stat(p)
        h.update(f"{os.path.abspath(p)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


@dataclass
class Decoded:
    images: np.ndarray  # (N, S, S, 3) uint8
    labels: np.ndarray  # (N,) int
    paths: list[str]
    skipped: list[dict]  # {"path", "reason"}


def _decode_one(path: str, size: int):
    try:
        return preprocess.load_image(path, size), None
    except preprocess.ImageError as e:
        return None, str(e)


def decode_split(split: Split, image_size: int, cache_dir: Path | None = None,
                 strict: bool = False, label: str | None = None, workers: int | None = None) -> Decoded:
    """Decode and resize every image of a split once; later runs reuse the cached arrays.
    Unreadable files are skipped and listed (or raise DataError with strict=True)."""
    if not split.paths:
        raise DataError(f"the {split.name} split has no images")
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    key = _cache_key(split.paths, image_size)
    npz = cache_dir / f"{split.name}-{image_size}px-{key}.npz"
    if npz.exists():
        try:
            with np.load(npz, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                out = Decoded(z["images"], z["labels"], meta["paths"], meta["skipped"])
            if strict and out.skipped:
                raise DataError(f"{len(out.skipped)} unreadable file(s), e.g. {out.skipped[0]['reason']}")
            return out
        except DataError:
            raise
        except Exception:  # zipfile.BadZipFile, EOFError, a short read...: damaged files are rebuilt
            pass
    n = len(split.paths)
    images = np.zeros((n, image_size, image_size, 3), np.uint8)
    ok = np.zeros(n, bool)
    skipped = []
    workers = workers or min(8, usable_cores() * 2)
    with Progress(n, label or f"decoding {split.name}") as bar, ThreadPoolExecutor(workers) as pool:
        for i, (img, err) in enumerate(pool.map(lambda p: _decode_one(p, image_size), split.paths, chunksize=16)):
            if img is None:
                skipped.append({"path": split.paths[i], "reason": err})
                if strict:
                    raise DataError(f"unreadable image (--strict): {err}")
            else:
                images[i] = img
                ok[i] = True
            bar.update()
    if not ok.any():
        raise DataError(f"no readable image in the {split.name} split")
    out = Decoded(images[ok], np.asarray(split.labels)[ok], [p for p, k in zip(split.paths, ok) if k], skipped)
    try:
        with atomic_path(npz) as tmp, open(tmp, "wb") as f:
            np.savez(f, images=out.images, labels=out.labels,
                     meta=np.array(json.dumps({"paths": out.paths, "skipped": out.skipped})))
    except OSError:
        pass  # caching is an optimisation; a read-only home must not stop training
    return out
