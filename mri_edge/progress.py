"""A dependency-free progress line for long loops (decoding, conversion, bench)."""

from __future__ import annotations

import sys
import time


class Progress:
    """Prints `label  n/total  rate  eta` to stderr; on a non-TTY only every ~10%."""

    def __init__(self, total: int, label: str, stream=None):
        self.total = max(int(total), 0)
        self.label = label
        self.n = 0
        self.start = time.perf_counter()
        self.stream = stream or sys.stderr
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self._last_pct = -10

    def update(self, k: int = 1) -> None:
        self.n += k
        pct = int(100 * self.n / self.total) if self.total else 100
        if self.tty or pct >= self._last_pct + 10 or self.n == self.total:
            self._last_pct = pct
            elapsed = time.perf_counter() - self.start
            rate = self.n / elapsed if elapsed > 0 else 0.0
            eta = (self.total - self.n) / rate if rate > 0 else 0.0
            end = "\r" if self.tty and self.n < self.total else "\n"
            self.stream.write(f"{self.label}: {self.n}/{self.total} ({pct}%) {rate:.1f}/s eta {eta:.0f}s{end}")
            self.stream.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.tty and self.n < self.total:
            self.stream.write("\n")
