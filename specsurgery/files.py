"""Files written whole or not at all, and bytes copied file to file."""
from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from typing import Iterator, Optional

from .errors import UserError


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "wb", durable: bool = True) -> Iterator:
    """Write to a temporary file in the target's folder; rename on success only.

    `durable` also fsyncs the file and its folder, so the rename survives a power
    cut, not only a killed process (for benchmarks that compare like with like)."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UserError(f"{path}: error: cannot write: it is a folder; name a file")
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    except (FileExistsError, NotADirectoryError):
        blocker = folder
        while not os.path.exists(blocker) and os.path.dirname(blocker) != blocker:
            blocker = os.path.dirname(blocker)
        raise UserError(f"{path}: error: cannot write: {blocker} is a file, not a folder") from None
    except OSError as e:
        raise UserError(f"{path}: error: cannot write: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, mode) as f:
            # mkstemp makes the file private (0600); give it the mode a plain open() would
            umask = os.umask(0o022)
            os.umask(umask)
            os.fchmod(f.fileno(), 0o666 & ~umask)
            with tracked_writes([f.fileno()], durable):
                yield f
                f.flush()
        os.replace(tmp, path)
        with contextlib.suppress(OSError):  # make the rename itself durable
            if not durable:
                raise OSError
            dir_fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise_write_error(e, path)
        raise


def raise_write_error(e: BaseException, path: str) -> None:
    """A full disk, a quota, a read-only file system met writing `path`, as the
    user's message (it is the disk, not a bug); anything else is left as it is."""
    if isinstance(e, OSError) and e.errno in _WRITE_ERRORS:
        raise UserError(f"{path}: error: cannot write: {e.strerror}; nothing was changed") from None


@contextlib.contextmanager
def tracked_writes(fds: list[int], durable: bool) -> Iterator[None]:
    """Files being written in place (in a staging folder, renamed as a whole
    later): `durable`, their pages go to disk as they are written (wrote) and
    they are fsynced at the end, as atomic_file's are."""
    if durable:
        _WRITING.update((fd, 0) for fd in fds)
    try:
        yield
        for fd in fds if durable else ():
            os.fsync(fd)
    finally:
        for fd in fds:
            _WRITING.pop(fd, None)


# What writing a file can meet that is no bug: a full disk or quota, a file too
# large for the file system, a read-only one.
_WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


# Durable files being written (atomic_file): fd -> bytes written since their
# writeback was last started.
_WRITING: dict[int, int] = {}
_WRITEBACK_EVERY = 64 << 20


def wrote(fd: int, nbytes: int) -> None:
    """Note `nbytes` written to `fd`. Every 64 MB of a durable file, start writing
    its pages to disk without waiting (sync_file_range): the disk works while
    the file is still being made, and the fsync that ends it (which stays: the
    rename must not outrun the data) has little left to wait for."""
    if fd not in _WRITING:
        return
    _WRITING[fd] += nbytes
    if _WRITING[fd] >= _WRITEBACK_EVERY:
        _WRITING[fd] = 0
        _start_writeback(fd)


_LIBC: list = []


def _start_writeback(fd: int) -> None:
    if not _LIBC:
        import ctypes
        import ctypes.util

        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            call = libc.sync_file_range
            call.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
        except (OSError, AttributeError):  # not Linux: the fsync alone does it
            call = None
        _LIBC.append(call)
    if _LIBC[0] is not None:
        _LIBC[0](fd, 0, 0, 2)  # SYNC_FILE_RANGE_WRITE: start writeback of every dirty page, do not wait


_COPY_STEP = 64 << 20


def copy_range(src_fd: int, dst_fd: int, offset: int, nbytes: int, at: Optional[int] = None) -> None:
    """Copy `nbytes` of src (from `offset`) into dst: at its position (moving it)
    or, given `at`, at that offset (the position stays): in the kernel where the
    file system can (copy_file_range), through a buffer where not."""
    left = nbytes
    try:
        while left:
            n = os.copy_file_range(src_fd, dst_fd, min(left, _COPY_STEP), offset, at)
            if n == 0:
                break
            left -= n
            offset += n
            at = None if at is None else at + n
            wrote(dst_fd, n)
    except OSError:  # not here (another file system, an old kernel): the buffer below
        pass
    while left:
        chunk = os.pread(src_fd, min(left, 16 << 20), offset)
        if not chunk:
            raise UserError("error: a checkpoint ended early while copying from it (truncated?)")
        write_all(dst_fd, memoryview(chunk), at)
        left -= len(chunk)
        offset += len(chunk)
        at = None if at is None else at + len(chunk)
        wrote(dst_fd, len(chunk))


def write_all(fd: int, view: memoryview, at: Optional[int] = None) -> None:
    """Write all of `view` to fd: at its position, or at offset `at` (pwrite)."""
    while view.nbytes:
        done = os.write(fd, view) if at is None else os.pwrite(fd, view, at)
        view = view[done:]
        at = None if at is None else at + done
