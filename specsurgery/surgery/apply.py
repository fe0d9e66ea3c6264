"""Carrying out a plan on a checkpoint, tensor by tensor.

The old checkpoint is read lazily (safetensors, memory-mapped) and the new one
streamed into a temporary file beside the target, renamed into place at the
end: memory holds a few tensors, never the model, and a crash leaves the old
files as they were.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..checkpoint import check_against, load_spec, open_tensors, read_header, write_checkpoint
from ..errors import UserError
from ..ir import build_graph
from ..ops import OPS, OUT
from ..spec import model as m
from ..spec.canonical import canonical
from .plan import ParamPlan, Plan


def _index(axis) -> tuple[torch.Tensor, torch.Tensor]:
    """(new indices, old indices) of the matched part of an axis."""
    new, old = [], []
    for r in axis.runs:
        new.extend(range(r.new, r.new + r.length))
        old.extend(range(r.old, r.old + r.length))
    return torch.tensor(new, dtype=torch.long), torch.tensor(old, dtype=torch.long)


def _select(tensor: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    if index.numel() == tensor.shape[dim] and bool((index == torch.arange(index.numel())).all()):
        return tensor  # the whole axis in order: no copy
    return tensor.index_select(dim, index)


def _place(target: torch.Tensor, dim: int, index: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    if index.numel() == target.shape[dim] and bool((index == torch.arange(index.numel())).all()):
        return source if source.shape == target.shape else target.copy_(source)
    return target.index_copy_(dim, index, source)


def build_tensor(p: ParamPlan, node, local: str, read_old: Callable[[str], torch.Tensor],
                 generator: torch.Generator) -> torch.Tensor:
    op = OPS[node.op]
    if p.source is None:
        tensor = torch.empty(p.shape)
        op.init(node, local, tensor, generator)
        return tensor
    old = read_old(p.source)
    if p.action == "copied":
        return old
    if len(p.shape) > 2:
        raise AssertionError(f"{p.name}: parameters of rank {len(p.shape)} are not supported")
    maps = [_index(a) for a in p.axes]
    # Copy: select the old indices axis by axis, then place them at their new ones.
    source = old
    for dim, (_, old_idx) in enumerate(maps):
        source = _select(source, dim, old_idx)
    if len(p.shape) == 1:
        block = _place(torch.zeros(p.shape), 0, maps[0][0], source)
    else:
        rows = torch.zeros(maps[0][0].numel(), p.shape[1])
        rows = _place(rows, 1, maps[1][0], source)
        block = _place(torch.zeros(p.shape), 0, maps[0][0], rows)
    # Fresh: new units on the output axis start at the op's init.
    out_dim = next(k for k, a in enumerate(p.axes) if a.role == OUT)
    new_units = sorted(set(range(p.shape[out_dim])) - set(maps[out_dim][0].tolist()))
    if new_units:
        slab_shape = list(p.shape)
        slab_shape[out_dim] = len(new_units)
        slab = torch.empty(slab_shape)
        op.init(node, local, slab, generator)
        block.index_copy_(out_dim, torch.tensor(new_units, dtype=torch.long), slab)
    return block


def apply_plan(plan: Plan, checkpoint: str, new_spec: m.ModelSpec, out: str, seed: int = 0,
               progress: Optional[Callable[[str, int], None]] = None) -> dict:
    """Write the surgered checkpoint to `out`; the old spec comes from `checkpoint` itself."""
    header = read_header(checkpoint)
    old_spec = load_spec(header)
    if canonical(old_spec) != plan.old_spec:
        raise UserError(f"{checkpoint}: error: the plan was made for another old spec than the one in this checkpoint")
    if canonical(new_spec) != plan.new_spec:
        raise UserError("error: the plan was made for another new spec than the one given")
    check_against(header, build_graph(old_spec))
    new_graph = build_graph(new_spec)
    parameters = new_graph.parameters()
    if [p.name for p in plan.params] != list(parameters):
        raise UserError("error: the plan's parameters do not match the new spec")
    tensors = open_tensors(checkpoint)
    generator = torch.Generator().manual_seed(seed)
    shapes = {p.name: tuple(p.shape) for p in plan.params}

    def produce():
        for p in plan.params:
            node, local = parameters[p.name]
            yield p.name, build_tensor(p, node, local, tensors.get_tensor, generator)

    written = write_checkpoint(out, plan.new_spec, new_spec.model.name, shapes, produce(), progress=progress)
    return {"checkpoint": out, "bytes": written, "tensors": len(shapes)}
