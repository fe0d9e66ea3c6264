"""The version 2 ops (attention, pointer, gru, dropout): hand-checked boolean
rules proven equal to the gradient probe, the torch forward against PyTorch's
own modules, masking of padding, and their argument errors.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from specsurgery import keys as K
from specsurgery.backends.probe import gradient_map
from specsurgery.backends.shadow import shadow_map
from specsurgery.errors import SpecError
from specsurgery.ir import build_graph
from specsurgery.model import Model
from specsurgery.ops import OPS, RunContext
from specsurgery.spec.load import load_text

try:  # tests/ as a package or as a rootdir-relative folder
    from .test_shadow_rules import SCHEMA, names
except ImportError:
    from test_shadow_rules import SCHEMA, names

pytestmark = pytest.mark.usefixtures("one_thread")


def graph_of(body: str):
    return build_graph(load_text(SCHEMA + f"model m(obs: s) {{\n{body}\n}}\n", "t.spec").model())


def assert_gradient_equal(graph, phi):
    """Boolean Φ == the full gradient method's, element for element; weaker probes find subsets."""
    full = gradient_map(graph, "gradient")
    for name, p in phi.params.items():
        for f in range(len(graph.features)):
            assert np.array_equal(full.masks[name][f], p.mask(1 << f)), (name, graph.features.names[f])
    for method in ("gradient-random", "gradient-positive"):
        weak = gradient_map(graph, method)
        for name in phi.params:
            assert not (weak.masks[name] & ~full.masks[name]).any(), (method, name)


# ---------------------------------------------------------------------------
# shadow rules, by hand


def test_attention_weights_meet_their_input_and_every_output_meets_the_whole_set():
    graph = graph_of("t = attention(obs.e, 2, 2)\nout h = linear(maxpool(t), 1)")
    phi = shadow_map(graph)
    both = {"e.p", "e.q"}
    for p in ("q", "k", "v"):
        # weight [row, i] meets input i (w ⊙ x); the bias meets everything that reaches the row
        assert names(phi, f"t.attention.{p}_weight", (0, 0)) == {"e.p"}
        assert names(phi, f"t.attention.{p}_weight", (3, 1)) == {"e.q"}
        assert names(phi, f"t.attention.{p}_bias", (2,)) == both
    # scores mix every index of every entity: each head output, and so each output, carries the set
    assert names(phi, "t.attention.out_weight", (1, 3)) == both
    assert names(phi, "t.attention.out_bias", (0,)) == both
    assert [names(phi, "h.linear.weight", (0, i)) for i in range(4)] == [both] * 4
    assert_gradient_equal(graph, phi)


def test_attention_rows_belong_to_heads():
    graph = graph_of("t = attention(obs.e, 2, 3)\nout h = linear(maxpool(t), 1)")
    phi = shadow_map(graph)
    per_head = tuple(K.Unit("t.attention", f"head {h}", d) for h in range(2) for d in range(3))
    for p in ("q", "k", "v"):
        assert phi.params[f"t.attention.{p}_weight"].axes[0].keys == per_head
    assert phi.params["t.attention.out_weight"].axes[1].keys == per_head  # the heads' outputs
    assert phi.params["t.attention.out_weight"].axes[0].keys == K.units("t.attention", 6)
    assert [p.shape for p in phi.params.values()][:8] == [(6, 2), (6,), (6, 2), (6,), (6, 2), (6,), (6, 6), (6,)]


def test_pointer_query_and_keys_meet_their_sides_and_scores_meet_both():
    graph = graph_of("out s = pointer(obs.b, obs.e, 2)")
    phi = shadow_map(graph)
    assert names(phi, "s.pointer.q_weight", (1, 0)) == {"b.z"}
    assert names(phi, "s.pointer.q_weight", (0, 1)) == {"b.w"}
    assert names(phi, "s.pointer.q_bias", (1,)) == {"b.z", "b.w"}
    assert names(phi, "s.pointer.k_weight", (0, 1)) == {"e.q"}
    assert names(phi, "s.pointer.k_bias", (0,)) == {"e.p", "e.q"}
    scores = phi.values[graph.outputs["s"]]
    assert scores.keys == K.units("s.pointer", 3, "entity")  # one per slot of e[3]
    assert set(graph.features.names_of(scores.sets[2])) == {"b.z", "b.w", "e.p", "e.q"}
    assert_gradient_equal(graph, phi)


def test_gru_hidden_weights_meet_everything_from_the_second_step():
    graph = graph_of("c = gru(obs.b, 2)\nout h = linear(c, 1)")
    phi = shadow_map(graph)
    assert names(phi, "c.gru.weight_ih", (5, 1)) == {"b.w"}
    assert names(phi, "c.gru.weight_ih", (0, 0)) == {"b.z"}
    assert names(phi, "c.gru.weight_hh", (0, 1)) == {"b.z", "b.w"}
    assert names(phi, "c.gru.bias_hh", (5,)) == {"b.z", "b.w"}
    assert names(phi, "h.linear.weight", (0, 1)) == {"b.z", "b.w"}
    rows = phi.params["c.gru.weight_ih"].axes[0].keys
    assert rows == tuple(K.Unit("c.gru", gate, i) for gate in "rzn" for i in range(2))
    assert_gradient_equal(graph, phi)


def test_dropout_keeps_its_input_keys_and_sets():
    with_dropout = graph_of("out h = linear(dropout(obs.a, 0.5), 1)")
    without = graph_of("out h = linear(obs.a, 1)")
    phi, plain = shadow_map(with_dropout), shadow_map(without)
    assert names(phi, "h.linear.weight", (0, 1)) == {"a.y"}
    assert phi.params["h.linear.weight"].axes == plain.params["h.linear.weight"].axes
    assert_gradient_equal(with_dropout, phi)


def test_a_transformer_block_with_a_pointer_and_a_gru_maps_alike():
    graph = graph_of("u = linear(obs.e, 4)\n"
                     "t = add(u, linear(attention(layernorm(u), 2, 2), 4))\n"
                     "core = gru(concat(dropout(obs.b, 0.1), avgpool(t)), 3)\n"
                     "out target = pointer(core, t, 2)\n"
                     "out act = linear(core, 2)")
    assert_gradient_equal(graph, shadow_map(graph))


# ---------------------------------------------------------------------------
# the torch forward


def featurised(values, mask, **extra):
    return {"e": values, "e#mask": mask, "a": torch.zeros(values.shape[0], 2),
            "a.c": torch.zeros(values.shape[0], dtype=torch.long), "b": torch.zeros(values.shape[0], 2), **extra}


def test_attention_is_pytorch_multihead_attention_over_the_real_entities():
    graph = graph_of("out h = maxpool(attention(linear(obs.e, 6), 3, 2))")
    model = Model(graph, seed=3).eval()
    g = torch.Generator().manual_seed(0)
    values = torch.randn(4, 3, 2, generator=g)
    mask = torch.tensor([[1, 1, 1], [1, 0, 1], [0, 0, 0], [1, 0, 0]], dtype=torch.float32)
    attention = model.h.attention
    reference = torch.nn.MultiheadAttention(6, 3, batch_first=True)
    with torch.no_grad():
        reference.in_proj_weight.copy_(torch.cat([attention.q_weight, attention.k_weight, attention.v_weight]))
        reference.in_proj_bias.copy_(torch.cat([attention.q_bias, attention.k_bias, attention.v_bias]))
        reference.out_proj.weight.copy_(attention.out_weight)
        reference.out_proj.bias.copy_(attention.out_bias)
    reference.eval()
    with torch.no_grad():
        u = torch.nn.functional.linear(values, model.h.linear.weight, model.h.linear.bias)
        node = next(n for n in graph.nodes if n.op == "attention")
        ours = OPS["attention"].forward(node, dict(attention.named_parameters()), [u], RunContext(masks={"e": mask}))
        for b in range(4):
            real = mask[b].bool()
            if real.any():
                theirs, _ = reference(u[b:b + 1, real], u[b:b + 1, real], u[b:b + 1, real])
                torch.testing.assert_close(ours[b, real], theirs[0], rtol=1e-5, atol=1e-6)
            assert torch.equal(ours[b, ~real], torch.zeros(int((~real).sum()), 6))  # padding rows: zeros
    assert torch.equal(ours[2], torch.zeros(3, 6))  # a set with no real entity gives zeros


def test_attention_of_a_set_with_no_real_entity_has_finite_gradients():
    graph = graph_of("out h = sumpool(attention(obs.e, 1, 2))")
    model = Model(graph, seed=0)
    out = model(featurised(torch.randn(2, 3, 2), torch.zeros(2, 3)))
    out["h"].sum().backward()
    assert torch.equal(out["h"], torch.zeros(2, 2))
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_pointer_scores_the_real_entities_and_padding_is_minus_infinity():
    graph = graph_of("out s = pointer(obs.b, obs.e, 4)")
    model = Model(graph, seed=1).eval()
    values = torch.randn(2, 3, 2)
    query = torch.randn(2, 2)
    mask = torch.tensor([[1, 0, 1], [0, 0, 0]], dtype=torch.float32)
    scores = model(featurised(values, mask, b=query))["s"]
    p = model.s.pointer
    q = query @ p.q_weight.T + p.q_bias
    k = values @ p.k_weight.T + p.k_bias
    expected = torch.einsum("bd,bed->be", q, k) / math.sqrt(4)
    torch.testing.assert_close(scores[0, [0, 2]], expected[0, [0, 2]])
    assert scores[0, 1] == -math.inf and (scores[1] == -math.inf).all()
    assert scores.shape == (2, 3)


def test_gru_is_pytorch_gru_and_steps_through_its_state():
    graph = graph_of("c = gru(obs.b, 3)\nout h = linear(c, 1)")
    model = Model(graph, seed=2).eval()
    reference = torch.nn.GRU(2, 3, batch_first=True)
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(reference, f"{name}_l0").copy_(getattr(model.c.gru, name))
    b = torch.randn(2, 5, 2)
    inputs = {"a": torch.zeros(2, 5, 2), "a.c": torch.zeros(2, 5, dtype=torch.long), "b": b,
              "e": torch.zeros(2, 5, 3, 2), "e#mask": torch.zeros(2, 5, 3)}
    with torch.no_grad():
        whole = model(inputs)["h"]
        hidden, _ = reference(b)
        torch.testing.assert_close(whole, hidden @ model.h.linear.weight.T + model.h.linear.bias)
        state = model.initial_state(2)
        assert list(state) == ["c"] and list(state["c"]) == ["gru.h"]
        steps = []
        for t in range(5):
            heads, state = model({k: v[:, t:t + 1] for k, v in inputs.items()}, state=state)
            steps.append(heads["h"])
        assert torch.equal(torch.cat(steps, dim=1), whole)
        torch.testing.assert_close(state["c"]["gru.h"], hidden[:, -1])


def test_dropout_is_the_identity_in_eval_mode_and_drops_while_training():
    graph = graph_of("out h = dropout(obs.b, 0.5)")
    model = Model(graph)
    b = torch.ones(4000, 2)
    inputs = featurised(torch.zeros(4000, 3, 2), torch.zeros(4000, 3), b=b)
    assert torch.equal(model.eval()(inputs)["h"], b)
    dropped = model.train()(inputs)["h"]
    assert set(dropped.unique().tolist()) == {0.0, 2.0}  # the rest scaled by 1/(1-p)
    assert 0.45 < (dropped == 0).float().mean().item() < 0.55


# ---------------------------------------------------------------------------
# errors, at the argument's column


@pytest.mark.parametrize("body,message", [
    ("out h = linear(maxpool(attention(linear(obs.b, 4), 2, 2)), 1)",
     "t.spec:9:34: error: attention needs an entity set, got vector of width 4"),
    ("out h = linear(maxpool(attention(obs.e, 0, 2)), 1)",
     "t.spec:9:41: error: attention heads must be a positive whole number, got 0"),
    ("out h = pointer(obs.e, obs.e, 2)",
     "t.spec:9:17: error: pointer needs a plain vector, got entity set e (pool it first)"),
    ("out h = pointer(obs.b, obs.b, 2)",
     "t.spec:9:24: error: pointer scores the entities of a set, got group b"),
    ("s = pointer(obs.b, obs.e, 2)\nout h = linear(s, 1)",
     "t.spec:9:5: error: pointer makes an output head: write `out s = ...`"),
    ("out s = pointer(obs.b, obs.e, 2)\nout h = linear(s, 1)",
     "t.spec:10:16: error: pointer makes an output head, which no op may read "
     "(its scores are -inf at padding entities)"),
    ("out h = gru(obs.e, 2)", "t.spec:9:13: error: gru needs a plain vector, got entity set e (pool it first)"),
    ("out h = dropout(obs.b, 1.0)", "t.spec:9:24: error: dropout p is a probability below 1, got 1"),
    ("out h = linear(obs.b, 0.5)", "t.spec:9:23: error: linear takes whole numbers, got 0.5"),
])
def test_argument_errors(body, message):
    with pytest.raises(SpecError) as refused:
        graph_of(body)
    assert refused.value.render().splitlines()[0] == message


def test_a_decimal_survives_the_canonical_text():
    from specsurgery.spec.canonical import canonical

    spec = load_text(SCHEMA + "model m(obs: s) {\n  out h = dropout(obs.b, 0.125)\n  out g = dropout(obs.b, 1e-05)\n}\n",
                     "t.spec").model()
    text = canonical(spec)
    assert "dropout(obs.b, 0.125)" in text and "dropout(obs.b, 1e-05)" in text
    assert canonical(load_text(text, "c.spec").model()) == text
