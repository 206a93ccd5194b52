"""A dependency-free progress bar for long-running commands (bench, demo)."""
from __future__ import annotations

import sys
import time
from typing import Optional, TextIO


class ProgressBar:
    """Minimal text progress bar written to stderr (silent when disabled).

    >>> with ProgressBar(total=10, label="bench") as bar:
    ...     for _ in range(10):
    ...         bar.update(1, detail="case name")
    """

    def __init__(self, total: int, label: str = "", width: int = 28,
                 stream: Optional[TextIO] = None, enabled: bool = True) -> None:
        self.total = max(int(total), 1)
        self.label = label
        self.width = width
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.done = 0
        self.start = time.perf_counter()
        self._last_len = 0

    def update(self, step: int = 1, detail: str = "") -> None:
        self.done = min(self.done + step, self.total)
        self._draw(detail)

    def set_detail(self, detail: str) -> None:
        self._draw(detail)

    def _draw(self, detail: str) -> None:
        if not self.enabled:
            return
        fraction = self.done / self.total
        filled = int(round(fraction * self.width))
        elapsed = time.perf_counter() - self.start
        line = (f"\r{self.label} [{'#' * filled}{'.' * (self.width - filled)}] "
                f"{self.done}/{self.total} {elapsed:5.1f}s {detail}")[:150]
        padding = " " * max(self._last_len - len(line), 0)
        self.stream.write(line + padding)
        self.stream.flush()
        self._last_len = len(line)

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()

    def __enter__(self) -> "ProgressBar":
        self._draw("")
        return self

    def __exit__(self, *exc) -> None:
        self.close()
