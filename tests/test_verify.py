"""ss.verify's states: drawn into the inputs, carried to the new schema column
for column, streamed in batches that change nothing but memory."""
from __future__ import annotations

import copy
import math
import random

import torch

import specsurgery as ss
from specsurgery.features import random_record
from specsurgery.spec.load import load_text
from specsurgery.surgery.diff import find_renames
from specsurgery.surgery.verify import _carry, carry_plan, verify_models

from test_api_surgery import trained

OLD = """schema s {
  vocab kinds = [a, b, c]
  group g {
    x: float
    n: int
    k: category(kinds)
  }
  group units[4] {
    hp: float
    kind: category(kinds)
  }
}

model m(obs: s) {
  u = maxpool(relu(linear(concat(obs.units, embed(obs.units.kind, 2)), 3)))
  out score = linear(concat(obs.g, embed(obs.g.k, 2), u), 2)
  out target = pointer(linear(obs.g, 3), obs.units, 3)
}
"""
# x renamed, b renamed and an item put first, a new unit feature, a larger entity set
NEW = (OLD.replace("    x: float\n", "    speed: float was x\n")
       .replace("[a, b, c]", "[z, a, bee was b, c]")
       .replace("units[4] {\n    hp: float\n", "units[6] {\n    hp: float\n    mp: float\n"))


def old_records(n: int, seed: int = 0) -> list:
    rng = random.Random(seed)
    return [random_record(load_text(OLD).model().schema, rng) for _ in range(n)]


def test_states_are_carried_column_for_column():
    old = ss.compile(OLD)
    new = ss.compile(NEW)
    os_, ns = old._ss_graph.spec, new._ss_graph.spec
    records = old_records(40)
    inputs = old.featurise(records)
    carried = new.inputs(_carry(inputs, carry_plan(os_.schema, ns.schema, find_renames(os_, ns)),
                                torch.Generator().manual_seed(0), torch.float32))
    assert torch.equal(carried["g"], inputs["g"])  # speed (was x), n: the same columns
    new_items = {"a": 1, "b": 2, "c": 3}
    assert carried["g.k"].tolist() == [new_items[r["g"]["k"]] for r in records]
    mask = carried["units#mask"]
    assert mask.shape == (40, 6) and torch.equal(mask[:, :4], inputs["units#mask"]) and not mask[:, 4:].any()
    assert torch.equal(carried["units"][..., :4, 0], inputs["units"][..., 0])  # hp
    assert not carried["units"][..., 4:, :].any()  # padding stays zero
    assert not (carried["units"][..., 1] * (1 - mask)).any()  # mp is random on real units only
    kinds = [[new_items[u["kind"]] for u in r["units"]] + [0] * (6 - len(r["units"])) for r in records]
    assert carried["units.kind"].tolist() == kinds



def test_groups_the_new_version_keeps_as_they_are_are_carried_whole():
    extra = OLD.replace("  group units[4] {", "  group extra {\n    y: float\n    on: bool\n  }\n  group units[4] {")
    old, new = ss.compile(OLD), ss.compile(extra)
    os_, ns = old._ss_graph.spec, new._ss_graph.spec
    plan = carry_plan(os_.schema, ns.schema, find_renames(os_, ns))
    assert [c.as_is for c in plan.groups] == [True, False, True]  # g, extra (new), units
    records = old_records(8)
    inputs = old.featurise(records)
    carried = new.inputs(_carry(inputs, plan, torch.Generator().manual_seed(0), torch.float32))
    for key in ("g", "g.k", "units", "units.kind", "units#mask"):
        assert torch.equal(carried[key], inputs[key]), key
    assert carried["extra"].shape == (8, 2) and set(carried["extra"][:, 1].tolist()) <= {0.0, 1.0}

def test_a_preserving_surgery_verifies_on_random_states_and_on_records():
    old = trained(OLD)
    new = ss.surgery(old, NEW).model
    v = ss.verify(old, new, states=64)
    assert v.ok and set(v.max_diff) == {"score", "target"}, v
    assert ss.verify(old, new, records=old_records(16)).ok
    # the pointer's padding scores are -inf on both sides, and equal
    assert v.max_diff["target"] < 1e-6 and math.isfinite(v.max_diff["target"])


def test_a_moved_weight_is_found():
    old = trained(OLD)
    new = ss.surgery(old, NEW).model
    with torch.no_grad():
        new.score.linear.weight[:, 0] += 1.0  # what reads speed (was x)
    v = ss.verify(old, new, states=32)
    assert not v.ok and v.max_diff["score"] > 0.1 and v.max_diff["target"] < 1e-6


def test_batches_change_nothing_but_memory():
    old = trained(OLD)
    lossy = ss.surgery(old, OLD.replace("    x: float\n", ""), allow_lossy=True).model  # nothing new is drawn
    records = old_records(23)
    found = [verify_models(old, lossy, records=records, batch=b).max_diff for b in (1, 5, 23)]
    assert found[0]["score"] > 0.1
    for other in found[1:]:  # the same maximum (a float32 matmul rounds a batch of 1 its own way)
        assert other.keys() == found[0].keys()
        assert all(math.isclose(other[h], found[0][h], rel_tol=1e-6) for h in other)


# A recurrence added beside a head that never meets it (h): the new model runs one
# step at a time, the old one ran all steps at once, and float32 matmuls of other
# shapes round otherwise (h came 3.7e-5 apart: verify said the function changed).
NO_TIME = """schema s {
  group t {
    n: int
    b: bool
  }
  group u[4] {
    f: bool
  }
}

model m(obs: s) {
  m = linear(obs.t, 3)
  out o = linear(m, 1)
  e = linear(obs.u.f, 11)
  out h = add(sumpool(linear(e, 9)), linear(layernorm(gelu(obs.t)), 9))
}
"""


def test_a_model_without_a_time_axis_runs_step_by_step_beside_a_recurrent_one():
    old = trained(NO_TIME, seed=0)
    new = ss.surgery(old, NO_TIME.replace("  out o = linear(m, 1)", "  r = add(m, lstm(m, 3))\n  out o = linear(r, 1)")).model
    v = ss.verify(old, new, states=300)
    assert v.steps == 3 and v.max_diff == {"o": 0.0, "h": 0.0}, v
    # a group of categories only: its numbers are a tensor of 0 elements (found by the random sequences)
    with_kinds = NO_TIME.replace("  group u[4] {", "  vocab kinds = [p, q]\n  group c {\n    k: category(kinds)\n  }\n  group u[4] {")
    with_kinds = with_kinds.replace("  out o = linear(m, 1)", "  out o = linear(concat(m, onehot(obs.c.k)), 1)")
    old = trained(with_kinds, seed=0)
    new = ss.surgery(old, with_kinds.replace("linear(concat(m, onehot(obs.c.k)), 1)",
                                             "linear(concat(add(m, lstm(m, 3)), onehot(obs.c.k)), 1)")).model
    assert ss.verify(old, new, states=30).max_diff == {"o": 0.0, "h": 0.0}


RECURRENT = """schema s {
  group g {
    x: float
    n: int
  }
}

model m(obs: s) {
  core = lstm(obs.g, 4)
  out o = linear(core, 2)
}
"""


def test_the_recurrent_state_goes_from_step_to_step():
    """States go through one step at a time: what the recurrence reads only from the
    second step on (weight_hh: the state starts at zero) is found, by as much as the
    models differ run over whole sequences."""
    old = ss.compile(RECURRENT, seed=0)
    new = copy.deepcopy(old)
    with torch.no_grad():
        new.core.lstm.weight_hh += 0.5
    assert verify_models(old, new, states=8, steps=1).max_diff == {"o": 0.0}
    assert not verify_models(old, new, states=8, steps=3).ok
    rng = random.Random(0)
    records = [[random_record(load_text(RECURRENT).model().schema, rng) for _ in range(3)] for _ in range(7)]
    found = verify_models(old, new, records=records, batch=3).max_diff["o"]
    with torch.inference_mode():
        whole = (old(old.featurise(records))["o"].double() - new(new.featurise(records))["o"].double()).abs().max()
    assert found > 0.01 and math.isclose(found, whole.item(), rel_tol=1e-6)
