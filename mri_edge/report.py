"""Plots and Markdown reports shared by train, verify and bench (their numbers: metrics.py)."""

from __future__ import annotations

import contextlib
import csv
import json
from pathlib import Path

import numpy as np

from .config import TrainConfig
from .errors import MriEdgeError
from .files import atomic_path, atomic_write_text, read_json, sha256_file
from .freshness import exported_again, made_from_another, renamed
from .run import AUDIT_FILES, BENCH_FILES, best_bench


def write_json(path: Path, obj) -> None:
    """Write JSON atomically (temp file + rename) so a crash never leaves half a report."""
    atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


write_text = atomic_write_text  # whole or not at all (files.atomic_path)


def _json_default(o):
    for kind, cast in ((np.integer, int), (np.floating, float), (np.ndarray, np.ndarray.tolist), (Path, str)):
        if isinstance(o, kind):
            return cast(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def test_summary(m: dict) -> str:
    """The console's line for a test report: accuracy and macro-F1, and the leakage-free subset's
    accuracy when the run has one (--dedup), as the reports give it."""
    free = f"; leakage-free {m['dedup']['accuracy']:.4f} ({m['dedup']['n']} images)" if "dedup" in m else ""
    return f"test accuracy {m['accuracy']:.4f}, macro-F1 {m['macro']['f1']:.4f}{free}"


def scores_text(m: dict, bold: bool = False) -> str:
    """Accuracy and macro-F1 of a test report (or its leakage-free part), each with its 95% CI
    where the report has one, as train_report.md and report.md give them."""
    def ci(key):
        return f" (95% CI {m[key][0]:.4f}-{m[key][1]:.4f})" if m.get(key) else ""
    acc = f"{m['accuracy']:.4f}"
    return (f"accuracy {f'**{acc}**' if bold else acc}{ci('accuracy_ci95')}, "
            f"macro-F1 {m['macro']['f1']:.4f}{ci('macro_f1_ci95')}")


# ---------------------------------------------------------------- plots

def _plt():
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


def save_figure(fig, path: Path, dpi: int = 110) -> None:
    """Write a figure whole or not at all, and close it."""
    with atomic_path(path, suffix=Path(path).suffix) as tmp:  # matplotlib picks the format from the suffix
        fig.savefig(tmp, dpi=dpi)
    _plt().close(fig)


def plot_confusion(cm, class_names, path: Path, title: str = "Confusion matrix") -> None:
    plt = _plt()
    cm = np.asarray(cm)
    fig, ax = plt.subplots(figsize=(1.2 * len(class_names) + 2.5, 1.1 * len(class_names) + 2))
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, f"{cm[i, j]}\n{norm[i, j]:.0%}", ha="center", va="center",
                    color="white" if norm[i, j] > 0.5 else "black", fontsize=8)
    ax.set_xticks(range(len(class_names)), class_names, rotation=30, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.tight_layout()
    save_figure(fig, path, 110)


def plot_reliability(cal: dict, path: Path, title: str) -> None:
    """Reliability diagram: accuracy against confidence per bin (bar width = bin, shade = share)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    ax.plot([0, 1], [0, 1], "--", color="gray", lw=1, label="perfect calibration")
    n = sum(r["n"] for r in cal["reliability"]) or 1
    for r in cal["reliability"]:
        ax.bar((r["lo"] + r["hi"]) / 2, r["accuracy"], width=r["hi"] - r["lo"], color="tab:blue",
               alpha=0.25 + 0.75 * r["n"] / n, edgecolor="tab:blue")
    ax.plot([r["confidence"] for r in cal["reliability"]], [r["accuracy"] for r in cal["reliability"]], "o-",
            color="tab:red", ms=3, label="accuracy at mean confidence")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top-1 probability)", ylabel="accuracy")
    ax.set_title(f"{title}\nECE {cal['ece']:.3f}, Brier {cal['brier']:.3f}, NLL {cal['nll']:.3f}", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    save_figure(fig, path, 110)


def write_csv(path: Path, rows: list[dict], cols: list[str]) -> None:
    """A CSV of rows (dicts; keys outside `cols` are left out), written atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def write_history(run, history: list[dict]) -> None:
    """history.csv and training_curves.png of a run's epochs (run: a RunFolder)."""
    if not history:
        return
    write_csv(run.history_path, history,
              ["phase", "epoch", "lr", "loss", "accuracy", "val_loss", "val_accuracy", "val_macro_f1"])
    plot_history(history, run.curves_path)


def plot_history(rows: list[dict], path: Path) -> None:
    """Accuracy and loss curves of both phases, with the phase boundary marked."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    x = np.arange(1, len(rows) + 1)
    for ax, metric in zip(axes, ("accuracy", "loss")):
        ax.plot(x, [r.get(metric, np.nan) for r in rows], "o-", label=f"train {metric}")
        ax.plot(x, [r.get(f"val_{metric}", np.nan) for r in rows], "s-", label=f"val {metric}")
        phases = [r["phase"] for r in rows]
        for i in range(1, len(phases)):
            if phases[i] != phases[i - 1]:
                ax.axvline(i + 0.5, color="gray", ls="--")
                ax.text(i + 0.6, ax.get_ylim()[1], "fine-tune", va="top", fontsize=8, color="gray")
        ax.set(xlabel="epoch", title=metric)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path, 110)


def plot_examples(images, y_true, y_pred, probs, class_names, path: Path, n: int = 16, seed: int = 0) -> None:
    """A grid of test images with true and predicted labels (misclassified ones first, in red)."""
    plt = _plt()
    y_true, y_pred, rng = np.asarray(y_true), np.asarray(y_pred), np.random.default_rng(seed)
    wrong, right = np.flatnonzero(y_true != y_pred), np.flatnonzero(y_true == y_pred)
    pick = np.concatenate([rng.permutation(wrong)[: n // 4], rng.permutation(right)])[:n]
    if len(pick) < n:
        pick = np.concatenate([pick, rng.permutation(wrong)[n // 4:]])[:n]
    cols, rows = 4, int(np.ceil(len(pick) / 4)) or 1
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.6, rows * 2.9))
    for ax in np.atleast_1d(axes).ravel():
        ax.axis("off")
    for ax, i in zip(np.atleast_1d(axes).ravel(), pick):
        ax.imshow(images[i])
        ok = y_true[i] == y_pred[i]
        ax.set_title(f"true: {class_names[y_true[i]]}\npred: {class_names[y_pred[i]]} ({probs[i, y_pred[i]]:.0%})",
                     fontsize=8, color="green" if ok else "red")
    fig.tight_layout()
    save_figure(fig, path, 100)


# ---------------------------------------------------------------- markdown

def as_words(mapping: dict | None, empty: str = "not recorded") -> str:
    """{"keras": "3.15.1", "L": 6400} as "keras 3.15.1, L 6400" (or `empty`)."""
    return ", ".join(f"{k} {v}" for k, v in (mapping or {}).items()) or empty


def md_table(headers: list[str], rows: list[list]) -> str:
    """A GitHub-style Markdown table; a literal | inside a cell is escaped so columns stay aligned."""
    def fmt(v):
        text = f"{v:.4g}" if isinstance(v, float) else str(v)
        return text.replace("\\|", "|").replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(fmt(h) for h in headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def metrics_markdown(m: dict, class_names: list[str]) -> str:
    rows = [[name, m["per_class"][name]["precision"], m["per_class"][name]["recall"],
             m["per_class"][name]["f1"], m["per_class"][name]["specificity"], m["per_class"][name]["support"]]
            for name in class_names]
    for avg in ("macro", "weighted"):
        rows.append([f"**{avg} avg**", m[avg]["precision"], m[avg]["recall"], m[avg]["f1"], "", m[avg]["support"]])
    return md_table(["class", "precision", "recall (sensitivity)", "F1", "specificity", "support"], rows)


def sentence(text: str) -> str:
    """A log line as a sentence of a report: capital first letter (and only that), final full stop."""
    return text[:1].upper() + text[1:] + ("" if text.endswith(".") else ".")


def train_report_markdown(run, cfg: dict, test: dict, extra: dict) -> str:
    """train_report.md (run: a RunFolder; its plots are linked by name, beside the report)."""
    names = cfg["class_names"]
    split = f" (split seed {cfg['split_seed']})" if cfg.get("split_seed") is not None else ""
    split = f" (validation: the carve of `{cfg['val_kept_from']}`)" if cfg.get("val_kept_from") else split
    parts = [
        f"# mri-edge training report: {cfg['task']}",
        "",
        f"Run folder `{run.path}`; DenseNet121, {cfg['image_size']} px, weights `{cfg['weights']}`, "
        f"seed {cfg['seed']}{split}; wall time {extra.get('wall_time_s', 0):.0f} s.",
        "",
        "## Data",
        "",
        md_table(["split", "images", "skipped (unreadable)"],
                 [[s, v["n"], v["skipped"]] for s, v in extra["splits"].items()]),
        "",
        *([sentence(extra["validation"]), ""] if extra.get("validation") else []),
    ]
    unreadable = [f"- {s}: {why}" for s, v in extra["splits"].items() for why in v.get("unreadable", [])]
    if unreadable:  # left out of the run (and of its split manifest): named, so they can be fixed
        parts += ["Unreadable files, left out:", "", *unreadable[:100], ""]
    weight = cfg.get("distill_weight", TrainConfig.distill_weight)
    teacher = [f"distilled from `{cfg['teacher']}` ({1 - weight:.1f} x labels + {weight:.1f} x its probabilities)"] \
        if cfg.get("teacher") else []
    if extra.get("phase_notes") or teacher:
        parts += ["## Training", ""] + [f"- {n}" for n in teacher + extra.get("phase_notes", [])] + [""]
    if run.curves_path.is_file():  # an ensemble trains nothing of its own
        parts += [f"![training curves]({run.curves_path.name})", ""]
    parts += [
        f"## Test set ({test['n']} images)",
        "",
        f"Test {scores_text(test, bold=True)}, weighted-F1 {test['weighted']['f1']:.4f} (CIs: bootstrap over images).",
        "",
        metrics_markdown(test, names),
        "",
        f"![confusion matrix]({run.confusion_path.name})",
        "",
    ]
    if test.get("calibration"):
        c = test["calibration"]
        parts += ["### Calibration", "",
                  f"Mean confidence {c['mean_confidence']:.4f} against accuracy {c['accuracy']:.4f}: expected "
                  f"calibration error (ECE, {c['bins']} bins) **{c['ece']:.4f}**, maximum calibration error "
                  f"{c['mce']:.4f}, Brier score {c['brier']:.4f}, negative log-likelihood {c['nll']:.4f}.", "",
                  f"![reliability diagram]({run.reliability_path.name})", ""]
    if test.get("dedup"):
        d = test["dedup"]
        parts += [
            f"### Leakage-free test subset ({d['n']} of {test['n']} images have no exact or near copy in train/val)",
            "",
            f"Leakage-free {scores_text(d)}.",
            "",
            metrics_markdown(d, names),
            "",
        ]
    parts += ["## Example predictions", "", f"![examples]({run.examples_path.name})", ""]
    return "\n".join(parts)


def run_index_markdown(run) -> str:
    """report.md of a run folder: what each command produced, with links (run: a RunFolder)."""
    def load(path):
        with contextlib.suppress(MriEdgeError):
            return read_json(path)

    root = run.path
    cfg = load(run.config_path) or {}
    # A shipped folder (artifacts/<task>: its files at the top level, no exports/) names the run it came from.
    shipped = not run.exports_dir.is_dir() and bool(run.export_files())
    trained_as = Path(cfg["out"]).name if shipped and isinstance(cfg.get("out"), str) else ""
    parts = [f"# mri-edge run `{trained_as or root.name}`"
             + (f" (in folder `{root.name}`)" if trained_as and trained_as != root.name else ""), ""]
    test = load(run.test_report_path)
    if test:
        parts += [f"Task **{cfg.get('task', '?')}**, DenseNet121 at {cfg.get('image_size', '?')} px, weights "
                  f"`{cfg.get('weights', '?')}`. Test {scores_text(test, bold=True)} on {test['n']} images.", ""]
        if test.get("dedup"):
            parts += [f"Leakage-free test subset: accuracy {test['dedup']['accuracy']:.4f} on "
                      f"{test['dedup']['n']} images.", ""]
        if run.train_report_path.is_file():  # a shipped folder may carry the test report without it
            parts += [f"- [Training report]({run.train_report_path.name}): data, phases, curves, per-class metrics, "
                      "confusion matrix", ""]
    if (root / AUDIT_FILES[1]).is_file():  # a shipped folder carries its dataset's audit
        parts += [f"- [Data audit]({AUDIT_FILES[1]}): duplicates and leakage between the splits", ""]
    elif run.state_path.is_file() and not (load(run.state_path) or {}).get("finished"):
        parts += ["Training has not finished (`mri-edge train --resume` continues it).", ""]
    index = load(run.exports_index_path)
    metadata = run.export_metadata()  # read once: the shipped table and the out-of-date check
    model_sha = sha256_file(run.model_path) if run.model_path.is_file() else None
    other = made_from_another(metadata, model_sha)  # as the card tells them
    if gone := [r["file"] for r in (index or {}).get("exports") or [] if r.get("file") not in metadata]:
        parts += [f"exports.json lists {', '.join(gone)}, no longer in exports/: `mri-edge export` makes them again.", ""]
    from .ov import size_on_disk  # noqa: PLC0415

    # the files there now (in exports/, or at the top level of a shipped folder), their facts in their metadata
    rows = [[f"[{f.name}]({f.relative_to(root).as_posix()})", metadata[f.name].get("format", "?"),
             metadata[f.name].get("quantization", "?"), f"{size_on_disk(f) / 1e6:.2f}"] for f in run.export_files()]
    if rows:
        parts += ["## Exports", "", md_table(["file", "format", "quantization", "size MB"], rows), ""]
    if other:
        parts += [f"{', '.join(other)}: exported from another model.keras than the run's (retrained, or evaluate "
                  "--fp16-weights since): `mri-edge export` makes them again.", ""]
    cal, cal_md = load(run.calibrate_report_paths[0]), run.calibrate_report_paths[1]
    if cal and isinstance(cal.get("trust"), dict):
        from .trust import fitted_for, threshold_text  # noqa: PLC0415
        t = cal["trust"]
        refit = " Out of date: fitted for another model.keras: run `mri-edge calibrate`." \
            if model_sha and not fitted_for(t, model_sha) else ""
        parts += ["## Calibration and abstention", "",
                  f"Temperature {t['temperature']:.3f}, abstain below {threshold_text(t['threshold'])}, "
                  "prediction sets at "
                  f"{1 - t['alpha']:.0%}; fitted on {cal['held_out']['n']} held-out images. "
                  f"[Details]({cal_md.relative_to(root).as_posix()}).{refit}", ""]

    def out_of_date(rows, command):  # as the card reads the same reports (`freshness.current_rows`)
        moved = renamed(dict(rows), metadata)
        rows = [(moved.get(n, n), r) for n, r in rows]
        named = {n for n, _ in rows}
        why = [f"{', '.join(names)} {how}".rstrip() for names, how in (
            ([f"{a} (renamed {b} since)" for a, b in moved.items()], ""),
            (exported_again(rows, metadata), "(exported again since)"),
            (sorted(named & set(other)), "(made from another model.keras)"),
            (sorted(n for n in named if not (root / n).is_file() and not (run.exports_dir / n).is_file()),
             "(no longer there)"), (sorted(set(metadata) - named), "(not in it)")) if names]
        return f" Out of date for {'; '.join(why)}: run `mri-edge {command}`." if why else ""
    card_json, card_md = run.card_paths
    if card := load(card_json):
        stale = out_of_date([(f["file"], f) for f in card.get("files", [])], "card")
        parts += ["## Model card", "", f"[{card_md.name}]({card_md.name}).{stale}", ""]
    for label, split in (("Parity on the test split", "test"), ("Parity on the validation split", "val")):
        path, md = run.parity_paths(split)
        link = md.relative_to(root).as_posix()
        parity = load(path)
        if parity and isinstance(parity.get("files"), dict):
            passed = sum(1 for r in parity["files"].values() if r.get("passed"))
            verdict = "every file passes its gate" if parity.get("passed") else \
                "FAILED: " + "; ".join(parity.get("failures", []))
            parts += [f"## {label}", "", f"{passed} of {len(parity['files'])} files pass: {verdict}. "
                                         f"[Details]({link}).{out_of_date(parity['files'].items(), 'verify')}", ""]
    bench_dir, bench = best_bench([(p.parent, load(p)) for p in run.bench_paths])
    if bench:
        best = min(bench["rows"], key=lambda r: r["p50_ms"])
        link = (bench_dir / BENCH_FILES[1]).relative_to(root).as_posix()
        runs = f" of {bench['settings']['runs']} timed runs" if (bench.get("settings") or {}).get("runs") else ""
        parts += ["## Benchmark", "", f"{len(bench['rows'])} rows{runs} on {bench['machine'].get('cpu', '?')}; fastest: "
                                      f"{best['model']} on {best['runtime_label']}, p50 {best['p50_ms']:.2f} ms at "
                                      f"batch {best['batch']}. [Details]({link})."
                                      f"{out_of_date([(r['model'], r) for r in bench['rows']], 'bench')}", ""]
    return "\n".join(parts)
