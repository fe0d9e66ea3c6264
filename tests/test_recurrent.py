"""Recurrent models run step by step: model.initial_state, model(inputs, state=s)
-> (heads, new_state), and T calls of one step give exactly one call over T steps."""
from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import specsurgery as ss
from specsurgery.features import random_record
from specsurgery.ir import build_graph
from specsurgery.model import Model
from specsurgery.spec.load import load_text

from strategies import specs

REPO = Path(__file__).resolve().parents[1]


def sequences(model, batch: int, steps: int, seed: int = 0) -> list:
    schema = load_text(model.spec).model().schema
    rng = random.Random(seed)
    return [[random_record(schema, rng, 3) for _ in range(steps)] for _ in range(batch)]


def step_by_step(model, inputs: dict, state: dict):
    steps = next(iter(inputs.values())).shape[1]
    outs = []
    for t in range(steps):
        heads, state = model({k: v[:, t:t + 1] for k, v in inputs.items()}, state=state)
        outs.append(heads)
    return {h: torch.cat([o[h] for o in outs], dim=1) for h in model.heads}, state


@pytest.fixture(scope="module")
def policy():
    return ss.compile(str(REPO / "specs" / "policy.spec"), seed=2)


def test_initial_state_is_zero_and_keyed_by_statement(policy):
    state = policy.initial_state(3)
    assert list(state) == ["core"] and list(state["core"]) == ["lstm.h", "lstm.c"]
    assert all(t.shape == (3, 512) and not t.any() for t in state["core"].values())


def test_step_by_step_equals_the_whole_sequence_exactly(policy, one_thread):
    inputs = policy.featurise(sequences(policy, 2, 5))
    whole = policy(inputs)
    assert whole["action"].shape == (2, 5, 9)
    stepped, state = step_by_step(policy, inputs, policy.initial_state(2))
    for head in policy.heads:
        assert torch.equal(stepped[head], whole[head])
    # one call with a state gives the heads and the state the steps reached
    heads, final = policy(inputs, state=policy.initial_state(2))
    assert torch.equal(heads["action"], whole["action"])
    for key in final["core"]:
        assert torch.equal(final["core"][key], state["core"][key])


def test_state_carries_across_calls(policy, one_thread):
    inputs = policy.featurise(sequences(policy, 2, 4, seed=1))
    first = {k: v[:, :2] for k, v in inputs.items()}
    second = {k: v[:, 2:] for k, v in inputs.items()}
    _, mid = policy(first, state=policy.initial_state(2))
    heads, _ = policy(second, state=mid)
    assert torch.equal(heads["value"], policy(inputs)["value"][:, 2:])
    fresh, _ = policy(second, state=policy.initial_state(2))
    assert not torch.equal(fresh["value"], heads["value"])


def test_gradients_flow_through_the_state(policy):
    inputs = policy.featurise(sequences(policy, 2, 2))
    state = {k: {n: t.requires_grad_() for n, t in v.items()} for k, v in policy.initial_state(2).items()}
    heads, _ = policy(inputs, state=state)
    heads["value"].sum().backward()
    assert state["core"]["lstm.h"].grad is not None and state["core"]["lstm.h"].grad.abs().sum() > 0


def test_state_mistakes(policy):
    inputs = policy.featurise(sequences(policy, 2, 1))
    with pytest.raises(ss.UserError, match=r"state= must be a dict keyed by \['core'\]"):
        policy(inputs, state={"trunk": {}})
    with pytest.raises(ss.UserError, match=r"state\['core'\] has no 'lstm.c'"):
        policy(inputs, state={"core": {"lstm.h": torch.zeros(2, 512)}})
    feed_forward = ss.compile("schema s {\n  group g {\n    x: float\n  }\n}\nmodel m(obs: s) {\n  out h = linear(obs.g, 2)\n}\n")
    with pytest.raises(ss.UserError, match="model m has no recurrent op, so no state"):
        feed_forward.initial_state(2)
    with pytest.raises(ss.UserError, match="model m has no recurrent state: call it without state="):
        feed_forward(feed_forward.featurise([{"g": {"x": 1.0}}]), state={})


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(specs().filter(lambda pair: build_graph(pair[1]).has_time), st.integers(0, 2 ** 16))
def test_step_by_step_equals_the_whole_sequence_on_random_recurrent_specs(pair, seed):
    _, spec = pair
    model = Model(build_graph(spec), seed=seed % 97).eval()  # eval: dropout draws no noise
    rng = random.Random(seed)
    recs = [[random_record(spec.schema, rng) for _ in range(3)] for _ in range(2)]
    inputs = model.featurise(recs)
    whole = model(inputs)
    stepped, _ = step_by_step(model, inputs, model.initial_state(2))
    for head in model.heads:
        assert torch.equal(stepped[head], whole[head]), head


def test_an_lstm_computes_what_torch_nn_lstm_computes():
    """The cell is written out (torch.lstm on CPU copies its weights into oneDNN's
    layout at every call); it must stay PyTorch's LSTM, state included."""
    text = ("schema s {\n  group g {\n    x: float\n    y: float\n  }\n}\n"
            "model m(obs: s) {\n  out core = lstm(obs.g, 3)\n}\n")
    model = ss.compile(text, seed=4).double()
    reference = torch.nn.LSTM(2, 3, batch_first=True).double()
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(reference, f"{name}_l0").copy_(getattr(model.core.lstm, name))
        x = torch.randn(4, 5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        start = model.initial_state(4)
        start["core"]["lstm.h"] += 0.5
        heads, state = model({"g": x}, state=start)
        expected, (h, c) = reference(x, (start["core"]["lstm.h"][None], start["core"]["lstm.c"][None]))
    assert torch.allclose(heads["core"], expected, rtol=0, atol=1e-12)
    assert torch.allclose(state["core"]["lstm.h"], h[0], rtol=0, atol=1e-12)
    assert torch.allclose(state["core"]["lstm.c"], c[0], rtol=0, atol=1e-12)
