"""Dependency-free progress output for long work: a counter for loops, a heartbeat for steps
that cannot count (graph building, a conversion)."""

from __future__ import annotations

import contextlib
import sys
import threading
import time

LOG_EVERY_S = 5.0  # without a terminal, progress lines are at least this far apart


class Progress:
    """Prints `label  n/total  rate  eta` to stderr; on a non-TTY at the start, every 10% at most
    every LOG_EVERY_S seconds, and at the end."""

    def __init__(self, total: int, label: str, stream=None):
        self.total = max(int(total), 0)
        self.label = label
        self.n = 0
        self.start = time.perf_counter()
        self.stream = stream or sys.stderr
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self._last_pct = 0
        self._last_line = time.perf_counter()
        if self.total:
            self._write(f"{self.label}: 0/{self.total}", "\r" if self.tty else "\n")

    def _write(self, text: str, end: str) -> None:
        try:
            self.stream.write(text + end)
            self.stream.flush()
        except (OSError, ValueError):
            pass  # a closed pipe must not stop the work it reports on

    def update(self, k: int = 1) -> None:
        self.n += k
        pct = int(100 * self.n / self.total) if self.total else 100
        now = time.perf_counter()
        # A log file (no terminal) gets a line per 10% at most every LOG_EVERY_S seconds, and the last one.
        if self.tty or self.n == self.total or (pct >= self._last_pct + 10 and now - self._last_line >= LOG_EVERY_S):
            self._last_pct, self._last_line = pct, now
            elapsed = now - self.start
            rate = self.n / elapsed if elapsed > 0 else 0.0
            eta = (self.total - self.n) / rate if rate > 0 else 0.0
            end = "\r" if self.tty and self.n < self.total else "\n"
            self._write(f"{self.label}: {self.n}/{self.total} ({pct}%) {rate:.1f}/s eta {eta:.0f}s", end)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.tty and self.n < self.total:
            self._write("", "\n")


class Heartbeat:
    """Says what is running at once, then how long it has run every `every` seconds until stopped.

    For steps with no count to show: tracing a training graph, a TFLite conversion.
    """

    def __init__(self, label: str, every: float = 15.0, stream=None):
        self.label = label
        self.every = every
        self.stream = stream or sys.stderr
        self.start = time.perf_counter()
        self._stop = threading.Event()
        self._thread = None

    def _say(self, text: str) -> None:
        try:
            self.stream.write(text + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass

    def _beat(self) -> None:
        while not self._stop.wait(self.every):
            self._say(f"{self.label}: still running ({time.perf_counter() - self.start:.0f} s)")

    def begin(self) -> "Heartbeat":
        self._say(f"{self.label} ...")
        self._thread = threading.Thread(target=self._beat, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> float:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(1)
        return time.perf_counter() - self.start

    def __enter__(self):
        return self.begin()

    def __exit__(self, *exc):
        self.stop()


_note_sink = None  # where note() sends its lines: the command's log, or a worker's parent (`notes_to`)


def note(text: str) -> None:
    """One line on the state of long work from code deep inside a step (each candidate of the
    accuracy-aware int8 search), where no log was handed down; dropped when nobody listens."""
    if _note_sink is not None:
        try:
            _note_sink(text)
        except Exception:  # noqa: BLE001 - a closed pipe or queue must not stop the work it reports on
            pass


def notes_to(sink) -> None:
    """Send note()'s lines to sink (a callable taking one line), or nowhere with None: for a
    worker process, which sends them to its parent for good."""
    global _note_sink
    _note_sink = sink


@contextlib.contextmanager
def notes_going_to(sink):
    """note()'s lines go to sink for the block, then where they went before."""
    before = _note_sink
    notes_to(sink)
    try:
        yield
    finally:
        notes_to(before)


class Relay:
    """A thread that hands the lines worker processes put on a queue to log as they come
    (log is called from that thread)."""

    def __init__(self, queue, log):
        self.queue, self.log = queue, log
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _hand_on(self, line: str) -> None:
        try:
            self.log(line)
        except Exception:  # noqa: BLE001 - a failing log must not end the relay or mask the export's own error
            pass

    def _run(self) -> None:
        import queue as queue_module  # noqa: PLC0415

        while not self._stop.is_set():
            try:
                line = self.queue.get(timeout=0.2)
            except queue_module.Empty:
                continue
            except (OSError, ValueError, EOFError):
                return  # the queue went away with the pool
            self._hand_on(line)

    def stop(self) -> None:
        """Stop after handing on the lines still queued."""
        import queue as queue_module  # noqa: PLC0415

        self._stop.set()
        self._thread.join(2)
        try:
            while True:
                self._hand_on(self.queue.get_nowait())
        except (queue_module.Empty, OSError, ValueError, EOFError):
            pass
