"""The op contract: every op declares its surgery meaning beside its other rules,
an op that forgets it fails when its class is created, and nothing outside the
registry decides anything by an op's name."""
from __future__ import annotations

import pathlib
import re

import pytest

from specsurgery import ops
from specsurgery.ops import LANGUAGE_OPS, OPS, Indices, Layout, Op, Surgery

ROOT = pathlib.Path(__file__).resolve().parent.parent / "specsurgery"


class _Rules:
    """Every rule but `surgery`, as a mixing op (attention, say) would write them."""

    def infer(self, inputs, ints, kw):
        return inputs[0], {}

    def init(self, node, name, tensor, generator):
        pass

    def forward(self, node, params, xs, ctx):
        return xs[0]

    def probe(self, node, params, xs, ctx):
        return xs[0]

    def shadow(self, node, xs):
        return xs[0], {}


def test_an_op_without_a_surgery_meaning_fails_at_class_creation():
    with pytest.raises(TypeError, match=r"op Attention does not declare its surgery meaning"):
        class Attention(_Rules, Op):  # noqa: F841 - creating the class is the test
            name = "attention"


def test_an_op_missing_a_rule_fails_at_class_creation():
    with pytest.raises(TypeError, match=r"op Half does not define probe, shadow"):
        class Half(Op):  # noqa: F841
            name = "half"
            surgery = Surgery(Indices.ELEMENTWISE, zero_to_zero=True, idempotent=False, layout=Layout("any"))

            def infer(self, inputs, ints, kw):
                return inputs[0], {}

            def init(self, node, name, tensor, generator):
                pass

            def forward(self, node, params, xs, ctx):
                return xs[0]


def test_no_default_lets_an_op_pass_as_element_wise():
    with pytest.raises(TypeError):
        Surgery(zero_to_zero=True, idempotent=False, layout=Layout("any"))  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        Surgery(Indices.MIXING, layout=Layout("any"))  # type: ignore[call-arg]


def test_inconsistent_declarations_are_refused():
    with pytest.raises(TypeError, match="join_neutral"):
        Surgery(Indices.JOIN, zero_to_zero=True, idempotent=False, layout=Layout("any"))
    with pytest.raises(TypeError, match="mix through parameters"):
        Surgery(Indices.ELEMENTWISE, zero_to_zero=True, idempotent=True, layout=Layout("any"), starts_at_zero=True)


def test_a_family_helper_gives_its_rule_once():
    class Softsign(ops.Elementwise):
        name, torch_name = "softsign", "softsign"
        surgery = Surgery(Indices.ELEMENTWISE, zero_to_zero=True, idempotent=False, layout=Layout("any"))

    assert Softsign().surgery.indices is Indices.ELEMENTWISE


@pytest.mark.parametrize("name", sorted(OPS))
def test_every_registered_op_declares_its_meaning(name):
    meaning = OPS[name].surgery
    assert isinstance(meaning, Surgery)
    if meaning.indices is Indices.MIXING:
        assert OPS[name].n_ints or OPS[name].keywords or name == "layernorm"  # ops with parameters


def test_the_declarations_say_what_the_surgery_table_needs():
    assert OPS["relu"].surgery.idempotent and not OPS["tanh"].surgery.idempotent
    assert not OPS["sigmoid"].surgery.zero_to_zero  # sigmoid(0) = 1/2
    assert OPS["add"].surgery.join_neutral == 0.0 and OPS["mul"].surgery.join_neutral == 1.0
    assert OPS["linear"].surgery.identity == {"weight": "identity", "bias": "zero"}
    assert OPS["lstm"].surgery.layout.time and OPS["maxpool"].surgery.layout.pools
    assert OPS["layernorm"].surgery.axis_change


# Modules that walk the graph and plan surgery: they work from what ops declare.
# (ir.py builds the input-reading nodes, through the registry's READ_* names.)
GENERIC = ["ir.py", "mapping.py", "backends/shadow.py", "backends/probe.py",
           "surgery/diff.py", "surgery/plan.py", "surgery/apply.py"]


@pytest.mark.parametrize("module", GENERIC)
def test_no_module_outside_the_registry_names_an_op(module):
    text = (ROOT / module).read_text()
    named = sorted({op for op in LANGUAGE_OPS if re.search(rf"""["']{re.escape(op)}["']""", text)})
    assert named == [], f"{module} names ops {named}: ask the op's declaration instead"
