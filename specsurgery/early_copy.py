"""Copying old tensors into the new checkpoint while the plan is still being made.

Reading the old spec and planning take a core for a good part of a second on
a large model; copying the tensors a change leaves alone takes about as long
again, in the kernel. The new checkpoint's layout needs only the new spec
(names and shapes) and each tensor's dtype, so apply lays its files out as
soon as the new spec is read, and a thread starts copying every tensor whose
name, shape and dtype the old checkpoint also has: on the other core, while
this one plans. Once the plan is known:
  * the copies it confirms (the tensor carried over unchanged, from the old
    tensor of its own name) go on;
  * the others stop, and one already copied in vain reads as zeros again
    before it is written as the plan says (the writers leave zeros unwritten);
  * if the layout was not the one the plan gives (a dtype guessed wrong), the
    files are dropped and apply writes as it would have.
The files are renamed into place only at the end, as apply's are: a failure
or a refused plan leaves nothing, whatever was copied.
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Iterator, Optional

from .checkpoint import Layout, StoredTensor, user_metadata
from .files import atomic_file, copy_range, raise_write_error, tracked_writes


class _Dropped(Exception):
    """The early files were not used: leave nothing of them."""


class _Run:
    """Old tensors that lie end to end in one old file and in one new file:
    one copy by the kernel (Five's hundred small tensors are a few copies,
    each a few moments of the GIL, not one each)."""

    def __init__(self, name: str, source: StoredTensor, fd: int, at: int):
        self.names, self.path, self.offset, self.nbytes, self.fd, self.at = \
            [name], source.path, source.offset, source.nbytes, fd, at

    def extend(self, name: str, source: StoredTensor, fd: int, at: int) -> bool:
        if (source.path, source.offset, fd, at) != (self.path, self.offset + self.nbytes, self.fd, self.at + self.nbytes):
            return False
        self.names.append(name)
        self.nbytes += source.nbytes
        return True

    def copy(self) -> None:
        with open(self.path, "rb") as src:
            copy_range(src.fileno(), self.fd, self.offset, self.nbytes, at=self.at)


class EarlyCopies:
    """Runs of old tensors (each tensor a (name, StoredTensor, fd, offset))
    copied in order by one thread, until told which tensors the plan keeps: a
    run holding any other is then left alone, or waited out if under way.
    Once the plan's own writing is done, the writers' thread lends a hand
    (help): each run is claimed by one thread, whichever comes first."""

    def __init__(self, copies: list[tuple[str, StoredTensor, int, int]]):
        self._runs: list[_Run] = []
        for copy in copies:
            if not self._runs or not self._runs[-1].extend(*copy):
                self._runs.append(_Run(*copy))
        self._changed = threading.Condition()
        self._keep: Optional[set[str]] = None  # None: every copy is wanted (the plan is not known yet)
        self._next = 0  # the first run no thread has claimed
        self._busy: list[_Run] = []
        self._done: set[str] = set()
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self.help, name="specsurgery-early-copies", daemon=True)
        self._thread.start()

    def _wanted(self, run: _Run) -> bool:
        return self._keep is None or self._keep.issuperset(run.names)

    def _claim(self) -> Optional[_Run]:
        with self._changed:
            while self._error is None and self._next < len(self._runs):
                run = self._runs[self._next]
                self._next += 1
                if self._wanted(run):
                    self._busy.append(run)
                    return run
            return None

    def help(self) -> None:
        """Copy runs not yet claimed until none is left (or a copy failed)."""
        while (run := self._claim()) is not None:
            try:
                run.copy()
            except BaseException as e:  # reported by wait()
                with self._changed:
                    self._error = self._error or e
                    self._busy.remove(run)
                    self._changed.notify_all()
                return
            with self._changed:
                self._busy.remove(run)
                self._done.update(run.names)
                self._changed.notify_all()

    def settle(self, keep: set[str]) -> tuple[set[str], set[str]]:
        """Go on with the runs of tensors in `keep` only; wait out those under
        way that hold another. Returns (the names copied or still to be,
        those copied in vain)."""
        with self._changed:
            self._keep = keep
            while any(not self._wanted(run) for run in self._busy):
                self._changed.wait()
            coming = {name for run in self._runs if self._wanted(run) for name in run.names} | (self._done & keep)
            return coming, self._done - keep

    def stop(self) -> None:
        self.settle(set())
        self.wait(raise_error=False)

    def wait(self, raise_error: bool = True) -> None:
        """Until every copy kept is done (by whichever thread); the first error of a copy, raised here."""
        self._thread.join()
        with self._changed:
            while self._busy:
                self._changed.wait()
        if self._error is not None and raise_error:
            raise self._error


class EarlyOutput:
    """The new checkpoint's files (one, or the shards of a staging folder),
    laid out with the guessed dtypes, and the copies into them under way."""

    def __init__(self, files: list[tuple[str, int, Layout]], header, folder: Optional[str] = None):
        self.files, self.folder, self.used = files, folder, False
        copies = []
        for _, fd, layout in files:
            layout.start(fd)
            copies += [(name, StoredTensor.of(header, name), fd, layout.at(name)) for name in layout.table
                       if _unchanged_looking(header, name, layout.table[name])]
        self.copies = EarlyCopies(copies)

    def adopt(self, layouts: list[Layout], kept: set[str]) -> Optional[set[str]]:
        """Take the files for the plan's `layouts` (one per file), where tensors
        `kept` are their old bytes: the names the early copies write (the
        writer skips them), or None when the layouts differ (the files are
        dropped; the caller writes its own)."""
        if [layout for _, _, layout in self.files] != layouts:
            self.copies.stop()
            return None
        self.used = True
        coming, wasted = self.copies.settle(kept)
        for _, fd, layout in self.files:
            for name in wasted & layout.table.keys():
                layout.clear(fd, name)
        return coming

    def fd_of(self, path: str) -> int:
        return next(fd for p, fd, _ in self.files if p == path)


def kept_as_is(plan, header, stored: Optional[dict] = None) -> set[str]:
    """The new tensors that are their old tensor of the same name, byte for byte
    (the copies EarlyOutput.adopt keeps); `stored`: a source's name in the
    checkpoint where it differs (surgery/apply's names of 0.1.0)."""
    from .surgery.apply import streams

    stored = stored or {}
    return {p.name for p in plan.params
            if p.action == "copied" and stored.get(p.source, p.source) == p.name and streams(p, header, p.name)}


def _unchanged_looking(header, name: str, entry: dict) -> bool:
    from .surgery.apply import stored_whole

    info = header.tensors.get(name)
    return info is not None and list(info.shape) == entry["shape"] and info.dtype == entry["dtype"] \
        and stored_whole(header, name)


def guessed_dtypes(header, shapes: dict) -> dict[str, str]:
    """Each new tensor's dtype as apply will most likely choose it: the old
    tensor's of the same name, else the dtype most of the checkpoint is in
    (surgery/apply.carried_dtypes, before the plan says which old tensor is whose)."""
    from .surgery.apply import usual_dtype

    usual = usual_dtype(header)
    return {name: header.tensors[name].dtype if name in header.tensors else usual for name in shapes}


@contextlib.contextmanager
def early_output(header, new_graph, out: str, sharded: bool, max_shard_size=None,
                 durable: bool = True) -> Iterator[Optional[EarlyOutput]]:
    """Lay out the new checkpoint `out` for `new_graph` and start copying into
    it; None where nothing would be copied early. On leaving: the files take
    `out`'s place if the writer used them (EarlyOutput.adopt) and no error
    was raised; otherwise nothing of them is left."""
    from .spec.canonical import canonical

    shapes = {name: tuple(node.params[local].shape) for name, (node, local) in new_graph.parameters().items()}
    dtypes = guessed_dtypes(header, shapes)
    if not any(_unchanged_looking(header, name, {"shape": list(shape), "dtype": dtypes[name]})
               for name, shape in shapes.items()):
        yield None
        return
    spec_text, model = canonical(new_graph.spec), new_graph.model.name
    try:
        if sharded:
            from .shard_apply import shard_layouts
            from .shards import staged_folder

            with staged_folder(out, durable) as folder:
                files = []
                try:
                    for name, layout in shard_layouts(spec_text, model, shapes, dtypes, max_shard_size, header):
                        path = os.path.join(folder, name)
                        files.append((path, os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666), layout))
                    with tracked_writes([fd for _, fd, _ in files], durable):
                        early = EarlyOutput(files, header, folder)
                        yield from _using(early)
                finally:
                    for _, fd, _ in files:
                        os.close(fd)
        else:
            with atomic_file(out, durable=durable) as f:
                layout = Layout(spec_text, model, shapes, dtypes, user_metadata(header))
                early = EarlyOutput([(out, f.fileno(), layout)], header)
                yield from _using(early)
    except _Dropped:
        pass
    except OSError as e:  # a full disk met by a copy (atomic_file says so itself for one file)
        raise_write_error(e, out)
        raise


def _using(early: EarlyOutput):
    try:
        yield early
    except BaseException:
        early.copies.stop()
        raise
    if not early.used:
        early.copies.stop()
        raise _Dropped
    early.copies.wait()
