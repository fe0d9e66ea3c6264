"""Property: the two interaction maps agree (paper, section 2.3.3).

Over random valid specs (strategies.py), the boolean shadow map Φ and the
gradient map of the paper's full method ("gradient": positive init, max-pool
read as avg-pool) must be equal element for element, for every parameter and
every input feature; each weaker probe ("gradient-random", "gradient-positive")
may only miss interactions, never invent one: its map is a subset.

Two known bugs of specsurgery make the property fail on specs as generated
(minimal reproducers and the xfail(strict=True) tests at the end):

  * gradient_map crashes when a statement (or an `as` alias) is named like an
    attribute of the torch module (`forward`, `training`, `graph`, `type`,
    `_parameters`, ...): torch.func.functional_call walks parameter names
    with getattr, which finds the attribute instead of the submodule;
  * a statement that reaches no output head: Φ says its parameters meet their
    input features (they do, w ⊙ x happens), but the probe's loss is the sum
    of the heads only, so every gradient there is zero.

`test_maps_agree` therefore checks a spec equivalent to the drawn one for
mapping purposes: such names get a suffix and every statement reaching no
head is made to reach one (a plain one becomes a head, an entity-set one gets
a `sumpool` head). It first proves that this leaves Φ of every parameter
unchanged, then compares all parameters. `test_maps_agree_as_generated` is
the property on the specs exactly as drawn, xfail(strict=False) until the
bugs are fixed.
"""
from __future__ import annotations

import collections
from typing import Optional

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, example, given, settings
from torch import nn

from specsurgery.backends.probe import gradient_map
from specsurgery.backends.shadow import InteractionMap, shadow_map
from specsurgery.backends.torch import SpecModule
from specsurgery.ir import Graph, build_graph
from specsurgery.spec import model as m
from specsurgery.spec.canonical import canonical
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
_TOP_ATTRS = frozenset(dir(SpecModule)) | frozenset(vars(nn.Module())) | {"graph", "probe_variant"}
_SCOPE_ATTRS = frozenset(dir(nn.Module)) | frozenset(vars(nn.Module()))


def _rewrite(expr, path_fn, call_fn):
    if isinstance(expr, m.Path):
        return path_fn(expr)
    if isinstance(expr, m.Call):
        args = tuple(_rewrite(a, path_fn, call_fn) for a in expr.args)
        return call_fn(expr.model_copy(update={"args": args}))
    return expr


def _live_nodes(graph: Graph) -> set[int]:
    live = set(graph.outputs.values())
    stack = list(live)
    while stack:
        for i in graph.nodes[stack.pop()].inputs:
            if i not in live:
                live.add(i)
                stack.append(i)
    return live


def mappable(spec: m.ModelSpec) -> tuple[m.ModelSpec, dict[str, str]]:
    """The spec with colliding names suffixed and every statement reaching a head;
    also new parameter name -> original parameter name."""
    model = spec.model
    taken = {s.name for s in model.statements} | {model.input_name}

    def fresh(base: str, attrs) -> str:
        name = base + "_s"
        while name in taken or name in attrs:
            name += "_"
        taken.add(name)
        return name

    statements = {s.name: fresh(s.name, _TOP_ATTRS) if s.name in _TOP_ATTRS else s.name for s in model.statements}

    def path_fn(p: m.Path) -> m.Path:
        if p.parts[0] != model.input_name and p.parts[0] in statements:
            return p.model_copy(update={"parts": (statements[p.parts[0]],) + p.parts[1:]})
        return p

    def call_fn(c: m.Call) -> m.Call:
        if c.alias in _SCOPE_ATTRS:
            return c.model_copy(update={"alias": fresh(c.alias, _SCOPE_ATTRS)})
        return c

    renamed = tuple(s.model_copy(update={"name": statements[s.name], "was": None,
                                         "expr": _rewrite(s.expr, path_fn, call_fn)})
                    for s in model.statements)
    spec2 = spec.model_copy(update={"model": model.model_copy(update={"statements": renamed})})
    graph = build_graph(spec2)
    live = _live_nodes(graph)
    final: list[m.Statement] = []
    for s in renamed:
        node = graph.nodes[graph.statements[s.name]]
        if node.index in live:
            final.append(s)
        elif node.value.entities is None:
            final.append(s.model_copy(update={"out": True}))
        else:
            final.append(s)
            final.append(m.Statement(name=fresh("live", _TOP_ATTRS), out=True,
                                     expr=m.Call(op="sumpool", args=(m.Path(parts=(s.name,)),))))
    spec3 = spec2.model_copy(update={"model": model.model_copy(update={"statements": tuple(final)})})
    spec3 = load_text(canonical(spec3), "<mappable>").model(model.name)  # still a valid spec

    # Parameter names, in graph order, correspond one to one (no op was added
    # inside a statement, the sumpool heads have no parameters).
    old_names = list(build_graph(spec).parameters())
    new_names = list(build_graph(spec3).parameters())
    assert len(old_names) == len(new_names)
    return spec3, dict(zip(new_names, old_names))


# ---------------------------------------------------------------------------
# the properties

SEEN: collections.Counter = collections.Counter()


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
    phi = shadow_map(graph)
    spec2, names = mappable(spec)
    graph2 = build_graph(spec2)
    phi2 = shadow_map(graph2)
    # The stand-in has the same Φ, parameter for parameter, axis for axis.
    assert graph2.features == graph.features
    for new, old in names.items():
        assert phi2.params[new].shape == phi.params[old].shape, (new, old)
        assert [a.sets for a in phi2.params[new].axes] == [a.sets for a in phi.params[old].axes], (new, old)
    problems = map_mismatches(graph2, phi2, names)
    assert not problems, "\n" + text + "\n".join(problems[:10])


def test_maps_agree():
    """Boolean Φ == full gradient Φ element for element; weaker gradients are subsets;
    and the run exercised every op, an entity set and an lstm."""
    SEEN.clear()
    _maps_agree()
    missing = WANTED - set(SEEN)
    assert not missing, f"the run never exercised {sorted(missing)} (seen: {dict(SEEN)})"


@pytest.mark.xfail(strict=False, reason="bugs: gradient_map crashes on statement/alias names that are torch "
                                        "module attributes (forward, training, type, _parameters, ...), and "
                                        "misses every interaction of statements that reach no head; see "
                                        "test_gradient_map_* below")
@settings(SETTINGS, phases=[Phase.explicit, Phase.generate])  # fails fast: the reproducers are below
@given(specs())
def test_maps_agree_as_generated(pair):
    """The property on the specs exactly as drawn."""
    text, spec = pair
    graph = build_graph(spec)
    problems = map_mismatches(graph, shadow_map(graph))
    assert not problems, "\n" + text + "\n".join(problems[:10])


# ---------------------------------------------------------------------------
# the minimal reproducers found by the properties

ONE = "schema s {\n  group g {\n    x: float\n  }\n}\n\n"


def _graph(body: str) -> Graph:
    return build_graph(load_text(ONE + "model m(obs: s) {\n" + body + "\n}\n", "<min>").model())


@pytest.mark.xfail(strict=True, raises=TypeError,
                   reason="bug: probe's functional_call resolves `forward.linear.weight` with getattr and finds "
                          "SpecModule.forward (a method), not the submodule; any statement named like a module "
                          "attribute (forward, training, type, graph, cuda, _parameters ...) or an alias like "
                          "`as training` crashes `specsurgery map --method gradient`")
@pytest.mark.parametrize("body", ["  out forward = linear(obs.g, 1)", "  out h = linear(obs.g, 1) as training"])
def test_gradient_map_of_statement_named_like_a_module_attribute(body):
    graph = _graph(body)
    assert map_mismatches(graph, shadow_map(graph)) == []


@pytest.mark.xfail(strict=True,
                   reason="bug: the probe's loss sums the heads only, so a statement that reaches no head gets "
                          "all-zero gradients while Φ says h.linear.weight[0, 0] and h.linear.bias[0] meet g.x")
def test_gradient_map_of_statement_reaching_no_head():
    graph = _graph("  h = linear(obs.g, 1)\n  out o = obs.g")
    assert map_mismatches(graph, shadow_map(graph)) == []
