"""The probe back end: Φ from gradients (paper, section 2.3.1), a second path
to the same map, used to prove the shadow rules and to reproduce Table 3.

The graph is run with every op's `probe` rule: one input feature on at a time
(value 1 in every entity and step, everything else 0), the loss the sum of all
heads, and a non-zero gradient on an element marks an interaction. Variants:

  gradient           positive non-bias weights, max-pool -> avg-pool, the inputs of tanh,
                     sigmoid and the gates normalised into (-1, 1) (the paper's method)
  gradient-random    signed random init, pools as written   (Table 3's 49.42% row)
  gradient-positive  positive init, max-pool kept            (Table 3's 0.52% row)

Features are probed in batches with per-sample gradients (torch.func.vmap).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from torch.func import grad, vmap

from ..ir import Graph
from .torch import SpecModule, mask_key

METHODS = ("gradient", "gradient-random", "gradient-positive")
PROBE_ENTITIES = 2  # entities are not told apart; two show the pool's behaviour
PROBE_STEPS = 2  # weight_hh meets the hidden state from the second step on


def probe_module(graph: Graph, method: str, seed: int = 0) -> SpecModule:
    module = SpecModule(graph, seed=seed, probe_variant=method)
    if method != "gradient-random":
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in module.named_parameters():
                # Strictly positive, U(0.5, 1) / fan_in: a linear's outputs stay
                # near its inputs' scale (in a deep model they still grow, which
                # the full method's tanh and sigmoid inputs are normalised for).
                fan_in = p.shape[1] if p.dim() > 1 else 1
                p.copy_((torch.rand(p.shape, generator=generator) * 0.5 + 0.5) / max(1, fan_in))
    return module


def _feature_slots(graph: Graph) -> list[tuple[str, tuple]]:
    """For each input feature (in schema order), the input tensor and position to set."""
    slots = []
    for group in graph.schema.groups:
        numeric = [f for f in group.features if not f.is_category]
        for feature in group.features:
            if feature.is_category:
                vocab = graph.schema.vocab(feature.vocab)
                for item, _ in enumerate(vocab.items):
                    slots.append((f"{group.name}.{feature.name}", (item,)))
            else:
                slots.append((group.name, (numeric.index(feature),)))
    return slots


def _empty_inputs(graph: Graph) -> dict[str, torch.Tensor]:
    """One probe observation, all zero: categories as one-hot rows (zero: no item)."""
    lead = (PROBE_STEPS,) if graph.has_time else ()
    out = {}
    for group in graph.schema.groups:
        ent = (PROBE_ENTITIES,) if group.is_entity_set else ()
        out[group.name] = torch.zeros(*lead, *ent, len(group.numeric_features))
        for f in group.category_features:
            out[f"{group.name}.{f.name}"] = torch.zeros(*lead, *ent, len(graph.schema.vocab(f.vocab).items))
        if group.is_entity_set:
            out[mask_key(group.name)] = torch.ones(*lead, *ent)
    return out


def probe_batches(graph: Graph, batch: int) -> Iterator[tuple[range, dict[str, torch.Tensor]]]:
    slots = _feature_slots(graph)
    empty = _empty_inputs(graph)
    for start in range(0, len(slots), batch):
        chunk = range(start, min(start + batch, len(slots)))
        inputs = {k: v.unsqueeze(0).repeat(len(chunk), *([1] * v.dim())) for k, v in empty.items()}
        for b, f in enumerate(chunk):
            key, (column,) = slots[f]
            inputs[key][b, ..., column] = 1.0
        yield chunk, inputs


@dataclass
class GradientMap:
    """Element-level Φ from gradients: masks[param] is bool [features, *shape]."""

    graph: Graph
    method: str
    masks: dict[str, np.ndarray]

    def pair_count(self) -> int:
        return int(sum(m.sum() for m in self.masks.values()))


def gradient_map(graph: Graph, method: str = "gradient", batch: int = 16, seed: int = 0,
                 keep: bool = True, on_batch: Optional[Callable] = None) -> GradientMap:
    """Probe every feature; `on_batch(features, {param: bool [b, *shape]})` sees each batch.

    With keep=False the masks are not stored (for large models, where a
    caller compares batch by batch and only the counts are wanted).
    """
    if method not in METHODS:
        raise ValueError(f"unknown gradient method {method!r}")
    module = probe_module(graph, method, seed)
    module.eval()
    params = {k: v.detach() for k, v in module.named_parameters()}

    def loss(p, inputs):
        # The sum of every statement, not only the heads: a statement that
        # reaches no head still has parameters that meet features.
        single = {k: v.unsqueeze(0) for k, v in inputs.items()}
        outputs = module(single, params=p, statements=True)
        return sum(o.sum() for o in outputs.values())

    per_sample = vmap(grad(loss), in_dims=(None, 0))
    n = len(graph.features)
    masks = {k: np.zeros((n, *v.shape), dtype=bool) for k, v in params.items()} if keep else {}
    for chunk, inputs in probe_batches(graph, batch):
        grads = per_sample(params, inputs)
        found = {k: (g != 0).numpy() for k, g in grads.items()}
        if keep:
            for k, m in found.items():
                masks[k][chunk.start:chunk.stop] = m
        if on_batch is not None:
            on_batch(chunk, found)
    return GradientMap(graph, method, masks)
