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

from ..checkpoint import StoredTensor, check_shapes, open_tensors, read_header, write_checkpoint
from ..errors import UserError
from ..ir import build_graph
from ..ops import OPS, OUT
from ..spec import model as m
from ..spec.canonical import canonical
from .plan import ParamPlan, Plan


def fresh_generator(seed: int, name: str) -> torch.Generator:
    """The generator of one parameter's fresh values, seeded by (seed, name): its
    values do not depend on which parameters were built before it, so shards
    built in parallel, in any order, equal a one-file apply."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def build_tensor(p: ParamPlan, node, local: str, read_old: Callable[[str], torch.Tensor],
                 generator: torch.Generator) -> torch.Tensor:
    """The new tensor: old blocks copied run by run, new inputs zero, new units fresh."""
    op = OPS[node.op]
    if p.source is None:
        tensor = torch.empty(p.shape)
        op.init(node, local, tensor, generator)
        return tensor
    if len(p.shape) > 2:
        raise AssertionError(f"{p.name}: parameters of rank {len(p.shape)} are not supported")
    old = read_old(p.source)
    block = torch.zeros(p.shape)
    # Runs are contiguous on both sides: slices, no index tensors, one new buffer.
    if len(p.shape) == 1:
        for r in p.axes[0].runs:
            block[r.new:r.new + r.length] = old[r.old:r.old + r.length]
    else:
        for r in p.axes[0].runs:
            for c in p.axes[1].runs:
                block[r.new:r.new + r.length, c.new:c.new + c.length] = old[r.old:r.old + r.length, c.old:c.old + c.length]
    del old
    # New units on the output axis start at the op's init.
    out_dim = next(k for k, a in enumerate(p.axes) if a.role == OUT)
    matched = [False] * p.shape[out_dim]
    for r in p.axes[out_dim].runs:
        matched[r.new:r.new + r.length] = [True] * r.length
    new_units = [i for i, m in enumerate(matched) if not m]
    if new_units:
        slab_shape = list(p.shape)
        slab_shape[out_dim] = len(new_units)
        slab = torch.empty(slab_shape)
        op.init(node, local, slab, generator)
        block.index_copy_(out_dim, torch.tensor(new_units, dtype=torch.long), slab)
    return block


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


def _spliced(p: ParamPlan, node, local: str, header, generator: torch.Generator) -> Optional[SplicedRows]:
    """Stream a large 2-D parameter whose rows are its output units, else None."""
    if len(p.shape) != 2 or p.axes[0].role != OUT or p.shape[0] * p.shape[1] < SPLICE_FROM:
        return None
    unmatched = p.shape[0] - p.axes[0].matched
    fresh = None
    if unmatched:
        fresh = torch.empty(unmatched, p.shape[1])
        OPS[node.op].init(node, local, fresh, generator)
    return SplicedRows(p, StoredTensor.of(header, p.source), fresh)


def _check_old_tensors(header, plan: Plan) -> None:
    """Refuse a checkpoint whose tensors do not match its (the plan's) old spec."""
    expected = {p.source: tuple(p.old_shape) for p in plan.params if p.source is not None}
    expected.update({d.name: tuple(d.shape) for d in plan.dropped})
    check_shapes(header, expected)


def apply_plan(plan: Plan, checkpoint: str, new_spec: m.ModelSpec, out: str, seed: int = 0,
               progress: Optional[Callable[[str, int], None]] = None, durable: bool = True) -> dict:
    """Write the surgered checkpoint to `out`; the old spec comes from `checkpoint` itself."""
    header = read_header(checkpoint)
    # Both texts are canonical: equal text means the same spec, no need to parse it again.
    if header.spec_text != plan.old_spec:
        raise UserError(f"{checkpoint}: error: the plan was made for another old spec than the one in this checkpoint")
    if canonical(new_spec) != plan.new_spec:
        raise UserError("error: the plan was made for another new spec than the one given")
    _check_old_tensors(header, plan)
    new_graph = build_graph(new_spec)
    parameters = new_graph.parameters()
    if [p.name for p in plan.params] != list(parameters):
        raise UserError("error: the plan's parameters do not match the new spec")
    tensors = open_tensors(checkpoint)
    shapes = {p.name: tuple(p.shape) for p in plan.params}

    def produce():
        for p in plan.params:
            node, local = parameters[p.name]
            if p.action == "copied":  # unchanged: its bytes go file to file
                yield p.name, StoredTensor.of(header, p.source)
                continue
            generator = fresh_generator(seed, p.name)
            spliced = _spliced(p, node, local, header, generator) if p.source is not None else None
            yield p.name, spliced or build_tensor(p, node, local, tensors.get_tensor, generator)

    written = write_checkpoint(out, plan.new_spec, new_spec.model.name, shapes, produce(), progress=progress,
                               durable=durable)
    return {"checkpoint": out, "bytes": written, "tensors": len(shapes)}
