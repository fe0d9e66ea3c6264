"""Property: padding entities never change any output.

Over random valid specs (strategies.py, which draws attention, pointer heads,
pools, lstm and gru), random observations are featurised, then every padding
slot of every entity set (mask 0) is filled with other random values and
category items: every head must come out bit for bit the same (a pointer's
padding scores are -inf on both sides).
"""
from __future__ import annotations

import random

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings

from specsurgery.ir import build_graph
from specsurgery.model import Model
from specsurgery.spec.load import load_text

try:  # tests/ as a package or as a rootdir-relative folder
    from .strategies import random_batch, spec_text_from_seed, specs
except ImportError:
    from strategies import random_batch, spec_text_from_seed, specs

pytestmark = pytest.mark.usefixtures("one_thread")

SETTINGS = settings(max_examples=30, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def with_other_padding(spec, inputs: dict, generator: torch.Generator) -> dict:
    """The same observations with different values in every padding slot."""
    out = dict(inputs)
    for group in spec.schema.groups:
        if not group.is_entity_set:
            continue
        padding = inputs[f"{group.name}#mask"] == 0
        noise = torch.randn(inputs[group.name].shape, generator=generator) * 10
        out[group.name] = torch.where(padding.unsqueeze(-1), noise, inputs[group.name])
        for f in group.category_features:
            key = f"{group.name}.{f.name}"
            items = len(spec.schema.vocab(f.vocab).items)
            other = torch.randint(0, items, inputs[key].shape, generator=generator)
            out[key] = torch.where(padding, other, inputs[key])
    return out


def _covering(ops=("attention", "pointer"), limit: int = 300) -> list:
    """Seeded specs that hold each op of `ops` (explicit examples)."""
    found, out = set(), []
    for seed in range(limit):
        text, name, used = spec_text_from_seed(seed)
        new = (set(ops) & used) - found
        if new:
            out.append((text, load_text(text, f"<seed-{seed}>").model(name)))
            found |= new
        if found == set(ops):
            break
    return out


def _with_covering_examples(test):
    for pair in _covering():
        test = example(pair)(test)
    return test


@SETTINGS
@_with_covering_examples
@given(specs())
def test_padding_entities_never_change_any_output(pair):
    text, spec = pair
    graph = build_graph(spec)
    if not graph.entity_sets():
        return
    model = Model(graph, seed=0).eval()
    inputs = random_batch(spec, graph, random.Random(7), batch=4)
    other = with_other_padding(spec, inputs, torch.Generator().manual_seed(11))
    if all(torch.equal(inputs[k], other[k]) for k in inputs):
        return  # every set happened to be full
    with torch.no_grad():
        first, second = model(inputs), model(other)
    for head in first:
        assert torch.equal(first[head], second[head]), f"{text}\nhead {head} changed with the padding"
