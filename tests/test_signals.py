"""No process outlives a SIGTERM or SIGINT to a command, and the run folder stays consistent."""

import contextlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mri_edge.files import sha256_file

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")]


def descendants(pid: int) -> set[int]:
    """Every process below pid (from /proc/*/stat)."""
    parent = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parent[int(stat.parent.name)] = int(fields[1])
        except (OSError, ValueError, IndexError):
            continue
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        kids = {c for c, pp in parent.items() if pp == p}
        out |= kids
        todo += list(kids)
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def as_from_a_terminal() -> None:
    # A shell starts background jobs with SIGINT ignored, and children inherit that (Python
    # then installs no Ctrl-C handler): the command must see SIGINT as a terminal sends it,
    # whatever way the test session itself was started.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def interrupt_when(cmd, ready, sig, timeout=120):
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=as_from_a_terminal)
    kids: set[int] = set()
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        kids |= descendants(proc.pid)
        if ready(kids):
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the command ended before it could be interrupted"
    kids |= descendants(proc.pid)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    time.sleep(1)
    return proc.returncode, err, kids


def test_an_interrupted_export_leaves_no_worker_and_a_matching_index(micro_run, tmp_path, sig=signal.SIGTERM):
    """Interrupted once the first new file has landed, while the workers convert the others
    (each worker starts TensorFlow and converts three files, a second or more each, so the
    signal, sent within 0.2 s, arrives mid-way). SIGINT takes the same way out
    (`clitools.terminate`); the bench test below sends both."""
    run = tmp_path / "run"
    shutil.copytree(micro_run, run, ignore=shutil.ignore_patterns("exports"))
    index = run / "exports" / "exports.json"
    cmd = [sys.executable, "-m", "mri_edge.cli", "export", str(run), "--format", "tflite", "--format", "onnx",
           "--workers", "2", "--calib-size", "16"]
    code, err, kids = interrupt_when(cmd, lambda k: len(k) >= 2 and index.is_file(), sig, timeout=300)
    assert code == 130 and "interrupted" in err and "Traceback" not in err, err
    survivors = [p for p in kids if alive(p)]
    assert not survivors, f"processes outlived the command: {survivors}"
    index = json.loads(index.read_text())
    listed = {r["file"]: r for r in index["exports"]}
    assert 1 <= len(listed) < 6, "the interrupt should have come mid-way"
    on_disk = {p.name for p in (run / "exports").iterdir() if p.suffix in (".tflite", ".onnx")}
    assert on_disk == set(listed)
    for name in on_disk:
        assert sha256_file(run / "exports" / name) == listed[name]["sha256"], name
    assert not [p for p in (run / "exports").iterdir() if p.name.startswith(".")]
    index_page = (run / "report.md").read_text()  # the run's index names what landed, and only that
    assert all(f"(exports/{n})" in index_page for n in on_disk) and index_page.count("](exports/") == len(on_disk)


def test_a_child_started_with_interrupts_held_ignores_a_ctrl_c_that_comes_while_it_imports():
    """Ctrl-C reaches every process of the terminal's group: an export worker still importing
    (before orphan_proof_child) would print a KeyboardInterrupt traceback of its own."""
    from mri_edge import quiet

    child = ("import time; print('started', flush=True); time.sleep(1.5)\n"  # the imports of a worker starting
             "from mri_edge.quiet import orphan_proof_child; orphan_proof_child()\n"
             "import os, signal; os.kill(os.getpid(), signal.SIGINT); time.sleep(0.2); print('ignored')")
    for held in (False, True):
        with quiet.interrupts_held() if held else contextlib.nullcontext():
            proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True,  # as from a terminal (a background job starts with Ctrl-C ignored)
                                    preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        assert proc.stdout.readline().strip() == "started"  # Python is up, however loaded the machine
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        if held:
            assert proc.returncode == 0 and out.strip() == "ignored" and not err, (out, err)
        else:  # what the mask prevents
            assert proc.returncode != 0 and "KeyboardInterrupt" in err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_an_interrupted_bench_leaves_no_row_process(micro_run, tmp_path, sig):
    cmd = [sys.executable, "-m", "mri_edge.cli", "bench", str(micro_run / "exports" / "model_int8.tflite"),
           "--batch", "1", "--threads", "1", "--seconds", "60", "--out", str(tmp_path / "b")]
    code, err, kids = interrupt_when(cmd, lambda k: len(k) >= 1, sig)
    assert code == 130 and "Traceback" not in err, err
    assert not [p for p in kids if alive(p)]

