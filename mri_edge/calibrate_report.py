"""The reports of `mri-edge calibrate`: calibrate.json, calibrate.md and its plots."""

from __future__ import annotations

from pathlib import Path

from . import familiar, metrics, report, trust
from .run import RunFolder


def write_reports(run: RunFolder, out: dict) -> None:
    d = run.calibration_dir
    json_path, md_path = run.calibrate_report_paths
    d.mkdir(parents=True, exist_ok=True)
    slim = {**out, "trust": familiar.without_arrays(out["trust"]), "files": {n: {s: {k: v for k, v in r.items() if k != "coverage_risk"} if isinstance(r, dict) else r
                                     for s, r in res.items()} for n, res in out["files"].items()}}
    report.write_json(json_path, slim)
    ref_name = reference_name(out)
    ref = out["files"][ref_name]
    for split in ("held_out", "test"):
        if split in ref:
            for when in ("before", "after"):
                cal = {**ref[split][when], "reliability": ref[split][f"reliability_{when}"], "bins": metrics.ECE_BINS}
                report.plot_reliability(cal, d / f"reliability_{split}_{when}.png",
                                        f"{ref_name}, {split.replace('_', '-')}, {when} temperature")
    plot_coverage_risk(out, d / "coverage_risk.png")
    report.write_text(md_path, markdown(out))
    run.write_index()


def plot_coverage_risk(out: dict, path: Path) -> None:
    """One colour per file, dashed held-out and solid test; a dot where the stored threshold puts
    each file on test."""
    plt = report._plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    dots = False
    for i, (name, res) in enumerate(out["files"].items()):
        for split, style in (("held_out", "--"), ("test", "-")):
            if split in res:
                c = res[split]["coverage_risk"]
                ax.plot(c["coverage"], c["risk"], style, color=f"C{i}", lw=1, label=name if split == "test" else None)
        if (a := res.get("test", {}).get("abstention")) and a["risk"] is not None:
            ax.plot(a["coverage"], a["risk"], "o", color=f"C{i}", ms=4)
            dots = True
    for style, split in (("--", "held-out"), ("-", "test")):  # the line styles' key, after the files
        ax.plot([], [], style, color="gray", lw=1, label=split)
    if dots:
        ax.plot([], [], "o", color="gray", ms=4, label="test, at the stored threshold")
    ax.set(xlabel="coverage (share answered)", ylabel="risk (error among answered)")
    ax.set_title(f"Coverage-risk; stored threshold {trust.threshold_text(out['trust']['threshold'], short=True)}",
                 fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    report.save_figure(fig, path)


SUMMARY_HEADERS = ["file", "split", "images", "accuracy", "ECE before", "ECE after", "NLL before", "NLL after",
                   "coverage at threshold", "risk at threshold", "set coverage / size"]


def summary_table(out: dict) -> str:
    """The table of every file on held-out and test, and which files' held-out risk at the stored
    threshold is above a --max-risk target (it was met by the reference model's answers)."""
    table = report.md_table(SUMMARY_HEADERS, summary_rows(out))
    fitted = out["trust"].get("fitted_on", {})
    limit = fitted.get("target", {}).get("max_risk")
    over = [f"{name} ({a['risk']:.4f} on {a['accepted']} accepted answers)" for name, res in out["files"].items()
            if limit is not None and (a := res.get("held_out", {}).get("abstention")) and a["risk"] is not None
            and a["risk"] > limit]
    if not over:
        return table
    return (f"{table}\n\nHeld-out risk at the threshold above the target {limit:g}: {', '.join(over)}. The threshold "
            f"was chosen on {fitted.get('model', 'the reference model')}'s answers; a file whose answers near it "
            "differ can exceed the target (with few accepted answers, by chance too).")


def summary_rows(out: dict) -> list[list]:
    rows = []
    for name, res in out["files"].items():
        for split in ("held_out", "test"):
            if split not in res:
                continue
            r = res[split]
            a = r.get("abstention", {})
            s = r.get("sets", {})
            rows.append([name, split.replace("_", "-"), r["n"], f"{r['before']['accuracy']:.4f}",
                         f"{r['before']['ece']:.4f}", f"{r['after']['ece']:.4f}", f"{r['before']['nll']:.3f}",
                         f"{r['after']['nll']:.3f}",
                         *trust.coverage_risk_parts(a),
                         f"{s['coverage']:.3f} / {s['mean_size']:.2f}" if s else ""])
    return rows


def markdown(out: dict) -> str:
    t = out["trust"]
    h = out["held_out"]
    return "\n".join([
        "# Calibration, abstention and conformal sets", "",
        f"Fitted on **{h['n']} held-out images**: {h['rule']}. Raw-pixel 1-NN probe of them against the training "
        f"images (the rest of validation left out): {h['nn_probe_accuracy']:.1%} (test split, against the same "
        f"training images: {h.get('test_nn_probe_accuracy', float('nan')):.1%}; close "
        "values mean the held-out images are as new to the model as test images)."
        + (" **They are not new to the model (--allow-twins): expect the fit to be overconfident on new subjects.**"
           if h["twins_included"] else "")
        + (f" The record is `{h['borrowed_from']}`'s, fitted with its model: this run's model trained on those "
           "images too (`train --refit`), so only its test rows are measured here; how well a recipe's record "
           "carries over to its refit: docs/trust.md in mri-edge." if h.get("borrowed_from") else ""), "",
        f"- temperature **{t['temperature']:.3f}** (fitted with `{t['fitted_on']['model']}`"
        + (f" of {h['borrowed_from']}" if h.get("borrowed_from") else "") + ", minimum NLL)",
        f"- abstention: answers with calibrated confidence below **{trust.threshold_text(t['threshold'])}** are marked "
        f"\"{trust.REVIEW}\" (target: {trust.describe_target(t['fitted_on']['target'])})",
        f"- conformal prediction sets at {1 - t['alpha']:.0%} coverage: classes join the set by falling calibrated "
        f"probability while the probability mass before them is at most {t['conformal_q']:.3f} (the top class "
        "always is in it)", "",
        "Every file below carries this record in its metadata; every runtime applies it.", "",
        summary_table(out), "",
        "The test rows are reported only; nothing was fitted on them.", "",
        *familiar.markdown(out),
        "![coverage-risk](coverage_risk.png)", "",
        "Reliability before and after: " + ", ".join(
            f"`reliability_{s}_{w}.png`" for s in ("held_out", "test") for w in ("before", "after")
            if s in out["files"][reference_name(out)]) + ".", ""])


def reference_name(out: dict) -> str:
    return next(n for n, r in out["files"].items() if r.get("reference"))
