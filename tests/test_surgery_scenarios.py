"""Surgery scenarios: one test per row of the spec language's change table
("What a spec change means for surgery"), mixed edits that make several of
those changes at once, weight-level checks, and the plan's JSON form.

Tests marked xfail(strict=True) are known bugs of specsurgery; each says what
the code does wrong and asserts what it should do.

Every scenario starts from a checkpoint with training-like weights (N(0, 0.5²)
everywhere, so biases are non-zero and layernorm weights are not 1), plans the
surgery, applies it and checks:

  * the exact transferred / zeroed / fresh / dropped counts (worked out by hand
    from the shapes; the arithmetic is in a comment at each test);
  * the exact `function_preserving` flag and, where it is False, each reason's
    message and the spec line it blames;
  * on 1,000 random states: max |old - new| < 1e-5 where the plan says the
    function is preserved, > 1e-5 where it says it is not (the change is real).

Parameter sizes of the two base models, for the arithmetic below:

BASE (model p, with an lstm: 3 steps per state)   total 910
  he.embed.weight       [3, 4]   = 12    rows: axe, bane, drow
  h.linear.weight       [8, 7]   = 56    cols: health, mana, level | he 0..3
  h.linear.bias         [8]      = 8
  u.linear.weight       [6, 4]   = 24    cols: x, y | creep, tower
  u.linear.bias         [6]      = 6
  core.lstm.weight_ih   [32, 14] = 448   cols: h 0..7 | u 0..5
  core.lstm.weight_hh   [32, 8]  = 256
  core.lstm.bias_ih/hh  [32] x 2 = 64
  a.linear.weight/bias  [3, 8] + [3] = 27
  v.linear.weight/bias  [1, 8] + [1] = 9

FF (model q, feed-forward with layernorm, add, mul)   total 272
  ie.embed.weight       [3, 3]   = 9     rows: sword, shield, potion
  m.linear.weight       [6, 7]   = 42    cols: hp, armor, gold, stunned | ie 0..2
  m.linear.bias         [6]      = 6
  f.linear.weight/bias  [5, 3] + [5] = 20   cols: dx, dy, hp
  j.layernorm.weight/bias [11] x 2 = 22  indices: m 0..5 | f 0..4
  r.proj.weight/bias    [6, 11] + [6] = 72
  pi.linear.weight/bias [4, 6] + [4] = 28
  val.gate.weight       [6, 11]  = 66
  val.linear.weight/bias [1, 6] + [1] = 7
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import jsonschema
import pytest
import torch

try:  # tests/ as a package or as a rootdir-relative folder
    from .surgery_helpers import NEW_FILE, OLD_FILE, TOL, check, edit, line_of, run_surgery
except ImportError:
    from surgery_helpers import NEW_FILE, OLD_FILE, TOL, check, edit, line_of, run_surgery

from specsurgery.surgery.plan import plan_json_schema

BASE = """\
schema s {
  vocab heroes = [axe, bane, drow]
  vocab kinds = [creep, tower]
  group hero {
    health: float
    mana: float
    level: int
    hero_id: category(heroes)
  }
  group units[4] {
    x: float
    y: float
    kind: category(kinds)
  }
}

model p(obs: s) {
  he = embed(obs.hero.hero_id, 4)
  h = relu(linear(concat(obs.hero, he), 8))
  uk = onehot(obs.units.kind)
  u = maxpool(relu(linear(concat(obs.units, uk), 6)))
  core = lstm(concat(h, u), 8)
  out a = linear(core, 3)
  out v = linear(core, 1)
}
"""

FF = """\
schema t {
  vocab items = [sword, shield, potion]
  group me {
    hp: float
    armor: float
    gold: int
    stunned: bool
    item: category(items)
  }
  group foes[3] {
    dx: float
    dy: float
    hp: float
  }
}

model q(obs: t) {
  ie = embed(obs.me.item, 3)
  m = tanh(linear(concat(obs.me, ie), 6))
  f = avgpool(relu(linear(obs.foes, 5)))
  j = layernorm(concat(m, f))
  r = add(linear(j, 6) as proj, m)
  out pi = linear(r, 4)
  out val = linear(mul(r, sigmoid(linear(j, 6, bias=false) as gate)), 1)
}
"""

# Edits used by several scenarios.
MANA = ("    mana: float\n", "    mana: float\n    armor: float\n")  # armor in the middle of hero
WIDEN_LSTM = ("core = lstm(concat(h, u), 8)", "core = lstm(concat(h, u), 12)")
RENAME_CORE = [("core = lstm(concat(h, u), 8)", "trunk was core = lstm(concat(h, u), 8)"),
               ("out a = linear(core, 3)", "out a = linear(trunk, 3)"),
               ("out v = linear(core, 1)", "out v = linear(trunk, 1)")]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def surgery(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("surgery"))
    return lambda old, new: run_surgery(old, new, folder)


def test_base_models_are_what_the_arithmetic_assumes(surgery):
    """Surgery onto the same spec copies everything and changes nothing."""
    check(surgery(BASE, BASE), old_params=910, new_params=910, transferred=910, zeroed=0, fresh=0, dropped=0,
          preserving=True)
    check(surgery(FF, FF), old_params=272, new_params=272, transferred=272, zeroed=0, fresh=0, dropped=0,
          preserving=True)


# ---------------------------------------------------------------------------
# add a feature


def test_add_feature_at_start_of_group(surgery):
    new = edit(BASE, ("    health: float\n", "    armor: float\n    health: float\n"))
    # h.linear.weight [8, 7] -> [8, 8]: 8 old units x 1 new input (armor) start at zero.
    # new = 910 + 8 = 918; transferred = 910 (every old element has a place).
    check(surgery(BASE, new), old_params=910, new_params=918, transferred=910, zeroed=8, fresh=0, dropped=0,
          preserving=True)


def test_add_feature_in_middle_of_group(surgery):
    new = edit(BASE, MANA)
    # as above: h.linear.weight gains column 2 (armor), 8 x 1 = 8 zeroed; 910 + 8 = 918.
    o = surgery(BASE, new)
    check(o, old_params=910, new_params=918, transferred=910, zeroed=8, fresh=0, dropped=0, preserving=True)
    p = o.param("h.linear.weight")
    assert (p.copied, p.zeroed, p.fresh) == (56, 8, 0)


def test_add_feature_at_end_of_group(surgery):
    new = edit(BASE, ("    hero_id: category(heroes)\n", "    hero_id: category(heroes)\n    armor: float\n"))
    # numeric features: health, mana, level, armor -> armor is column 3, the embedding moves to 4..7.
    # h.linear.weight [8, 8]: 8 x 1 zeroed; 910 + 8 = 918.
    o = surgery(BASE, new)
    check(o, old_params=910, new_params=918, transferred=910, zeroed=8, fresh=0, dropped=0, preserving=True)
    assert o.param("h.linear.weight").axes[1].old_indices() == [0, 1, 2, -1, 3, 4, 5, 6]


def test_add_feature_to_entity_set(surgery):
    new = edit(BASE, ("    x: float\n", "    hp: float\n    x: float\n"))
    # u.linear.weight [6, 4] -> [6, 5] (cols hp, x, y | creep, tower): 6 x 1 zeroed; 910 + 6 = 916.
    o = surgery(BASE, new)
    check(o, old_params=910, new_params=916, transferred=910, zeroed=6, fresh=0, dropped=0, preserving=True)
    assert o.param("u.linear.weight").axes[1].old_indices() == [-1, 0, 1, 2, 3]


def test_add_category_feature_that_nothing_reads(surgery):
    new = edit(BASE, ("    kind: category(kinds)\n", "    kind: category(kinds)\n    owner: category(heroes)\n"))
    # units.owner=* are new features no op reads: nothing changes. 910 of 910 copied.
    check(surgery(BASE, new), old_params=910, new_params=910, transferred=910, zeroed=0, fresh=0, dropped=0,
          preserving=True)


# ---------------------------------------------------------------------------
# remove a feature


def test_remove_feature_that_was_read(surgery):
    new = edit(BASE, ("    mana: float\n", ""))
    # h.linear.weight [8, 7] -> [8, 6]: the mana column (8 elements) is dropped.
    # new = transferred = 910 - 8 = 902.
    check(surgery(BASE, new), old_params=910, new_params=902, transferred=902, zeroed=0, fresh=0, dropped=8,
          preserving=False,
          reasons=[("feature hero.mana was removed, but h.linear read it: the function changes wherever it was non-zero",
                    OLD_FILE, line_of(BASE, "mana: float"))])


def test_remove_feature_from_entity_set(surgery):
    new = edit(FF, ("    dy: float\n", ""))
    # f.linear.weight [5, 3] -> [5, 2]: the dy column (5 elements) is dropped; 272 - 5 = 267.
    check(surgery(FF, new), old_params=272, new_params=267, transferred=267, zeroed=0, fresh=0, dropped=5,
          preserving=False,
          reasons=[("feature foes.dy was removed, but f.linear read it: the function changes wherever it was non-zero",
                    OLD_FILE, line_of(FF, "dy: float"))])


# A schema where some features are never read: stats.deaths (only obs.stats.kills
# is read) and hero.rank (a category no embed / onehot reads).
UNREAD = edit(BASE,
              ("    hero_id: category(heroes)\n", "    hero_id: category(heroes)\n    rank: category(kinds)\n"),
              ("  group units[4] {", "  group stats {\n    deaths: int\n    kills: int\n  }\n  group units[4] {"),
              ("concat(obs.hero, he)", "concat(obs.hero, he, obs.stats.kills)"))
# UNREAD: h.linear.weight is [8, 8] (cols health, mana, level | he 0..3 | kills): 910 + 8 = 918.


def test_remove_numeric_feature_never_read(surgery):
    new = edit(UNREAD, ("    deaths: int\n", ""))
    # No parameter ever met stats.deaths: everything is copied, the function is preserved
    # (kills moves from column 1 to column 0 of its group; the model reads it by name).
    check(surgery(UNREAD, new), old_params=918, new_params=918, transferred=918, zeroed=0, fresh=0, dropped=0,
          preserving=True)


def test_remove_category_feature_never_read(surgery):
    new = edit(UNREAD, ("    rank: category(kinds)\n", ""))
    # hero.rank=creep and hero.rank=tower met no parameter: all 918 copied, preserved.
    check(surgery(UNREAD, new), old_params=918, new_params=918, transferred=918, zeroed=0, fresh=0, dropped=0,
          preserving=True)


# ---------------------------------------------------------------------------
# reorder


def test_reorder_features(surgery):
    new = edit(BASE, ("    health: float\n    mana: float\n    level: int\n",
                      "    level: int\n    health: float\n    mana: float\n"))
    # h.linear.weight columns permuted (health, mana, level -> level, health, mana): 910 of 910 copied.
    o = surgery(BASE, new)
    check(o, old_params=910, new_params=910, transferred=910, zeroed=0, fresh=0, dropped=0, preserving=True)
    assert o.param("h.linear.weight").axes[1].old_indices() == [2, 0, 1, 3, 4, 5, 6]


def test_reorder_vocab_items(surgery):
    new = edit(BASE, ("[axe, bane, drow]", "[drow, axe, bane]"))
    # he.embed.weight rows permuted: 910 of 910 copied.
    o = surgery(BASE, new)
    check(o, old_params=910, new_params=910, transferred=910, zeroed=0, fresh=0, dropped=0, preserving=True)
    assert o.param("he.embed.weight").axes[0].old_indices() == [2, 0, 1]


def test_reorder_groups(surgery):
    hero = BASE[BASE.index("  group hero {"):BASE.index("  group units[4] {")]
    units = BASE[BASE.index("  group units[4] {"):BASE.index("}\n\nmodel")]
    new = edit(BASE, (hero + units, units + hero))
    # Groups are read by name: the input feature schema's order changes, no parameter does.
    check(surgery(BASE, new), old_params=910, new_params=910, transferred=910, zeroed=0, fresh=0, dropped=0,
          preserving=True)


def test_reorder_concat_arguments(surgery):
    new = edit(BASE, ("concat(h, u)", "concat(u, h)"))
    # core.lstm.weight_ih [32, 14] columns permuted (h 0..7 | u 0..5 -> u | h): 910 copied.
    o = surgery(BASE, new)
    check(o, old_params=910, new_params=910, transferred=910, zeroed=0, fresh=0, dropped=0, preserving=True)
    assert o.param("core.lstm.weight_ih").axes[1].old_indices() == list(range(8, 14)) + list(range(8))
    assert torch.equal(o.new["core.lstm.weight_ih"][:, :6], o.old["core.lstm.weight_ih"][:, 8:])
    assert torch.equal(o.new["core.lstm.weight_ih"][:, 6:], o.old["core.lstm.weight_ih"][:, :8])


def test_reorder_concat_under_layernorm(surgery):
    new = edit(FF, ("layernorm(concat(m, f))", "layernorm(concat(f, m))"))
    # The layernorm's weight/bias and the two readers of j (proj, gate) are permuted; mean and
    # variance do not depend on the order: 272 of 272 copied, preserved.
    check(surgery(FF, new), old_params=272, new_params=272, transferred=272, zeroed=0, fresh=0, dropped=0,
          preserving=True)


# ---------------------------------------------------------------------------
# grow a vocabulary


def test_grow_vocab_embed(surgery):
    new = edit(BASE, ("[axe, bane, drow]", "[axe, lina, bane, drow]"))
    # he.embed.weight [3, 4] -> [4, 4]: the lina row (an input index of the embedding) reads a new
    # feature, so its 4 elements start at zero; the old rows move (bane 1 -> 2, drow 2 -> 3).
    # new = 910 + 4 = 914.
    o = surgery(BASE, new)
    check(o, old_params=910, new_params=914, transferred=910, zeroed=4, fresh=0, dropped=0, preserving=True)
    old, got = o.old["he.embed.weight"], o.new["he.embed.weight"]
    assert torch.equal(got[1], torch.zeros(4))
    assert torch.equal(got[[0, 2, 3]], old)


def test_grow_vocab_onehot(surgery):
    new = edit(BASE, ("[creep, tower]", "[creep, tower, courier]"))
    # onehot width 2 -> 3: u.linear.weight [6, 4] -> [6, 5], 6 x 1 zeroed; 910 + 6 = 916.
    check(surgery(BASE, new), old_params=910, new_params=916, transferred=910, zeroed=6, fresh=0, dropped=0,
          preserving=True)


# ---------------------------------------------------------------------------
# widen / narrow


def test_widen_linear(surgery):
    new = edit(BASE, ("relu(linear(concat(obs.hero, he), 8))", "relu(linear(concat(obs.hero, he), 10))"))
    # h.linear.weight [10, 7]: 56 copied, 2 new units x 7 = 14 fresh
    # h.linear.bias   [10]   : 8 copied, 2 fresh
    # core.lstm.weight_ih [32, 16]: 448 copied, 32 rows x 2 new inputs = 64 zeroed
    # new = 910 + 14 + 2 + 64 = 990; zeroed 64, fresh 16.
    o = surgery(BASE, new)
    check(o, old_params=910, new_params=990, transferred=910, zeroed=64, fresh=16, dropped=0, preserving=True)


def test_widen_lstm(surgery):
    new = edit(BASE, WIDEN_LSTM)
    # 8 -> 12 units: 4 gates x 4 new units = 16 new rows.
    # weight_ih [48, 14]: 32 x 14 = 448 copied, 16 x 14 = 224 fresh
    # weight_hh [48, 12]: 32 x 8 = 256 copied, 32 x 4 = 128 zeroed, 16 x 12 = 192 fresh
    # bias_ih, bias_hh [48]: 32 copied + 16 fresh each
    # a.linear.weight [3, 12]: 24 copied, 3 x 4 = 12 zeroed; v.linear.weight [1, 12]: 8 copied, 4 zeroed
    # zeroed = 128 + 12 + 4 = 144; fresh = 224 + 192 + 32 = 448; new = 910 + 144 + 448 = 1502.
    o = surgery(BASE, new)
    check(o, old_params=910, new_params=1502, transferred=910, zeroed=144, fresh=448, dropped=0, preserving=True)
    # The old rows of each gate block keep their gate: rows i 0..7 -> 0..7, f 8..15 -> 12..19, ...
    rows = o.param("core.lstm.weight_ih").axes[0].old_indices()
    for gate in range(4):
        assert rows[12 * gate:12 * gate + 12] == list(range(8 * gate, 8 * gate + 8)) + [-1] * 4


def test_widen_embed_dim(surgery):
    new = edit(BASE, ("embed(obs.hero.hero_id, 4)", "embed(obs.hero.hero_id, 6)"))
    # he.embed.weight [3, 6]: 12 copied, 3 items x 2 new dims = 6 fresh
    # h.linear.weight [8, 9]: 56 copied, 8 x 2 = 16 zeroed
    # new = 910 + 6 + 16 = 932.
    check(surgery(BASE, new), old_params=910, new_params=932, transferred=910, zeroed=16, fresh=6, dropped=0,
          preserving=True)


def test_widen_under_layernorm_is_reported(surgery):
    new = edit(FF, ("linear(obs.foes, 5)", "linear(obs.foes, 7)"))
    # f.linear.weight [7, 3]: 6 fresh; bias: 2 fresh; j.layernorm weight/bias [13]: 2 + 2 fresh
    # r.proj.weight [6, 13] and val.gate.weight [6, 13]: 6 x 2 zeroed each = 24
    # new = 272 + 12 + 24 = 308. A layernorm over a wider axis has another mean and variance:
    # the plan must say so (the table's "function preserved" cannot hold here).
    check(surgery(FF, new), old_params=272, new_params=308, transferred=272, zeroed=24, fresh=12, dropped=0,
          preserving=False,
          reasons=[("layernorm j.layernorm normalises over an axis that changed (11 -> 13 indices): "
                    "mean and variance change", NEW_FILE, line_of(FF, "j = layernorm"))])


def test_widen_two_linears_joined_by_add(surgery):
    old = edit(BASE, ("  core = lstm(concat(h, u), 8)",
                      "  z = add(linear(h, 5) as p1, linear(u, 5) as p2)\n  core = lstm(concat(h, u, z), 8)"))
    new = edit(old, ("linear(h, 5) as p1, linear(u, 5) as p2", "linear(h, 7) as p1, linear(u, 7) as p2"))
    # old = 910 + p1 [5, 8] + [5] (45) + p2 [5, 6] + [5] (35) + weight_ih's 32 x 5 columns for z (160) = 1150
    # p1.weight [7, 8]: 2 x 8 = 16 fresh, bias 2 fresh; p2.weight [7, 6]: 2 x 6 = 12 fresh, bias 2 fresh
    # core.lstm.weight_ih [32, 8 + 6 + 7 = 21]: 32 x 2 = 64 zeroed
    # fresh 32, zeroed 64; new = 1150 + 96 = 1246.
    check(surgery(old, new), old_params=1150, new_params=1246, transferred=1150, zeroed=64, fresh=32, dropped=0,
          preserving=True)


def test_narrow_linear(surgery):
    new = edit(BASE, ("relu(linear(concat(obs.units, uk), 6))", "relu(linear(concat(obs.units, uk), 4))"))
    # u.linear.weight [4, 4]: 16 copied, 8 dropped; u.linear.bias [4]: 4 copied, 2 dropped
    # core.lstm.weight_ih [32, 12]: 384 copied, 32 x 2 = 64 dropped
    # dropped = 74; new = transferred = 910 - 74 = 836.
    check(surgery(BASE, new), old_params=910, new_params=836, transferred=836, zeroed=0, fresh=0, dropped=74,
          preserving=False,
          reasons=[("u.linear narrowed from 6 to 4 units", NEW_FILE, line_of(new, "u = maxpool")),
                   ("core.lstm no longer reads 2 of its old inputs (u.linear): their weights are dropped",
                    NEW_FILE, line_of(new, "core = lstm"))])


def test_narrow_lstm(surgery):
    new = edit(BASE, ("core = lstm(concat(h, u), 8)", "core = lstm(concat(h, u), 6)"))
    # 8 -> 6 units: 4 gates x 2 = 8 rows go.
    # weight_ih [24, 14]: 336 copied, 112 dropped; weight_hh [24, 6]: 144 copied, 112 dropped
    # bias_ih, bias_hh [24]: 8 dropped each; a.linear.weight [3, 6]: 6 dropped; v.linear.weight [1, 6]: 2
    # dropped = 112 + 112 + 16 + 6 + 2 = 248; new = 910 - 248 = 662.
    check(surgery(BASE, new), old_params=910, new_params=662, transferred=662, zeroed=0, fresh=0, dropped=248,
          preserving=False,
          reasons=[("core.lstm narrowed from 8 to 6 units", NEW_FILE, line_of(new, "core = lstm")),
                   ("a.linear no longer reads 2 of its old inputs (core.lstm): their weights are dropped",
                    NEW_FILE, line_of(new, "out a =")),
                   ("v.linear no longer reads 2 of its old inputs (core.lstm): their weights are dropped",
                    NEW_FILE, line_of(new, "out v ="))])


# ---------------------------------------------------------------------------
# new statements and heads


def test_add_statement_feeding_existing_unit(surgery):
    new = edit(BASE, ("  core = lstm(concat(h, u), 8)", "  g = relu(linear(obs.hero, 4))\n  core = lstm(concat(h, u, g), 8)"))
    # g.linear.weight [4, 3] + bias [4] = 16 fresh
    # core.lstm.weight_ih [32, 18]: 448 copied, 32 x 4 = 128 zeroed (the path g -> core starts at zero)
    # new = 910 + 16 + 128 = 1054.
    o = surgery(BASE, new)
    check(o, old_params=910, new_params=1054, transferred=910, zeroed=128, fresh=16, dropped=0, preserving=True)
    assert torch.equal(o.new["core.lstm.weight_ih"][:, 14:], torch.zeros(32, 4))
    assert o.new["g.linear.weight"].abs().sum() > 0


def test_add_head(surgery):
    new = edit(BASE, ("  out v = linear(core, 1)\n", "  out v = linear(core, 1)\n  out w = linear(core, 2)\n"))
    # w.linear.weight [2, 8] + bias [2] = 18 fresh; 910 + 18 = 928.
    check(surgery(BASE, new), old_params=910, new_params=928, transferred=910, zeroed=0, fresh=18, dropped=0,
          preserving=True)


def test_add_statement_joined_by_add_keeps_old_weights(surgery):
    """A new statement added onto an old value (the language's "new branch joined by
    add" row): h flows on through add(h, g), so its readers keep their weights, and
    g, the branch's last parameterised op, starts at zero: add(h, 0) is h."""
    new = edit(BASE, ("  core = lstm(concat(h, u), 8)", "  g = linear(obs.hero, 8)\n  hs = add(h, g)\n  core = lstm(concat(hs, u), 8)"))
    o = surgery(BASE, new)
    # g.linear [8, 3] + [8] = 32 zero; every old element keeps its place: 910 copied, 0 dropped,
    # new = 910 + 32 = 942.
    check(o, old_params=910, new_params=942, transferred=910, zeroed=32, fresh=0, dropped=0, preserving=True)
    assert torch.equal(o.new["g.linear.weight"], torch.zeros(8, 3))
    assert torch.equal(o.new["g.linear.bias"], torch.zeros(8))
    assert torch.equal(o.new["core.lstm.weight_ih"], o.old["core.lstm.weight_ih"])


# ---------------------------------------------------------------------------
# renames


def test_rename_feature(surgery):
    new = edit(BASE, ("    mana: float\n", "    mp: float was mana\n"))
    o = surgery(BASE, new)
    check(o, old_params=910, new_params=910, transferred=910, zeroed=0, fresh=0, dropped=0, preserving=True)
    assert torch.equal(o.new["h.linear.weight"], o.old["h.linear.weight"])


def test_rename_feature_without_was_is_remove_plus_add(surgery):
    new = edit(BASE, ("    mana: float\n", "    mp: float\n"))
    # h.linear.weight [8, 7]: the mana column (8) dropped, the mp column (8) zeroed; 910 - 8 + 8 = 910.
    check(surgery(BASE, new), old_params=910, new_params=910, transferred=902, zeroed=8, fresh=0, dropped=8,
          preserving=False,
          reasons=[("feature hero.mana was removed, but h.linear read it: the function changes wherever it was non-zero",
                    OLD_FILE, line_of(BASE, "mana: float"))])


def test_rename_group(surgery):
    new = edit(BASE, ("  group hero {", "  group heroes was hero {"),
               ("obs.hero.hero_id", "obs.heroes.hero_id"), ("concat(obs.hero, he)", "concat(obs.heroes, he)"))
    check(surgery(BASE, new), old_params=910, new_params=910, transferred=910, zeroed=0, fresh=0, dropped=0,
          preserving=True)


def test_rename_vocab_item(surgery):
    new = edit(BASE, ("[axe, bane, drow]", "[axe, bane, drowranger was drow]"))
    o = surgery(BASE, new)
    check(o, old_params=910, new_params=910, transferred=910, zeroed=0, fresh=0, dropped=0, preserving=True)
    assert torch.equal(o.new["he.embed.weight"], o.old["he.embed.weight"])


def test_rename_statement(surgery):
    new = edit(BASE, *RENAME_CORE)
    o = surgery(BASE, new)
    check(o, old_params=910, new_params=910, transferred=910, zeroed=0, fresh=0, dropped=0, preserving=True)
    assert not any(name.startswith("core.") for name in o.new)
    for p in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
        assert torch.equal(o.new[f"trunk.lstm.{p}"], o.old[f"core.lstm.{p}"])


def test_rename_head(surgery):
    new = edit(BASE, ("out a = linear(core, 3)", "out act was a = linear(core, 3)"))
    o = surgery(BASE, new)
    check(o, old_params=910, new_params=910, transferred=910, zeroed=0, fresh=0, dropped=0, preserving=True)
    assert set(o.report["heads"]) == {"act", "v"}
    assert torch.equal(o.new["act.linear.weight"], o.old["a.linear.weight"])


def test_rename_statement_without_was_restarts_it(surgery):
    new = edit(BASE, ("core = lstm", "trunk = lstm"), ("linear(core, 3)", "linear(trunk, 3)"),
               ("linear(core, 1)", "linear(trunk, 1)"))
    # trunk.lstm is a new op: 448 + 256 + 32 + 32 = 768 fresh, core.lstm's 768 dropped.
    # a.linear.weight [3, 8] and v.linear.weight [1, 8] now read new inputs: 24 + 8 = 32 zeroed,
    # and their old 32 dropped. transferred = 910 - 768 - 32 = 110 (he, h, u, the head biases).
    check(surgery(BASE, new), old_params=910, new_params=910, transferred=110, zeroed=32, fresh=768, dropped=800,
          preserving=False,
          reasons=[("a.linear no longer reads 8 of its old inputs (core.lstm): their weights are dropped",
                    NEW_FILE, line_of(new, "out a =")),
                   ("v.linear no longer reads 8 of its old inputs (core.lstm): their weights are dropped",
                    NEW_FILE, line_of(new, "out v ="))])


# ---------------------------------------------------------------------------
# output heads: widening and narrowing a head


def test_widen_head_plan(surgery):
    new = edit(BASE, ("out v = linear(core, 1)", "out v = linear(core, 2)"))
    # v.linear.weight [2, 8]: 8 copied, 8 fresh; bias [2]: 1 copied, 1 fresh; 910 + 9 = 919.
    check(surgery(BASE, new), old_params=910, new_params=919, transferred=910, zeroed=0, fresh=9, dropped=0,
          preserving=True, verify_states=False)


def test_widen_head_verifies(surgery):
    o = surgery(BASE, edit(BASE, ("out v = linear(core, 1)", "out v = linear(core, 2)")))
    assert o.report["max"] < TOL


def test_narrow_head_plan(surgery):
    new = edit(BASE, ("out a = linear(core, 3)", "out a = linear(core, 2)"))
    # a.linear.weight [2, 8]: 16 copied, 8 dropped; bias [2]: 2 copied, 1 dropped; 910 - 9 = 901.
    check(surgery(BASE, new), old_params=910, new_params=901, transferred=901, zeroed=0, fresh=0, dropped=9,
          preserving=False, verify_states=False,
          reasons=[("a.linear narrowed from 3 to 2 units", NEW_FILE, line_of(new, "out a =")),
                   ("output head a narrowed from 3 to 2", NEW_FILE, line_of(new, "out a ="))])


def test_narrow_head_verifies_the_outputs_that_remain(surgery):
    # The dropped output is gone (the plan says the function is not preserved);
    # the two that remain still compute what they did.
    o = surgery(BASE, edit(BASE, ("out a = linear(core, 3)", "out a = linear(core, 2)")))
    assert not o.plan.summary.function_preserving
    assert o.report["max"] < TOL


# A feature read by no parameter on its way to a head.
KILLS = edit(BASE, ("  group units[4] {", "  group stats {\n    deaths: int\n    kills: int\n  }\n  group units[4] {"),
             ("out v = linear(core, 1)", "out v = add(linear(core, 1), obs.stats.kills)"))


def test_remove_feature_read_without_parameters(surgery):
    new = edit(KILLS, ("    kills: int\n", ""), ("add(linear(core, 1), obs.stats.kills)", "linear(core, 1)"))
    o = surgery(KILLS, new)
    s = o.plan.summary
    # No parameter met stats.kills: 910 of 910 copied either way.
    assert (s.transferred, s.zeroed, s.fresh, s.dropped) == (910, 0, 0, 0)
    assert o.report["max"] > TOL  # the change is real: v lost + kills
    assert not s.function_preserving
    assert any("stats.kills" in r.message for r in s.reasons)


def test_change_elementwise_op_on_the_path(surgery):
    new = edit(BASE, ("h = relu(", "h = tanh("))
    # No parameter changes shape: 910 of 910 copied; but h computes something else now.
    o = surgery(BASE, new)
    check(o, old_params=910, new_params=910, transferred=910, zeroed=0, fresh=0, dropped=0, preserving=False,
          reasons=[(o.plan.summary.reasons[0].message, NEW_FILE, line_of(new, "core = lstm"))])
    assert re.fullmatch(r"core\.lstm reads h\.linear through a changed path \(an op around it changed\)",
                        o.plan.summary.reasons[0].message)


def test_plan_text_is_deterministic(tmp_path):
    (tmp_path / "old.spec").write_text(BASE)
    (tmp_path / "new.spec").write_text(edit(BASE, ("h = relu(", "h = tanh(")))
    outputs = set()
    procs = [_cli("plan", "old.spec", "new.spec", "--json", cwd=tmp_path, hash_seed=str(seed)) for seed in (1, 2, 3)]
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr
        outputs.add(stdout)
    assert len(outputs) == 1


# ---------------------------------------------------------------------------
# mixed changes: several rows of the table in one edit


def test_mixed_add_feature_widen_lstm_reorder_concat_rename_statement(surgery):
    new = edit(BASE, MANA, ("core = lstm(concat(h, u), 8)", "trunk was core = lstm(concat(u, h), 12)"),
               ("out a = linear(core, 3)", "out a = linear(trunk, 3)"), ("out v = linear(core, 1)", "out v = linear(trunk, 1)"))
    # h.linear.weight [8, 8]: 8 zeroed (armor)
    # trunk.lstm.weight_ih [48, 14] (cols u | h, permuted): 448 copied, 16 x 14 = 224 fresh
    # trunk.lstm.weight_hh [48, 12]: 256 copied, 32 x 4 = 128 zeroed, 16 x 12 = 192 fresh
    # biases: 16 + 16 fresh; a.linear.weight: 12 zeroed; v.linear.weight: 4 zeroed
    # zeroed = 8 + 128 + 12 + 4 = 152; fresh = 224 + 192 + 32 = 448; new = 910 + 152 + 448 = 1510.
    o = surgery(BASE, new)
    check(o, old_params=910, new_params=1510, transferred=910, zeroed=152, fresh=448, dropped=0, preserving=True)
    p = o.param("trunk.lstm.weight_ih")
    assert p.source == "core.lstm.weight_ih"
    assert p.axes[1].old_indices() == list(range(8, 14)) + list(range(8))


def test_mixed_grow_vocab_rename_item_widen_embed(surgery):
    new = edit(BASE, ("[axe, bane, drow]", "[lina, axe, bane, drowranger was drow]"),
               ("embed(obs.hero.hero_id, 4)", "embed(obs.hero.hero_id, 6)"))
    # he.embed.weight [4, 6]: 3 old rows x 4 old dims = 12 copied; lina row x 4 old dims = 4 zeroed;
    #   4 rows x 2 new dims = 8 fresh
    # h.linear.weight [8, 9]: 56 copied, 8 x 2 = 16 zeroed
    # zeroed 20, fresh 8; new = 910 + 20 + 8 = 938.
    o = surgery(BASE, new)
    check(o, old_params=910, new_params=938, transferred=910, zeroed=20, fresh=8, dropped=0, preserving=True)
    got, old = o.new["he.embed.weight"], o.old["he.embed.weight"]
    assert torch.equal(got[1:, :4], old)
    assert torch.equal(got[0, :4], torch.zeros(4))


def test_mixed_entity_feature_grow_onehot_widen_linear(surgery):
    new = edit(BASE, ("    kind: category(kinds)\n", "    kind: category(kinds)\n    hp: float\n"),
               ("[creep, tower]", "[creep, courier, tower]"),
               ("relu(linear(concat(obs.units, uk), 6))", "relu(linear(concat(obs.units, uk), 8))"))
    # u.linear.weight [8, 6] (cols x, y, hp | creep, courier, tower): 6 x 4 = 24 copied,
    #   6 old units x 2 new inputs = 12 zeroed, 2 new units x 6 = 12 fresh
    # u.linear.bias [8]: 6 copied, 2 fresh
    # core.lstm.weight_ih [32, 16]: 448 copied, 32 x 2 = 64 zeroed
    # zeroed 76, fresh 14; new = 910 + 76 + 14 = 1000.
    o = surgery(BASE, new)
    check(o, old_params=910, new_params=1000, transferred=910, zeroed=76, fresh=14, dropped=0, preserving=True)
    assert o.param("u.linear.weight").axes[1].old_indices() == [0, 1, -1, 2, -1, 3]


def test_mixed_reorder_features_and_groups_add_head_rename_group(surgery):
    hero = BASE[BASE.index("  group hero {"):BASE.index("  group units[4] {")]
    units = BASE[BASE.index("  group units[4] {"):BASE.index("}\n\nmodel")]
    heroes = edit(hero, ("  group hero {", "  group heroes was hero {"),
                  ("    health: float\n    mana: float\n    level: int\n", "    level: int\n    mana: float\n    health: float\n"))
    new = edit(BASE, (hero + units, units + heroes), ("obs.hero.hero_id", "obs.heroes.hero_id"),
               ("concat(obs.hero, he)", "concat(obs.heroes, he)"),
               ("  out v = linear(core, 1)\n", "  out v = linear(core, 1)\n  out w = linear(core, 2)\n"))
    # w.linear [2, 8] + [2] = 18 fresh; everything else copied (h.linear.weight permuted): 928.
    o = surgery(BASE, new)
    check(o, old_params=910, new_params=928, transferred=910, zeroed=0, fresh=18, dropped=0, preserving=True)
    assert o.param("h.linear.weight").axes[1].old_indices() == [2, 1, 0, 3, 4, 5, 6]


def test_mixed_remove_add_feature_widen(surgery):
    new = edit(BASE, ("    health: float\n    mana: float\n", "    armor: float\n    health: float\n"),
               ("relu(linear(concat(obs.hero, he), 8))", "relu(linear(concat(obs.hero, he), 10))"))
    # h.linear.weight [10, 7] (cols armor, health, level | he): 8 x 6 = 48 copied, 8 x 1 = 8 zeroed
    #   (armor), 2 x 7 = 14 fresh; the mana column, 8, dropped
    # h.linear.bias [10]: 8 copied, 2 fresh
    # core.lstm.weight_ih [32, 16]: 448 copied, 64 zeroed
    # transferred 910 - 8 = 902; zeroed 72; fresh 16; new = 902 + 72 + 16 = 990.
    check(surgery(BASE, new), old_params=910, new_params=990, transferred=902, zeroed=72, fresh=16, dropped=8,
          preserving=False,
          reasons=[("feature hero.mana was removed, but h.linear read it: the function changes wherever it was non-zero",
                    OLD_FILE, line_of(BASE, "mana: float"))])


def test_mixed_narrow_widen_add_head(surgery):
    new = edit(BASE, ("relu(linear(concat(obs.hero, he), 8))", "relu(linear(concat(obs.hero, he), 6))"),
               ("relu(linear(concat(obs.units, uk), 6))", "relu(linear(concat(obs.units, uk), 8))"),
               ("  out v = linear(core, 1)\n", "  out v = linear(core, 1)\n  out w = linear(core, 2)\n"))
    # h.linear.weight [6, 7]: 42 copied, 14 dropped; bias [6]: 6 copied, 2 dropped
    # u.linear.weight [8, 4]: 24 copied, 8 fresh; bias [8]: 6 copied, 2 fresh
    # core.lstm.weight_ih [32, 14] (h 0..5 | u 0..7): 32 x 12 = 384 copied, 32 x 2 = 64 zeroed (u 6, 7),
    #   32 x 2 = 64 dropped (h 6, 7)
    # w: 18 fresh
    # dropped = 14 + 2 + 64 = 80; transferred 830; zeroed 64; fresh 8 + 2 + 18 = 28; new = 922.
    check(surgery(BASE, new), old_params=910, new_params=922, transferred=830, zeroed=64, fresh=28, dropped=80,
          preserving=False,
          reasons=[("h.linear narrowed from 8 to 6 units", NEW_FILE, line_of(new, "h = relu")),
                   ("core.lstm no longer reads 2 of its old inputs (h.linear): their weights are dropped",
                    NEW_FILE, line_of(new, "core = lstm"))])


def test_mixed_rename_and_move_feature_add_feature_at_end(surgery):
    new = edit(BASE, ("    health: float\n    mana: float\n", "    mp: float was mana\n    health: float\n"),
               ("    hero_id: category(heroes)\n", "    hero_id: category(heroes)\n    armor: float\n"))
    # h.linear.weight [8, 8] (cols mp, health, level, armor | he): 8 zeroed (armor); 910 + 8 = 918.
    o = surgery(BASE, new)
    check(o, old_params=910, new_params=918, transferred=910, zeroed=8, fresh=0, dropped=0, preserving=True)
    assert o.param("h.linear.weight").axes[1].old_indices() == [1, 0, 2, -1, 3, 4, 5, 6]


def test_mixed_rename_head_new_statement_widen_linear(surgery):
    new = edit(BASE, ("relu(linear(concat(obs.hero, he), 8))", "relu(linear(concat(obs.hero, he), 10))"),
               ("  core = lstm(concat(h, u), 8)", "  g = relu(linear(obs.hero, 4))\n  core = lstm(concat(h, u, g), 8)"),
               ("out a = linear(core, 3)", "out act was a = linear(core, 3)"))
    # h.linear.weight [10, 7]: 14 fresh; bias: 2 fresh
    # g.linear [4, 3] + [4]: 16 fresh
    # core.lstm.weight_ih [32, 10 + 6 + 4 = 20]: 448 copied, 32 x 6 = 192 zeroed (h 8, 9 and g 0..3)
    # act.linear <- a.linear: copied. zeroed 192, fresh 32, new = 910 + 224 = 1134.
    check(surgery(BASE, new), old_params=910, new_params=1134, transferred=910, zeroed=192, fresh=32, dropped=0,
          preserving=True)


def test_mixed_ff_add_feature_grow_vocab_rename_statement_add_head(surgery):
    new = edit(FF, ("    armor: float\n", "    armor: float\n    mana: float\n"),
               ("[sword, shield, potion]", "[sword, shield, bow, potion]"),
               ("  m = tanh(", "  mind was m = tanh("), ("concat(m, f)", "concat(mind, f)"),
               ("as proj, m)", "as proj, mind)"),
               ("  out pi = linear(r, 4)\n", "  out pi = linear(r, 4)\n  out aux = linear(j, 2)\n"))
    # ie.embed.weight [4, 3]: 9 copied, bow row 3 zeroed
    # mind.linear.weight [6, 8] (hp, armor, mana, gold, stunned | ie): 42 copied, 6 zeroed
    # aux.linear [2, 11] + [2] = 24 fresh
    # zeroed 9, fresh 24, new = 272 + 9 + 24 = 305.
    o = surgery(FF, new)
    check(o, old_params=272, new_params=305, transferred=272, zeroed=9, fresh=24, dropped=0, preserving=True)
    assert torch.equal(o.new["mind.linear.bias"], o.old["m.linear.bias"])


def test_mixed_ff_reorder_under_layernorm_rename_add_entity_feature(surgery):
    new = edit(FF, ("layernorm(concat(m, f))", "layernorm(concat(f, m))"),
               ("  r = add(", "  res was r = add("), ("linear(r, 4)", "linear(res, 4)"), ("mul(r, ", "mul(res, "),
               ("    dx: float\n    dy: float\n", "    range: float\n    dy: float\n    dx: float\n"))
    # f.linear.weight [5, 4] (range, dy, dx, hp): 15 copied, 5 zeroed; the rest moved or copied.
    # new = 272 + 5 = 277.
    o = surgery(FF, new)
    check(o, old_params=272, new_params=277, transferred=272, zeroed=5, fresh=0, dropped=0, preserving=True)
    assert o.param("f.linear.weight").axes[1].old_indices() == [-1, 1, 0, 2]
    assert o.param("res.proj.weight").source == "r.proj.weight"


def test_mixed_ff_remove_feature_grow_vocab_rename_group(surgery):
    new = edit(FF, ("    stunned: bool\n", ""), ("[sword, shield, potion]", "[wand, sword, shield, potion]"),
               ("  group foes[3] {", "  group enemies[3] was foes {"), ("obs.foes", "obs.enemies"))
    # m.linear.weight [6, 6] (hp, armor, gold | ie): 36 copied, the stunned column (6) dropped
    # ie.embed.weight [4, 3]: 9 copied, the wand row (3) zeroed
    # transferred 272 - 6 = 266; new = 266 + 3 = 269.
    check(surgery(FF, new), old_params=272, new_params=269, transferred=266, zeroed=3, fresh=0, dropped=6,
          preserving=False,
          reasons=[("feature me.stunned was removed, but m.linear read it: the function changes wherever it was non-zero",
                    OLD_FILE, line_of(FF, "stunned: bool"))])


def test_mixed_ff_narrow_embed_rename_feature(surgery):
    new = edit(FF, ("embed(obs.me.item, 3)", "embed(obs.me.item, 2)"), ("    hp: float\n    armor", "    health: float was hp\n    armor"))
    # ie.embed.weight [3, 2]: 6 copied, 3 dropped
    # m.linear.weight [6, 6] (health, armor, gold, stunned | ie 0..1): 36 copied, 6 dropped
    # dropped 9; new = transferred = 263.
    check(surgery(FF, new), old_params=272, new_params=263, transferred=263, zeroed=0, fresh=0, dropped=9,
          preserving=False,
          reasons=[("ie.embed narrowed from 3 to 2 units", NEW_FILE, line_of(new, "ie = embed")),
                   ("m.linear no longer reads 1 of its old inputs (ie.embed): their weights are dropped",
                    NEW_FILE, line_of(new, "m = tanh"))])


def test_mixed_unread_removed_read_renamed_vocab_grown(surgery):
    new = edit(UNREAD, ("    deaths: int\n", ""), ("    kills: int\n", "    frags: int was kills\n"),
               ("obs.stats.kills", "obs.stats.frags"), ("[axe, bane, drow]", "[axe, bane, drow, lina]"))
    # he.embed.weight [4, 4]: 12 copied, lina row 4 zeroed; the rest copied; 918 + 4 = 922.
    check(surgery(UNREAD, new), old_params=918, new_params=922, transferred=918, zeroed=4, fresh=0, dropped=0,
          preserving=True)


def test_mixed_everything_at_once(surgery):
    hero = BASE[BASE.index("  group hero {"):BASE.index("  group units[4] {")]
    units = BASE[BASE.index("  group units[4] {"):BASE.index("}\n\nmodel")]
    new = edit(BASE, (hero + units, units + hero))
    new = edit(new, MANA, ("[axe, bane, drow]", "[axe, bane, lina, drow]"), ("    y: float\n", "    hp: float\n    y: float\n"),
               ("relu(linear(concat(obs.hero, he), 8))", "relu(linear(concat(he, obs.hero), 8))"),
               ("core = lstm(concat(h, u), 8)", "trunk was core = lstm(concat(u, h), 10)"),
               ("out a = linear(core, 3)", "out act was a = linear(trunk, 3)"), ("out v = linear(core, 1)", "out v = linear(trunk, 1)"))
    # he.embed.weight [4, 4]: 12 copied, lina row 4 zeroed
    # h.linear.weight [8, 8] (he 0..3 | health, mana, armor, level): 56 copied, 8 zeroed
    # u.linear.weight [6, 5] (x, hp, y | creep, tower): 24 copied, 6 zeroed
    # trunk.lstm (8 -> 10 units, 8 new rows of 40):
    #   weight_ih [40, 14]: 448 copied, 8 x 14 = 112 fresh
    #   weight_hh [40, 10]: 256 copied, 32 x 2 = 64 zeroed, 8 x 10 = 80 fresh
    #   bias_ih, bias_hh [40]: 8 + 8 fresh
    # act.linear.weight [3, 10]: 6 zeroed; v.linear.weight [1, 10]: 2 zeroed
    # zeroed = 4 + 8 + 6 + 64 + 6 + 2 = 90; fresh = 112 + 80 + 16 = 208; new = 910 + 90 + 208 = 1208.
    o = surgery(BASE, new)
    check(o, old_params=910, new_params=1208, transferred=910, zeroed=90, fresh=208, dropped=0, preserving=True)
    assert o.param("h.linear.weight").axes[1].old_indices() == [3, 4, 5, 6, 0, 1, -1, 2]


# ---------------------------------------------------------------------------
# weights, element by element


def test_weights_after_adding_feature_in_middle(surgery):
    o = surgery(BASE, edit(BASE, MANA))
    old, new = o.old["h.linear.weight"], o.new["h.linear.weight"]
    assert new.shape == (8, 8)
    # cols old: health, mana, level, he 0..3 -> new: health, mana, armor, level, he 0..3
    assert torch.equal(new[:, 2], torch.zeros(8))
    assert torch.equal(new[:, :2], old[:, :2])
    assert torch.equal(new[:, 3:], old[:, 2:])
    for name in o.new:
        if name != "h.linear.weight":
            assert torch.equal(o.new[name], o.old[name]), name


def test_weights_after_widening_linear(surgery):
    o = surgery(BASE, edit(BASE, ("relu(linear(concat(obs.hero, he), 8))", "relu(linear(concat(obs.hero, he), 10))")))
    w_old, w_new = o.old["h.linear.weight"], o.new["h.linear.weight"]
    assert torch.equal(w_new[:8], w_old)
    assert torch.equal(o.new["h.linear.bias"][:8], o.old["h.linear.bias"])
    # The new units start fresh: non-zero, within nn.Linear's init bound 1/sqrt(7).
    fresh = torch.cat([w_new[8:].flatten(), o.new["h.linear.bias"][8:]])
    assert bool((fresh != 0).all())
    assert float(fresh.abs().max()) <= 7 ** -0.5
    # The consumer: core reads concat(h, u), so the new h units are columns 8, 9 of weight_ih: zero.
    ih_old, ih_new = o.old["core.lstm.weight_ih"], o.new["core.lstm.weight_ih"]
    assert ih_new.shape == (32, 16)
    assert torch.equal(ih_new[:, 8:10], torch.zeros(32, 2))
    assert torch.equal(ih_new[:, :8], ih_old[:, :8])
    assert torch.equal(ih_new[:, 10:], ih_old[:, 8:])


def test_weights_after_widening_lstm(surgery):
    o = surgery(BASE, edit(BASE, WIDEN_LSTM))
    hh_old, hh_new = o.old["core.lstm.weight_hh"], o.new["core.lstm.weight_hh"]
    for gate in range(4):
        old_rows, new_rows = hh_old[8 * gate:8 * gate + 8], hh_new[12 * gate:12 * gate + 12]
        assert torch.equal(new_rows[:8, :8], old_rows)
        assert torch.equal(new_rows[:8, 8:], torch.zeros(8, 4))  # old units do not read new ones
        assert bool((new_rows[8:] != 0).all())  # new units start fresh
    assert torch.equal(o.new["a.linear.weight"][:, 8:], torch.zeros(3, 4))
    assert torch.equal(o.new["a.linear.weight"][:, :8], o.old["a.linear.weight"])


def test_weights_after_renames(surgery):
    new = edit(BASE, ("    mana: float\n", "    mp: float was mana\n"), ("[axe, bane, drow]", "[axe, bane, drowranger was drow]"),
               *RENAME_CORE)
    o = surgery(BASE, new)
    check(o, old_params=910, new_params=910, transferred=910, zeroed=0, fresh=0, dropped=0, preserving=True)
    renamed = {f"trunk.lstm.{p}": f"core.lstm.{p}" for p in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
    back = {v: k for k, v in renamed.items()}
    assert set(o.new) == {back.get(n, n) for n in o.old}
    for name, tensor in o.new.items():
        assert torch.equal(tensor, o.old[renamed.get(name, name)]), name


# ---------------------------------------------------------------------------
# the plan as JSON


def _plan_scenarios():
    return [(BASE, edit(BASE, MANA)), (BASE, edit(BASE, WIDEN_LSTM)),
            (BASE, edit(BASE, ("    mana: float\n", ""))), (FF, edit(FF, ("linear(obs.foes, 5)", "linear(obs.foes, 7)")))]


def test_plan_json_validates_against_schema(surgery):
    schema = plan_json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    for old, new in _plan_scenarios():
        data = json.loads(surgery(old, new).plan.model_dump_json())
        jsonschema.validate(data, schema, cls=jsonschema.Draft202012Validator)


def _cli(*args, cwd, hash_seed=None) -> subprocess.Popen:
    exe = os.path.join(os.path.dirname(sys.executable), "specsurgery")
    command = [exe, *args] if os.path.exists(exe) else [sys.executable, "-c", "from specsurgery.cli import entry; entry()", *args]
    env = {k: v for k, v in os.environ.items() if k != "SPECSURGERY_DEBUG"}
    if hash_seed is not None:
        env["PYTHONHASHSEED"] = hash_seed
    return subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


# (where in the plan, the wrong value, how the message names the place)
CORRUPTIONS = [
    (("params", 1, "copied"), "many", "params[1].copied"),
    (("summary", "function_preserving"), "yes", "summary.function_preserving"),
    (("params", 0, "shape", 0), "3", "params[0].shape[0]"),
]


@pytest.mark.slow  # one `specsurgery apply` process per case (each imports torch), run side by side
def test_apply_plan_file_from_the_command_line(surgery, tmp_path):
    """`specsurgery apply CKPT NEW.spec -o OUT --plan plan.json`: a plan with a wrong type in a
    field exits 1 with one line naming the JSON path, writes nothing, shows no traceback;
    the untouched plan applies and gives exactly what apply_plan gives."""
    new_text = edit(BASE, MANA)
    o = surgery(BASE, new_text)
    good = json.loads(o.plan.model_dump_json())
    runs = []
    for k, (path, value, where) in enumerate(CORRUPTIONS + [(None, None, None)]):
        folder = tmp_path / f"case{k}"
        folder.mkdir()
        (folder / "new.spec").write_text(new_text)
        data = json.loads(json.dumps(good))
        if path is not None:
            target = data
            for key in path[:-1]:
                target = target[key]
            target[path[-1]] = value
        (folder / "plan.json").write_text(json.dumps(data))
        before = sorted(os.listdir(folder))
        runs.append((folder, where, before,
                     _cli("apply", o.old_ckpt, "new.spec", "-o", "out.safetensors", "--plan", "plan.json", cwd=folder)))
    results = []
    for folder, where, before, proc in runs:
        stdout, stderr = proc.communicate(timeout=300)
        results.append((folder, where, before, proc.returncode, stdout, stderr))
    for folder, where, before, code, stdout, stderr in results:
        if where is None:
            assert code == 0, stderr
            from safetensors.torch import load_file

            got = load_file(str(folder / "out.safetensors"))
            assert set(got) == set(o.new)
            for name in got:  # no fresh parameters in this plan: exactly the library's result
                assert torch.equal(got[name], o.new[name]), name
            continue
        assert code == 1, (where, stderr)
        lines = stderr.strip().splitlines()
        assert len(lines) == 1, stderr
        assert lines[0].startswith("plan.json: error: not a valid plan: "), lines[0]
        assert where in lines[0], (where, lines[0])
        assert "Traceback" not in stderr and stdout == ""
        assert sorted(os.listdir(folder)) == before  # nothing written, no temporary file left
