"""Carrying out a plan on a checkpoint, tensor by tensor.

The new checkpoint is streamed into a temporary file beside the target,
renamed into place at the end: memory holds a few row blocks, never the
model, and a crash leaves the old files as they were. File to file, a tensor
only moved is copied by the kernel (copy_file_range), and the others are
written row block by row block from the old file's bytes (StreamedTensor):
numpy is imported only where a block is laid out (carried rows with zero new
columns, and a new tensor of few fresh values, need none), torch only where
a fresh init cannot be drawn without it (fresh.py), or for an old tensor a
DCP job saved in chunks.
"""
from __future__ import annotations

import hashlib
import math
import os
from typing import TYPE_CHECKING, Callable, Optional

from ..checkpoint import (_DTYPES, TORCH_DTYPES, Layout, StoredTensor, check_shapes, fill_checkpoint, load_spec,
                          open_tensors, read_header, user_metadata, write_checkpoint)
from ..errors import UserError
from ..files import copy_range, write_all, wrote
from ..ir import Graph, build_graph
from ..ops import OPS
from ..spec.canonical import canonical
from .diff import check_plan
from .fresh import NeedsTorch, recorded
from .plan import ParamPlan, Plan

if TYPE_CHECKING:
    import numpy as np
    import torch


def fresh_seed(seed: int, name: str) -> int:
    """The seed of one parameter's fresh values, from (seed, name): its values do
    not depend on which parameters were built before it, so shards built in
    parallel, in any order, equal a one-file apply."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def fresh_generator(seed: int, name: str) -> "torch.Generator":
    """The torch generator of one parameter's fresh values (fresh_seed)."""
    import torch

    return torch.Generator().manual_seed(fresh_seed(seed, name))


def _index(indices: list[int]):
    """A slice where the indices are one run (the common case), else an index tensor."""
    import torch

    if indices and indices == list(range(indices[0], indices[0] + len(indices))):
        return slice(indices[0], indices[0] + len(indices))
    return torch.tensor(indices, dtype=torch.long)


def _place(tensor: "torch.Tensor", region: list[list[int]], block) -> None:
    import torch

    index = [_index(ix) for ix in region]
    if len(index) == 2 and not all(isinstance(i, slice) for i in index):
        rows, cols = (i if not isinstance(i, slice) else torch.arange(i.start, i.stop) for i in index)
        tensor[rows[:, None], cols[None, :]] = block
    else:
        tensor[tuple(index)] = block


def build_tensor(entry: ParamPlan, read_old: Callable[[str], "torch.Tensor"],
                 init_fresh: Callable[["torch.Tensor"], None], dtype=None, device=None) -> "torch.Tensor":
    """ONE new tensor, exactly as its plan entry says: every `Fill` (zero, fresh,
    identity) over its region, then the copied runs from `read_old(entry.source)`.

    `init_fresh(t)` fills `t`, a float32 tensor of the shape of a fresh region,
    with the op's init (see `fresh_init`); the result has `dtype` (float32 when
    None) and `device` (an old tensor's, for surgery in memory). In memory, this
    is the one executor of a plan (file to file, StreamedTensor writes the same
    bytes without building the tensor): its name and signature are stable."""
    import torch

    dtype = dtype or torch.float32
    if len(entry.shape) > 2:
        raise AssertionError(f"{entry.name}: parameters of rank {len(entry.shape)} are not supported")
    tensor = torch.zeros(entry.shape, dtype=dtype, device=device)
    for fill in entry.fills:
        region = entry.region(fill)
        if not all(region):
            continue
        if fill.value == "fresh":
            block = torch.empty([len(ix) for ix in region])
            init_fresh(block)
            _place(tensor, region, block.to(dtype=dtype, device=device))
        elif fill.value == "identity":
            rows, cols = region
            on = sorted(set(rows) & set(cols))  # element [j, i] is 1 where j == i
            tensor[torch.tensor(on, dtype=torch.long), torch.tensor(on, dtype=torch.long)] = 1.0
        # "zero": the tensor starts at zero
    if entry.source is None:
        return tensor
    return copy_runs(entry, read_old(entry.source).to(dtype=dtype, device=device), tensor)


def copy_runs(entry: ParamPlan, old, into):
    """Copy the plan's runs of `old` (a tensor of the old parameter's shape) into
    `into` (of the new shape), in place; the elements no run reaches keep what
    `into` holds. Parameters and every tensor of their shape (an optimizer's
    moments, optimizer_state.py) move by this one function."""
    # Runs are contiguous on both sides: slices, no index tensors.
    if len(entry.shape) == 1:
        for r in entry.axes[0].runs:
            into[r.new:r.new + r.length] = old[r.old:r.old + r.length]
    else:
        for r in entry.axes[0].runs:
            for c in entry.axes[1].runs:
                into[r.new:r.new + r.length, c.new:c.new + c.length] = old[r.old:r.old + r.length, c.old:c.old + c.length]
    return into


Init = Callable[[object, object], None]  # (tensor, generator): an op's init of one parameter


def op_init(graph: Graph, name: str, params: Optional[dict] = None) -> Init:
    """The init of parameter `name` of `graph` (what "start fresh" means for its
    op), as init(tensor, generator). `params`: graph.parameters(), when at hand."""
    node, local = (params or graph.parameters())[name]
    return lambda tensor, generator: OPS[node.op].init(node, local, tensor, generator)


def fresh_init(graph: Graph, name: str, generator: "torch.Generator") -> Callable[["torch.Tensor"], None]:
    """The init of parameter `name` of `graph`, drawing from `generator`."""
    init = op_init(graph, name)
    return lambda tensor: init(tensor, generator)


# ---------------------------------------------------------------------------
# file to file: a tensor written from the old file's bytes


def _uint(size: int):
    """The numpy dtype that moves elements of `size` bytes as bits."""
    import numpy as np

    return np.dtype(f"<u{size}")


_ONE = {"F32": 0x3F800000, "F64": 0x3FF0000000000000, "F16": 0x3C00, "BF16": 0x3F80}  # 1.0, as bits


class _Given:
    """Fresh values drawn beforehand (by torch), as bits, handed out in order."""

    def __init__(self, bits: "np.ndarray"):
        self.bits, self.at = bits, 0

    def take(self, n: int) -> "np.ndarray":
        self.at += n
        return self.bits[self.at - n:self.at]

    def skip(self, n: int) -> None:
        self.at += n

    def take_bytes(self, n: int) -> bytes:
        return self.take(n).tobytes()


def fresh_values(p: ParamPlan, init: Init, seed: int, dtype: str, torch_allowed: bool = True) -> dict:
    """Fill number -> the values of that fresh region, in the order they are
    placed: drawn without torch where fresh.py can (uniform inits, float32 and
    float64), else by torch exactly as build_tensor draws them (NeedsTorch when
    `torch_allowed` is False)."""
    fresh = [k for k, f in enumerate(p.fills) if f.value == "fresh" and p.region_size(f)]
    if not fresh:
        return {}
    try:
        return dict(zip(fresh, recorded(init, fresh_seed(seed, p.name), dtype,
                                        [p.region_size(p.fills[k]) for k in fresh])))
    except NeedsTorch:
        if not torch_allowed:
            raise
    import numpy as np
    import torch

    from ..checkpoint import tensor_bytes

    generator, out = fresh_generator(seed, p.name), {}
    for k in fresh:  # one generator, the regions in turn: build_tensor's draws
        block = torch.empty([len(ix) for ix in p.region(p.fills[k])])
        init(block, generator)
        out[k] = _Given(np.frombuffer(tensor_bytes(block, dtype), dtype=_uint(_DTYPES[dtype])))
    return out


class StreamedTensor:
    """One new tensor (of rank 1 or 2) written from the old file's bytes, a block
    of rows at a time, never built whole (an LSTM's input weight at OpenAI Five
    size is 350 MB): rows carried over with all their columns are copied by the
    kernel; the others are laid out in a reused buffer, as build_tensor would
    make them: zero, then the fresh and identity fills, then the old columns'
    runs, read into a second buffer. A vector is one row. Elements move as
    bits, in the file's dtype: nothing is converted. Bit for bit what
    build_tensor gives (tests/test_apply_fresh.py)."""

    block_bytes = 4 << 20  # a block that stays in the CPU's caches while it is laid out

    def __init__(self, plan: ParamPlan, source: Optional[StoredTensor], dtype: str, fresh: dict):
        self.plan, self.source, self.dtype, self.fresh = plan, source, dtype, fresh

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.plan.shape)

    def _grid(self):
        """(rows, cols, old cols, row runs, column runs, per fill its (rows, cols)
        as arrays: None for a zero fill, which writes nothing)."""
        p = self.plan
        if len(p.shape) == 2:
            (rows, cols), row_runs = p.shape, (p.axes[0].runs if p.source is not None else ())
            col_runs = p.axes[1].runs if p.source is not None else ()
            old_cols = p.old_shape[1] if p.source is not None else 0
        else:
            (rows, cols), row_runs = (1, p.shape[0]), ((0, 0, 1),) if p.source is not None else ()
            col_runs = p.axes[0].runs if p.source is not None else ()
            old_cols = p.old_shape[0] if p.source is not None else 0
        regions = [None if f.value == "zero" else self._region(f) for f in p.fills]
        row_runs = [r if isinstance(r, tuple) else (r.new, r.old, r.length) for r in row_runs]
        col_runs = [(c.new, c.old, c.length) for c in col_runs]
        return rows, cols, old_cols, sorted(row_runs), col_runs, regions

    def _region(self, fill):
        import numpy as np

        region = self.plan.region(fill)
        if len(self.plan.shape) == 1:
            return [np.zeros(1, dtype=np.int64), np.asarray(region[0], dtype=np.int64)]
        return [np.asarray(ix, dtype=np.int64) for ix in region]

    def _all_fresh(self):
        """The values of a new tensor that one fresh fill covers whole (a new
        unit's weights), else None: they are the tensor's elements in order."""
        p = self.plan
        if p.source is None and len(self.fresh) == 1:
            (k, values), = self.fresh.items()
            others = [f for j, f in enumerate(p.fills) if j != k and f.value != "zero" and p.region_size(f)]
            if not others and p.region_size(p.fills[k]) == math.prod(p.shape):
                return values
        return None

    def copy_to(self, out) -> int:
        """Write the tensor at the file's position, its end (anything past it is
        cut off), and move the position past it."""
        fd, nbytes = out.fileno(), math.prod(self.shape) * _DTYPES[self.dtype]
        at = os.lseek(fd, 0, os.SEEK_CUR)
        os.ftruncate(fd, at)  # nothing was written from here on: all of it reads as zero
        os.ftruncate(fd, at + nbytes)
        self.write_at(fd, at)
        os.lseek(fd, at + nbytes, os.SEEK_SET)
        return nbytes

    def write_at(self, dst: int, base: int) -> int:
        """Write the tensor at offset `base` of `dst`, where the file reads as
        zeros (extended by ftruncate, never written): what stays zero is never
        written. Runs of old bytes are copied by the kernel, the rest is laid
        out and written in place; by `parts` threads, each its own rows, where
        the tensor is large and draws no fresh values (they come in order)."""
        size = _DTYPES[self.dtype]
        values = self._all_fresh()
        if values is not None:
            return self._write_values(dst, base, values, size)
        grid = self._grid()
        rows, cols, old_cols, row_runs, col_runs, regions = grid
        whole_rows = old_cols == cols and col_runs == [(0, 0, cols)]  # an old row's bytes are the new row's
        spans = []  # (first row, end, old first row or None: laid out in the buffer)
        at = 0
        for new, old, length in row_runs if whole_rows else ():
            if new > at:
                spans.append((at, new, None))
            spans.append((new, new + length, old))
            at = new + length
        if at < rows:
            spans.append((at, rows, None))
        nbytes = rows * cols * size
        pieces = _row_pieces(col_runs, cols, size)
        old_pieces = [k for o, k in pieces if o is not None]
        by_kernel = bool(old_pieces) and sum(old_pieces) >= self.kernel_piece_bytes * len(old_pieces)
        parts = self.parts if not self.fresh and nbytes >= self.parallel_bytes else 1
        if parts == 1:
            self._write_spans(dst, base, spans, grid, pieces, by_kernel)
            return nbytes
        # In threads, rows gathered in numpy outrun the kernel's copy of each
        # run: one write per block of rows, not one per run.
        from concurrent.futures import ThreadPoolExecutor

        bounds = [rows * k // parts for k in range(parts + 1)]
        shares = [[(max(a, lo), min(b, hi), None if old is None else old + max(a, lo) - a)
                   for a, b, old in spans if max(a, lo) < min(b, hi)] for lo, hi in zip(bounds, bounds[1:])]
        with ThreadPoolExecutor(parts) as pool:
            for done in [pool.submit(self._write_spans, dst, base, share, grid, pieces, False) for share in shares]:
                done.result()
        return nbytes

    def _write_values(self, dst: int, base: int, values, size: int) -> int:
        n, step = math.prod(self.shape), self.block_bytes // size
        for at in range(0, n, step):
            block = values.take_bytes(min(step, n - at))
            write_all(dst, memoryview(block), base + at * size)
            wrote(dst, len(block))
        return n * size

    def _write_spans(self, dst: int, base: int, spans, grid, pieces, by_kernel: bool) -> None:
        rows, cols, old_cols, row_runs, col_runs, regions = grid
        size = _DTYPES[self.dtype]
        row_bytes = cols * size
        step = max(1, self.block_bytes // (size * max(cols, old_cols, 1)))
        src = open(self.source.path, "rb") if self.source is not None else None
        new_buf = old_buf = None
        try:
            for first, end, old in spans:
                if old is not None:
                    self._skip_fresh(regions, first, end)  # drawn for elements the copy replaces (none in practice)
                    copy_range(src.fileno(), dst, self.source.offset + old * old_cols * size, (end - first) * row_bytes,
                               at=base + first * row_bytes)
                    continue
                for a in range(first, end, step):
                    b = min(a + step, end)
                    carried, only_zeros = _carried(row_runs, a, b), self._only_zeros(regions, a, b)
                    if only_zeros and not carried:  # all zero: left a hole
                        continue
                    if only_zeros and carried == b - a:  # old rows, zero in their new columns: nothing laid out
                        if by_kernel:
                            self._copy_rows(src.fileno(), dst, base, a, b, row_runs, old_cols, cols, size, pieces)
                            continue
                        if old_buf is None:
                            old_buf = bytearray(min(step, rows) * old_cols * size)
                        self._read_rows(src, old_buf, a, b, row_runs, old_cols, size)
                        _gather(dst, memoryview(old_buf), b - a, old_cols * size, pieces, base + a * row_bytes)
                        wrote(dst, (b - a) * row_bytes)
                        continue
                    if new_buf is None:
                        import numpy as np

                        new_buf = np.empty((min(step, rows), cols), dtype=_uint(size))
                    if old_buf is None and src is not None:
                        old_buf = bytearray(min(step, rows) * old_cols * size)
                    block = new_buf[:b - a]
                    self._lay_out(block, a, b, regions, row_runs, col_runs, src, old_buf, old_cols, size)
                    write_all(dst, memoryview(block).cast("B"), base + a * row_bytes)
                    wrote(dst, block.nbytes)
        finally:
            if src is not None:
                src.close()

    parts = 1  # threads writing one tensor (apply_plan sets it: a one-file checkpoint's large tensors)
    parallel_bytes = 64 << 20  # a tensor this large is worth the threads

    # An old row's column runs at least this long on average are copied by the
    # kernel, run by run, row by row (a widened 8192-unit layer: 32 KB runs);
    # shorter ones are read into a buffer and gathered (a syscall per run costs more).
    kernel_piece_bytes = 4096

    def _only_zeros(self, regions, a: int, b: int) -> bool:
        """No fill but zero reaches rows a..b."""
        return not any(fill.value != "zero" and regions[k][1].size and _between(regions[k][0], a, b).size
                       for k, fill in enumerate(self.plan.fills))

    def _copy_rows(self, src_fd: int, dst: int, base: int, a: int, b: int, row_runs, old_cols: int, cols: int,
                   size: int, pieces) -> None:
        """New rows a..b (all carried over) from their old rows, each run of old
        columns by the kernel; the new columns stay the hole's zeros. A run that
        ends a row and one that starts the next are one copy when they lie end
        to end on both sides (columns inserted mid-row: one copy a row, not two)."""
        runs, at = [], 0  # (offset in the old row, offset in the new row, length)
        for offset, length in pieces:
            if offset is not None:
                runs.append((offset, at, length))
            at += length
        copy = None  # (from, to, length) being extended
        for new, old, length in row_runs:
            for r in range(max(a, new), min(b, new + length)):
                from_row = self.source.offset + (old + r - new) * old_cols * size
                to_row = base + r * cols * size
                for offset, at, n in runs:
                    if copy is not None and copy[0] + copy[2] == from_row + offset and copy[1] + copy[2] == to_row + at:
                        copy = (copy[0], copy[1], copy[2] + n)
                        continue
                    if copy is not None:
                        copy_range(src_fd, dst, copy[0], copy[2], at=copy[1])
                    copy = (from_row + offset, to_row + at, n)
        if copy is not None:
            copy_range(src_fd, dst, copy[0], copy[2], at=copy[1])

    def _read_rows(self, src, old_buf: bytearray, a: int, b: int, row_runs, old_cols: int, size: int) -> None:
        """The old rows of new rows a..b (those runs carry over) into old_buf's first b - a rows."""
        row_bytes = old_cols * size
        for new, old, length in row_runs:
            lo, hi = max(a, new), min(b, new + length)
            if lo >= hi:
                continue
            view = memoryview(old_buf)[(lo - a) * row_bytes:(hi - a) * row_bytes]
            if os.preadv(src.fileno(), [view], self.source.offset + (old + lo - new) * old_cols * size) != view.nbytes:
                raise UserError(f"{self.source.path}: error: not a valid checkpoint: it ended early")

    def _skip_fresh(self, regions, a: int, b: int) -> None:
        for k, values in self.fresh.items():
            region_rows, region_cols = regions[k]
            values.skip(_between(region_rows, a, b).size * region_cols.size)

    def _lay_out(self, block, a, b, regions, row_runs, col_runs, src, old_buf, old_cols, size) -> None:
        import numpy as np

        block.fill(0)  # "zero" fills: nothing more to do
        for k, fill in enumerate(self.plan.fills):
            if fill.value == "zero":
                continue
            region_rows, region_cols = regions[k]
            here = _between(region_rows, a, b)
            if not here.size or not region_cols.size:
                continue
            if fill.value == "fresh":
                values = self.fresh[k].take(here.size * region_cols.size)
                _put(block, here - a, region_cols, values.view(block.dtype).reshape(here.size, region_cols.size))
            elif fill.value == "identity":  # element [j, i] is 1 where j == i
                on = np.intersect1d(here, region_cols)
                block[on - a, on] = _ONE[self.dtype]
        if src is None:
            return
        self._read_rows(src, old_buf, a, b, row_runs, old_cols, size)
        got = np.frombuffer(old_buf, dtype=block.dtype, count=(b - a) * old_cols).reshape(b - a, old_cols)
        for new, _, length in row_runs:
            lo, hi = max(a, new), min(b, new + length)
            for c_new, c_old, c_len in col_runs if lo < hi else ():
                block[lo - a:hi - a, c_new:c_new + c_len] = got[lo - a:hi - a, c_old:c_old + c_len]


def _carried(row_runs, a: int, b: int) -> int:
    """How many of rows a..b are carried over from old rows."""
    return sum(max(0, min(b, new + length) - max(a, new)) for new, _, length in row_runs)


def _between(sorted_indices: "np.ndarray", a: int, b: int) -> "np.ndarray":
    import numpy as np

    return sorted_indices[np.searchsorted(sorted_indices, a):np.searchsorted(sorted_indices, b)]


def _as_slice(indices: "np.ndarray"):
    """A slice where the (sorted) indices are one run, else the indices."""
    if indices.size and indices[-1] - indices[0] + 1 == indices.size:
        return slice(int(indices[0]), int(indices[-1]) + 1)
    return indices


def _put(block: "np.ndarray", rows: "np.ndarray", cols: "np.ndarray", values: "np.ndarray") -> None:
    import numpy as np

    r, c = _as_slice(rows), _as_slice(cols)
    if isinstance(r, slice) or isinstance(c, slice):
        block[r, c] = values
    else:
        block[np.ix_(r, c)] = values


def _row_pieces(col_runs, cols: int, size: int) -> list[tuple[Optional[int], int]]:
    """A new row as byte pieces, in order: (offset in the old row, length) for a
    run of old columns, (None, length) for new columns (zero)."""
    pieces, at = [], 0
    for c_new, c_old, c_len in sorted(col_runs):
        if c_new > at:
            pieces.append((None, (c_new - at) * size))
        pieces.append((c_old * size, c_len * size))
        at = c_new + c_len
    if at < cols:
        pieces.append((None, (cols - at) * size))
    return pieces


_IOV_MAX = 1024  # Linux's limit on the buffers of one writev


def _gather(fd: int, old_rows: memoryview, n: int, old_row_bytes: int, pieces, at: int) -> None:
    """Write n new rows at offset `at` from the old rows in `old_rows`, gathered
    by pwritev: the old columns' runs straight from the read buffer, zeros for
    new columns; no copy into a row buffer first (a third of the work for a
    widened input)."""
    zeros = memoryview(bytes(max((k for o, k in pieces if o is None), default=0)))
    iov = [zeros[:k] if o is None else old_rows[i * old_row_bytes + o:i * old_row_bytes + o + k]
           for i in range(n) for o, k in pieces]
    for j in range(0, len(iov), _IOV_MAX):
        part = iov[j:j + _IOV_MAX]
        done, want = os.pwritev(fd, part, at), sum(v.nbytes for v in part)
        if done < want:  # a short write (rare on a file): the rest one buffer at a time
            for v in part:
                if done < v.nbytes:
                    write_all(fd, v[done:], at + done)
                done, at = max(0, done - v.nbytes), at + v.nbytes
        else:
            at += want


def streams(p: ParamPlan, header, stored: Optional[str]) -> bool:
    """Whether StreamedTensor can write `p`: rank 1 or 2, its old tensor (if any)
    in one piece in one file (not in chunks of a DCP job)."""
    return len(p.shape) in (1, 2) and (stored is None or stored_whole(header, stored))


def stored_whole(header, name: str) -> bool:
    """Whether old tensor `name` lies in one piece in one file (not in chunks of a DCP job)."""
    return getattr(header, "whole", lambda _: True)(name)


def carried_tensor(p: ParamPlan, init: Init, header, stored: Optional[str],
                   read_old: Callable[[str], "torch.Tensor"], seed: int, dtype: str = "F32"):
    """What apply writes for `p` (file to file), in `dtype` (F32, BF16, F16, F64):
    a StreamedTensor where it can, else the tensor build_tensor makes. `init` is
    p's op_init; `stored` the old tensor's name in the checkpoint."""
    if streams(p, header, stored):
        source = StoredTensor.of(header, stored) if stored is not None else None
        return StreamedTensor(p, source, dtype, fresh_values(p, init, seed, dtype))
    generator = fresh_generator(seed, p.name)
    return build_tensor(p, read_old, lambda t: init(t, generator), dtype=TORCH_DTYPES[dtype])


def needs_torch(p: ParamPlan, init: Init, header, stored: Optional[str], seed: int, dtype: str) -> bool:
    """Whether writing `p` file to file imports torch (a normal init, a fresh
    region in float16, an old tensor in chunks)."""
    if p.action == "copied" and streams(p, header, stored):
        return False
    if not streams(p, header, stored):
        return True
    try:
        fresh_values(p, init, seed, dtype, torch_allowed=False)
    except NeedsTorch:
        return True
    return False


def carried_dtypes(plan: Plan, header, stored: dict[str, str]) -> dict[str, str]:
    """Each new tensor's dtype in the file: its old tensor's; a fresh one takes
    the dtype most of the checkpoint is in."""
    usual = usual_dtype(header)
    return {p.name: header.tensors[stored[p.source]].dtype if p.source is not None else usual for p in plan.params}


def usual_dtype(header) -> str:
    """The dtype most of a checkpoint's tensors are in (F32 for none): a fresh tensor's."""
    from collections import Counter

    counts = Counter(info.dtype for info in header.tensors.values())
    return counts.most_common(1)[0][0] if counts else "F32"


def apply_plan(plan: Plan, checkpoint: str, new_spec, out: str, seed: int = 0,
               progress: Optional[Callable[[str, int], None]] = None, durable: bool = True,
               checked: bool = False, threads: int = 1, early=None) -> dict:
    """Write the surgered checkpoint to `out`; the old spec comes from `checkpoint` itself.

    `new_spec` is a ModelSpec or its Graph. The plan is checked against both
    specs first (`checked=True`: the caller made it from them just now).
    `threads` tensors are written at once (write_checkpoint). `early`: `out`
    laid out before the plan was known, old tensors being copied into it
    (early_copy.early_output); used if its layout is the plan's."""
    header = read_header(checkpoint)
    # Both texts are canonical: equal text means the same spec.
    if header.spec_text != plan.old_spec:
        raise UserError(f"{checkpoint}: error: the plan was made for another old spec than the one in this checkpoint")
    new_graph = new_spec if isinstance(new_spec, Graph) else build_graph(new_spec)
    if canonical(new_graph.spec) != plan.new_spec:
        raise UserError("error: the plan was made for another new spec than the one given")
    old_graph = None
    if not checked or any(p.source is not None and p.source not in header.tensors for p in plan.params):
        old_graph = build_graph(load_spec(header))
    if not checked:
        check_plan(plan, old_graph, new_graph)  # a plan from a file: it must be the one the specs give
    # A checkpoint of 0.1.0 keys some ops by the older numbering.
    legacy = old_graph.names_0_1_0() if old_graph is not None else {}
    stored = {p.source: (p.source if p.source in header.tensors else legacy.get(p.source, p.source))
              for p in plan.params if p.source is not None}
    expected = {stored[p.source]: tuple(p.old_shape) for p in plan.params if p.source is not None}
    expected.update({legacy.get(d.name, d.name) if d.name not in header.tensors else d.name: tuple(d.shape)
                     for d in plan.dropped})
    check_shapes(header, expected)
    shapes = {p.name: tuple(p.shape) for p in plan.params}
    opened = []

    def read_old(name: str) -> "torch.Tensor":  # only where a tensor is built by torch
        if not opened:
            opened.append(open_tensors(checkpoint))
        return opened[0].get_tensor(stored[name])

    dtypes = carried_dtypes(plan, header, stored)
    params = new_graph.parameters()

    def produce(names):
        for p in plan.params:
            if p.name not in names:
                continue
            source = stored.get(p.source)
            if p.action == "copied" and streams(p, header, source):  # unchanged: its bytes go file to file
                yield p.name, StoredTensor.of(header, source)
                continue
            tensor = carried_tensor(p, op_init(new_graph, p.name, params), header, source, read_old, seed,
                                    dtype=dtypes[p.name])
            if isinstance(tensor, StreamedTensor):  # one file: a large tensor takes every thread (the others are small)
                tensor.parts = threads
            yield p.name, tensor

    copied = None
    if early is not None:
        from ..early_copy import kept_as_is

        layout = Layout(plan.new_spec, new_graph.model.name, shapes, dtypes, user_metadata(header))
        copied = early.adopt([layout], kept_as_is(plan, header, stored))
    if copied is None:
        written = write_checkpoint(out, plan.new_spec, new_graph.model.name, shapes, produce(shapes),
                                   progress=progress, durable=durable, dtypes=dtypes,
                                   extra_metadata=user_metadata(header), threads=threads)
    else:
        for name in copied if progress is not None else ():
            progress(name, layout.nbytes(name))
        rest = [name for name in shapes if name not in copied]
        written = fill_checkpoint(early.fd_of(out), layout, rest, produce(set(rest)), progress=progress,
                                  threads=threads)
        early.copies.help()  # the plan's own tensors are written: copy beside the early thread
        written += sum(layout.nbytes(name) for name in copied)
    return {"checkpoint": out, "bytes": written, "tensors": len(shapes)}
