import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from mri_edge.cli import main


def all_commands(group, prefix=()):
    for name, cmd in group.commands.items():
        yield (*prefix, name), cmd
        if hasattr(cmd, "commands"):
            yield from all_commands(cmd, (*prefix, name))


def test_every_command_has_help_and_an_example():
    for path, cmd in all_commands(main):
        assert cmd.help, path
        res = CliRunner().invoke(main, [*path, "--help"])
        assert res.exit_code == 0, path
        if not hasattr(cmd, "commands"):
            assert "Example" in res.output, path


def test_help_does_not_import_heavy_libraries():
    code = ("import sys; from click.testing import CliRunner; from mri_edge.cli import main; "
            "CliRunner().invoke(main, ['--help']); "
            "print([m for m in ('tensorflow', 'keras', 'sklearn', 'onnx', 'matplotlib') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("args, message", [
    (["train", "--task", "tumor", "--data-dir", "/nonexistent"], "data folder not found"),
    (["train", "--task", "tumor"], "--task and --data-dir are required"),
    (["export", "/nonexistent"], "run folder not found"),
    (["verify", "/nonexistent"], "run folder not found"),
    (["bench", "/nonexistent"], "no such file or folder"),
    (["bench", "x", "--threads", "a"], "comma-separated"),
    # nan and inf pass click's own ranges (a gate of nan passes every file): refused, bounded or not
    (["verify", "x", "--min-agreement-quant", "nan"], "'nan' is not a finite number"),
    (["export", "x", "--max-drop", "nan"], "'nan' is not a finite number"),
    (["train", "--lr", "inf"], "'inf' is not a finite number"),
    (["calibrate", "x", "--alpha", "nan"], "'nan' is not a finite number"),
    (["data", "audit", "x", "--pixel-threshold", "nan"], "'nan' is not a finite number"),
    (["bench", "x", "--seconds", "nan"], "'nan' is not a finite number"),
    # counts that would take the machine's processes or memory; an empty list item
    (["bench", "x", "--threads", "100000"], "values must be between 1 and 1024"),
    (["bench", "x", "--threads", "1,,2"], "comma-separated"),
    (["predict", "m.tflite", "x.jpg", "--threads", "100000"], "100000 is not in the range 1<=x<=1024"),
    # a folder whose permissions allow writing but whose file system does not (the kernel's /proc)
    (["data", "audit", "x", "--out", "/proc/mri-edge-out"], "cannot make a folder in /proc"),
    # the environment a command reads, refused before it starts
    ({"MRI_EDGE_MAX_PIXELS": "abc"}, "MRI_EDGE_MAX_PIXELS=abc: must be a whole number of pixels above 0"),
    ({"MRI_EDGE_MAX_PIXELS": "-1"}, "MRI_EDGE_MAX_PIXELS=-1: must be a whole number"),
    ({"KERAS_BACKEND": "bogus"}, "KERAS_BACKEND=bogus: Keras has no such backend"),
    ({"MRI_EDGE_MAX_PIXELS": "\u00b2"}, "must be a whole number"),  # a digit to str.isdigit, not to int()
])
def test_bad_input_is_one_line_error(args, message):
    env = args if isinstance(args, dict) else {}
    res = CliRunner(env=env).invoke(main, ["predict", "m.tflite", "x.jpg"] if env else args)
    assert res.exit_code != 0
    assert message in res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1, res.output


@pytest.mark.parametrize("args, message", [
    (["train", "--epoch", "3"], "--epoch"),  # click 8.1 and 8.2 word it differently
    (["export"], "Error: Missing argument 'RUN_DIR'. See 'mri-edge export --help'."),
    (["data", "audit"], "Error: Missing argument 'DATA_DIR'. See 'mri-edge data audit --help'."),
    (["bogus"], "Error: No such command 'bogus'. See 'mri-edge --help'."),
    (["data", "bogus"], "Error: No such command 'bogus'. See 'mri-edge data --help'."),
    (["pretrain"], "Missing option '--task'. Choose from: tumor, alzheimer, custom."),  # click's list, one line
    (["--bogus"], "--bogus"),
    (["verify", "/nonexistent/run", "--split", "train"], "Invalid value for '--split'"),
    (["calibrate", "{run}", "--coverage", "0.9", "--max-risk", "0.1"], "not both"),  # the command's own usage check
])
def test_usage_errors_are_one_line_that_names_the_help(args, message, tmp_path):
    res = CliRunner().invoke(main, [a.format(run=tmp_path) for a in args], prog_name="mri-edge")
    assert res.exit_code == 2 and message in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1 and res.output.startswith("Error: ") and "--help'." in res.output


def test_a_group_called_bare_shows_its_help_and_takes_verbose_after_its_name(tmp_path):
    assert CliRunner().invoke(main, ["data"], prog_name="mri-edge").output.startswith("Usage: mri-edge data")
    res = CliRunner().invoke(main, ["data", "--verbose", "synth", "--out", str(tmp_path / "d"), "--n-train", "2",
                                    "--n-test", "1", "--size", "32"])
    assert res.exit_code == 0, res.output


def test_a_commands_help_is_shown_whatever_the_environment():
    res = CliRunner(env={"KERAS_BACKEND": "bogus"}).invoke(main, ["predict", "--help"])
    assert res.exit_code == 0 and res.output.startswith("Usage:")


def test_train_wrong_task_folders(tmp_path):
    from mri_edge.synth import write_dataset

    root = write_dataset(tmp_path / "d", "alzheimer", n_train=2, n_test=1, size=32)
    res = CliRunner().invoke(main, ["train", "--task", "tumor", "--data-dir", str(root), "--weights", "none",
                                    "--out", str(tmp_path / "r")])
    assert res.exit_code == 1 and "--task custom" in res.output and "Traceback" not in res.output


def test_data_synth_layout(tmp_path):
    res = CliRunner().invoke(main, ["data", "synth", "--out", str(tmp_path / "s"), "--task", "alzheimer",
                                    "--n-train", "2", "--n-test", "1", "--size", "48"])
    assert res.exit_code == 0, res.output
    folders = sorted(p.name for p in (tmp_path / "s" / "Training").iterdir())
    assert folders == ["MildDemented", "ModerateDemented", "NonDemented", "VeryMildDemented"]
    assert len(list((tmp_path / "s" / "Testing").rglob("*.jpg"))) == 4


def test_bad_weights_fail_before_anything_is_written(tmp_path):
    from mri_edge.synth import write_dataset

    root = write_dataset(tmp_path / "d", "tumor", n_train=2, n_test=1, size=32)
    out = tmp_path / "run"
    res = CliRunner().invoke(main, ["train", "--task", "tumor", "--data-dir", str(root), "--weights",
                                    str(tmp_path / "missing.h5"), "--image-size", "32", "--out", str(out)])
    assert res.exit_code == 1 and "--weights" in res.output and "Traceback" not in res.output
    assert not out.exists()


def test_evaluate_re_roots_a_moved_run_and_refuses_wrong_data(tiny_run, synth_data, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("exports"))  # (exported_run exports tiny_run)
    moved = tmp_path / "data-elsewhere"
    shutil.copytree(synth_data, moved)
    before = json.loads((run / "test_report.json").read_text())
    probs_before = json.loads((run / "test_predictions.json").read_text())["probs"]
    manifest_before = (run / "split_manifest.json").read_text()

    wrong = tmp_path / "wrong"
    (wrong / "Training" / "glioma").mkdir(parents=True)
    res = CliRunner().invoke(main, ["evaluate", str(run), "--data-dir", str(wrong)])
    assert res.exit_code == 1 and "file(s) of the run's splits are not there" in res.output
    assert (run / "split_manifest.json").read_text() == manifest_before

    res = CliRunner().invoke(main, ["evaluate", str(run), "--data-dir", str(moved)])
    assert res.exit_code == 0, res.output
    assert f"next: mri-edge export {run} --format all" in res.output  # nothing exported yet
    assert json.loads((run / "split_manifest.json").read_text())["root"] == str(moved.resolve())
    after = json.loads((run / "test_report.json").read_text())
    assert after["accuracy"] == before["accuracy"] and after["confusion_matrix"] == before["confusion_matrix"]
    # model.keras is the network train reported on (a copy of its kept epoch's file, not saved again)
    probs_after = json.loads((run / "test_predictions.json").read_text())["probs"]
    assert np.allclose(probs_after, probs_before, rtol=0, atol=1e-5)
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["data_dir"] == str(moved) and cfg["evaluated"]["versions"]["backend"]

    (run / "exports").mkdir()
    (run / "exports" / "model_int8.tflite").write_bytes(b"")
    res = CliRunner().invoke(main, ["evaluate", str(run)])  # the files of this model.keras: check them again
    assert res.exit_code == 0 and f"next: mri-edge verify {run}\n" in res.output, res.output
    # a folder that holds one run (the demo's) names it
    res = CliRunner().invoke(main, ["export", str(run.parent), "--format", "tflite"])
    assert res.exit_code == 1 and f"has no model.keras (the run is {run})" in res.output, res.output
    (run / "model.keras").unlink()
    res = CliRunner().invoke(main, ["evaluate", str(run)])
    assert res.exit_code == 1 and "has no model.keras" in res.output


@pytest.mark.parametrize("command, hidden, says", [
    (["train", "--task", "tumor", "--data-dir", "{data}", "--weights", "none", "--out", "{tmp}/run"], "keras",
     "mri-edge train needs keras"),
    (["demo", "--out", "{tmp}/demo"], "sklearn", "mri-edge demo needs scikit-learn"),
    (["export", "{run}", "--format", "onnx"], "tensorflow", "mri-edge export needs tensorflow"),
    (["verify", "{run}"], "matplotlib", "mri-edge verify needs matplotlib"),
])
def test_a_missing_package_is_one_line_before_any_work(command, hidden, says, micro_run, synth_data, tmp_path,
                                                       monkeypatch):
    """Where only the device runtime is installed, a command that needs more says which package,
    in one line, before it writes anything."""
    monkeypatch.setitem(sys.modules, hidden, None)  # import fails, as where it is not installed
    before = sorted(p.name for p in micro_run.rglob("*"))
    args = [a.format(data=synth_data, tmp=tmp_path, run=micro_run) for a in command]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1 and says in res.output and "pip install 'mri-edge[full]'" in res.output, res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == [] and sorted(p.name for p in micro_run.rglob("*")) == before


def test_a_package_missing_midway_is_one_line_and_a_bug_is_not_hidden(monkeypatch):
    import click

    from mri_edge.clitools import run_guarded

    def needs(name):
        raise ModuleNotFoundError(f"No module named '{name}'", name=name)

    monkeypatch.setitem(sys.modules, "sklearn", None)  # not installed
    with pytest.raises(click.ClickException, match=r"needs scikit-learn, not installed here"):
        run_guarded(needs, "sklearn")
    # our own module missing, or a part of an installed package (a version mismatch): the traceback stays
    for name in ("mri_edge.nothing", "numpy.nothing"):
        with pytest.raises(ModuleNotFoundError):
            run_guarded(needs, name)


def test_bench_without_matplotlib_writes_its_tables_and_says_why_there_is_no_plot(micro_run, tmp_path, monkeypatch):
    from mri_edge import bench

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = {"machine": {"cpu": "cpu", "cores": 2, "cpu_flags": [], "versions": {}}, "created": "now",
           "settings": {"warmup": 1, "runs": 2, "batches": [1]}, "skipped": [], "errors": [],
           "rows": [{"model": "m.tflite", "runtime": "litert", "runtime_label": "litert", "threads": 1, "batch": 1,
                     "p50_ms": 1.0, "p90_ms": 1.5}]}
    (tmp_path / "bench.png").write_bytes(b"an older plot")
    monkeypatch.setattr(bench, "table", lambda out: "| table |")
    bench.write_outputs(out, tmp_path)
    assert "No plot: matplotlib is not installed here" in (tmp_path / "bench.md").read_text()
    assert not (tmp_path / "bench.png").exists()


def test_our_log_lines_pass_while_a_converters_stderr_is_captured():
    """quiet.native_stderr hides what native code writes to fd 2; the command's own lines
    (export's search progress, logged while a converter runs in-process) still get out."""
    code = ("import os, threading; from mri_edge import quiet, clitools\n"
            "with quiet.native_stderr():\n"
            "    os.write(2, b'converter noise\\n'); clitools.echo('our line')\n"
            "    with quiet.native_stderr():\n"  # nested: still the real stderr, not the outer capture
            "        clitools.echo('nested line')\n"
            "    t = threading.Thread(target=clitools.echo, args=('thread line',)); t.start(); t.join()\n"
            "clitools.echo('after')\n")
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "MRI_EDGE_VERBOSE": ""}).stderr
    assert "converter noise" not in err, err
    for line in ("our line", "nested line", "thread line", "after"):
        assert err.count(line) == 1, (line, err)


def test_an_error_a_library_raises_for_a_ctrl_c_is_reported_as_an_interrupt():
    """TensorFlow can catch the KeyboardInterrupt of a Ctrl-C and raise a RuntimeError of its own:
    after a Ctrl-C or SIGTERM that is an interrupt (exit 130), not a traceback; without one, a bug
    still shows whole."""
    from mri_edge import clitools

    def library_call():
        try:
            clitools.terminate(signal.SIGINT, None)  # what the handler does when Ctrl-C comes
        except KeyboardInterrupt:
            raise RuntimeError("KeyboardInterrupt replaced") from None

    def bug():
        raise RuntimeError("a bug")

    try:
        with pytest.raises(clitools.Interrupted) as caught:
            clitools.run_guarded(library_call)
        assert caught.value.exit_code == 130
        old = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            clitools.handle_interrupts()  # each command starts with nothing remembered
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)
        with pytest.raises(RuntimeError, match="a bug"):
            clitools.run_guarded(bug)
    finally:
        clitools.signalled = False


def test_a_reader_that_stops_reading_ends_the_command_quietly():
    """`mri-edge predict ... --json | head -1`: the broken pipe is click's to end quietly, not a
    one-line error of a file that cannot be written."""
    from mri_edge import clitools

    def write_to_a_closed_pipe():
        raise BrokenPipeError(32, "Broken pipe")

    with pytest.raises(BrokenPipeError):
        clitools.run_guarded(write_to_a_closed_pipe)
