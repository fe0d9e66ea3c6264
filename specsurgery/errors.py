"""One error type for everything a user can get wrong, rendered like a compiler.

    specs/a.spec:4:12: error: linear needs a numeric input, got category hero.hero_id
      hero_h = linear(obs.hero.hero_id, 8)
                      ^^^^^^^^^^^^^^^^
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Iterable, Optional

from pydantic import BaseModel, ConfigDict


class Span(BaseModel):
    """Where a spec node stands in its file (1-based line and column)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    file: str = "<string>"
    line: int = 0
    column: int = 0
    end_line: int = 0
    end_column: int = 0

    # Positions are metadata: two specs with the same text mean the same thing.
    def __eq__(self, other: object) -> bool:
        return isinstance(other, Span)

    def __hash__(self) -> int:
        return 0

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"


@dataclass(frozen=True)
class Diagnostic:
    message: str
    span: Optional[Span] = None
    hint: Optional[str] = None

    def render(self, source: Optional[str] = None) -> str:
        if self.span is None or not self.span.line:
            head = f"{self.span.file}: error: {self.message}" if self.span else f"error: {self.message}"
            return head + (f"\n  {self.hint}" if self.hint else "")
        span = self.span
        lines = [f"{span.file}:{span.line}:{span.column}: error: {self.message}"]
        text = source if source is not None else _read(span.file)
        if text is not None:
            source_lines = text.split("\n")  # lines as lark counts them (not at '\r' or '\x0c')
            if 0 < span.line <= len(source_lines):
                line = source_lines[span.line - 1].removesuffix("\r")
                width = 1
                if span.end_line == span.line and span.end_column > span.column:
                    width = span.end_column - span.column
                # a tab shows as spaces to the next multiple of 8: the caret goes by the shown column
                before = line[:span.column - 1].expandtabs()
                width = len(line[:span.column - 1 + width].expandtabs()) - len(before)
                lines.append("  " + line.expandtabs())
                lines.append("  " + " " * len(before) + "^" * max(1, width))
        if self.hint:
            lines.append("  " + self.hint)
        return "\n".join(lines)


def _read(path: str) -> Optional[str]:
    if path.startswith("<") or not os.path.isfile(path):
        return SOURCES.get(path)
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError:
        return SOURCES.get(path)


# Texts of specs that were not read from disk (git revisions, strings), by the
# name their spans carry, so errors can still show the line.
SOURCES: dict[str, str] = {}


@dataclass
class SpecError(Exception):
    """One or more diagnostics; the command layer prints them and exits 1."""

    diagnostics: list[Diagnostic] = field(default_factory=list)

    def __init__(self, diagnostics: Iterable[Diagnostic] | Diagnostic | str, span: Optional[Span] = None):
        if isinstance(diagnostics, str):
            diagnostics = [Diagnostic(diagnostics, span)]
        elif isinstance(diagnostics, Diagnostic):
            diagnostics = [diagnostics]
        self.diagnostics = list(diagnostics)
        super().__init__(self.render())

    def render(self) -> str:
        return "\n".join(d.render() for d in self.diagnostics)

    def __str__(self) -> str:
        return self.render()


class UserError(Exception):
    """A problem with a file, record, checkpoint or argument (not a spec line)."""


# Control characters (but newline and tab) and the bidirectional overrides: text
# read from a file (a checkpoint's metadata, a plan's reasons, a spec line) could
# otherwise drive the terminal it is printed on.
_UNPRINTABLE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """`text` with every unprintable character spelled as an escape (ESC -> \\x1b)."""
    return _UNPRINTABLE.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 256
                            else f"\\u{ord(m.group()):04x}", text)


class PrintableStream:
    """A text stream that writes what it is given through printable()."""

    def __init__(self, stream):
        self.unfiltered = stream

    def write(self, text: str) -> int:
        return self.unfiltered.write(printable(text))

    def __getattr__(self, name):
        return getattr(self.unfiltered, name)
