"""Quiet by default: third-party log noise hidden unless `--verbose`, and child processes
that never outlive their command.

TensorFlow, absl, oneDNN, the TFLite converter and XNNPACK write straight to file
descriptor 2 from C++, where Python's logging cannot reach them, so the noisy calls run
with descriptor 2 pointed at a temporary file. What was captured is replayed when the
block raises (the cause of a failure is never hidden) or when MRI_EDGE_VERBOSE is set.

Standard library only: the on-device runtime uses it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import tempfile
import threading

VERBOSE_ENV = "MRI_EDGE_VERBOSE"


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def set_verbose(on: bool) -> None:
    """Also reaches worker processes, which inherit the environment."""
    if on:
        os.environ[VERBOSE_ENV] = "1"
        os.environ.pop("TF_CPP_MIN_LOG_LEVEL", None)
    else:
        os.environ.pop(VERBOSE_ENV, None)
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


_uncaptured: list[int] = []  # fd 2 as it was before each native_stderr block now running captured it
_capture_lock = threading.Lock()  # a capture starts and ends whole between two of our lines


def write_uncaptured(text: str, otherwise) -> None:
    """Write our own line where fd 2 pointed before any native_stderr block captured it (an
    export's progress, from any thread, while a converter runs in this process); with nothing
    captured, call otherwise() instead."""
    with _capture_lock:
        if not _uncaptured:
            otherwise()
            return
        try:  # the outermost block saved the real stderr; an inner one, the outer's capture file
            os.write(_uncaptured[0], (text + "\n").encode(getattr(sys.stderr, "encoding", None) or "utf-8", "replace"))
        except (OSError, LookupError):
            pass


@contextlib.contextmanager
def native_stderr():
    """Run the block with fd 2 captured; replay the capture if it fails (not when interrupted:
    the user stopped it, and the lines would be noise), or pass it through when verbose."""
    if verbose():
        yield
        return
    try:
        fd, ours = sys.stderr.fileno(), True  # sys.stderr writes to the fd captured: our lines need a way out
    except (AttributeError, ValueError, OSError):  # no real stderr (an embedding app, CliRunner)
        fd, ours = 2, False
    try:
        saved = os.dup(fd)
    except OSError:
        yield
        return
    with tempfile.TemporaryFile() as cap:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        with _capture_lock:
            os.dup2(cap.fileno(), fd)
            if ours:
                _uncaptured.append(saved)
        failed = False
        try:
            yield
        except Exception:
            failed = True
            raise
        finally:
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            with _capture_lock:
                if ours:
                    _uncaptured.remove(saved)
                os.dup2(saved, fd)
                os.close(saved)
            if failed:
                cap.seek(0)
                text = cap.read().decode("utf-8", "replace").strip()
                if text:
                    sys.stderr.write(text[-4000:] + "\n")


@contextlib.contextmanager
def signals_deferred():
    """SIGINT and SIGTERM wait until the block is done, then take effect as usual: for steps
    that must not stop halfway, such as moving a file and updating the index that records it.

    Python runs signal handlers in the main thread whichever thread the kernel picked, so the
    handlers are swapped for one that only takes note (a thread signal mask would not do).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    sigs = (signal.SIGINT, signal.SIGTERM)
    old = {s: signal.getsignal(s) for s in sigs}
    pending = []
    for s in sigs:
        signal.signal(s, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        if pending:
            handler = old[pending[0]]
            if callable(handler):
                handler(pending[0], None)  # e.g. raises KeyboardInterrupt
            elif handler != signal.SIG_IGN:
                os.kill(os.getpid(), pending[0])  # the default action


def import_tensorflow():
    """Import TensorFlow (and Keras on it) once, without its start-up banner; TensorFlow's and
    absl's Python loggers keep to errors unless verbose."""
    import logging  # noqa: PLC0415

    with native_stderr():
        import keras  # noqa: F401, PLC0415
    if not verbose():
        for name in ("tensorflow", "absl", "tf2onnx", "nncf", "openvino"):
            logging.getLogger(name).setLevel(logging.ERROR)


@contextlib.contextmanager
def nncf_quiet():
    """NNCF without its INFO lines and progress bars (rich, on stdout) unless verbose."""
    if verbose():
        yield
        return
    import io  # noqa: PLC0415
    import logging  # noqa: PLC0415

    import nncf  # noqa: PLC0415

    nncf.set_log_level(logging.ERROR)  # NNCF sets its own level when imported
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def orphan_proof_child() -> None:
    """In a child process: die with the parent, and leave Ctrl-C to the parent.

    Ctrl-C reaches every process of the terminal's group; the parent then stops its
    children itself, so they must not race it with tracebacks of their own. On Linux the
    kernel also sends SIGTERM to the child if the parent dies without cleaning up (SIGKILL).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):  # held back while it started (interrupts_held): now ignored
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            import ctypes  # noqa: PLC0415

            PR_SET_PDEATHSIG = 1
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@contextlib.contextmanager
def interrupts_held():
    """Ctrl-C held back from this thread while it starts child processes that call
    orphan_proof_child. A child inherits the thread's signal mask, so a Ctrl-C that reaches it
    while it still imports waits, and is then ignored, instead of printing its traceback; in
    this process it takes effect as usual (at once if another thread takes it, else when the
    block ends)."""
    if not hasattr(signal, "pthread_sigmask"):  # Windows: no terminal process groups to fear
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def quiet_worker() -> None:
    """Initializer of worker processes: orphan-proof, and their native log noise dropped unless verbose."""
    orphan_proof_child()
    if not verbose():
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.dup2(devnull, 1)  # a worker's results travel by pickle; its stdout is only converter noise
        os.close(devnull)
