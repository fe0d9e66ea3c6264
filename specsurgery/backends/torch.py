"""The torch back end: an IR graph as an nn.Module to train.

Parameters are held flat under the language's parameter names
(`hero_h.linear.weight`), so `state_dict()` keys are the checkpoint's keys.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..ir import Graph, walk
from ..ops import INPUT_OPS, OPS, RunContext


class SpecModule(nn.Module):
    """`forward(inputs)` takes featurised tensors and returns a dict of heads."""

    def __init__(self, graph: Graph, seed: Optional[int] = 0, probe_variant: Optional[str] = None):
        """`seed` makes the init reproducible; None leaves parameters uninitialised (to load them)."""
        super().__init__()
        self.graph = graph
        self.probe_variant = probe_variant  # None: the model as written; else a gradient-map probe
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        for node in graph.nodes:
            for name, spec in node.params.items():
                tensor = torch.empty(spec.shape)
                if seed is not None:  # None: weights are about to be loaded, skip the init
                    with torch.no_grad():
                        OPS[node.op].init(node, name, tensor, generator)
                # Flat, under the checkpoint's own names: statement names like
                # "forward" or "training" must not meet nn.Module's attributes.
                self._parameters[f"{node.scope}.{name}"] = nn.Parameter(tensor)

    def load_tensors(self, read) -> None:
        """Set every parameter from `read(name)` (a checkpoint's tensors, by name).

        nn.Module.load_state_dict would look for submodules at each dot of the
        name; parameters here are flat under the checkpoint's own names."""
        with torch.no_grad():
            for name, param in self._parameters.items():
                tensor = read(name)
                if tuple(tensor.shape) != tuple(param.shape):
                    raise ValueError(f"{name}: shape {list(tensor.shape)}, the spec says {list(param.shape)}")
                param.copy_(tensor)

    def op_params(self, node) -> dict[str, torch.Tensor]:
        return {local: self._parameters[f"{node.scope}.{local}"] for local in node.params}

    def forward(self, inputs: dict[str, torch.Tensor], params: Optional[dict[str, torch.Tensor]] = None,
                statements: bool = False) -> dict[str, torch.Tensor]:
        """Heads (or, with `statements`, every statement's value) for `inputs`.

        `params` (checkpoint name -> tensor) replaces the module's own, which
        is how the probe takes per-sample gradients (torch.func) without
        looking parameters up by attribute: a statement may be called `forward`.
        """
        graph = self.graph
        ctx = RunContext(masks={g.name: inputs[mask_key(g.name)] for g in graph.entity_sets()},
                         probe_variant=self.probe_variant or "gradient", training=self.training)
        probing = self.probe_variant is not None

        def visit(node, xs):
            op = OPS[node.op]
            if node.op in INPUT_OPS:
                xs = [inputs[op.input_key(node)]]
            if not node.params:
                own = {}
            elif params is None:
                own = self.op_params(node)
            else:
                own = {local: params[f"{node.scope}.{local}"] for local in node.params}
            return (op.probe if probing else op.forward)(node, own, xs, ctx)

        values = walk(graph, visit)
        chosen = graph.statements if statements else graph.outputs
        return {name: values[index] for name, index in chosen.items()}


def mask_key(group: str) -> str:
    """The input key of an entity set's mask (1 for a real entity, 0 for padding)."""
    return f"{group}#mask"
