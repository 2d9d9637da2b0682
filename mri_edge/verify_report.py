"""verify's reports: the console table and parity.md, from the report dict `verify.verify_run` writes."""

from __future__ import annotations

from . import familiar, report, trust
from .config import OCCLUSION_GRID


def summary_table(out: dict) -> str:
    rows = []
    for name, r in out["files"].items():
        if "error" in r:
            rows.append([name, "", "", "", "", "", "", "", "", "", "", "", "FAIL: " + r["fail_reasons"][0]])
            continue
        rows.append([name, r["runtime"], f"{r['accuracy']:.4f}", f"{r['accuracy_delta'] * 100:+.2f}",
                     f"[{r['accuracy_delta_ci95'][0] * 100:+.2f}, {r['accuracy_delta_ci95'][1] * 100:+.2f}]",
                     f"{r['macro_f1_delta']:+.4f}", f"{r['agreement'] * 100:.2f}%", len(r["flips"]),
                     f"{r['mcnemar']['p_value']:.3g}", f"{r['prob_abs_diff']['mean']:.2e} / {r['prob_abs_diff']['max']:.2e}",
                     (f"{r['calibration']['ece']:.4f} ({r['calibration']['ece_delta']:+.4f})"
                      if "calibration" in r else ""),
                     (f"{r['explanation']['rank_correlation']['median']:.3f}" if "explanation" in r else ""),
                     "PASS" if r["passed"] else "FAIL: " + "; ".join(r["fail_reasons"])])
    return report.md_table(["file", "runtime", "accuracy", "Δacc (pts)", "Δacc 95% CI", "Δmacro-F1", "agreement",
                            "flips", "McNemar p", "abs Δp mean / max", "ECE (Δ)", "expl. ρ", "gate"], rows)


def plot_name(kind: str, file_name: str) -> str:
    """verify's plot of one file: confusion_<file>.png or reliability_<file>.png, dots as underscores."""
    return f"{kind}_{file_name.replace('.', '_')}.png"


def plot_links(out: dict, kind: str, plot_dir: str) -> str:
    """Links to one kind of plot of every file checked, relative to parity.md (plot_dir: their folder from it)."""
    folder = "" if plot_dir in ("", ".") else plot_dir.rstrip("/") + "/"
    return ", ".join(f"[{n}](<{folder}{plot_name(kind, n)}>)" for n, r in out["files"].items() if "error" not in r)


def markdown(out: dict, plot_dir: str) -> str:
    """parity.md; plot_dir: where the per-file plots are, relative to it."""
    names = out["class_names"]
    th = dict(out["thresholds"])
    for key in ("float", "quant"):  # reports written before the drops were kept in points
        if f"{key}_max_drop" in th:
            th[f"{key}_max_drop_pts"] = th.pop(f"{key}_max_drop") * 100
    parts = [
        "# Export parity",
        "",
        f"Keras reference: accuracy {out['keras']['accuracy']:.4f}, macro-F1 {out['keras']['macro_f1']:.4f} "
        f"on {out['n_test']} {'validation' if out.get('split') == 'val' else 'test'} images. "
        "Every TFLite and ONNX file below ran through `mri_edge.runtime`, OpenVINO files through `mri_edge.ov`.",
        "",
        summary_table(out),
        "",
        f"Gates: fp32/fp16 agreement >= {th['float_agreement']:.3f} and accuracy drop <= "
        f"{th['float_max_drop_pts']:.1f} pts; dynamic/int8 agreement >= "
        f"{th['quant_agreement']:.3f} and drop <= {th['quant_max_drop_pts']:.1f} pts"
        + (f"; every file: |ΔECE| <= {th['max_ece_change']} in its own bins or in the Keras bins."
           if "max_ece_change" in th else "."),
        "",
        "## Clinical parity: per-class sensitivity / specificity deltas (points)",
        "",
    ]
    rows = []
    for name, r in out["files"].items():
        if "error" in r:
            continue
        rows.append([name] + [f"{r['per_class_delta'][c]['sensitivity'] * 100:+.2f} / "
                              f"{r['per_class_delta'][c]['specificity'] * 100:+.2f}" for c in names])
    parts += [report.md_table(["file", *names], rows), ""]
    cal = [(n, r["calibration"]) for n, r in out["files"].items() if "calibration" in r]
    if cal:
        parts += ["## Calibration (expected calibration error, 15 bins)", "",
                  report.md_table(["file", "ECE", "Keras ECE", "ΔECE", "ΔECE in Keras bins", "Brier", "NLL",
                                   "mean confidence"],
                                  [[n, f"{c['ece']:.4f}", f"{c['keras']['ece']:.4f}", f"{c['ece_delta']:+.4f}",
                                    f"{c['ece_delta_keras_bins']:+.4f}" if "ece_delta_keras_bins" in c else "",
                                    f"{c['brier']:.4f}", f"{c['nll']:.4f}", f"{c['mean_confidence']:.4f}"]
                                   for n, c in cal]), "",
                  f"Reliability diagrams: {plot_links(out, 'reliability', plot_dir)}. The ECE gate fails a file "
                  "only when both changes pass the limit (mri-edge's docs/how-it-works.md).", ""]
    tr = [(n, r["trust"]) for n, r in out["files"].items() if "trust" in r]
    if tr:
        def sets(m):
            c = m.get("sets")
            return f"{c['coverage']:.3f} / {c['mean_size']:.2f}" if c else ""

        parts += ["## Stored calibration (temperature, abstention, conformal sets)", "",
                  report.md_table(["file", "T", "ECE after T (Keras)", "ΔECE", "coverage / risk at threshold",
                                   "Keras coverage / risk", "set coverage / size", "Keras set coverage / size"],
                                  [[n, f"{t['temperature']:.3f}", f"{t['file']['ece']:.4f} ({t['keras']['ece']:.4f})",
                                    f"{t['ece_delta']:+.4f}", trust.coverage_risk_text(t["file"].get("abstention")),
                                    trust.coverage_risk_text(t["keras"].get("abstention")), sets(t["file"]),
                                    sets(t["keras"])] for n, t in tr]), ""]
    fam = [(n, r["familiarity"]) for n, r in out["files"].items() if "familiarity" in r]
    if fam:
        def row(n, m):
            if "skipped" in m:
                return [n, "", "", "", "", "", "", f"not compared: {m['skipped']}"]
            return [n, f"{m['limit']:.2f}", f"{m['referred']:.2%} ({m['keras_referred']:.2%})", f"{m['agreement']:.2%}",
                    f"{m['kappa']:.3f}" + (f" (<= {m['kappa_upper']:.3f})" if "kappa_upper" in m else ""),
                    f"{m['only_keras']} / {m['only_file']}", f"{m['rank_correlation']:.4f}",
                    f"{m['distance_change']['median']:.4f} / {m['distance_change']['max']:.3f}"]

        parts += ["## Familiarity check (images unlike the training images), file vs Keras", "",
                  report.md_table(["file", "limit", "referred (Keras)", "referral agreement", f"kappa ({familiar.KAPPA_LEVEL:.0%} upper bound)",
                                   "only Keras / only file", "distance rank correlation", "|Δdistance| median / max"],
                                  [row(n, m) for n, m in fam]), "",
                  "The file's stored limit applied to its own pooled features and to the Keras model's, image by image "
                  "(mri-edge's docs/trust.md, \"Familiarity\"). A file fails when the two refer "
                  "different images more often than its top-1 agreement gate allows, when their Cohen's kappa is under "
                  f"{out['thresholds']['min_familiarity_kappa']} with {familiar.KAPPA_LEVEL:.0%} confidence (its "
                  "bootstrap upper bound: one image moves kappa far where few are referred), or when its record "
                  "holds a check the file "
                  "cannot run (no features output).", ""]
    ex = [(n, r["explanation"]) for n, r in out["files"].items() if "explanation" in r]
    if ex:
        parts += ["## Explanation parity (occlusion maps, file vs Keras)", "",
                  report.md_table(["file", "images", "rank correlation median / p10 / min", "top-10% overlap median / p10"],
                                  [[n, e["images"], f"{e['rank_correlation']['median']:.3f} / "
                                    f"{e['rank_correlation']['p10']:.3f} / {e['rank_correlation']['min']:.3f}",
                                    f"{e['top10_overlap']['median']:.3f} / {e['top10_overlap']['p10']:.3f}"]
                                   for n, e in ex]), "",
                  f"Each image's {OCCLUSION_GRID}x{OCCLUSION_GRID} occlusion map of the class Keras predicts, "
                  "through the file's own runtime, against the Keras model's map (Spearman rank correlation over cells; "
                  "intersection over union of the top 10% of pixels).", ""]
    if any("dedup" in r for r in out["files"].values()):
        rows = [[n, r["dedup"]["n"], f"{r['dedup']['keras_accuracy']:.4f}", f"{r['dedup']['accuracy']:.4f}",
                 f"{r['dedup']['accuracy_delta'] * 100:+.2f}", f"{r['dedup']['agreement'] * 100:.2f}%"]
                for n, r in out["files"].items() if "dedup" in r]
        parts += ["## Leakage-free test subset", "",
                  report.md_table(["file", "images", "Keras acc", "export acc", "Δacc (pts)", "agreement"], rows), ""]
    for name, r in out["files"].items():
        if r.get("flips"):
            parts += [f"### Flipped predictions: {name} ({len(r['flips'])})", ""]
            parts += [report.md_table(["image", "true", "Keras", "export"],
                                      [[f"`{x['path']}`", x["true"], f"{x['keras']} ({x['keras_p']:.2f})",
                                        f"{x['export']} ({x['export_p']:.2f})"] for x in r["flips"][:20]]), ""]
    parts += [f"Confusion matrices: {links}.", ""] if (links := plot_links(out, "confusion", plot_dir)) else []
    return "\n".join(parts)
