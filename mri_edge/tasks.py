"""Built-in tasks and the mapping from dataset folder names to class labels."""

from __future__ import annotations

import re

from .errors import MriEdgeError

# Each task lists (canonical key, display label, folder aliases) in output order.
# Alzheimer classes are in severity order so confusion matrices read naturally.
TASKS: dict[str, list[tuple[str, str, tuple[str, ...]]]] = {
    "tumor": [
        ("glioma", "Glioma", ("glioma", "gliomatumor")),
        ("meningioma", "Meningioma", ("meningioma", "meningiomatumor")),
        ("notumor", "No Tumor", ("notumor", "normal", "healthy")),
        ("pituitary", "Pituitary", ("pituitary", "pituitarytumor")),
    ],
    "alzheimer": [
        ("nondemented", "No Dementia", ("nondemented", "nodementia", "nondementia")),
        ("verymilddemented", "Very Mild Dementia", ("verymilddemented", "verymilddementia")),
        ("milddemented", "Mild Dementia", ("milddemented", "milddementia")),
        ("moderatedemented", "Moderate Dementia", ("moderatedemented", "moderatedementia")),
    ],
}


class TaskError(MriEdgeError, ValueError):
    """A dataset's class folders do not fit the chosen task."""


def normalize_name(name: str) -> str:
    """Folder names compare without case, spaces, underscores or hyphens."""
    return re.sub(r"[\s_\-]+", "", name).lower()


def task_names() -> list[str]:
    return [*TASKS, "custom"]


def resolve_classes(task: str, folder_names: list[str]) -> tuple[list[str], list[str], dict[str, int]]:
    """Map the class folders of one split to (keys, labels, folder -> index).

    For built-in tasks every folder must match one class and every class must
    be present; `custom` takes the sorted folder names as classes.
    """
    if task == "custom":
        keys = sorted(folder_names, key=normalize_name)
        if len(keys) < 2:
            raise TaskError(f"need at least 2 class folders, found {len(keys)}: {keys}")
        seen: dict[str, str] = {}
        for k in keys:
            n = normalize_name(k)
            if n in seen:
                raise TaskError(f"class folders {seen[n]!r} and {k!r} name the same class")
            seen[n] = k
        return [normalize_name(k) for k in keys], keys, {k: i for i, k in enumerate(keys)}
    if task not in TASKS:
        raise TaskError(f"unknown task {task!r}; choose one of {', '.join(task_names())}")
    spec = TASKS[task]
    alias_to_index = {}
    for i, (key, label, aliases) in enumerate(spec):
        for a in (key, normalize_name(label), *aliases):
            alias_to_index[a] = i
    mapping: dict[str, int] = {}
    unknown = []
    for folder in folder_names:
        idx = alias_to_index.get(normalize_name(folder))
        if idx is None:
            unknown.append(folder)
        elif idx in mapping.values():
            other = next(f for f, j in mapping.items() if j == idx)
            raise TaskError(f"folders {other!r} and {folder!r} both map to class {spec[idx][1]!r}")
        else:
            mapping[folder] = idx
    if unknown:
        expected = ", ".join(key for key, _, _ in spec)
        raise TaskError(
            f"folder(s) {', '.join(map(repr, unknown))} are not classes of task {task!r} "
            f"(expected {expected}); use --task custom for other datasets"
        )
    missing = [spec[i][1] for i in range(len(spec)) if i not in mapping.values()]
    if missing:
        raise TaskError(f"task {task!r} has no folder for class(es): {', '.join(missing)}")
    return [k for k, _, _ in spec], [lab for _, lab, _ in spec], mapping


# Where the built-in tasks' public datasets come from (model cards cite them), and the size of
# their official test splits, by which a run's data is told from another dataset in the same layout.
DATASETS = {
    "tumor": {"name": "Brain Tumor MRI Dataset", "source": "Masoud Nickparvar, Kaggle", "licence": "CC0-1.0",
              "test_images": 1311},
    "alzheimer": {"name": "Alzheimer's Dataset (4 class of Images)", "source": "Kaggle", "licence": "ODbL-1.0",
                  "test_images": 1279},
}


def public_dataset(task: str, manifest: dict | None) -> dict | None:
    """Name, source and licence of the public dataset a run's images are (its task's, when the split
    manifest's test split, with any image left out as unreadable, is that dataset's official one), or
    None: synthetic phantoms or one's own images in the same folders."""
    known, m = DATASETS.get(task), manifest or {}
    n_test = len((m.get("splits") or {}).get("test") or []) + len((m.get("unreadable") or {}).get("test") or [])
    return {k: v for k, v in known.items() if k != "test_images"} if known and n_test == known["test_images"] else None
