"""Progress of a long write, shown on a terminal only."""
from __future__ import annotations

import sys


class Progress:
    """`apply: 12/40 tensors, 350.2 MB` on stderr, only when stderr is a terminal."""

    def __init__(self, label: str, total: int, enabled: bool = True):
        self.label, self.total, self.done, self.bytes = label, total, 0, 0
        self.enabled = enabled and sys.stderr.isatty()

    def __call__(self, name: str, nbytes: int) -> None:
        self.done += 1
        self.bytes += nbytes
        if self.enabled and not self.total:  # the count is not known beforehand
            sys.stderr.write(f"\r{self.label}: {self.done} tensors, {self.bytes / 1e6:,.1f} MB")
            sys.stderr.flush()
        elif self.enabled:
            width = 30
            filled = width * self.done // max(1, self.total)
            _terminal().write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] "
                              f"{self.done}/{self.total} tensors, {self.bytes / 1e6:,.1f} MB")
            _terminal().flush()

    def close(self) -> None:
        if self.enabled and self.done:
            _terminal().write("\n")


def _terminal():
    # the bar's own '\r' must reach the terminal; the command layer filters stderr
    return getattr(sys.stderr, "unfiltered", sys.stderr)
