"""Carrying out a plan on a checkpoint, tensor by tensor.

The old checkpoint is read lazily (safetensors, memory-mapped) and the new one
streamed into a temporary file beside the target, renamed into place at the
end: memory holds a few tensors, never the model, and a crash leaves the old
files as they were.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..checkpoint import (TORCH_DTYPES, StoredTensor, check_shapes, load_spec, open_tensors, read_header,
                          user_metadata, write_checkpoint)
from ..errors import UserError
from ..ir import Graph, build_graph
from ..ops import OPS, OUT
from ..spec.canonical import canonical
from .diff import check_plan
from .plan import Fill, ParamPlan, Plan


def fresh_generator(seed: int, name: str) -> torch.Generator:
    """The generator of one parameter's fresh values, seeded by (seed, name): its
    values do not depend on which parameters were built before it, so shards
    built in parallel, in any order, equal a one-file apply."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def _index(indices: list[int]):
    """A slice where the indices are one run (the common case), else an index tensor."""
    if indices and indices == list(range(indices[0], indices[0] + len(indices))):
        return slice(indices[0], indices[0] + len(indices))
    return torch.tensor(indices, dtype=torch.long)


def _place(tensor: torch.Tensor, region: list[list[int]], block) -> None:
    index = [_index(ix) for ix in region]
    if len(index) == 2 and not all(isinstance(i, slice) for i in index):
        rows, cols = (i if not isinstance(i, slice) else torch.arange(i.start, i.stop) for i in index)
        tensor[rows[:, None], cols[None, :]] = block
    else:
        tensor[tuple(index)] = block


def build_tensor(entry: ParamPlan, read_old: Callable[[str], torch.Tensor], init_fresh: Callable[[torch.Tensor], None],
                 dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """ONE new tensor, exactly as its plan entry says: every `Fill` (zero, fresh,
    identity) over its region, then the copied runs from `read_old(entry.source)`.

    `init_fresh(t)` fills `t`, a float32 tensor of the shape of a fresh region,
    with the op's init (see `fresh_init`); the result has `dtype` and `device`
    (an old tensor's, for surgery in memory). File to file or in memory, this
    is the one executor of a plan: its name and signature are stable."""
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


def copy_runs(entry: ParamPlan, old: torch.Tensor, into: torch.Tensor) -> torch.Tensor:
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


def fresh_init(graph: Graph, name: str, generator: torch.Generator) -> Callable[[torch.Tensor], None]:
    """The init of parameter `name` of `graph` (what "start fresh" means for its op)."""
    node, local = graph.parameters()[name]
    return lambda tensor: OPS[node.op].init(node, local, tensor, generator)


@dataclass
class SplicedRows:
    """A grown 2-D parameter written a block of rows at a time: old rows read
    straight from the old file, their column runs placed in a zeroed block,
    fresh rows from the op's init. Memory holds one block, never the tensor
    (an LSTM's input weight at OpenAI Five size is 350 MB)."""

    plan: ParamPlan
    source: StoredTensor
    fresh: Optional[torch.Tensor]  # [unmatched rows, columns], in row order
    block_bytes: int = 32 << 20

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.plan.shape)

    def copy_to(self, out) -> int:
        import numpy as np

        rows, cols = self.plan.shape
        old_cols = self.source.shape[1]
        row_map = self.plan.axes[0].old_indices()
        col_runs = self.plan.axes[1].runs
        gaps = np.ones(cols, dtype=bool)  # columns no run fills: they stay zero
        for c in col_runs:
            gaps[c.new:c.new + c.length] = False
        fresh = self.fresh.contiguous().numpy() if self.fresh is not None else None
        step = max(1, self.block_bytes // (4 * max(cols, old_cols)))
        # Two buffers, reused: old rows are read into one, the new rows laid out in the other.
        old_buf = np.empty((step, old_cols), dtype="<f4")
        new_buf = np.zeros((step, cols), dtype="<f4")
        dst = out.fileno()
        k = 0
        with open(self.source.path, "rb") as src_file:
            src = src_file.fileno()
            for start in range(0, rows, step):
                n = min(step, rows - start)
                wanted = row_map[start:start + n]
                block = new_buf[:n]
                contiguous = all(w == wanted[0] + i for i, w in enumerate(wanted)) and wanted[0] >= 0
                if contiguous:
                    view = memoryview(old_buf[:n]).cast("B")
                    got = os.preadv(src, [view], self.source.offset + 4 * wanted[0] * old_cols)
                    if got != len(view):
                        raise UserError(f"{self.source.path}: error: not a valid checkpoint: it ended early")
                    for c in col_runs:
                        block[:, c.new:c.new + c.length] = old_buf[:n, c.old:c.old + c.length]
                    block[:, gaps] = 0.0
                else:  # rows moved or new: one at a time
                    for i, r in enumerate(wanted):
                        if r < 0:
                            block[i] = fresh[k]
                            k += 1
                            continue
                        view = memoryview(old_buf[0]).cast("B")
                        os.preadv(src, [view], self.source.offset + 4 * r * old_cols)
                        block[i] = 0.0
                        for c in col_runs:
                            block[i, c.new:c.new + c.length] = old_buf[0, c.old:c.old + c.length]
                os.write(dst, memoryview(block).cast("B"))
        return 4 * rows * cols


SPLICE_FROM = 1 << 20  # elements: below this, building the tensor in memory is as fast
# The fills SplicedRows writes: new rows fresh, old rows' new columns zero.
_ROW_FILLS = (Fill(value="fresh", where=("new", "all")), Fill(value="zero", where=("old", "new")))


def _spliced(p: ParamPlan, init: Callable[[torch.Tensor], None], header, stored: str) -> Optional[SplicedRows]:
    """Stream a large 2-D parameter whose rows are its output units, else None."""
    if (len(p.shape) != 2 or p.axes[0].role != OUT or p.shape[0] * p.shape[1] < SPLICE_FROM
            or not set(p.fills) <= set(_ROW_FILLS)):
        return None
    unmatched = p.shape[0] - p.axes[0].matched
    fresh = None
    if unmatched:
        fresh = torch.empty(unmatched, p.shape[1])
        init(fresh)
    return SplicedRows(p, StoredTensor.of(header, stored), fresh)


def carried_tensor(p: ParamPlan, new_graph: Graph, header, stored: Optional[str],
                   read_old: Callable[[str], torch.Tensor], seed: int, dtype: torch.dtype = torch.float32):
    """What apply writes for `p` (file to file): a large grown float32 tensor
    streamed row block by row block, else the tensor build_tensor makes, in
    `dtype`. `stored` is the old tensor's name in the checkpoint."""
    init = fresh_init(new_graph, p.name, fresh_generator(seed, p.name))
    spliced = _spliced(p, init, header, stored) if p.source is not None and dtype == torch.float32 else None
    return spliced or build_tensor(p, read_old, init, dtype=dtype)


def carried_dtypes(plan: Plan, header, stored: dict[str, str]) -> dict[str, str]:
    """Each new tensor's dtype in the file: its old tensor's; a fresh one takes
    the dtype most of the checkpoint is in."""
    from collections import Counter

    counts = Counter(info.dtype for info in header.tensors.values())
    usual = counts.most_common(1)[0][0] if counts else "F32"
    return {p.name: header.tensors[stored[p.source]].dtype if p.source is not None else usual for p in plan.params}


def apply_plan(plan: Plan, checkpoint: str, new_spec, out: str, seed: int = 0,
               progress: Optional[Callable[[str, int], None]] = None, durable: bool = True,
               checked: bool = False) -> dict:
    """Write the surgered checkpoint to `out`; the old spec comes from `checkpoint` itself.

    `new_spec` is a ModelSpec or its Graph. The plan is checked against both
    specs first (`checked=True`: the caller made it from them just now)."""
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
    tensors = open_tensors(checkpoint)
    shapes = {p.name: tuple(p.shape) for p in plan.params}

    def read_old(name: str) -> torch.Tensor:
        return tensors.get_tensor(stored[name])

    dtypes = carried_dtypes(plan, header, stored)

    def produce():
        for p in plan.params:
            if p.action == "copied":  # unchanged: its bytes go file to file
                yield p.name, StoredTensor.of(header, stored[p.source])
                continue
            yield p.name, carried_tensor(p, new_graph, header, stored.get(p.source), read_old, seed,
                                         dtype=TORCH_DTYPES[dtypes[p.name]])

    written = write_checkpoint(out, plan.new_spec, new_graph.model.name, shapes, produce(), progress=progress,
                               durable=durable, dtypes=dtypes, extra_metadata=user_metadata(header))
    return {"checkpoint": out, "bytes": written, "tensors": len(shapes)}
