"""Property tests over random valid specs (see strategies.py).

Every generated spec must load, build, run and round-trip through its
canonical text; padding entities must not change any output; the torch
module's parameters must be exactly the graph's. Every run draws the same
specs (conftest.py); SPECSURGERY_EXPLORE=1 draws fresh ones (with
--hypothesis-seed=N, run N's).
"""
from __future__ import annotations

import math
import random

import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from specsurgery.backends.torch import SpecModule, mask_key
from specsurgery.ir import build_graph
from specsurgery.ops import OPS as REGISTRY
from specsurgery.spec.canonical import canonical
from specsurgery.spec.load import load_text

try:  # tests/ as a package or as a rootdir-relative folder
    from .strategies import OPS, random_batch, spec_text_from_seed, specs
except ImportError:
    from strategies import OPS, random_batch, spec_text_from_seed, specs

BATCH, STEPS = 3, 2

# database=None: no .hypothesis/ folder in the working tree.
SETTINGS = settings(max_examples=60, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])

seeds = st.integers(0, 2**31 - 1)


def _run(module: SpecModule, inputs: dict) -> dict:
    with torch.no_grad():
        return module.eval()(inputs)  # eval: dropout is the identity


def _seeded_examples(ops=("attention", "pointer", "gru"), limit: int = 300):
    """Decorate a test with seeded specs that hold each op of `ops` (explicit examples)."""
    found, pairs = set(), []
    for seed in range(limit):
        text, name, used = spec_text_from_seed(seed)
        if (set(ops) & used) - found:
            pairs.append(((text, load_text(text, f"<seed-{seed}>").model(name)), seed))
            found |= set(ops) & used
        if found == set(ops):
            break

    def decorate(test):
        for pair, seed in pairs:
            test = example(pair, seed)(test)
        return test

    return decorate


def test_generator_covers_the_language():
    """The generator (driven by seeds, no hypothesis) makes valid specs using every op."""
    ops: set[str] = set()
    texts = []
    for seed in range(300):
        text, name, used = spec_text_from_seed(seed)
        load_text(text, f"<seed-{seed}>").model(name)  # raises on an invalid spec
        ops |= used
        texts.append(text)
    assert ops == set(OPS)
    joined = "\n".join(texts)
    for needle in ("bias=false", " as ", "] {", ": float", ": int", ": bool", ": category(", "out ", " was "):
        assert needle in joined, needle


@SETTINGS
@given(specs(), seeds)
def test_random_spec_runs_forward(pair, seed):
    text, spec = pair
    graph = build_graph(spec)
    module = SpecModule(graph, seed=seed)
    inputs = random_batch(spec, graph, random.Random(seed), batch=BATCH, steps=STEPS)
    outputs = _run(module, inputs)
    assert set(outputs) == {s.name for s in spec.model.statements if s.out} == set(graph.outputs)
    lead = (BATCH, STEPS) if graph.has_time else (BATCH,)
    for head, index in graph.outputs.items():
        value = outputs[head]
        assert tuple(value.shape) == lead + (graph.nodes[index].value.width,), head
        assert value.dtype == torch.get_default_dtype()
        finite = torch.isfinite(value)
        if REGISTRY[graph.nodes[index].op].head_only:  # a pointer scores padding -inf
            finite |= value == -math.inf
        assert finite.all(), head


@SETTINGS
@given(specs())
def test_canonical_round_trips(pair):
    text, spec = pair
    first = canonical(spec)
    again = load_text(first, "<canonical>").model(spec.model.name)
    assert again == spec
    assert canonical(again) == first


@SETTINGS
@_seeded_examples()
@given(specs(), seeds)
def test_padding_entities_do_not_change_outputs(pair, seed):
    text, spec = pair
    graph = build_graph(spec)
    module = SpecModule(graph, seed=seed)
    inputs = random_batch(spec, graph, random.Random(seed), batch=BATCH, steps=STEPS)
    before = _run(module, inputs)

    junk = torch.Generator().manual_seed(seed)
    changed = {k: v.clone() for k, v in inputs.items()}
    for group in graph.entity_sets():
        pad = changed[mask_key(group.name)] == 0
        n = int(pad.sum())
        if n == 0:
            continue
        values = changed[group.name]
        values[pad] = torch.randn(n, values.shape[-1], generator=junk) * 5
        for feature in group.category_features:
            size = len(spec.schema.vocab(feature.vocab).items)
            key = f"{group.name}.{feature.name}"
            changed[key][pad] = torch.randint(0, size, (n,), generator=junk)
    after = _run(module, changed)

    for head in graph.outputs:
        assert torch.equal(before[head], after[head]), head


@SETTINGS
@given(specs())
def test_state_dict_matches_graph_parameters(pair):
    text, spec = pair
    graph = build_graph(spec)
    module = SpecModule(graph, seed=0)
    state = module.state_dict()
    params = graph.parameters()
    assert set(state) == set(params)
    for key, (node, name) in params.items():
        assert tuple(state[key].shape) == tuple(node.params[name].shape), key
    assert sum(t.numel() for t in state.values()) == graph.parameter_count()
