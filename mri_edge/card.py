"""`mri-edge card`: a model card (model_card.md and model_card.json) from what a run folder's
commands recorded: config, split manifest, test report, audit, calibration, parity, bench.
Nothing in it is typed by hand except the intended-use statement; a fact a command has not
produced yet is listed as missing rather than guessed."""

from __future__ import annotations

import platform
from pathlib import Path

from . import __version__, groups, metrics, quiet, report, trust
from .audit_report import counts_text
from .config import REGULARISERS
from .errors import MriEdgeError
from .familiar import without_arrays
from .files import read_json, sha256_file
from .integrity import model_files
from .onnx_model import int8_isa
from .freshness import current_rows, made_from_another, renamed
from .run import RunFolder, best_bench
from .tasks import public_dataset

INTENDED_USE = (
    "Research and engineering use: evaluating how a brain-MRI classifier behaves when deployed on an edge device "
    "(accuracy, calibration, abstention and explanations of the deployed file against the trained model). "
    "It is **not a medical device** and not a diagnostic tool: it was trained on {data} without clinical "
    "validation, and no clinical decision may rest on its output.")


def _load(path: Path, damaged: list, keys: tuple[str, ...] = (), command: str = ""):
    """A report, or None when it is not there; a damaged one (not JSON, or without the `keys` its
    `command` writes) is None and named in `damaged` with the command that writes it again."""
    try:
        return read_json(path, None, keys) if Path(path).is_file() else None
    except MriEdgeError as e:
        damaged.append(f"{e}" + (f" (run `mri-edge {command}` again)" if command else ""))
        return None


def _found(path: str, run: RunFolder) -> Path:
    """A path recorded relative to where train ran: as it is, else below a folder above the run
    (card may run from elsewhere than the project root)."""
    p = Path(path)
    if p.is_absolute() or p.is_file():
        return p
    return next((base / p for base in run.path.resolve().parents if (base / p).is_file()), p)


def familiarity_limit(cal: dict | None) -> str:
    """The model card's limitation on images of another kind, with what calibrate measured."""
    fam = ((cal or {}).get("trust") or {}).get("familiarity")
    if not fam:
        why = ("a run trained with --refit has no held-out images to set a familiarity check on"
               if ((cal or {}).get("held_out") or {}).get("borrowed_from") else
               "files with a features output get a familiarity check from `mri-edge calibrate`")
        return ("It answers any image: an MRI of another kind can get a confident answer that the threshold does "
                f"not refer; only blank and tiny images are flagged ({why}).")
    text = (f"Images whose features lie farther than {fam['limit']:.2f} from the training images' are referred "
            f"(set to refer {fam['fitted_on']['refer_rate']:.1%} of held-out images); an image of another kind "
            "that resembles the training images passes, and gets an answer as confident as any.")
    measured = [(n, r["familiarity"]["foreign"]) for n, r in cal["files"].items()
                if (r.get("familiarity") or {}).get("foreign")]
    if measured:
        text += " Measured on " + f"`{cal['foreign']}`: " + ", ".join(
            f"{n} referred {r['referred']:.1%} of {r['n']}" for n, r in measured) + "."
    return text


def build(run_dir) -> dict:
    from .export.pool import float_parts  # noqa: PLC0415

    run = RunFolder(run_dir)
    cfg = run.config()
    names = run.labels()["class_names"]
    damaged = []  # reports that are there but cannot be read
    test = _load(run.test_report_path, damaged, ("accuracy", "n", "macro", "confusion_matrix"), "evaluate")
    manifest = _load(run.manifest_path, damaged, ("splits",), "evaluate")
    cal = _load(run.calibrate_report_paths[0], damaged, ("trust", "files", "held_out"), "calibrate")
    parity = _load(run.parity_paths()[0], damaged, ("files",), "verify")
    bench = best_bench([(p.parent, _load(p, damaged, ("rows", "machine"), "bench")) for p in run.bench_paths])[1]
    audit = _load(_found(cfg["dedup"], run), damaged) if cfg.get("dedup") else None
    everything = metadata = run.export_metadata(models := [])  # and the model files the card lists, whole
    damaged += [f"{m} (run `mri-edge export` again)" for m in models]
    if damaged:  # a card without them would replace a complete one: refuse, and keep what is there
        raise MriEdgeError("cannot write the model card: " + "; ".join(damaged))
    files = run.export_files()
    missing = [] if files else [f"exported files (mri-edge export {run.path})"]
    keras = (run.model_path.name,) if run.model_path.is_file() else ()  # rows of it are kept beside the files'
    model_sha = sha256_file(run.model_path) if keras else None
    if other := made_from_another(metadata, model_sha):  # their reports describe files of another model
        missing.append(f"export of {', '.join(other)} (made from another model.keras than the run's: retrained, or "
                       f"evaluate --fp16-weights since; run mri-edge export {run.path})")
        metadata = {n: m for n, m in metadata.items() if n not in other}
    record, carried = run.trust(), any(m.get("trust") for m in metadata.values())  # exported files: their own
    why_not = ("fitted for another model.keras than the run's" if cal and model_sha
               and not trust.fitted_for(cal["trust"], model_sha) else
               "calibration/calibrate.json is missing, though the files carry a record" if not cal and carried else None)
    if cal and not why_not and (record is None or without_arrays(record) != cal["trust"]):
        missing.append(f"trust.json, the record model.keras is applied with, is missing or not calibrate.json's (run "
                       f"mri-edge calibrate {run.path})")
    cal = None if why_not else cal
    public = public_dataset(cfg["task"], manifest)  # else one's own images: no name, licence or "official" split
    card = {"model": {"architecture": "DenseNet121 (Keras 3), normalisation inside the graph",
                      "task": cfg["task"], "classes": names, "input": f"{cfg['image_size']} x {cfg['image_size']} "
                      "RGB, raw 0-255 pixels", "preprocessing": cfg.get("preprocessing")},
            "intended_use": INTENDED_USE.format(data="a public slice-level dataset" if public else "a user-supplied dataset"),
            "data": {**(public or {"name": "user-supplied", "source": cfg.get("data_dir"), "licence": "unknown"}),
                     "official_test_split": bool(public)},
            "recipe": {k: cfg.get(k) for k in ("weights", "image_size", "batch_size", "phases", "augment", "select_by",
                                                "patience", "dense_units", "dropout", "weights_stored",
                                                "class_weight", "val_split", "val_fraction", "seed", "split_seed", "val_kept_from",
                                                "time_budget_s", "wall_time_s", "ensemble", *REGULARISERS,
                                                *(("distill_weight", "distillation") if cfg.get("teacher") else ()))},
            "versions": {"trained_with": cfg.get("versions"), "benched_with": (bench or {}).get("machine", {}).get("versions"),
                         "card_written_with": {
                "mri_edge": __version__, "python": platform.python_version()}}}
    if run.history_path.is_file():  # the epochs each phase ran (a shipped folder may not carry the history)
        import csv  # noqa: PLC0415

        try:
            with open(run.history_path, newline="") as f:
                ran = [row.get("phase") for row in csv.DictReader(f)]
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise MriEdgeError(f"cannot write the model card: {run.history_path} cannot be read ({e})") from None
        card["recipe"]["epochs_run"] = {p["name"]: ran.count(p["name"]) for p in cfg.get("phases") or []}
    if manifest:
        card["data"]["counts"] = {s: len(rows) for s, rows in manifest["splits"].items()}
        carved = manifest.get("val_split") or {"method": "random"}  # (a run before carves were recorded)
        card["data"]["validation"] = {**(carved if manifest.get("val_carved_from_train") else {"method": "folder"}),
                                      "description": groups.describe_carve(manifest)}
        if not manifest.get("val_carved_from_train"):  # the dataset's own validation folder: no carve options
            for k in ("val_split", "val_fraction", "split_seed"):
                card["recipe"].pop(k, None)
    else:
        missing.append("split manifest")
    start = RunFolder(_found(cfg.get("weights") or "", run).parent) if str(cfg.get("weights")).endswith(".keras") else None
    if start and start.config_path.is_file() and start.manifest_path.is_file():  # its first weights' run
        began = public_dataset((_load(start.config_path, damaged) or {}).get("task"), _load(start.manifest_path, damaged))
        if began and began != public:  # trained on another public dataset
            card["data"]["starting_weights_trained_on"] = began
    if audit:
        near = (audit.get("near_duplicates") or {}).get("by_split_pair") or {}
        card["data"]["audit"] = {"exact_duplicate_pairs": audit["exact_duplicates"]["pairs_by_split"],
                                 "near_duplicate_pairs": {k: v["confirmed"] for k, v in near.items()},
                                 "test_images": sum((audit.get("counts") or {}).get("test", {}).values()),
                                 "leakage_free_test_images": audit["leakage_free"].get("test"),
                                 "nearest_neighbour_probe_test_accuracy": audit["nearest_neighbour_probe"]["accuracy"]}
    else:
        missing.append(f"leakage audit ({cfg['dedup']}, recorded relative to where train ran, is not found from here "
                       "or from a folder above the run: run card from there)" if cfg.get("dedup")
                       else "leakage audit (train --dedup)")
    if test:
        card["results"] = {"official": {"n": test["n"], "accuracy": test["accuracy"],
                                        "accuracy_ci95": test.get("accuracy_ci95"), "macro_f1": test["macro"]["f1"],
                                        "macro_f1_ci95": test.get("macro_f1_ci95"),
                                        "per_class": metrics.per_class_ci(test["confusion_matrix"], names)}}
        if test.get("dedup"):
            d = test["dedup"]
            card["results"]["leakage_free"] = {"n": d["n"], "accuracy": d["accuracy"],
                                               "accuracy_ci95": d.get("accuracy_ci95"), "macro_f1": d["macro"]["f1"],
                                               "macro_f1_ci95": d.get("macro_f1_ci95"),
                                               "per_class": metrics.per_class_ci(d["confusion_matrix"], names)}
    else:
        missing.append("test report")
    if cal:
        reference = next((n for n, r in cal["files"].items() if r.get("reference")), None)
        reference = renamed(cal["files"], metadata).get(reference, reference)
        cal["files"] = current_rows(cal["files"], metadata, "calibration", f"mri-edge calibrate {run.path}", missing,
                                    (*keras, reference))  # the reference's row, though it is no longer there
        card["calibration"] = {"trust": cal["trust"], "held_out": cal["held_out"],  # calibrate.json: no arrays
                               "per_file": {n: {s: {"ece_before": r[s]["before"]["ece"], "ece_after": r[s]["after"]["ece"],
                                                    **({"abstention": r[s]["abstention"]} if "abstention" in r[s] else {}),
                                                    **({"sets": r[s]["sets"]} if "sets" in r[s] else {})}
                                                for s in ("held_out", "test") if s in r}
                                            for n, r in cal["files"].items()},
                               "reference_model": reference}
    else:
        missing.append(f"calibration ({why_not}; run mri-edge calibrate {run.path})" if why_not
                       else "calibration (mri-edge calibrate)")
    if parity:
        card["parity"] = {n: {k: r.get(k) for k in ("quantization", "runtime", "accuracy", "agreement", "passed")}
                          | {"flips": len(r.get("flips", [])),
                             "familiarity_agreement": (r.get("familiarity") or {}).get("agreement"),
                             "explanation_rank_correlation": ((r.get("explanation") or {}).get("rank_correlation")
                                                              or {}).get("median")}
                          | ({"int8_recipe": float_parts(recipe)}
                             if (recipe := metadata.get(n, {}).get("accuracy_aware")) else {}) for n, r in
                          current_rows(parity["files"], metadata, "parity", f"mri-edge verify {run.path}",
                                       missing, keras).items()}
    else:
        missing.append("parity (mri-edge verify)")
    if bench:
        skipped = {s["model"]: f"bench skipped it: {s['reason']}" for s in bench.get("skipped") or []}
        replaced = [r for r in bench["rows"] if r["model"] in keras and r.get("model_sha256") not in (None, model_sha)]
        current = current_rows({r["model"]: r for r in bench["rows"] if r["batch"] == 1 and r not in replaced},
                               metadata, "latency", f"mri-edge bench {run.path}", missing, keras, skipped)
        isa = int8_isa(bench["machine"].get("cpu_flags") or [])
        moved = renamed({r["model"]: r for r in bench["rows"]}, metadata)  # every batch-1 row of a file, as named now
        card["latency"] = {"machine": ", ".join(x for x in (bench["machine"].get("cpu"), isa) if x), "rows": [
            {"model": moved.get(r["model"], r["model"]), **{k: r[k] for k in ("runtime_label", "threads", "batch", "p50_ms")}}
            for r in bench["rows"] if r["batch"] == 1 and moved.get(r["model"], r["model"]) in current]}
    else:
        missing.append("latency (mri-edge bench)")
    # the exported files and the model.keras they came from (verify's and calibrate's reference)
    stored = [p for f in [*files, run.model_path] for p in model_files(f) if p.is_file()]
    shas = {n: m["model_sha256"] for n, m in everything.items() if m.get("model_sha256")}
    card["files"] = [{"file": f.name, "bytes": f.stat().st_size,  # model.keras hashed once, above
                      "sha256": model_sha if f == run.model_path else sha256_file(f),  # report.md: out of date?
                      **({"model_sha256": shas[f.name]} if f.name in shas else {})} for f in stored]
    small = [c["class"] for c in card.get("results", {}).get("official", {}).get("per_class", []) if c["support"] < 30]
    limits = [f"Input is {cfg['image_size']} px: images are resized to it, finer detail is lost.",
              f"Trained and tested on single 2-D slices from {'a public dataset' if public else 'the user-supplied dataset'}; "
              "not validated on other scanners, protocols or populations.",
              familiarity_limit(cal)]
    if small:
        limits.append(f"Few test images for {', '.join(small)} (under 30): their sensitivity intervals are wide.")
    a = card["data"].get("audit") or {}
    if a.get("test_images") and (a.get("leakage_free_test_images") or 0) < a["test_images"]:
        limits.append(f"{a['test_images'] - a['leakage_free_test_images']} of {a['test_images']} test images have an "
                      "exact or near copy in training, and a raw-pixel nearest neighbour gets "
                      f"{a['nearest_neighbour_probe_test_accuracy']:.1%} of test: the test accuracy overstates accuracy on new "
                      "patients (the leakage-free subset leaves out the copies, not other slices of the same subjects).")
    c = card.get("calibration") or {}
    at = ((c.get("per_file") or {}).get(c.get("reference_model"), {}).get("test") or {}).get("abstention") or {}
    if at.get("coverage") is not None and at["coverage"] < 0.5:
        limits.append(f"At its stored threshold it answers {at['coverage']:.1%} of test images ("
                      + (f"{at['accepted_accuracy']:.1%} of them right" if at.get("accepted_accuracy") is not None
                         else "none") + f") and refers the other {1 - at['coverage']:.1%} for review: the trade "
                      "`mri-edge calibrate --max-risk` set.")
    held = (cal or {}).get("held_out", {})
    if held.get("borrowed_from"):
        limits.append(f"Its calibration, threshold and sets are those of {held['borrowed_from']}, its recipe's run "
                      "without `--refit`: what they were shown to give holds for that model, not for this one, which "
                      "also trained on those held-out images; it has no familiarity check.")
    rec = (cal or {}).get("trust") or {}
    if rec.get("conformal_q") == 0.0:  # every held-out set was the top class alone
        limits.append(f"Its {1 - rec['alpha']:.0%} prediction sets are single classes: its held-out error is under "
                      f"{rec['alpha']:.0%}, so a set never adds a second class, even to an answer near 0.5 (the "
                      "threshold refers those); their test coverage is in the calibration table.")
    if held.get("twins_included"):
        limits.append("The calibration was fitted on held-out images that are not new to the model (`calibrate "
                      "--allow-twins`: near twins of training, or a raw-pixel 1-NN that gets more of them than of test): "
                      "it is overconfident on new subjects.")
    if not cal and not carried:
        limits.append("Its probabilities are the raw softmax, not calibrated, and it has no abstention threshold "
                      "(`mri-edge calibrate` fits them on held-out images without near twins in training, and refuses "
                      "when the run has none).")
    if card["data"].get("validation", {}).get("method") == "random":
        limits.append("Validation was carved at random: on datasets with several slices per subject its images "
                      "have near twins in training, so validation accuracy overstates accuracy on new subjects.")
    card["limitations"] = limits
    card["missing"] = missing
    return card


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 60 else f"{seconds:.0f} s"


def ci(v) -> str:
    return f"[{v[0] * 100:.1f}, {v[1] * 100:.1f}]" if v else ""


def pct(value, interval) -> str:
    return "n/a (no images)" if value is None else f"{value:.1%} {ci(interval)}"


def markdown(card: dict) -> str:
    m, d = card["model"], card["data"]
    parts = [f"# Model card: mri-edge {m['task']} classifier", "", "## Intended use", "", card["intended_use"], "",
             "## Model", "", f"{m['architecture']}; classes: {', '.join(m['classes'])}; input {m['input']}.", "",
             "## Data", "", f"{d.get('name')} ({d.get('source')}; licence {d.get('licence')})."
             + (f" Its starting weights were trained on {w['name']} ({w['source']}; licence {w['licence']})."
                if (w := d.get("starting_weights_trained_on")) else ""), ""]
    if "counts" in d:
        parts += [report.md_table(["split", "images"], [[s, n] for s, n in d["counts"].items()]), "",
                  report.sentence(d["validation"]["description"]), ""]
    if "audit" in d:
        a = d["audit"]
        near = "; near duplicates: " + counts_text(a["near_duplicate_pairs"]) if a.get("near_duplicate_pairs") else ""
        of = f" of {a['test_images']}" if a.get("test_images") else ""
        parts += [f"Leakage audit: exact duplicate pairs by split: {counts_text(a['exact_duplicate_pairs'])}{near}; "
                  f"{a['leakage_free_test_images']}{of} test images have no exact or near copy in training; a raw-pixel "
                  f"nearest neighbour among the training folder's images (validation included) gets "
                  f"{a['nearest_neighbour_probe_test_accuracy']:.1%} of test.", ""]
    r = card["recipe"]
    if r.get("ensemble"):  # `mri-edge ensemble`: no training of its own; each member's recipe is in its folder
        members = [f"`{m['run']}` (test accuracy " + ("not recorded" if m.get("test_accuracy") is None
                                                       else f"{m['test_accuracy']:.2%}") + ")"
                   for m in r["ensemble"]["members"]]
        parts += ["## Training recipe", "", f"Ensemble, {r['image_size']} px: the mean of the probabilities of "
                  f"{len(members)} runs, {'; '.join(members)}. Each member's recipe is in its run folder's "
                  "config.json.", ""]
    else:
        ran = r.get("epochs_run") or {}
        phases = "; ".join(f"{p['name']} up to {p['epochs']} epoch{'s' * (p['epochs'] != 1)}"
                           + (f" ({ran[p['name']]} run)" if p["name"] in ran else "")
                           + f" at lr {p['lr']} (unfreeze {p['unfreeze']})" for p in r.get("phases") or [])
        budget = f"time budget {minutes(r['time_budget_s'])}" if r.get("time_budget_s") else ""
        took = f"{minutes(r['wall_time_s'])} of training" if r.get("wall_time_s") else ""
        phases += "".join(f"; {x}" for x in (budget, took) if x)
        parts += ["## Training recipe", "", f"Weights `{r['weights']}`, {r['image_size']} px, batch {r['batch_size']}, "
                  f"augmentation {'on' if r['augment'] else 'off'}, class weights "
                  f"{r['class_weight'] or 'not recorded'}, seed {r['seed']}; regularisers: "
                  f"{', '.join(f'{k} {r[k]}' for k in REGULARISERS if r.get(k)) or 'none'}"
                  f"{' (distill weight ' + str(r['distill_weight']) + ')' if r.get('teacher') else ''}; "
                  f"phases: {phases}. Head: {r.get('dense_units') or '?'} units, dropout {r.get('dropout')}; each phase "
                  + ("keeps its last epoch." if (sel := r.get("select_by") or "loss") == "last" else
                     f"keeps its epoch of best validation {sel.replace('_', '-')} (patience {r.get('patience')}).")
                  + (f" The stored model.keras has its kernels rounded to {ws['kernels']} (from the trained "
                     f"{ws['from']['file']}, sha256 {ws['from']['sha256'][:12]}...)." if (ws := r.get("weights_stored")) else ""),
                  ""]
    official = "official test split" if d.get("official_test_split") else "test split"
    for key, title in (("official", official), ("leakage_free", "leakage-free test subset")):
        res = card.get("results", {}).get(key)
        if not res:
            continue
        parts += [f"## Results: {title} ({res['n']} images)", "",
                  f"Accuracy **{res['accuracy']:.2%}** {ci(res.get('accuracy_ci95'))}, macro-F1 {res['macro_f1']:.3f}"
                  + (" [{:.3f}, {:.3f}].".format(*res["macro_f1_ci95"]) if res.get("macro_f1_ci95") else "."),
                  "", report.md_table(["class", "images", "sensitivity [95% CI]", "specificity [95% CI]"],
                                      [[c["class"], c["support"], pct(c["sensitivity"], c["sensitivity_ci95"]),
                                        pct(c["specificity"], c["specificity_ci95"])]
                                       for c in res["per_class"]]), ""]
    if "calibration" in card:
        c = card["calibration"]
        t = c["trust"]
        fitted_with = (f"{c['held_out']['borrowed_from']}'s model (this model trained on those images too: "
                       "`train --refit`, `calibrate --from-run`)" if c["held_out"].get("borrowed_from")
                       else f"`{c['reference_model']}`")
        parts += ["## Calibration and abstention", "",
                  f"Temperature {t['temperature']:.3f} fitted with {fitted_with} on {c['held_out']['n']} "
                  f"held-out images ({c['held_out']['rule']}). Answers below calibrated confidence "
                  f"{trust.threshold_text(t['threshold'])} are marked for review (target: "
                  f"{trust.describe_target(t.get('fitted_on', {}).get('target', {}))}); prediction sets at "
                  f"{1 - t['alpha']:.0%} coverage.", "",
                  report.md_table(["file", "split", "ECE before", "ECE after", "coverage / risk at threshold",
                                   "set coverage / size"],
                                  [[n, s.replace("_", "-"), f"{v['ece_before']:.4f}", f"{v['ece_after']:.4f}",
                                    trust.coverage_risk_text(v.get("abstention")),
                                    f"{v['sets']['coverage']:.3f} / {v['sets']['mean_size']:.2f}" if "sets" in v else ""]
                                   for n, res in c["per_file"].items() for s, v in res.items()]), ""]
        target = t.get("fitted_on", {}).get("target", {}).get("max_risk")
        over = [f"{n} ({a['risk']:.4f})" for n, res in c["per_file"].items()
                if target is not None and (a := res.get("held_out", {}).get("abstention") or {}).get("risk") is not None
                and a["risk"] > target]
        if over:  # the threshold was chosen with one model; another file's answers move around it
            parts += [f"Held-out risk at the stored threshold above the {target:.1%} target: {', '.join(over)}. The "
                      f"threshold was chosen with `{c['reference_model']}`'s answers, and each of these files moves "
                      "some answers across it.", ""]
    if card.get("parity"):
        parts += ["## Parity of the exported files (test split)", "",
                  report.md_table(["file", "quantization", "accuracy", "agreement", "flips",
                                   "familiarity referrals agree", "explanation ρ (median)", "gate"],
                                  [[n, p["quantization"], f"{p['accuracy']:.4f}" if p["accuracy"] is not None else "",
                                    f"{p['agreement']:.2%}" if p["agreement"] is not None else "", p["flips"],
                                    f"{a:.2%}" if (a := p.get("familiarity_agreement")) is not None else "",
                                    f"{r:.3f}" if (r := p.get("explanation_rank_correlation")) is not None else "",
                                    "PASS" if p["passed"] else "FAIL"] for n, p in card["parity"].items()]), ""]
        recipes = [f"- `{n}`: {p['int8_recipe']}" for n, p in card["parity"].items() if "int8_recipe" in p]
        if recipes:  # what the accuracy-aware search kept out of static int8, and its held-out score
            parts += ["int8 recipes (`mri-edge export --max-drop`): what each file keeps out of static int8 ('body': "
                      "the input normalisation before conv1), then its held-out agreement, flip bound at 95% and accuracy "
                      "change:",
                      "", *recipes, ""]
    if "latency" in card:
        parts += [f"## Latency (batch 1, {card['latency']['machine']})", "",
                  report.md_table(["file", "runtime", "threads", "p50 ms"],
                                  [[x["model"], x["runtime_label"], x["threads"], f"{x['p50_ms']:.2f}"]
                                   for x in card["latency"]["rows"]]), ""]
    parts += ["## Files", "", report.md_table(["file", "bytes", "sha256"], [[f["file"], f["bytes"], f"`{f['sha256']}`"]
                                                                            for f in card["files"]]), "",
              "## Versions", "", f"Trained with {report.as_words(card['versions']['trained_with'])}; "
              + (f"benched with {report.as_words(v)}; " if (v := card["versions"].get("benched_with")) else "")
              + f"card written with {report.as_words(card['versions']['card_written_with'])}.", "",
              "## Known limitations", "", *[f"- {x}" for x in card["limitations"]], ""]
    if card["missing"]:
        parts += ["## Not yet recorded", "", *[f"- {x}" for x in card["missing"]], ""]
    return "\n".join(parts)


def write_card(run_dir) -> dict:
    run = RunFolder(run_dir)
    try:
        card = build(run.path)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:  # a report edited by hand, say
        raise MriEdgeError(f"cannot write the model card: a report in {run.path} is not as its command writes it "
                           f"({type(e).__name__}: {e}); run that command again") from None
    run.check_writable()
    text = markdown(card)  # both made before either is written; the JSON (what the index reads) last
    with quiet.signals_deferred():  # the pair says one thing
        report.write_text(run.card_paths[1], text)
        report.write_json(run.card_paths[0], card)
        run.write_index()
    return card
