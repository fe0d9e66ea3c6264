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

from ..checkpoint import optimizer_path
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
        glob.escape(staged_path(target)),                    # staged, not yet verified and renamed
        glob.escape(optimizer_path(staged_path(target))),    # its optimizer file, staged
        f"{here}/..{glob.escape(base)}.staged.*.tmp",        # the staged file, half written
        f"{here}/.{glob.escape(base)}.*.tmp",                # a fresh checkpoint, half written
        f"{history}/{glob.escape(stem)}-*.safetensors.tmp",    # the history link before its rename
        f"{history}/.{glob.escape(stem)}-*.safetensors.*.tmp",  # a history copy, half written
    ]
    return sorted({path for pattern in patterns for path in glob.glob(pattern)})


def staged_path(target: str) -> str:
    """Where a surgery writes the new checkpoint of `target` before it is verified and renamed."""
    folder, base = os.path.split(target)
    return os.path.join(folder, f".{base}.staged")


def finish_commit(target: str) -> bool:
    """A surgery renames its new checkpoint into place, then its optimizer file.
    A build killed between the two left the new checkpoint beside the old
    optimizer state, with the new one staged: carry the rename out (True)."""
    staged_optimizer = optimizer_path(staged_path(target))
    if os.path.exists(staged_path(target)) or not os.path.isfile(staged_optimizer):
        return False  # not verified yet (both staged), or nothing to finish
    os.replace(staged_optimizer, optimizer_path(target))
    return True


def sweep_leftovers(target: str) -> None:
    """Remove them; only under the build lock, when no other build is writing.
    A commit cut short between its two renames is finished first."""
    finish_commit(target)
    for path in leftovers(target):
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.unlink(path)
