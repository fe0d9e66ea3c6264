"""Hand-checked boolean rules, op by op, on small specs (paper, Tables 1 and 2).

Each test writes the expected feature sets out by hand, then checks that the
gradient probe finds exactly the same interactions element for element.
"""
from __future__ import annotations


import numpy as np
import pytest

from specsurgery.backends.probe import gradient_map
from specsurgery.backends.shadow import shadow_map
from specsurgery.ir import build_graph
from specsurgery.ops import LANGUAGE_OPS, OPS
from specsurgery.spec.load import load_text

SCHEMA = """
schema s {
  vocab colours = [red, green, blue]
  group a { x: float  y: float  c: category(colours) }
  group b { z: float  w: int }
  group e[3] { p: float  q: bool }
}
"""


def phi_of(body: str):
    spec = load_text(SCHEMA + f"model m(obs: s) {{\n{body}\n}}\n", "t.spec").model()
    graph = build_graph(spec)
    return graph, shadow_map(graph)


def names(phi, param: str, index: tuple[int, ...]) -> set[str]:
    return set(phi.features_of(param, index))


def assert_gradient_equal(graph, phi):
    gmap = gradient_map(graph, "gradient")
    for name, p in phi.params.items():
        for f in range(len(graph.features)):
            expected = p.mask(1 << f)
            assert np.array_equal(gmap.masks[name][f], expected), (name, graph.features.names[f])


def test_linear_weight_meets_its_input_and_bias_meets_all():
    graph, phi = phi_of("out h = linear(obs.a, 2)")
    # weight [j, i] meets input i (w ⊙ x); the bias meets the sum (x + w)
    assert names(phi, "h.linear.weight", (0, 0)) == {"a.x"}
    assert names(phi, "h.linear.weight", (1, 1)) == {"a.y"}
    assert names(phi, "h.linear.bias", (1,)) == {"a.x", "a.y"}
    assert_gradient_equal(graph, phi)


def test_embed_row_meets_its_item():
    graph, phi = phi_of("e = embed(obs.a.c, 2)\nout h = linear(e, 1)")
    assert names(phi, "e.embed.weight", (2, 1)) == {"a.c=blue"}
    assert names(phi, "h.linear.weight", (0, 0)) == {"a.c=red", "a.c=green", "a.c=blue"}
    assert_gradient_equal(graph, phi)


def test_concat_keeps_positions_so_the_next_weight_tells_groups_apart():
    graph, phi = phi_of("out h = linear(concat(obs.b, obs.a, onehot(obs.a.c)), 2)")
    row = [names(phi, "h.linear.weight", (0, i)) for i in range(7)]
    assert row == [{"b.z"}, {"b.w"}, {"a.x"}, {"a.y"}, {"a.c=red"}, {"a.c=green"}, {"a.c=blue"}]
    assert_gradient_equal(graph, phi)


def test_elementwise_ops_keep_each_index_set():
    for op in ("relu", "tanh", "sigmoid", "gelu"):
        graph, phi = phi_of(f"out h = linear({op}(obs.a), 1)")
        assert names(phi, "h.linear.weight", (0, 1)) == {"a.y"}, op
        assert_gradient_equal(graph, phi)


def test_add_unions_index_by_index():
    graph, phi = phi_of("s1 = linear(obs.a, 2)\ns2 = linear(obs.b, 2)\nout h = linear(add(s1, s2), 1)")
    assert names(phi, "h.linear.weight", (0, 0)) == {"a.x", "a.y", "b.z", "b.w"}
    assert_gradient_equal(graph, phi)


def test_mul_of_disjoint_inputs_is_the_union_footnote_5():
    # x ⊙ x: the product of a's and b's features carries both. A plain product
    # probe sees nothing when only one factor is on; ours sees the union.
    graph, phi = phi_of("g = mul(obs.a.x, obs.b.z)\nout h = linear(g, 1)")
    assert names(phi, "h.linear.weight", (0, 0)) == {"a.x", "b.z"}
    assert_gradient_equal(graph, phi)


def test_layernorm_mixes_the_whole_axis():
    graph, phi = phi_of("n = layernorm(obs.a)\nout h = linear(n, 1)")
    assert names(phi, "n.layernorm.weight", (0,)) == {"a.x", "a.y"}
    assert names(phi, "h.linear.weight", (0, 0)) == {"a.x", "a.y"}
    assert_gradient_equal(graph, phi)


@pytest.mark.parametrize("pool", ["maxpool", "avgpool", "sumpool"])
def test_pools_keep_sets_entities_not_told_apart(pool):
    graph, phi = phi_of(f"u = {pool}(linear(obs.e, 2))\nout h = linear(u, 1)")
    assert names(phi, "u.linear.weight", (1, 0)) == {"e.p"}
    assert names(phi, "h.linear.weight", (0, 1)) == {"e.p", "e.q"}
    assert_gradient_equal(graph, phi)


def test_lstm_hidden_weights_meet_everything_from_the_second_step():
    graph, phi = phi_of("c = lstm(obs.b, 2)\nout h = linear(c, 1)")
    assert names(phi, "c.lstm.weight_ih", (5, 1)) == {"b.w"}
    assert names(phi, "c.lstm.weight_hh", (0, 1)) == {"b.z", "b.w"}
    assert names(phi, "c.lstm.bias_hh", (7,)) == {"b.z", "b.w"}
    assert_gradient_equal(graph, phi)


def test_weaker_probes_find_subsets():
    graph, phi = phi_of("u = maxpool(relu(linear(obs.e, 4)))\nc = tanh(linear(concat(obs.a, u), 4))\nout h = linear(c, 2)")
    full = gradient_map(graph, "gradient")
    for method in ("gradient-random", "gradient-positive"):
        weak = gradient_map(graph, method)
        for name in full.masks:
            assert not (weak.masks[name] & ~full.masks[name]).any(), (method, name)


def test_registry_covers_every_op_the_grammar_accepts():
    # Every op of the language reference's table has one registry entry with every rule.
    language = {"linear", "embed", "onehot", "concat", "relu", "tanh", "sigmoid", "gelu", "add", "mul",
                "layernorm", "maxpool", "avgpool", "sumpool", "lstm", "attention", "pointer", "gru", "dropout"}
    assert set(LANGUAGE_OPS) == language
    for name in language:
        op = OPS[name]
        for rule in ("infer", "init", "forward", "probe", "shadow"):
            assert callable(getattr(op, rule)), (name, rule)


def test_map_never_materialises_params_by_features():
    # Φ is kept per axis index: a 4096-unit LSTM's map holds a few thousand sets, not 10^8.
    graph, phi = phi_of("c = lstm(concat(obs.a, obs.b), 4096)\nout h = linear(c, 1)")
    stored = sum(len(axis) for p in phi.params.values() for axis in p.axes)
    assert stored < 100_000 < graph.parameter_count()
    assert phi.distinct_sets() <= 8
