"""Every Markdown file the project writes or ships renders: each table keeps its columns."""

import re

import pytest
from markdown_it import MarkdownIt

from conftest import REPO

from mri_edge import report


def table_problems(text: str) -> list[str]:
    """Rows whose cell count differs from their table's header, per markdown-it-py's tables."""
    md = MarkdownIt("commonmark").enable("table")
    lines = text.splitlines()
    problems = []
    tokens = md.parse(text)
    covered = set()
    for tok in tokens:
        if tok.type in ("table_open", "fence", "code_block") and tok.map:
            covered.update(range(*tok.map))
    problems += [f"line {i + 1} looks like a table row but is not part of a rendered table: {ln[:80]}"
                 for i, ln in enumerate(lines) if ln.lstrip().startswith("|") and i not in covered]
    for tok in tokens:
        if tok.type != "table_open" or tok.map is None:
            continue
        start, end = tok.map
        rows = [ln for ln in lines[start:end] if ln.strip()]

        def cells(line):
            body = line.strip()
            body = body[1:] if body.startswith("|") else body
            body = body[:-1] if body.endswith("|") and not body.endswith("\\|") else body
            return len(re.split(r"(?<!\\)\|", body))

        width = cells(rows[0])
        for ln in rows[2:]:
            if cells(ln) != width:
                problems.append(f"line {lines.index(ln) + 1}: {cells(ln)} cells, header has {width}: {ln[:80]}")
    return problems


def check(path):
    text = path.read_text()
    assert not table_problems(text), f"{path}: {table_problems(text)}"
    return text


def test_the_checker_catches_a_broken_table():
    assert table_problems("| a | b |\n|---|---|\n| 1 | 2 |\n") == []
    assert table_problems("| a | |dp| |\n|---|---|\n| 1 | 2 |\n")  # an unescaped | shifts the columns
    assert table_problems("| a | b | c |\n|---|---|---|\n| 1 | 2 |\n")
    assert table_problems("| a | \\|dp\\| |\n|---|---|\n| 1 | 2 |\n") == []


def test_reports_of_a_run_render(micro_run):
    from mri_edge.verify import verify_run

    verify_run(micro_run, log=lambda *_: None)
    names = {p.name for p in micro_run.rglob("*.md")}
    assert {"report.md", "train_report.md", "parity.md"} <= names
    for path in micro_run.rglob("*.md"):
        check(path)
    index = (micro_run / "report.md").read_text()
    for link in ("train_report.md", "exports/model_int8.tflite", "parity.md"):
        assert f"({link})" in index
    # every relative link of every report resolves from the report's folder (parity.md's plots among them)
    import re

    for path in micro_run.rglob("*.md"):
        for target in re.findall(r"\]\(<?([^)>#]+)>?\)", path.read_text()):
            if "://" not in target:
                assert (path.parent / target).exists(), f"{path.name}: {target}"
    parity = (micro_run / "parity.md").read_text()
    assert "[model_int8.tflite](<verify/reliability_model_int8_tflite.png>)" in parity
    assert "[model_int8.tflite](<verify/confusion_model_int8_tflite.png>)" in parity


def test_audit_report_renders(tmp_path):
    from mri_edge import audit
    from mri_edge.synth import write_dataset

    root = write_dataset(tmp_path / "d", "tumor", n_train=4, n_test=2, size=48)
    audit.audit(root, "tumor", tmp_path / "a", log=lambda *_: None)
    check(tmp_path / "a" / "audit.md")


@pytest.mark.parametrize("path", sorted([REPO / "README.md", *(REPO / "docs").glob("*.md"),
                                         *(REPO / "artifacts").rglob("*.md")]), ids=lambda p: p.name)
def test_shipped_markdown_renders(path):
    check(path)


def test_readme_is_a_users_page():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    assert 'pip install -e ".[full,dev]"' in readme


def test_cli_reference_is_generated_from_the_code():
    from mri_edge.clidoc import reference

    assert (REPO / "docs" / "cli.md").read_text() == reference(), \
        "docs/cli.md is stale: python -m mri_edge.clidoc > docs/cli.md"


def test_calibration_metrics_on_known_cases():
    import numpy as np

    from mri_edge.metrics import calibration_metrics

    y = np.array([0, 1, 0, 1])
    perfect = calibration_metrics(y, np.eye(2)[y])
    assert perfect["ece"] == 0 and perfect["brier"] == 0 and perfect["nll"] < 1e-9
    # always 90% sure, right half of the time: ECE 0.4
    over = calibration_metrics(y, np.array([[0.9, 0.1], [0.9, 0.1], [0.9, 0.1], [0.9, 0.1]]))
    assert abs(over["ece"] - 0.4) < 1e-9 and abs(over["mean_confidence"] - 0.9) < 1e-9
    assert over["reliability"] == [{"lo": over["reliability"][0]["lo"], "hi": over["reliability"][0]["hi"],
                                    "n": 4, "confidence": 0.9, "accuracy": 0.5}]
    assert abs(over["brier"] - (0.01 + 0.01 + 0.81 + 0.81) / 2) < 1e-9


def test_group_bootstrap_resamples_whole_groups():
    import numpy as np

    from mri_edge.metrics import bootstrap_ci

    rng = np.random.default_rng(0)
    hits = rng.random(300) < 0.7
    # one image a group: the same draws as the per-image bootstrap
    assert bootstrap_ci(hits, groups=np.arange(300)) == bootstrap_ci(hits)
    # 30 groups of 10 twins, each group all right or all wrong: 30 independent answers, not 300
    clustered = np.repeat(rng.random(30) < 0.7, 10)
    ids = np.repeat(np.arange(30), 10)
    lo, hi = bootstrap_ci(clustered, groups=ids)
    lo_i, hi_i = bootstrap_ci(clustered)
    assert hi - lo > 2.5 * (hi_i - lo_i)
    assert lo <= clustered.mean() <= hi


def test_macro_f1_ci_scores_each_resample_as_sklearn_does():
    import numpy as np
    from sklearn.metrics import f1_score

    from mri_edge.metrics import classification_metrics, macro_f1_ci, stratified_resamples

    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, 200)
    y[:3] = 3  # a rare class: kept in every resample (drawn within its class)
    y[3:] = np.minimum(y[3:], 2)
    pred = np.where(rng.random(200) < 0.75, y, rng.integers(0, 4, 200))
    # the same resamples drawn again and scored by sklearn: the interval's ends are their quantiles
    idx = stratified_resamples(y, 300, seed=7)
    assert all((np.bincount(y[i], minlength=4) == np.bincount(y, minlength=4)).all() for i in idx)
    by_sklearn = [f1_score(y[i], pred[i], labels=range(4), average="macro", zero_division=0) for i in idx]
    assert np.allclose(macro_f1_ci(y, pred, 4, n_boot=300, seed=7), np.quantile(by_sklearn, [0.025, 0.975]))
    lo, hi = macro_f1_ci(y, pred, 4)
    assert lo < classification_metrics(y, pred, ["a", "b", "c", "d"])["macro"]["f1"] < hi and hi - lo > 0.05
    assert macro_f1_ci(y, y, 4) == [1.0, 1.0] and macro_f1_ci([], [], 4) == [0.0, 0.0]


def test_verify_reports_calibration_of_every_file(micro_run):
    from mri_edge.verify import verify_run

    out = verify_run(micro_run, log=lambda *_: None)
    for name, r in out["files"].items():
        c = r["calibration"]
        assert min(abs(c["ece_delta"]), abs(c["ece_delta_keras_bins"])) <= r["thresholds"]["max_ece_change"], name
        assert (micro_run / "verify" / f"reliability_{name.replace('.', '_')}.png").is_file()
    assert "Calibration (expected calibration error" in (micro_run / "parity.md").read_text()
    test = __import__("json").loads((micro_run / "test_report.json").read_text())
    assert 0 <= test["calibration"]["ece"] <= 1 and (micro_run / "reliability.png").is_file()


def test_the_console_line_gives_the_leakage_free_accuracy_when_the_run_has_one():
    m = {"accuracy": 0.7115, "macro": {"f1": 0.7223}}
    assert report.test_summary(m) == "test accuracy 0.7115, macro-F1 0.7223"
    m["dedup"] = {"accuracy": 0.7029, "n": 1225}
    assert report.test_summary(m).endswith("; leakage-free 0.7029 (1225 images)")


def test_an_interrupted_verify_leaves_the_plots_of_the_report_on_disk(micro_run, tmp_path, monkeypatch):
    """The per-file plots land with parity.json and parity.md, not one by one before them: stopped
    midway, the folder keeps the earlier report and its own plots, and no staging folder."""
    import shutil

    from mri_edge import report
    from mri_edge.verify import verify_run

    run = tmp_path / "run"
    shutil.copytree(micro_run, run)
    verify_run(run, explain_images=0, log=lambda *_: None)
    plots = {p.name: p.stat().st_mtime_ns for p in (run / "verify").iterdir()}
    calls = []

    def stop(*a, **k):
        calls.append(a)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(report, "plot_reliability", stop)
    with pytest.raises(KeyboardInterrupt):
        verify_run(run, explain_images=0, log=lambda *_: None)
    assert {p.name: p.stat().st_mtime_ns for p in (run / "verify").iterdir()} == plots
    # what a verify killed outright (SIGKILL) leaves, the next one removes
    (run / "verify" / ".plots-killed").mkdir()
    monkeypatch.undo()
    verify_run(run, explain_images=0, log=lambda *_: None)
    assert not list((run / "verify").glob(".plots-*"))


@pytest.mark.parametrize("copy", ["a.tflite", "z.tflite"])  # before or after the measured twin, by name
def test_a_renamed_files_rows_go_to_the_file_holding_its_bytes_without_rows_of_its_own(copy):
    from mri_edge.freshness import by_current_name, renamed

    meta = {copy: {"model_sha256": "x"}, "keep.tflite": {"model_sha256": "x"}, "other.onnx": {"model_sha256": "y"}}
    rows = {"keep.tflite": {"model_sha256": "x"}, "old.tflite": {"model_sha256": "x"}, "gone.onnx": {"model_sha256": "q"},
            "model.keras": {}}
    assert renamed(rows, meta) == {"old.tflite": copy}  # keep.tflite has its own; gone.onnx's bytes are nowhere
    assert set(by_current_name(rows, meta)) == {"keep.tflite", copy, "gone.onnx", "model.keras"}
