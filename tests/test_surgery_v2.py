"""Surgery scenarios for the version 2 ops, one per row of the language's
surgery table that names them, in the style of test_surgery_scenarios.py:
exact counts worked out by hand, exact tensors, and the function checked on
1,000 random states (3 steps each: the model has a gru).

Parameter sizes of the base model, for the arithmetic below:

ENT (model agent)                                         total 420
  u.linear.weight/bias      [4, 4] + [4]        = 20    cols: x, y | worker, soldier
  t.attention.{q,k,v}_weight [4, 6] x 3         = 72    cols: u 0..3 | x, y
  t.attention.{q,k,v}_bias  [4] x 3             = 12    rows: head 0 d 0..1, head 1 d 0..1
  t.attention.out_weight    [4, 4]              = 16
  t.attention.out_bias      [4]                 = 4
  t.linear.weight/bias      [4, 4] + [4]        = 20
  me.linear.weight/bias     [3, 2] + [3]        = 9     cols: hp, gold
  core.gru.weight_ih        [15, 7]             = 105   cols: me 0..2 | maxpool(t) 0..3
  core.gru.weight_hh        [15, 5]             = 75
  core.gru.bias_ih/hh       [15] x 2            = 30
  target.pointer.q_weight/bias [3, 7] + [3]     = 24    cols: core 0..4 | hp, gold
  target.pointer.k_weight/bias [3, 6] + [3]     = 21    cols: t 0..3 | x, y
  act.linear.weight/bias    [2, 5] + [2]        = 12
"""
from __future__ import annotations

import math
import pathlib

import pytest
import torch

try:  # tests/ as a package or as a rootdir-relative folder
    from .surgery_helpers import NEW_FILE, check, edit, line_of, run_surgery
except ImportError:
    from surgery_helpers import NEW_FILE, check, edit, line_of, run_surgery

pytestmark = pytest.mark.usefixtures("one_thread")

ENT = """\
schema w {
  vocab kinds = [worker, soldier]
  group me {
    hp: float
    gold: float
  }
  group units[4] {
    x: float
    y: float
    kind: category(kinds)
  }
}

model agent(obs: w) {
  u = linear(concat(obs.units, onehot(obs.units.kind)), 4)
  t = add(u, linear(attention(concat(u, obs.units), 2, 2), 4))
  me = dropout(relu(linear(obs.me, 3)), 0.1)
  core = gru(concat(me, maxpool(t)), 5)
  out target = pointer(concat(core, obs.me), concat(t, obs.units), 3)
  out act = linear(core, 2)
}
"""

ATTENTION = "t = add(u, linear(attention(concat(u, obs.units), 2, 2), 4))"
POINTER = "out target = pointer(concat(core, obs.me), concat(t, obs.units), 3)"


@pytest.fixture(scope="module")
def surgery(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("surgery_v2"))
    return lambda old, new: run_surgery(old, new, folder)


def test_base_model_is_what_the_arithmetic_assumes(surgery):
    check(surgery(ENT, ENT), old_params=420, new_params=420, transferred=420, zeroed=0, fresh=0, dropped=0,
          preserving=True)


def test_add_a_head_to_attention(surgery):
    new = edit(ENT, (ATTENTION, ATTENTION.replace("2, 2)", "3, 2)")))
    # width 4 -> 6. q, k, v: 2 new rows each, fresh in all 6 columns, and their
    # biases: 3 x (12 + 2) = 42 fresh. out_weight [6, 6]: old rows x new head
    # columns 4 x 2 = 8 zero, new rows 2 x 6 = 12 fresh; out_bias 2 fresh.
    # t.linear reads the 2 new output units: 4 x 2 = 8 zero.
    # new = 420 + 42 + 20 + 2 + 8 = 492; zeroed 16, fresh 56.
    o = surgery(ENT, new)
    check(o, old_params=420, new_params=492, transferred=420, zeroed=16, fresh=56, dropped=0, preserving=True)
    old, now = o.old, o.new
    for p in ("q", "k", "v"):
        assert torch.equal(now[f"t.attention.{p}_weight"][:4], old[f"t.attention.{p}_weight"])
        assert torch.equal(now[f"t.attention.{p}_bias"][:4], old[f"t.attention.{p}_bias"])
        assert (now[f"t.attention.{p}_weight"][4:] != 0).all()  # the new head starts fresh
    out = now["t.attention.out_weight"]
    assert torch.equal(out[:4, :4], old["t.attention.out_weight"])
    assert torch.equal(out[:4, 4:], torch.zeros(4, 2))  # old output units do not read the new head
    assert (out[4:] != 0).all()  # new output units start fresh in every column
    assert torch.equal(now["t.linear.weight"][:, 4:], torch.zeros(4, 2))  # readers of new units: zero
    assert o.param("t.attention.out_weight").axes[1].old_indices() == [0, 1, 2, 3, -1, -1]


def test_change_head_dim_is_lossy(surgery):
    new = edit(ENT, (ATTENTION, ATTENTION.replace("2, 2)", "2, 3)")))
    # Head h keeps its first two rows (keyed by head): q rows [h0 d0..2, h1 d0..2]
    # take old rows [0, 1, -, 2, 3, -]. The counts are those of a new head, but
    # the scores' scale changed.
    o = surgery(ENT, new)
    check(o, old_params=420, new_params=492, transferred=420, zeroed=16, fresh=56, dropped=0, preserving=False,
          reasons=[("t.attention head_dim changed from 2 to 3: scores are scaled by 1/sqrt(head_dim)",
                    NEW_FILE, line_of(new, "attention("))])
    assert o.param("t.attention.q_weight").axes[0].old_indices() == [0, 1, -1, 2, 3, -1]


def test_change_pointer_dim_is_lossy(surgery):
    new = edit(ENT, (POINTER, POINTER.replace("3)", "4)")))
    # q_weight [4, 7]: 7 fresh, q_bias 1, k_weight [4, 6]: 6 fresh, k_bias 1: 15 fresh; 435.
    check(surgery(ENT, new), old_params=420, new_params=435, transferred=420, zeroed=0, fresh=15, dropped=0,
          preserving=False,
          reasons=[("target.pointer dim changed from 3 to 4: scores are scaled by 1/sqrt(dim)",
                    NEW_FILE, line_of(new, "pointer("))])


def test_widen_gru(surgery):
    new = edit(ENT, ("core = gru(concat(me, maxpool(t)), 5)", "core = gru(concat(me, maxpool(t)), 7)"))
    # rows 15 -> 21 (r, z, n blocks of 7; 5 old units each). weight_ih: 6 new rows x 7 = 42 fresh.
    # weight_hh [21, 7]: old rows x new hidden columns 15 x 2 = 30 zero, new rows 6 x 7 = 42 fresh.
    # biases: 6 + 6 fresh. Readers of the 2 new units: pointer q_weight 3 x 2, act 2 x 2 zero.
    # new = 420 + 42 + 72 + 12 + 6 + 4 = 556; zeroed 40, fresh 96.
    o = surgery(ENT, new)
    check(o, old_params=420, new_params=556, transferred=420, zeroed=40, fresh=96, dropped=0, preserving=True)
    rows = o.param("core.gru.weight_hh").axes[0].old_indices()
    assert rows == [0, 1, 2, 3, 4, -1, -1, 5, 6, 7, 8, 9, -1, -1, 10, 11, 12, 13, 14, -1, -1]
    assert torch.equal(o.new["core.gru.weight_hh"][[0, 7, 14]][:, 5:], torch.zeros(3, 2))


def test_raise_an_entity_cap(surgery):
    new = edit(ENT, ("  group units[4] {\n", "  group units[6] {\n"))
    # No parameter changes shape: 420 copied. The pointer gains two scores.
    o = surgery(ENT, new)
    check(o, old_params=420, new_params=420, transferred=420, zeroed=0, fresh=0, dropped=0, preserving=True)
    assert all(p.action == "copied" for p in o.plan.params)


def test_a_new_unit_feature_starts_at_zero_in_attention_and_the_pointer(surgery):
    new = edit(ENT, ("    y: float\n", "    y: float\n    hp: float\n"))
    # units.hp is a new column of u.linear (4), of q, k and v (4 each) and of the
    # pointer's k_weight (3): 19 zero; 439.
    o = surgery(ENT, new)
    check(o, old_params=420, new_params=439, transferred=420, zeroed=19, fresh=0, dropped=0, preserving=True)
    for p in ("q", "k", "v"):
        weight = o.new[f"t.attention.{p}_weight"]
        assert weight.shape == (4, 7) and torch.equal(weight[:, 6], torch.zeros(4))
        assert torch.equal(weight[:, :6], o.old[f"t.attention.{p}_weight"])
    assert torch.equal(o.new["target.pointer.k_weight"][:, 6], torch.zeros(3))
    assert o.param("target.pointer.k_weight").axes[1].old_indices() == [0, 1, 2, 3, 4, 5, -1]


def test_a_new_query_feature_starts_at_zero_in_the_pointer(surgery):
    new = edit(ENT, ("    hp: float\n", "    hp: float\n    armor: float\n"))
    # me.hp, me.armor, me.gold: me.linear [3, 3] gains 3 zero, the pointer's q_weight [3, 8] 3 zero; 426.
    o = surgery(ENT, new)
    check(o, old_params=420, new_params=426, transferred=420, zeroed=6, fresh=0, dropped=0, preserving=True)
    assert o.param("target.pointer.q_weight").axes[1].old_indices() == [0, 1, 2, 3, 4, 5, -1, 6]
    assert torch.equal(o.new["target.pointer.q_weight"][:, 6], torch.zeros(3))


def test_adding_or_changing_a_dropout_moves_no_weight(surgery):
    new = edit(ENT, ("me = dropout(relu(linear(obs.me, 3)), 0.1)", "me = relu(dropout(linear(obs.me, 3), 0.5))"))
    o = surgery(ENT, new)
    check(o, old_params=420, new_params=420, transferred=420, zeroed=0, fresh=0, dropped=0, preserving=True)
    assert all(p.action == "copied" for p in o.plan.params)


# ---------------------------------------------------------------------------
# the example spec of specs/: new unit features and one more attention head

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_the_entity_transformer_example_surgery(surgery):
    old = (ROOT / "specs" / "entity_transformer.spec").read_text()
    new = (ROOT / "examples" / "entity_transformer_next.spec").read_text()
    o = surgery(old, new)
    s = o.plan.summary
    assert s.function_preserving and s.dropped == 0 and s.transferred == s.old_params
    # 2 new unit features: 2 columns of the unit encoder (64 x 2) and, in block 1,
    # a fifth head (16 rows) of q, k, v over 64 inputs plus biases, out_weight's
    # 16 new columns of 64 old rows (zero) and 16 new rows of 80 (fresh), and the
    # projection's 16 new columns (64 x 16, zero).
    assert (s.zeroed, s.fresh) == (64 * 2 + 64 * 16 + 64 * 16, 3 * (16 * 64 + 16) + 16 * 80 + 16)
    assert o.report["max"] < 1e-5 and math.isfinite(o.report["max"])
