"""The checkpoint folder as builds share it: one build at a time, the leftovers
of killed builds swept, symbolic links at a checkpoint's path checked.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import os
import shutil
from typing import Iterator

from ..errors import UserError


@contextlib.contextmanager
def build_lock(folder: str) -> Iterator[None]:
    """Hold `folder` for one build, or say that another build holds it.

    The lock is flock() on the folder itself, so there is no lock file to leave
    behind; the kernel drops it when the holder exits, even by SIGKILL. A folder
    made for the lock is removed again if the build wrote nothing into it."""
    made = not os.path.isdir(folder)
    try:
        os.makedirs(folder, exist_ok=True)
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        raise UserError(f"{folder}: error: cannot write checkpoints here: {e.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{folder}: error: another specsurgery build is writing to this folder; "
                            "nothing was changed; run build again when it has finished") from None
        yield
    finally:
        if made:
            with contextlib.suppress(OSError):  # not empty: the build wrote there
                os.rmdir(folder)
        os.close(fd)


def checkpoint_path(target: str) -> str:
    """The file a build reads and replaces at `target`: a symbolic link is followed
    to its file; a dangling or looping one is refused (building there would put
    fresh weights in the place of what the link was meant to reach)."""
    if not os.path.islink(target):
        return target
    try:
        return os.path.realpath(target, strict=True)
    except OSError as e:
        why = "loops" if e.errno == errno.ELOOP else "points to nothing"
        raise UserError(f"{target}: error: a symbolic link that {why} ({os.readlink(target)!r}); "
                        "fix it or remove it") from None


def leftovers(target: str) -> list[str]:
    """What a build of `target` killed mid-write can have left beside it."""
    folder, base = os.path.split(target)
    stem = base.removesuffix(".safetensors")
    here, history = glob.escape(folder or "."), glob.escape(os.path.join(folder, "history"))
    patterns = [
        f"{here}/.{glob.escape(base)}.staged",               # staged, not yet verified and renamed
        f"{here}/.{glob.escape(base)}.staged.optimizer.safetensors",  # its optimizer file, staged
        f"{here}/..{glob.escape(base)}.staged.*.tmp",        # the staged file, half written
        f"{here}/.{glob.escape(base)}.*.tmp",                # a fresh checkpoint, half written
        f"{history}/{glob.escape(stem)}-*.safetensors.tmp",    # the history link before its rename
        f"{history}/.{glob.escape(stem)}-*.safetensors.*.tmp",  # a history copy, half written
    ]
    return sorted({path for pattern in patterns for path in glob.glob(pattern)})


def sweep_leftovers(target: str) -> None:
    """Remove them; only under the build lock, when no other build is writing."""
    for path in leftovers(target):
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.unlink(path)
