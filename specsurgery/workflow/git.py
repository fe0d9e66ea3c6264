"""Specs at a git revision: `git:REV:path` wherever a spec path is taken.

A spec read at a revision resolves its `use` at that same revision. Spans of
such specs carry the name `git:REV:path`, so errors still point at the line.
"""
from __future__ import annotations

import os
import subprocess
from typing import Optional

from ..errors import UserError


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
    return rev, path


def show(rev: str, path: str, cwd: str = ".", root: Optional[str] = None) -> Optional[str]:
    """The text of `path` (relative to cwd) at `rev` ('' for the staged index); None if absent."""
    root = root or repo_root(cwd)
    rel = os.path.relpath(os.path.abspath(os.path.join(cwd, path)), root)
    result = _git(["show", f"{rev}:{rel}"], root)
    if result.returncode != 0:
        return None
    try:
        return result.stdout.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"git:{rev}:{path}: error: not UTF-8 text") from None


def reader_at(rev: str, cwd: str = "."):
    """A spec Reader that reads every path (and what it uses) at `rev`."""
    prefix = f"git:{rev}:"
    root = repo_root(cwd)

    def read(path: str) -> str:
        plain = path[len(prefix):] if path.startswith(prefix) else path
        text = show(rev, plain, cwd, root)
        if text is None:
            raise UserError(f"{path}: error: no such file at revision {rev or 'the index'}")
        return text

    return read
