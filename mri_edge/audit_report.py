"""`mri-edge data audit`'s Markdown report (audit.md), from the dict `audit.audit` writes as audit.json."""

from __future__ import annotations

from . import report


def counts_text(counts: dict) -> str:
    """{"176x208": 6400, "L": 12} as "176x208 (6400), L (12)", or "none"."""
    return report.as_words({k: f"({v})" for k, v in counts.items()}, "none")


def first_ten(paths: list[str]) -> str:
    return f" ({', '.join(paths[:10])}{', ...' if len(paths) > 10 else ''})." if paths else "."


def markdown(out: dict) -> str:
    names = out["class_names"]
    rows = [[s, *[c.get(n, 0) for n in names], sum(c.values())] for s, c in out["counts"].items()]
    nd = out["near_duplicates"]
    parts = [f"# Data audit: `{out['data_dir']}`", "", report.md_table(["split", *names, "total"], rows), "",
             f"Image sizes (top): {counts_text(out['image_sizes'])}. Modes: {counts_text(out['modes'])}. "
             f"Formats: {counts_text(out['formats'])}.", "",
             f"Corrupt or unreadable files: {len(out['corrupt'])}{first_ten(out['corrupt'])}", "",
             "Ignored by discovery (hidden, checkpoint copies, OS debris, not images, outside class folders): "
             f"{len(out.get('ignored', []))}{first_ten(out.get('ignored', []))}", "",
             "## Exact duplicates (identical bytes)", "",
             f"{out['exact_duplicates']['groups']} groups; pairs by split: "
             f"{counts_text(out['exact_duplicates']['pairs_by_split'])}."
             + (f" Every pair, exact and near, with its files: [{out['pairs_csv']}]({out['pairs_csv']})."
                if out.get("pairs_csv") else ""), "",
             "## Near duplicates", "", nd["method"] + ".", "",
             report.md_table(["splits", "hash candidates", "confirmed", "of which byte-identical"],
                             [[k, v["hash_candidates"], v["confirmed"], v["of_which_byte_identical"]]
                              for k, v in nd["by_split_pair"].items()]), "",
             "Pixel MAD of hash candidates, quantiles: " + report.as_words(
                 {f"{q}%:": "n/a" if v is None else f"{v:.2f}" for q, v in nd["candidate_mad_quantiles"].items()}, "none")
             + "; pairs by MAD range: " + counts_text(nd["candidate_mad_histogram"]) + ".", "",
             f"## Label conflicts: {out['n_label_conflicts']} pairs of (near-)copies filed under different classes", ""]
    parts += [f"- `{c['a']}` ({c['label_a']}) vs `{c['b']}` ({c['label_b']}), {c['kind']}" for c in out["label_conflicts"][:15]]
    parts += ["", "## Leakage", ""]
    for s, v in out["leaked"].items():
        total = sum(out["counts"].get(s, {}).values())
        if total:
            parts.append(f"- {s}: {len(v)} of {total} images have an exact or near copy in an earlier split; "
                         f"leakage-free subset: {out['leakage_free'].get(s, 0)} images.")
    nn = out.get("nearest_neighbour_probe")
    if nn:
        free = f"{nn['leakage_free_accuracy']:.1%}" if nn["leakage_free_accuracy"] is not None else "n/a"
        parts += ["", "## Nearest-neighbour probe", "",
                  f"Each test image takes the label of its most correlated training image (contrast-normalised "
                  f"64x64 grey thumbnails, {nn['n_reference']} references): **{nn['accuracy']:.1%}** correct, "
                  f"{free} on the leakage-free subset, against {nn['majority_class_rate']:.1%} for always answering "
                  f"the largest class; median best correlation {nn['median_best_correlation']:.3f}. Recall by class: "
                  + ", ".join(f"{k} {v:.2f}" for k, v in nn["recall_by_class"].items()) + ". "
                  "A raw-pixel classifier far above the majority rate suggests that the test split shares images "
                  "or subjects with training (or that the classes differ in plain pixel layout): a model's accuracy "
                  "there measures recognition as much as generalisation."]
    vp = out.get("validation_probes")
    if vp:
        g = vp["grouped"]
        parts += ["", "## Which validation split behaves like the test split", "",
                  f"A 1-NN probe (training images as references) on a validation split carved at random, on one "
                  f"carved by whole groups of near-identical images (`--val-split grouped`: thumbnail correlation "
                  f">= {g['threshold']}, {g['groups']} groups, the largest {g['largest_group']} images), and on the "
                  "test split. A validation split whose probe is far above the test's has twins of its images in "
                  "training: its accuracy cannot select models for the test's kind of images. A run's own "
                  "carve (`train --val-split grouped`, recorded in its split_manifest.json) follows the same rule but "
                  "can differ by a few groups; quote the run's for that run.", "",
                  report.md_table(["held out", "images", "1-NN accuracy", "median best correlation"],
                                  [[k, v["n"], "" if v["nn_accuracy"] is None else f"{v['nn_accuracy']:.1%}",
                                    "" if v["median_best_correlation"] is None else
                                    f"{v['median_best_correlation']:.3f}"] for k, v in vp.items()])]
    return "\n".join(parts + (["", f"![example duplicate pairs]({out['pairs_plot']})", ""] if out.get("pairs_plot") else [""]))
