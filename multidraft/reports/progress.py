"""A dependency-free progress bar for long report runs (stderr by default)."""

from __future__ import annotations

import sys
import time


class Progress:
    """``bar = Progress(total, "acceptance"); bar.step("T=0.6 k=2 rrs")`` ... ``bar.close()``.

    On a terminal the bar redraws in place; into a file or pipe it writes a line every tenth of
    the way, so logs stay short.
    """

    def __init__(self, total: int, title: str, stream=None, enabled: bool = True):
        self.total, self.title, self.done = max(total, 1), title, 0
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.started = time.perf_counter()
        self.next_line = 0.1

    def step(self, label: str = "") -> None:
        self.done += 1
        if not self.enabled:
            return
        fraction = min(self.done / self.total, 1.0)
        elapsed = time.perf_counter() - self.started
        eta = elapsed / fraction * (1 - fraction) if fraction > 0 else 0.0
        bar = "#" * int(24 * fraction) + "-" * (24 - int(24 * fraction))
        line = f"{self.title:<11} [{bar}] {self.done}/{self.total}  {elapsed:5.0f}s, ~{eta:4.0f}s left  {label}"
        if self.tty:
            self.stream.write("\r" + line[:120].ljust(120))
            self.stream.flush()
        elif fraction >= self.next_line or self.done == self.total:
            self.stream.write(line + "\n")
            self.next_line = fraction + 0.1

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()
