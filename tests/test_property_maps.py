"""Property: the two interaction maps agree (paper, section 2.3.3).

Over random valid specs (strategies.py), the boolean shadow map Φ and the
gradient map of the paper's full method ("gradient": positive init, max-pool
read as avg-pool) must be equal element for element, for every parameter and
every input feature; each weaker probe ("gradient-random", "gradient-positive")
may only miss interactions, never invent one: its map is a subset.

Every run draws the same specs (conftest.py); SPECSURGERY_EXPLORE=1 draws
fresh ones (with --hypothesis-seed=N, run N's).

The regression tests at the end are the minimal cases the property found
before they were fixed: a statement named like an attribute of a torch module
(`forward`, `training`), and a statement that reaches no head (the probe's
loss now sums every statement, not only the heads).
"""
from __future__ import annotations

import collections
from typing import Optional

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings

from specsurgery.backends.probe import gradient_map
from specsurgery.backends.shadow import InteractionMap, shadow_map
from specsurgery.ir import Graph, build_graph
from specsurgery.spec import model as m
from specsurgery.spec.load import load_text

try:  # tests/ as a package or as a rootdir-relative folder
    from .strategies import OPS, spec_text_from_seed, specs
except ImportError:
    from strategies import OPS, spec_text_from_seed, specs

WEAK_METHODS = ("gradient-random", "gradient-positive")
SMALL = 400  # parameters: the covering examples stay small

SETTINGS = settings(max_examples=40, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

# What a run must exercise: every op of the language, an entity set, an lstm.
WANTED = frozenset(OPS) | {"entity set", "lstm"}
SEEN: collections.Counter = collections.Counter()  # what the run exercised


pytestmark = pytest.mark.usefixtures("one_thread")


def exercised(graph: Graph) -> set[str]:
    """The ops of WANTED a graph uses (and "entity set" when it reads one)."""
    used = {n.op for n in graph.nodes}
    if any(n.value.entities for n in graph.nodes):
        used.add("entity set")
    return used & WANTED


def _covering_examples(limit: int = 1000) -> list[tuple[str, m.ModelSpec]]:
    """Small seeded specs that together exercise all of WANTED (explicit examples:
    40 hypothesis draws alone do not reliably reach `mul` or `maxpool`)."""
    missing = set(WANTED)
    out = []
    for seed in range(limit):
        if not missing:
            break
        text, name, _ = spec_text_from_seed(seed)
        spec = load_text(text, f"<seed-{seed}>").model(name)
        graph = build_graph(spec)
        new = exercised(graph) & missing
        if new and graph.parameter_count() <= SMALL:
            out.append((text, spec))
            missing -= new
    return out


COVERING = _covering_examples()


# ---------------------------------------------------------------------------
# the comparison


def map_mismatches(graph: Graph, phi: InteractionMap, names: Optional[dict[str, str]] = None) -> list[str]:
    """Every disagreement with the full gradient method, and every interaction a
    weaker method finds that the full one does not; [] when the maps agree.

    `names`: parameter name in `graph` -> the name to report it under.
    """
    names = names or {}
    features = graph.features.names
    full = gradient_map(graph, "gradient")
    problems = []
    assert set(full.masks) == set(phi.params)
    for name, p in phi.params.items():
        grad = full.masks[name]
        assert grad.shape == (len(features), *p.shape), name
        for f, feature in enumerate(features):
            boolean = p.mask(1 << f)
            if not np.array_equal(grad[f], boolean):
                only_b = np.argwhere(boolean & ~grad[f]).tolist()
                only_g = np.argwhere(grad[f] & ~boolean).tolist()
                problems.append(f"{names.get(name, name)} x {feature}: boolean only at {only_b[:4]}, "
                                f"gradient only at {only_g[:4]}")
    for method in WEAK_METHODS:
        weak = gradient_map(graph, method)
        for name in phi.params:
            extra = weak.masks[name] & ~full.masks[name]
            if extra.any():
                f, *index = np.argwhere(extra)[0].tolist()
                problems.append(f"{method} finds {names.get(name, name)}{index} x {features[f]}, "
                                f"which the full method does not")
    return problems


# ---------------------------------------------------------------------------
# the equivalent spec that steps around the two known bugs

# getattr on the module finds these before the submodules of the same name.
def _with_covering_examples(test):
    for pair in COVERING:
        test = example(pair)(test)
    return test


@SETTINGS
@_with_covering_examples
@given(specs())
def _maps_agree(pair):
    text, spec = pair
    graph = build_graph(spec)
    SEEN.update(exercised(graph))
    SEEN["examples"] += 1
    problems = map_mismatches(graph, shadow_map(graph))
    assert not problems, "\n" + text + "\n".join(problems[:10])


def test_maps_agree():
    """Boolean Φ == full gradient Φ element for element; weaker gradients are subsets;
    and the run exercised every op, an entity set and an lstm."""
    SEEN.clear()
    _maps_agree()
    missing = WANTED - set(SEEN)
    assert not missing, f"the run never exercised {sorted(missing)} (seen: {dict(SEEN)})"


# ---------------------------------------------------------------------------
# regressions: the minimal cases the property once failed on

ONE = "schema s {\n  group g {\n    x: float\n  }\n}\n\n"


def _graph(body: str) -> Graph:
    return build_graph(load_text(ONE + "model m(obs: s) {\n" + body + "\n}\n", "<min>").model())


@pytest.mark.parametrize("body", ["  out state = linear(obs.g, 1)", "  out h = linear(obs.g, 1) as weight"])
def test_gradient_map_of_statement_named_like_a_module_attribute(body):
    graph = _graph(body)
    assert map_mismatches(graph, shadow_map(graph)) == []


def test_gradient_map_of_statement_reaching_no_head():
    graph = _graph("  h = linear(obs.g, 1)\n  out o = obs.g")
    assert map_mismatches(graph, shadow_map(graph)) == []


# Positive probe values grow through layernorms (x + mean) and muls (a + b + ab):
# here past 9.5 at a tanh and 17 at a sigmoid, where float32 rounds their slope
# to exactly 0. The full method then missed LSTM gate g (rows 2 of 4; found in CI
# as `lstm(c, 1)` after `layernorm(add(b, linear(b, 3)))`), every gate of a GRU,
# and all that lies before a tanh or sigmoid; its inputs are now brought into
# (-1, 1) first (ops.py, _unsaturated).
DEEP = "mul(layernorm(layernorm(obs.g)), layernorm(layernorm(obs.g)))"


@pytest.mark.parametrize("head, interactions", [
    ("lstm(DEEP, 1)", 24),  # 8 of 4 layernorms, 4 + 4 + 4 + 4 rows of the cell (found: 16)
    ("gru(DEEP, 1)", 20),  # 8, then 3 + 3 + 3 + 3 (found: 0)
    ("linear(tanh(DEEP), 1)", 10),  # 8, then the linear's weight and bias (found: 2)
    ("linear(sigmoid(mul(DEEP, DEEP)), 1)", 18),  # 16, then 2 (found: 2)
])
def test_gradient_map_through_a_saturating_function(head, interactions):
    graph = _graph("  out o = " + head.replace("DEEP", DEEP))
    full = gradient_map(graph, "gradient")
    assert sum(int(mask[0].sum()) for mask in full.masks.values()) == interactions
    assert map_mismatches(graph, shadow_map(graph)) == []
