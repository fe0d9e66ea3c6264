"""Helpers for the end-to-end workflow tests: real git repositories in temporary
folders, and the installed `specsurgery` console script run inside them.

Git runs with a fixed identity and with the user's global and system git
configuration switched off (GIT_CONFIG_GLOBAL=/dev/null, GIT_CONFIG_NOSYSTEM=1),
so a signing key, a hooks path or a template folder of the person running the
tests cannot change what the tests see.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterable, Optional

REPO = Path(__file__).resolve().parents[1]

GIT_ENV = {
    "GIT_AUTHOR_NAME": "Spec Tester",
    "GIT_AUTHOR_EMAIL": "spec.tester@example.com",
    "GIT_COMMITTER_NAME": "Spec Tester",
    "GIT_COMMITTER_EMAIL": "spec.tester@example.com",
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_TERMINAL_PROMPT": "0",
}

# Slow machines (2 cores shared with other jobs): generous, but a hang still ends.
TIMEOUT = 600


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "SPECSURGERY_DEBUG" and not k.startswith("GIT_")}
    env.update(GIT_ENV)
    env.update(extra)
    return env


def specsurgery_cmd() -> list[str]:
    """The installed console script (the one beside this interpreter first), else `python -m`."""
    exe = shutil.which("specsurgery", path=os.path.dirname(sys.executable)) or shutil.which("specsurgery")
    return [exe] if exe else [sys.executable, "-m", "specsurgery"]


def specsurgery_python() -> str:
    """The interpreter the console script runs on."""
    exe = specsurgery_cmd()[0]
    candidate = Path(exe).with_name("python")
    if exe != sys.executable and candidate.exists():
        return str(candidate)
    return sys.executable


def run(*args: str, cwd: Path, env: Optional[dict] = None, timeout: int = TIMEOUT) -> subprocess.CompletedProcess:
    """`specsurgery ARGS` in `cwd`; never a traceback."""
    result = subprocess.run(specsurgery_cmd() + list(args), cwd=cwd, env=env or base_env(), capture_output=True,
                            text=True, timeout=timeout)
    assert "Traceback" not in result.stderr, result.stderr
    return result


def git(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["git", *args], cwd=cwd, env=base_env(), capture_output=True, text=True,
                            timeout=TIMEOUT)
    if check and result.returncode != 0:
        raise AssertionError(f"git {' '.join(args)} failed ({result.returncode}):\n{result.stdout}{result.stderr}")
    return result


def write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def make_repo(root: Path, files: dict[str, str], commit: bool = True) -> Path:
    """A git repository at `root` holding `files` (committed unless told not to)."""
    root.mkdir(parents=True, exist_ok=True)
    git("-c", "init.defaultBranch=main", "init", "-q", cwd=root)
    write(root, files)
    if commit:
        git("add", "-A", cwd=root)
        git("commit", "-q", "-m", "initial specs", cwd=root)
    return root


def commit_all(root: Path, message: str) -> str:
    git("add", "-A", cwd=root)
    git("commit", "-q", "-m", message, cwd=root)
    return head(root)


def head(root: Path) -> str:
    return git("rev-parse", "HEAD", cwd=root).stdout.strip()


def line_of(text: str, needle: str) -> int:
    """The 1-based line of the one line that contains `needle`."""
    hits = [i for i, line in enumerate(text.splitlines(), 1) if needle in line]
    assert len(hits) == 1, f"{needle!r} is on lines {hits}"
    return hits[0]


def col_of(text: str, needle: str) -> int:
    """The 1-based column where `needle` starts on its line."""
    line = text.splitlines()[line_of(text, needle) - 1]
    return line.index(needle) + 1


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def snapshot(folder: Path) -> dict[str, tuple[int, int, int]]:
    """Every file under `folder`: relative path -> (size, mtime_ns, inode)."""
    if not folder.exists():
        return {}
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            st = path.stat()
            out[str(path.relative_to(folder))] = (st.st_size, st.st_mtime_ns, st.st_ino)
    return out


def tracked_and_untracked(root: Path) -> Iterable[str]:
    """What `git ls-files -co --exclude-standard` lists in `root` (tracked plus untracked-not-ignored)."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=root, env=base_env(),
                         capture_output=True, check=True, timeout=TIMEOUT).stdout.decode()
    return [p for p in out.split("\0") if p]
