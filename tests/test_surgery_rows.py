"""The version-2 rows of the language's surgery table, and the defects of issue 11,
one scenario each: exact counts, exact tensors (a join starts at zero, an
inserted layer is `eye`), and the function proven on 1,000 random states
(max |old - new| < 1e-5 where the plan says it is preserved, > 1e-5 where not).

Parameter sizes of SMALL (model m), for the arithmetic below:
  h.linear.weight [4, 2] + bias [4] = 12     cols: a.x, a.y
  o.linear.weight [2, 4] + bias [2] = 10     cols: h 0..3
  total 22
"""
from __future__ import annotations

import pytest
import torch

try:  # tests/ as a package or as a rootdir-relative folder
    from .surgery_helpers import NEW_FILE, OLD_FILE, TOL, check, edit, line_of, load_model, run_surgery, stepwise_report
except ImportError:
    from surgery_helpers import NEW_FILE, OLD_FILE, TOL, check, edit, line_of, load_model, run_surgery, stepwise_report

from specsurgery.errors import SpecError
from specsurgery.surgery.diff import make_plan
from specsurgery.surgery.plan import head_columns

SCHEMA = """\
schema s {
  vocab kinds = [p, q, r]
  group a {
    x: float
    y: float
    k: category(kinds)
  }
  group b {
    z: float
  }
}
"""

SMALL = SCHEMA + """
model m(obs: s) {
  h = relu(linear(obs.a, 4))
  out o = linear(h, 2)
}
"""


@pytest.fixture
def surgery(tmp_path_factory):
    folder = str(tmp_path_factory.getbasetemp() / "rows")
    return lambda old, new: run_surgery(old, new, folder)


# ---------------------------------------------------------------------------
# a new value joined at zero


def test_new_statement_read_through_concat_starts_at_zero(surgery):
    """g reads a feature (b.z) that o never met: o's columns for g start at zero, and
    the proof (what each matched index carries) holds on the model as it starts."""
    new = edit(SMALL, ("  out o = linear(h, 2)", "  g = relu(linear(obs.b, 3))\n  out o = linear(concat(h, g), 2)"))
    o = surgery(SMALL, new)
    # g.linear [3, 1] + [3] = 6 fresh; o.linear.weight [2, 7]: 8 copied, 2 x 3 = 6 zero; 22 + 6 + 6 = 34
    check(o, old_params=22, new_params=34, transferred=22, zeroed=6, fresh=6, dropped=0, preserving=True)
    assert torch.equal(o.new["o.linear.weight"][:, 4:], torch.zeros(2, 3))
    assert torch.equal(o.new["o.linear.weight"][:, :4], o.old["o.linear.weight"])


def test_new_concat_argument_read_by_an_old_layer(surgery):
    new = edit(SMALL, ("linear(h, 2)", "linear(concat(h, obs.b), 2)"))
    o = surgery(SMALL, new)
    # o.linear.weight [2, 5]: 8 copied, 2 zero; 22 + 2 = 24
    check(o, old_params=22, new_params=24, transferred=22, zeroed=2, fresh=0, dropped=0, preserving=True)
    assert torch.equal(o.new["o.linear.weight"][:, 4], torch.zeros(2))


def test_new_branch_joined_by_add_starts_at_zero(surgery):
    """r = add(h, branch): the branch's last parameterised op starts at zero (weights
    and bias), the ops after it map 0 to 0 (relu), its other parameters start fresh;
    o keeps all its weights (unit i of r is unit i of h)."""
    new = edit(SMALL, ("  out o = linear(h, 2)",
                       "  g = relu(linear(relu(linear(obs.b, 5)), 4))\n  r = add(h, g)\n  out o = linear(r, 2)"))
    o = surgery(SMALL, new)
    # g.linear_2 [5, 1] + [5] = 10 fresh (inner); g.linear [4, 5] + [4] = 24 zero (outer); 22 + 34 = 56
    check(o, old_params=22, new_params=56, transferred=22, zeroed=24, fresh=10, dropped=0, preserving=True)
    assert torch.equal(o.new["g.linear.weight"], torch.zeros(4, 5))
    assert torch.equal(o.new["g.linear.bias"], torch.zeros(4))
    assert o.new["g.linear_2.weight"].abs().sum() > 0
    assert torch.equal(o.new["o.linear.weight"], o.old["o.linear.weight"])


def test_new_branch_through_sigmoid_cannot_start_at_zero(surgery):
    """sigmoid(0) = 1/2: a branch that ends in sigmoid cannot join at zero; the plan
    says the function changes, at the add."""
    new = edit(SMALL, ("  out o = linear(h, 2)", "  r = add(h, sigmoid(linear(obs.b, 4)))\n  out o = linear(r, 2)"))
    o = surgery(SMALL, new)
    # r.linear [4, 1] + [4] = 8 fresh; 22 + 8 = 30
    check(o, old_params=22, new_params=30, transferred=22, zeroed=0, fresh=8, dropped=0, preserving=False,
          reasons=[("add joins a new input (r.linear) to h.linear", NEW_FILE, line_of(new, "r = add"))])


# ---------------------------------------------------------------------------
# a layer inserted as the identity (Net2DeeperNet)


def test_insert_layer_after_relu_starts_as_identity(surgery):
    new = edit(SMALL, ("  out o = linear(h, 2)", "  h2 = relu(linear(h, 4))\n  out o = linear(h2, 2)"))
    o = surgery(SMALL, new)
    # h2.linear.weight [4, 4] = 16 identity, bias [4] = 4 zero; 22 + 20 = 42
    check(o, old_params=22, new_params=42, transferred=22, zeroed=4, fresh=0, dropped=0, preserving=True)
    assert o.plan.summary.identity == 16
    assert torch.equal(o.new["h2.linear.weight"], torch.eye(4))
    assert torch.equal(o.new["h2.linear.bias"], torch.zeros(4))
    assert o.param("h2.linear.weight").action == "identity"


def test_insert_layer_without_activation_starts_as_identity(surgery):
    new = edit(SMALL, ("  out o = linear(h, 2)", "  h2 = linear(h, 4)\n  out o = linear(h2, 2)"))
    o = surgery(SMALL, new)
    check(o, old_params=22, new_params=42, transferred=22, zeroed=4, fresh=0, dropped=0, preserving=True)
    assert torch.equal(o.new["h2.linear.weight"], torch.eye(4))


def test_insert_layer_read_through_a_join_starts_as_identity(surgery):
    """The old reader of the value is a join (mul), and an old layer reads the join:
    the inserted layer still starts as the identity (found by the random sequences)."""
    old_text = edit(SMALL, ("linear(h, 2)", "linear(mul(h, h), 2)"))
    new = edit(old_text, ("  out o = linear(mul(h, h), 2)", "  h2 = linear(h, 4)\n  out o = linear(mul(h2, h), 2)"))
    o = surgery(old_text, new)
    check(o, old_params=22, new_params=42, transferred=22, zeroed=4, fresh=0, dropped=0, preserving=True)
    assert torch.equal(o.new["h2.linear.weight"], torch.eye(4))
    assert torch.equal(o.new["o.linear.weight"], o.old["o.linear.weight"])


def test_two_ops_that_do_the_same_thing_keep_their_places(surgery):
    """Two layernorms read one value (p is a feature group by another name); a layer
    joined at zero goes in before the first. Matched by what they do, the second new
    layernorm could take either old one: it keeps its own, so the head still adds
    the same two terms in the same order (found by the random sequences: they were
    swapped, and the function reported lost)."""
    old_text = SCHEMA + """
model m(obs: s) {
  p = obs.b
  out t = add(layernorm(p), layernorm(obs.b))
}
"""
    new = edit(old_text, ("  out t = add(layernorm(p), layernorm(obs.b))",
                          "  j = add(p, linear(relu(linear(p, 2)), 1))\n  out t = add(layernorm(j), layernorm(obs.b))"))
    o = surgery(old_text, new)
    # layernorms 2 + 2; new: j.linear_2 [2, 1] + [2] fresh, j.linear [1, 2] + [1] zero
    check(o, old_params=4, new_params=11, transferred=4, zeroed=3, fresh=4, dropped=0, preserving=True)
    moved = {p.name: p.source for p in o.plan.params if p.source is not None}
    assert moved == {"t.layernorm.weight": "t.layernorm.weight", "t.layernorm.bias": "t.layernorm.bias",
                     "t.layernorm_2.weight": "t.layernorm_2.weight", "t.layernorm_2.bias": "t.layernorm_2.bias"}
    assert torch.equal(o.new["j.linear.weight"], torch.zeros(1, 2))


def test_insert_layer_over_a_group_that_gained_a_feature_starts_as_identity(surgery):
    """The layer reads a group that also gained a feature (b.w): it still starts as
    the identity, which passes the new feature on too; o's column for it starts at
    zero (found by the random sequences: the inserted layer started fresh)."""
    old_text = edit(SMALL, ("linear(h, 2)", "linear(concat(h, obs.b), 2)"))
    new = edit(old_text, ("    z: float\n", "    z: float\n    w: float\n"),
               ("  out o = linear(concat(h, obs.b), 2)", "  d = linear(obs.b, 2)\n  out o = linear(concat(h, d), 2)"))
    o = surgery(old_text, new)
    # h.linear 12 + o.linear [2, 5] + [2] = 24; new: d.linear.weight [2, 2] = 4 identity, bias 2 zero,
    # o.linear.weight [2, 6]: 10 copied, w's column 2 zero; 24 + 6 + 2 = 32
    check(o, old_params=24, new_params=32, transferred=24, zeroed=4, fresh=0, dropped=0, preserving=True)
    assert o.plan.summary.identity == 4
    assert torch.equal(o.new["d.linear.weight"], torch.eye(2))
    assert torch.equal(o.new["o.linear.weight"][:, :5], o.old["o.linear.weight"])
    assert torch.equal(o.new["o.linear.weight"][:, 5], torch.zeros(2))


def test_head_that_computed_a_value_twice_and_now_once_changes(surgery):
    """concat(h, h) -> concat(linear(h, 5), h): h is still in the head, at one of the
    two places it was; the other four outputs are now fresh units. Counted output by
    output, the plan says so (it once said the function was preserved, and verify
    compared fresh units with h: found by the random sequences)."""
    old_text = edit(SMALL, ("  out o = linear(h, 2)", "  out o = concat(h, h)"))
    new = edit(old_text, ("  out o = concat(h, h)", "  out o = concat(linear(h, 5), h)"))
    o = surgery(old_text, new)
    # h.linear 12 copied; o.linear [5, 4] + [5] = 25 fresh
    check(o, old_params=12, new_params=37, transferred=12, zeroed=0, fresh=25, dropped=0, preserving=False,
          reasons=[("output head o no longer computes h.linear (and 3 more outputs)", NEW_FILE,
                    line_of(new, "out o ="))])


def test_insert_layer_whose_activation_does_not_give_back_its_input(surgery):
    """tanh(tanh(x)) is not tanh(x): the layer starts as the identity, and the plan
    says the function changes."""
    old_text = edit(SMALL, ("relu(linear(obs.a, 4))", "tanh(linear(obs.a, 4))"))
    new = edit(old_text, ("  out o = linear(h, 2)", "  h2 = tanh(linear(h, 4))\n  out o = linear(h2, 2)"))
    o = surgery(old_text, new)
    check(o, old_params=22, new_params=42, transferred=22, zeroed=4, fresh=0, dropped=0, preserving=False,
          reasons=[("o.linear reads h.linear through a changed path (an op around it changed)", NEW_FILE,
                    line_of(new, "out o ="))])
    assert torch.equal(o.new["h2.linear.weight"], torch.eye(4))


def test_a_new_square_head_starts_fresh(surgery):
    """Only a layer inserted before old readers starts as the identity: a new head
    over h, square as it may be, starts fresh."""
    new = edit(SMALL, ("  out o = linear(h, 2)\n", "  out o = linear(h, 2)\n  out w = linear(h, 4)\n"))
    o = surgery(SMALL, new)
    check(o, old_params=22, new_params=42, transferred=22, zeroed=0, fresh=20, dropped=0, preserving=True)


# ---------------------------------------------------------------------------
# unnamed ops matched by what they do


def test_named_embed_inserted_before_an_unnamed_one(surgery):
    old_text = SCHEMA + """
model m(obs: s) {
  out o = linear(concat(obs.a, embed(obs.a.k, 2)), 2)
}
"""
    new = edit(old_text, ("concat(obs.a, embed(obs.a.k, 2))", "concat(obs.a, embed(obs.a.k, 3) as je, embed(obs.a.k, 2))"))
    o = surgery(old_text, new)
    # o.embed [3, 2] = 6 copied; o.je [3, 3] = 9 fresh; o.linear.weight [2, 4] -> [2, 7]: 8 copied, 6 zero,
    # bias 2 copied: 16 old, 16 + 9 + 6 = 31 new
    check(o, old_params=16, new_params=31, transferred=16, zeroed=6, fresh=9, dropped=0, preserving=True)
    assert torch.equal(o.new["o.embed.weight"], o.old["o.embed.weight"])  # the same name and the same op
    assert torch.equal(o.new["o.linear.weight"][:, 2:5], torch.zeros(2, 3))


def test_reorder_concat_of_unnamed_embeds(surgery):
    old_text = SCHEMA + """
model m(obs: s) {
  out o = linear(concat(embed(obs.a.k, 2), embed(obs.a.k, 3)), 2)
}
"""
    new = edit(old_text, ("concat(embed(obs.a.k, 2), embed(obs.a.k, 3))", "concat(embed(obs.a.k, 3), embed(obs.a.k, 2))"))
    o = surgery(old_text, new)
    check(o, old_params=6 + 9 + 12, new_params=27, transferred=27, zeroed=0, fresh=0, dropped=0, preserving=True)
    assert torch.equal(o.new["o.embed.weight"], o.old["o.embed_2.weight"])
    assert torch.equal(o.new["o.embed_2.weight"], o.old["o.embed.weight"])
    assert torch.equal(o.new["o.linear.weight"], torch.cat([o.old["o.linear.weight"][:, 2:], o.old["o.linear.weight"][:, :2]], 1))


# ---------------------------------------------------------------------------
# recurrence added to a model that had none


def _stepwise_difference(o) -> float:
    return stepwise_report(o.old_ckpt, o.new_ckpt, states=1000)["max"]


def test_add_lstm_to_a_model_that_had_none(surgery):
    new = edit(SMALL, ("  out o = linear(h, 2)", "  c = lstm(h, 3)\n  out o = linear(concat(h, c), 2)"))
    o = surgery(SMALL, new)
    # c.lstm: weight_ih [12, 4] 48 + weight_hh [12, 3] 36 + biases 24 = 108 fresh; o.linear.weight [2, 7]:
    # 8 copied, 6 zero; 22 + 108 + 6 = 136
    check(o, old_params=22, new_params=136, transferred=22, zeroed=6, fresh=108, dropped=0, preserving=True,
          verify_states=False)
    assert torch.equal(o.new["o.linear.weight"][:, 4:], torch.zeros(2, 3))
    assert _stepwise_difference(o) < TOL


def test_add_lstm_joined_by_add_starts_at_zero(surgery):
    """An lstm with every parameter at zero outputs zero (every gate 1/2, g = 0), so it
    can be the branch of a join at zero."""
    new = edit(SMALL, ("  out o = linear(h, 2)", "  r = add(h, lstm(h, 4))\n  out o = linear(r, 2)"))
    o = surgery(SMALL, new)
    # r.lstm: [16, 4] + [16, 4] + 16 + 16 = 160 zero
    check(o, old_params=22, new_params=182, transferred=22, zeroed=160, fresh=0, dropped=0, preserving=True,
          verify_states=False)
    assert all(torch.equal(o.new[f"r.lstm.{p}"], torch.zeros_like(o.new[f"r.lstm.{p}"]))
               for p in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
    assert _stepwise_difference(o) < TOL


# ---------------------------------------------------------------------------
# renames


def test_statement_renamed_while_a_new_statement_takes_its_name():
    new = edit(SMALL, ("  h = relu(linear(obs.a, 4))\n", "  c was h = relu(linear(obs.a, 4))\n  h = relu(linear(obs.b, 4))\n"),
               ("linear(h, 2)", "linear(c, 2)"))
    with pytest.raises(SpecError) as e:
        load_model(new, NEW_FILE)
    text = str(e.value)
    line = line_of(new, "c was h")
    assert f"{NEW_FILE}:{line}:3: error: statement 'c' was 'h', but 'h' still exists in model m" in text, text


def test_vocab_renamed_with_an_item_renamed(surgery):
    old_text = edit(SMALL, ("relu(linear(obs.a, 4))", "relu(linear(concat(obs.a, embed(obs.a.k, 2)), 4))"))
    new = edit(old_text, ("vocab kinds = [p, q, r]", "vocab sorts = [p, s was q, r]"), ("category(kinds)", "category(sorts)"))
    o = surgery(old_text, new)
    # h.embed [3, 2] = 6, h.linear [4, 4] + 4 = 20, o.linear 10: 36, all copied
    check(o, old_params=36, new_params=36, transferred=36, zeroed=0, fresh=0, dropped=0, preserving=True)
    assert torch.equal(o.new["h.embed.weight"], o.old["h.embed.weight"])


# ---------------------------------------------------------------------------
# what verification compares, from the plan


def test_the_plan_holds_the_head_maps(surgery):
    new = edit(SMALL, ("  out o = linear(h, 2)\n", "  out o = linear(h, 3)\n  out w = linear(h, 1)\n"))
    o = surgery(SMALL, new)
    assert head_columns(o.plan) == {"o": ("o", [0, 1], [0, 1])}
    assert o.plan.new_only_heads == ("w",) and o.plan.old_only_heads == ()


# ---------------------------------------------------------------------------
# a plan from a file is checked against both specs before anything is written


def _tampered(plan, index: int, **update):
    params = list(plan.params)
    params[index] = params[index].model_copy(update=update)
    return plan.model_copy(update={"params": tuple(params)})


def test_a_plan_that_does_not_fit_the_specs_writes_nothing(surgery, tmp_path):
    import os

    from specsurgery.errors import UserError
    from specsurgery.surgery.apply import apply_plan
    from specsurgery.surgery.plan import Run

    new = edit(SMALL, ("linear(h, 2)", "linear(concat(h, obs.b), 2)"))
    o = surgery(SMALL, new)
    weight = next(i for i, p in enumerate(o.plan.params) if p.name == "o.linear.weight")
    p = o.plan.params[weight]
    rows, cols = p.axes
    cases = {
        "changed shape": (_tampered(o.plan, weight, shape=(3, 5)), "params[2].shape"),
        "runs removed": (_tampered(o.plan, weight, axes=(rows.model_copy(update={"runs": ()}), cols)), "params[2].axes[0].runs"),
        "row duplicated": (_tampered(o.plan, weight, axes=(rows.model_copy(update={"runs": (Run(new=0, old=0, length=1), Run(new=1, old=0, length=1))}), cols)),
                           "params[2].axes[0].runs"),
        "claims preserved": (o.plan.model_copy(update={"summary": o.plan.summary.model_copy(update={"transferred": 24})}),
                             "summary.transferred"),
    }
    for what, (plan, where) in cases.items():
        out = tmp_path / f"{what}.safetensors"
        with pytest.raises(UserError) as e:
            apply_plan(plan, o.old_ckpt, o.new_spec, str(out))
        message = str(e.value)
        assert message.startswith(f"error: the plan does not fit the specs: {where}"), (what, message)
        assert message.endswith("make it again with `specsurgery plan`")
        assert os.listdir(tmp_path) == []  # nothing written, no temporary file left


# ---------------------------------------------------------------------------
# checkpoints written by 0.1.0


def test_a_checkpoint_with_0_1_0_names_is_carried_over(surgery, tmp_path):
    """0.1.0 numbered named ops too: `linear(x, 2) as p, linear(y, 3)` had `linear_2`
    where the unnamed op is now `linear`. apply reads either name."""
    from safetensors.torch import load_file

    from specsurgery.checkpoint import write_checkpoint
    from specsurgery.ir import build_graph
    from specsurgery.spec.canonical import canonical
    from specsurgery.surgery.apply import apply_plan
    old_text = SCHEMA + """
model m(obs: s) {
  out o = linear(concat(linear(obs.a, 2) as p, linear(obs.b, 3)), 2)
}
"""
    old = load_model(old_text, OLD_FILE)
    graph = build_graph(old)
    assert graph.names_0_1_0() == {"o.linear_2.weight": "o.linear_3.weight", "o.linear_2.bias": "o.linear_3.bias"}
    legacy = graph.names_0_1_0()
    generator = torch.Generator().manual_seed(5)
    tensors = {legacy.get(name, name): torch.randn(node.params[local].shape, generator=generator)
               for name, (node, local) in graph.parameters().items()}
    path = str(tmp_path / "v010.safetensors")
    write_checkpoint(path, canonical(old), "m", {k: tuple(t.shape) for k, t in tensors.items()}, tensors.items())
    new = load_model(edit(old_text, ("linear(obs.b, 3)", "linear(obs.b, 4)")), NEW_FILE)
    plan = make_plan(old, new)
    out = str(tmp_path / "new.safetensors")
    apply_plan(plan, path, new, out)
    got = load_file(out)
    assert torch.equal(got["o.linear_2.weight"][:3], tensors["o.linear_3.weight"])
    assert torch.equal(got["o.p.weight"], tensors["o.p.weight"])
    assert torch.equal(got["o.linear.weight"][:, 5], torch.zeros(2))  # the widened op's new unit, read at zero


@pytest.mark.slow  # loading 1,500 statements twice takes seconds
def test_a_chain_deeper_than_the_recursion_limit_plans():
    import sys

    n = 1500
    assert sys.getrecursionlimit() < n
    body = ["  s0 = linear(obs.b, 4)"] + [f"  s{i} = tanh(s{i - 1})" for i in range(1, n)] + [f"  out o = linear(s{n - 1}, 2)"]
    text = SCHEMA + "\nmodel m(obs: s) {\n" + "\n".join(body) + "\n}\n"
    old = load_model(text, OLD_FILE)
    new = load_model(edit(text, ("    z: float\n", "    z: float\n    w: float\n")), NEW_FILE)
    s = make_plan(old, new).summary
    # s0.linear [4, 1] -> [4, 2]: 4 + 4 bias copied, 4 zero; o.linear 10 copied
    assert (s.transferred, s.zeroed, s.fresh, s.function_preserving) == (18, 4, 0, True)


def test_removed_heads_are_named_in_the_order_of_the_spec():
    """A plan is the same text in every run: heads are named as the old spec lists them,
    not in the order of a set of names (which changes with each process's hash seed)."""
    heads = ["zeta", "alpha", "mid", "beta", "omega"]
    old = SCHEMA + "\nmodel m(obs: s) {\n  h = relu(linear(obs.a, 4))\n" + "".join(f"  out {n} = linear(h, 2)\n" for n in heads) + "}\n"
    new = SCHEMA + "\nmodel m(obs: s) {\n  h = relu(linear(obs.a, 4))\n  out zeta = linear(h, 2)\n}\n"
    plan = make_plan(load_model(old, OLD_FILE), load_model(new, NEW_FILE))
    assert [r.message for r in plan.summary.reasons] == [f"output head {n} was removed" for n in heads[1:]]
