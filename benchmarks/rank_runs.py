"""Rank candidate runs by the grouped held-out rule, next to their test ranking.

The held-out split of the first run (a grouped one: whole groups of near-identical training
images held out, docs/data.md) is the rule: every candidate's model.keras is scored on those
images, and candidates are ranked by held-out accuracy (or --by macro_f1). The test
columns come from each run's own test report and are shown beside the rule, never used by
it. A run that trained on any of the held-out images (a random carve, another seed or
threshold), or started from the weights of a run that did, cannot be ranked by the rule and
is listed apart, with its test numbers. A run that started from one which only kept its
epoch on them (the same grouped split, one run continued by another), or learned from such a
run (`train --teacher`), is ranked and marked.

The held-out split also costs on test when the test split holds other slices of the training
subjects (the Alzheimer data does): the test images whose nearest training image (raw-pixel
thumbnail correlation) is a held-out one are shown apart, with each candidate's accuracy on
them and on the rest; a final fit on training + held-out would give those subjects back.

Held-out intervals resample whole groups (the cluster bootstrap: near twins are one answer,
not many), and each candidate's difference from the rule's first is given with its interval:
where it holds 0, this split cannot tell the two apart.

The held-out figures are a little optimistic when candidates chose their own epochs on the
same images (`train --select-by accuracy`): each is the best point of a noisy curve. The
test columns beside them show how far that carries.

    python benchmarks/rank_runs.py artifacts/runs/alzheimer-96px-grouped \\
        artifacts/runs/alzheimer-96px-grouped-reg [--by accuracy] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from tta import probabilities, scores  # noqa: E402

from mri_edge import groups, metrics, report  # noqa: E402
from mri_edge.data import decode_images, is_refit  # noqa: E402
from mri_edge.keras_model import KerasModel  # noqa: E402
from mri_edge.verify import mcnemar_exact  # noqa: E402
from mri_edge.run import RunFolder  # noqa: E402


def test_scores(run: RunFolder, names: list[str]) -> dict:
    rep = run.test_report()
    if rep is None:
        raise SystemExit(f"{run.path}: no test_report.json (evaluate the run first)")
    free = rep.get("dedup") or {}
    smallest = min(names, key=lambda c: rep["per_class"][c]["support"])
    return {"accuracy": rep["accuracy"], "ci": rep["accuracy_ci95"], "macro_f1": rep["macro"]["f1"],
            "leakage_free": free.get("accuracy"), "smallest": smallest,
            "smallest_hits": round(rep["per_class"][smallest]["recall"] * rep["per_class"][smallest]["support"]),
            "smallest_n": rep["per_class"][smallest]["support"]}


def images_seen(run: RunFolder, ancestor: bool = False) -> tuple[set[Path], set[Path]]:
    """(images a run's weights were fitted on, images only chosen on): its training split;
    for the run whose model.keras it started from (config.json `weights`), and so on up the
    line, the training split as fitted and the validation split as chosen on (that run kept
    its epoch by it); for an ensemble (`mri-edge ensemble`), what each member has seen."""
    manifest = run.manifest()
    root = Path(manifest["root"])

    def split(name):
        return {(root / rel).resolve() for rel, _ in manifest["splits"].get(name, [])}

    fitted, chosen = split("train"), split("val") if ancestor else set()
    config = run.config()
    members = [Path(m["run"]) for m in (config.get("ensemble") or {}).get("members", [])]
    start = Path(str(config.get("weights", "none")))
    lineage = [(RunFolder(m), ancestor) for m in members]
    if not members and start.suffix == ".keras" and (start.parent / "split_manifest.json").is_file():
        lineage.append((RunFolder(start.parent), True))
    teacher = config.get("teacher")  # a distilled run learned from a run that kept its epochs on these images
    if teacher and (Path(teacher) / "split_manifest.json").is_file():
        lineage.append((RunFolder(teacher), True))
    elif teacher:  # trained elsewhere: train refused a teacher fitted on them, so it chose on them at most
        chosen |= split("val")
    for other, as_ancestor in lineage:
        f, c = images_seen(other, as_ancestor)
        fitted |= f
        chosen |= c
    return fitted, chosen - fitted


def ensemble(held_p, test_p, held_labels, test_labels, names: list[str], like: dict, seed: int) -> dict:
    """The ensemble lever measured, not built: the mean of the rankable candidates'
    probabilities, `held_p` and `test_p` (one exported graph averaging them would give the same
    numbers)."""
    t = scores(test_p, test_labels, names)
    return {"run": "mean of the candidates above", "held_out": scores(held_p, held_labels, names),
            "test": {"accuracy": t["accuracy"], "macro_f1": t["macro_f1"], "leakage_free": None,
                     "ci": metrics.bootstrap_ci((test_p.argmax(1) == test_labels).astype(float), seed=seed),
                     "smallest": like["smallest"], "smallest_hits": t["hits"][like["smallest"]],
                     "smallest_n": like["smallest_n"]}}


def near_twins(manifest: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """From one read of the thumbnails (the audit's measure): for each test image of the manifest,
    in its order, whether its nearest image among training + held-out is a held-out one, and that
    image's label (the 1-NN vote); and the group id of each held-out image (its groups of near
    twins at the carve's threshold: the carve holds out whole groups, so the groups found among
    the held-out images alone are the carve's own)."""
    root = Path(manifest["root"])
    train, held, test = (manifest["splits"][s] for s in ("train", "val", "test"))
    thumbs, ok = groups.read_thumbnails([str(root / rel) for rel, _ in train + held + test],
                                        "thumbnails of training, held-out and test")
    n_ref = len(train) + len(held)
    nearest, _ = groups.nearest(thumbs[n_ref:], thumbs[:n_ref])
    labels = np.array([y for _, y in train + held])
    group_ids = groups.components(thumbs[len(train):n_ref], float(manifest["val_split"]["threshold"]),
                                  ok[len(train):n_ref])
    return nearest >= len(train), labels[nearest], group_ids


def ranks(values: list[float]) -> list[int]:
    order = sorted(range(len(values)), key=lambda i: -values[i])
    out = [0] * len(values)
    for r, i in enumerate(order):
        out[i] = r + 1
    return out


def _pct(x) -> str:
    return "-" if x is None else f"{x:.2%}"


def versus(r: dict, first: str) -> str:
    """An apart run's paired comparison with the rule's first, in words (McNemar exact p)."""
    v = r.get("versus_first")
    if not v:
        return ""
    return f" (against {first}: " + "; ".join(
        f"{'near held-out' if k == 'near_held_out' else 'the rest'} {d['this_right_only']} answers right only here, "
        f"{d['first_right_only']} only there, p {d['p_value']:.3g}" for k, d in v.items()) + ")"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--by", choices=("accuracy", "macro_f1"), default="accuracy")
    ap.add_argument("--out", default=None, help="write rank.json and rank.md here")
    args = ap.parse_args()
    runs = [RunFolder(r) for r in args.runs]
    ref = runs[0].manifest()
    if (ref.get("val_split") or {}).get("method") != "grouped":
        sys.exit(f"{runs[0].path}: its validation split is not grouped; the rule needs one (--val-split grouped)")
    if is_refit(ref):
        sys.exit(f"{runs[0].path} trained on its held-out images (train --refit): give a run without --refit first")
    held = ref["splits"]["val"]
    held_paths = {(Path(ref["root"]) / rel).resolve() for rel, _ in held}
    labels = np.array([k for _, k in held])
    names = ref["class_names"]
    ranked, apart, member_probs = [], [], []  # member_probs: (held-out, test) probabilities of each ranked run
    ref_preds = runs[0].test_predictions()
    test_labels = np.asarray(ref_preds["labels"])
    # test predictions leave out unreadable images: match the manifest's test split by path
    is_held, vote, group_ids = near_twins(ref)
    near = {rel: (h, v) for (rel, _), h, v in zip(ref["splits"]["test"], is_held.tolist(), vote.tolist())}
    matched = [near.get(rel, (False, -1)) for rel in ref_preds["paths"]]  # -1: no vote, never right
    near_held = np.array([h for h, _ in matched], bool)
    nn_vote = np.array([v for _, v in matched])

    def split_hits(hit: np.ndarray) -> dict:
        return {"near_held_out": float(hit[near_held].mean()) if near_held.any() else None,
                "rest": float(hit[~near_held].mean()) if (~near_held).any() else None}

    def split_accuracy(test_probs) -> dict:
        return split_hits(np.asarray(test_probs).argmax(1) == test_labels)

    for run in runs:
        manifest = run.manifest()
        if manifest["class_names"] != names:
            sys.exit(f"{run.path}: classes {manifest['class_names']} are not {names}: another task")
        fitted, chosen = (held_paths & seen for seen in images_seen(run))
        preds = run.test_predictions()
        same_test = preds["paths"] == ref_preds["paths"]
        entry = {"run": str(run.path), "chosen_before": len(chosen),
                 "test": {**test_scores(run, names), **(split_accuracy(preds["probs"]) if same_test else
                                                         {"near_held_out": None, "rest": None})}}
        if fitted:
            refit = " (`train --refit`)" if is_refit(manifest) else ""
            apart.append({**entry, "why": f"its weights were fitted on {len(fitted)} of the {len(held)} held-out "
                                          f"images{refit}",
                          "_hits": np.asarray(preds["probs"]).argmax(1) == test_labels if same_test else None})
            continue
        if not same_test:
            sys.exit(f"{run.path}: its test predictions are not over {runs[0].path.name}'s test images")
        net = KerasModel(run.model_path)
        images = decode_images(net, Path(ref["root"]), [rel for rel, _ in held], f"{run.path.name}: held-out images")
        probs, _ = probabilities(net, images, lambda x: [x])
        ranked.append({**entry, "held_out": scores(probs, labels, names)})
        member_probs.append((probs, np.asarray(preds["probs"], np.float32)))
    if len(member_probs) > 1:
        held_mean, test_mean = (np.mean([m[i] for m in member_probs], axis=0) for i in (0, 1))
        mean = ensemble(held_mean, test_mean, labels, test_labels, names, ranked[0]["test"],
                        seed=runs[0].config().get("seed", 42))
        mean["test"].update(split_accuracy(test_mean))
        mean["chosen_before"] = sum(r.get("chosen_before", 0) for r in ranked)
        ranked.append(mean)
        member_probs.append((held_mean, test_mean))
    held_hits = [held.argmax(1) == labels for held, _ in member_probs]  # one per ranked row
    by_rule = ranks([r["held_out"][args.by] for r in ranked])
    first = by_rule.index(1) if ranked else 0
    for r, hits in zip(ranked, held_hits):
        r["held_out"]["ci_by_group"] = metrics.bootstrap_ci(hits, groups=group_ids)
        r["held_out"]["minus_first"] = float(hits.mean() - held_hits[first].mean())
        r["held_out"]["minus_first_ci"] = metrics.bootstrap_ci(hits.astype(float) - held_hits[first], groups=group_ids)
    by_test = ranks([r["test"][args.by] for r in ranked])
    first_hits = member_probs[first][1].argmax(1) == test_labels if ranked else None
    for r in apart:  # paired against the rule's first, on the test images near held-out ones and on the rest
        hits = r.pop("_hits")
        if hits is None or first_hits is None:
            continue
        r["versus_first"] = {}
        for name, m in (("near_held_out", near_held), ("rest", ~near_held)):
            b, c = int((first_hits & ~hits)[m].sum()), int((hits & ~first_hits)[m].sum())
            r["versus_first"][name] = {"first_right_only": b, "this_right_only": c, "p_value": mcnemar_exact(b, c)}
    rows = []
    for r, a, b in sorted(zip(ranked, by_rule, by_test), key=lambda t: t[1]):
        h, t = r["held_out"], r["test"]
        # a run that started from one which kept its epoch on these images was chosen on them twice
        lo, hi = h["ci_by_group"]
        d_lo, d_hi = h["minus_first_ci"]
        rows.append([a, Path(r["run"]).name + (" (*)" if r.get("chosen_before") else ""),
                     f"{h['accuracy']:.2%} [{lo:.2%}, {hi:.2%}]",
                     "-" if a == 1 else f"{h['minus_first']:+.2%} [{d_lo:+.2%}, {d_hi:+.2%}]", f"{h['macro_f1']:.3f}",
                     f"{t['accuracy']:.2%} [{t['ci'][0]:.2%}, {t['ci'][1]:.2%}]",
                     _pct(t["leakage_free"]), f"{t['macro_f1']:.3f}",
                     f"{t['smallest_hits']}/{t['smallest_n']}", _pct(t["near_held_out"]), _pct(t["rest"]), b])
    text = (f"# Candidates ranked by the grouped held-out rule ({args.by})\n\n"
            f"Held-out split: {len(held)} images in {len(set(group_ids.tolist()))} groups of near twins, "
            f"{runs[0].path.name}'s grouped carve. Held-out intervals resample whole groups.\n\n"
            + report.md_table(["rule rank", "run", "held-out accuracy [95% CI]", "minus the first [95% CI]",
                               "held-out macro-F1", "test accuracy [95% CI]",
                               "leakage-free", "test macro-F1", f"test {ranked[0]['test']['smallest'] if ranked else ''}",
                               f"test, nearest image held out ({int(near_held.sum())})",
                               f"test, the rest ({int((~near_held).sum())})", "test rank"], rows))
    tied = [Path(r["run"]).name for r, a in zip(ranked, by_rule)
            if a != 1 and r["held_out"]["minus_first_ci"][1] >= 0]
    if tied:
        text += (f"\n\nNot told apart from the rule's first by this split (the difference's interval holds 0): "
                 f"{', '.join(tied)}.")
    nn = split_hits(nn_vote == test_labels)
    text += (f"\n\nA 1-NN vote over training + held-out thumbnails gets {_pct(nn['near_held_out'])} of the test images "
             f"whose nearest image is held out and {_pct(nn['rest'])} of the rest.")
    if any(r.get("chosen_before") for r in ranked):
        text += ("\n\n(*) started from, learned from (`train --teacher`) or averages a run that kept its epoch on "
                 "these held-out images (never trained on them): chosen on them twice, so its held-out figure is a "
                 "little more optimistic than the others'.")
    if apart:
        text += "\n\nNot rankable by the rule:\n\n" + "\n".join(
            f"- {Path(r['run']).name}: {r['why']}; test {r['test']['accuracy']:.2%}, macro-F1 "
            f"{r['test']['macro_f1']:.3f}, {r['test']['smallest']} "
            f"{r['test']['smallest_hits']}/{r['test']['smallest_n']}; "
            f"{_pct(r['test']['near_held_out'])} of the test images whose nearest image is held out, "
            f"{_pct(r['test']['rest'])} of the rest" + versus(r, Path(ranked[first]["run"]).name if ranked else "")
            for r in apart)
    text += "\n"
    print(text)
    if args.out:
        dest = Path(args.out)
        dest.mkdir(parents=True, exist_ok=True)
        (dest / "rank.json").write_text(json.dumps({"by": args.by, "ranked": ranked, "apart": apart}, indent=1))
        (dest / "rank.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
