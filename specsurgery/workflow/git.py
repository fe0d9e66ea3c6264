"""Specs at a git revision: `git:REV:path` wherever a spec path is taken.

A spec read at a revision resolves its `use` at that same revision. Spans of
such specs carry the name `git:REV:path`, so errors still point at the line.
"""
from __future__ import annotations

import os
import subprocess
from typing import Optional

from ..errors import UserError


class NotAtRevision(UserError):
    """The path does not exist at the revision (or in the index)."""


def _git(args: list[str], cwd: str = ".") -> subprocess.CompletedProcess:
    try:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True)
    except FileNotFoundError:
        raise UserError("error: git is not installed") from None


def repo_root(cwd: str = ".") -> str:
    result = _git(["rev-parse", "--show-toplevel"], cwd)
    if result.returncode != 0:
        raise UserError(f"error: {os.path.abspath(cwd)} is not inside a git repository")
    return result.stdout.decode().strip()


def git_dir(cwd: str = ".") -> str:
    result = _git(["rev-parse", "--absolute-git-dir"], cwd)
    if result.returncode != 0:
        raise UserError(f"error: {os.path.abspath(cwd)} is not inside a git repository")
    return result.stdout.decode().strip()


def split_git_path(arg: str) -> Optional[tuple[str, str]]:
    """`git:REV:path` -> (REV, path), else None. REV may be empty (the index)."""
    if not arg.startswith("git:"):
        return None
    rest = arg[4:]
    if ":" not in rest:
        raise UserError(f"error: {arg!r} is not git:REV:path")
    rev, path = rest.split(":", 1)
    check_rev(rev, arg)
    return rev, path


def check_rev(rev: str, where: str) -> None:
    """Refuse a revision git could read as an option (`--output=FILE` makes it
    write a file) or that holds control characters; '' is the index."""
    if rev.startswith("-") or any(ord(c) < 32 or ord(c) == 127 for c in rev):
        raise UserError(f"{where}: error: {rev!r} is not a git revision")


def show(rev: str, path: str, cwd: str = ".", root: Optional[str] = None) -> Optional[str]:
    """The text of `path` (relative to cwd) at `rev` ('' for the staged index); None if absent."""
    check_rev(rev, f"git:{rev}:{path}")
    root = root or repo_root(cwd)
    rel = os.path.relpath(os.path.abspath(os.path.join(cwd, path)), root)
    # cat-file: the blob's bytes, no filters; the object name starts with the checked REV or ':'
    result = _git(["cat-file", "blob", f"{rev}:{rel}"], root)
    if result.returncode != 0:
        return None
    from ..spec.load import decode_text

    return decode_text(result.stdout, f"git:{rev}:{path}" if rev else path)  # '': the staged file


def reader_at(rev: str, cwd: str = "."):
    """A spec Reader that reads every path (and what it uses) at `rev`."""
    check_rev(rev, f"git:{rev}:")
    prefix = f"git:{rev}:"
    root = repo_root(cwd)

    def read(path: str) -> str:
        plain = path[len(prefix):] if path.startswith(prefix) else path
        text = show(rev, plain, cwd, root)
        if text is None:
            raise NotAtRevision(f"{path}: error: no such file at revision {rev or 'the index'}")
        return text

    return read
