"""The typed spec's nodes (spec/node.py): frozen, equal by value (spans aside),
copied with changes, and read back from their JSON with every field checked."""
from __future__ import annotations

import copy
import json
import pickle
from pathlib import Path

import pytest

from specsurgery.spec import model as m
from specsurgery.spec.load import load

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def five() -> m.ModelSpec:
    return load([str(ROOT / "specs" / "five.spec")]).model()


def test_a_node_is_frozen():
    item = m.VocabItem(name="axe")
    with pytest.raises(AttributeError, match="frozen"):
        item.name = "bane"
    with pytest.raises(AttributeError, match="frozen"):
        del item.name
    assert item.name == "axe" and item.was is None and item.span == m.NO_SPAN


def test_nodes_are_equal_by_value_spans_aside():
    here = m.Span(file="a.spec", line=3, column=5)
    a, b = m.Path(parts=("obs", "hero"), span=here), m.Path(parts=("obs", "hero"))
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a != m.Path(parts=("obs",)) and m.IntArg(value=1) != m.Keyword(name="x", value=1)
    assert a.model_copy(update={"parts": ("obs",)}) == m.Path(parts=("obs",)) and a.parts == ("obs", "hero")
    assert repr(b) == "Path(kind='path', parts=('obs', 'hero'), span=Span(file='<string>', line=0, column=0, " \
                      "end_line=0, end_column=0))"


def test_the_constructor_takes_the_fields_and_no_others():
    assert m.Vocab(name="v", items=[m.VocabItem(name="a")]).items == (m.VocabItem(name="a"),)  # a list kept as a tuple
    with pytest.raises(TypeError, match="has no field 'colour'"):
        m.VocabItem(name="a", colour="red")
    with pytest.raises(TypeError, match="needs 'name'"):
        m.VocabItem(was="b")
    with pytest.raises(TypeError, match="has no field 'colour'"):
        m.VocabItem(name="a").model_copy(update={"colour": "red"})


def test_a_spec_survives_json_copy_and_pickle_spans_too(five):
    for back in (m.ModelSpec.model_validate_json(five.model_dump_json()), copy.deepcopy(five),
                 pickle.loads(pickle.dumps(five))):
        assert back == five and back.model_dump() == five.model_dump()
    assert m.ModelSpec(schema=five.schema, model=five.model) == five


@pytest.mark.parametrize("change, where", [
    (lambda d: d["model"]["statements"][0]["span"].update(line="3"), "model.statements[0].span.line: not a int"),
    (lambda d: d["model"]["statements"][0]["expr"].update(kind="lambda"), "no node of kind 'lambda'"),
    (lambda d: d["model"]["statements"][0].update(out=1), "model.statements[0].out: not a bool"),
    (lambda d: d["schema"]["groups"][0]["features"][0].update(type="double"), "not one of"),
    (lambda d: d["schema"]["groups"][0].update(colour="red"), "unknown field 'colour'"),
    (lambda d: d["schema"]["vocabs"][0]["items"][0].pop("name"), "items[0].name: missing"),
    (lambda d: d["schema"].update(groups={}), "schema_.groups: expected a list"),
])
def test_doctored_json_is_refused(five, change, where):
    data = json.loads(five.model_dump_json())
    data["schema"] = data.pop("schema_")
    change(data)
    with pytest.raises(ValueError, match=where.replace("[", r"\[").replace("]", r"\]")):
        m.ModelSpec.model_validate_json(json.dumps(data))
