"""Inputs: featurise (records) and inputs (arrays) build the same tensors; the
record reader accepts and refuses exactly what the record JSON Schema does;
numpy scalars and 0/1 bools are taken; every mistake names its group and feature."""
from __future__ import annotations

import copy
import functools
import math
import random
import weakref

import jsonschema
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import specsurgery as ss
from specsurgery.features import featurise, random_record, record_schema
from specsurgery.ir import build_graph
from specsurgery.record_reader import reader_for
from specsurgery.spec.load import load_text

from strategies import specs

SPEC = """schema s {
  vocab kinds = [a, b, c]
  group g {
    x: float
    k: category(kinds)
    n: int
    on: bool
  }
  group items[4] {
    w: float
    kind: category(kinds)
  }
}

model ff(obs: s) {
  e = embed(obs.g.k, 3)
  h = relu(linear(concat(obs.g, e), 8))
  pooled = sumpool(linear(concat(obs.items, onehot(obs.items.kind)), 5))
  out score = linear(concat(h, pooled), 2)
}
"""


def schema_of(model):
    return load_text(model.spec).model().schema


@functools.lru_cache(maxsize=None)
def spec_schema():
    """SPEC's schema, made once (the random records of many examples are read against it)."""
    return load_text(SPEC).model().schema


@pytest.fixture(scope="module")
def model():
    return ss.compile(SPEC)


GOOD = {"g": {"x": 0.5, "k": "b", "n": 3, "on": True},
        "items": [{"w": 1.5, "kind": "c"}, {"w": -2.0, "kind": "a"}]}


def columns_of(schema, records: list, time: bool = False, as_dict: bool = False, counts: bool = False) -> dict:
    """The arrays a training loop would hold for `records` (zero padding)."""
    flat = [r for seq in records for r in seq] if time else records
    lead = (len(records), len(records[0])) if time else (len(records),)
    out: dict = {}
    for group in schema.groups:
        vocab = {f.name: list(schema.vocab(f.vocab).item_names) for f in group.category_features}
        numeric = group.numeric_features
        if group.is_entity_set:
            n = group.entities
            values = np.zeros((len(flat), n, len(numeric)), dtype=np.float32)
            cats = {f: np.zeros((len(flat), n), dtype=np.int64) for f in vocab}
            count = np.zeros(len(flat), dtype=np.int64)
            for b, r in enumerate(flat):
                for i, e in enumerate(r[group.name]):
                    values[b, i] = [float(e[f.name]) for f in numeric]
                    for f in vocab:
                        cats[f][b, i] = vocab[f].index(e[f])
                count[b] = len(r[group.name])
            rest = (n,)
        else:
            values = np.array([[float(r[group.name][f.name]) for f in numeric] for r in flat],
                              dtype=np.float32).reshape(len(flat), len(numeric))
            cats = {f: np.array([vocab[f].index(r[group.name][f]) for r in flat], dtype=np.int64) for f in vocab}
            rest = ()
        values = values.reshape(*lead, *rest, len(numeric))
        cats = {f: c.reshape(*lead, *rest) for f, c in cats.items()}
        if as_dict:
            out[group.name] = {f.name: values[..., i] for i, f in enumerate(numeric)} | cats
        else:
            out[group.name] = values
            out.update({f"{group.name}.{f}": c for f, c in cats.items()})
        if group.is_entity_set:
            count = count.reshape(lead)
            if counts:
                out[f"{group.name}#count"] = count
            else:
                out[f"{group.name}#mask"] = (np.arange(group.entities) < count[..., None]).astype(np.float32)
    return out


def assert_same(a: dict, b: dict) -> None:
    assert list(a) == list(b) or set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------------------
# featurise == inputs


def test_inputs_equal_featurise_in_every_form(model):
    schema = schema_of(model)
    recs = [GOOD, {**GOOD, "items": []}, {"g": {"x": -1, "k": "a", "n": 0, "on": 0}, "items": [GOOD["items"][0]] * 4}]
    expected = model.featurise(recs)
    for as_dict in (False, True):
        for counts in (False, True):
            assert_same(model.inputs(columns_of(schema, recs, as_dict=as_dict, counts=counts)), expected)
    # torch tensors, other dtypes, item strings
    cols = columns_of(schema, recs)
    cols = {k: torch.as_tensor(v).double() if k == "g" else v for k, v in cols.items()}
    cols["items.kind"] = np.array([["c", "a", "a", "a"], ["a"] * 4, ["c"] * 4])
    cols["g.k"] = ["b", "b", "a"]
    assert_same(model.inputs(cols), expected)
    out = model(model.inputs(cols))
    assert torch.equal(out["score"], model(expected)["score"])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs(), st.integers(0, 2 ** 16), st.booleans(), st.booleans())
def test_featurise_equals_inputs_on_random_specs(pair, seed, as_dict, counts):
    _, spec = pair
    graph = build_graph(spec)
    rng = random.Random(seed)
    if graph.has_time:
        recs = [[random_record(spec.schema, rng) for _ in range(2)] for _ in range(3)]
    else:
        recs = [random_record(spec.schema, rng) for _ in range(3)]
    expected = featurise(spec.schema, recs, time=graph.has_time)
    assert_same(featurise(spec.schema, recs, time=graph.has_time, validate=False), expected)
    from specsurgery.features import inputs_from_columns

    got = inputs_from_columns(spec.schema, columns_of(spec.schema, recs, graph.has_time, as_dict, counts),
                              time=graph.has_time)
    assert_same(got, expected)


# ---------------------------------------------------------------------------
# the record reader and the JSON Schema accept and refuse the same records

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.sampled_from([0.0, 1.0, 2.0, 0.5, -1.5, 10 ** 400, 2 ** 64,
                                                                      math.inf, -math.inf, math.nan])
    | st.sampled_from(["a", "b", "z", ""]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["x", "w", "q"]), inner, max_size=2),
    max_leaves=4)


def _places(value, path=()):
    """Every (path) inside a record where a mutation can land."""
    yield path
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _places(v, path + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _places(v, path + (i,))


@st.composite
def mutated_records(draw):
    rng = random.Random(draw(st.integers(0, 2 ** 16)))
    schema = spec_schema()
    record = random_record(schema, rng)
    for _ in range(draw(st.integers(0, 2))):
        places = list(_places(record))
        path = draw(st.sampled_from(places))
        how = draw(st.sampled_from(["replace", "drop", "add", "grow"]))
        if not path:
            if how == "replace":
                record = draw(JSON_VALUES)
            continue
        parent = record
        for step in path[:-1]:
            parent = parent[step]
        last = path[-1]
        if how == "replace":
            parent[last] = draw(JSON_VALUES)
        elif how == "drop":
            del parent[last]
        elif how == "add" and isinstance(parent, dict):
            parent[draw(st.sampled_from(["x", "w", "extra", "kind"]))] = draw(JSON_VALUES)
        elif how == "grow" and isinstance(parent[last], list):
            parent[last].extend(copy.deepcopy(parent[last][:1]) * 4)
    return schema, record


@settings(max_examples=300, deadline=None)
@given(mutated_records())
def test_reader_accepts_and_refuses_what_the_json_schema_does(case):
    schema, record = case
    definition = jsonschema.Draft202012Validator(record_schema(schema))
    try:
        featurise(schema, [record])
        accepted = True
    except ss.UserError:
        accepted = False
    assert accepted == definition.is_valid(record), record


@settings(max_examples=100, deadline=None)
@given(mutated_records())
def test_featurise_without_validation_takes_a_valid_record_alike_and_refuses_cleanly(case):
    """validate=False on any record: the validated tensors for a valid one,
    else a tensor batch or a UserError, never another exception."""
    schema, record = case
    try:
        unchecked = featurise(schema, [record, record], validate=False)
    except ss.UserError:
        unchecked = None
    if jsonschema.Draft202012Validator(record_schema(schema)).is_valid(record):
        assert unchecked is not None
        assert_same(unchecked, featurise(schema, [record, record]))


NUMPY_VALUES = st.sampled_from([
    np.float16(1.0), np.float32(0.5), np.float64(-2.0), np.longdouble(1.0), np.float32(np.inf), np.float64(np.nan),
    np.int8(1), np.uint8(0), np.int32(-3), np.int64(4), np.longlong(2), np.uint64(2 ** 64 - 1),
    np.bool_(True), np.bool_(False), np.str_("a"), np.str_("z")])


@st.composite
def records_with_numpy_scalars(draw):
    """A random record with some values replaced by numpy scalars (of every width)."""
    rng = random.Random(draw(st.integers(0, 2 ** 16)))
    schema = spec_schema()
    record = random_record(schema, rng)
    objects = [record["g"], *record["items"]]
    for _ in range(draw(st.integers(1, 3))):
        obj = draw(st.sampled_from(objects))
        obj[draw(st.sampled_from(sorted(obj)))] = draw(NUMPY_VALUES)
    return schema, record


@settings(max_examples=100, deadline=None)
@given(records_with_numpy_scalars())
def test_reader_takes_numpy_scalars_as_the_json_schema_is_told_to(case):
    """numpy scalars: the reader agrees with the validator that words its refusals
    (jsonschema told that numpy numbers are numbers, numpy bools read as bools)."""
    from specsurgery.features import _json_validator, _plain

    schema, record = case
    try:
        featurise(schema, [record])
        accepted = True
    except ss.UserError:
        accepted = False
    assert accepted == _json_validator(schema).is_valid(_plain(record)), record


def test_numpy_scalars_and_bool_spellings(model):
    plain = model.featurise([GOOD])
    numpy_record = {"g": {"x": np.float32(0.5), "k": "b", "n": np.int64(3), "on": np.bool_(True)},
                    "items": [{"w": np.float64(1.5), "kind": "c"}, {"w": np.float16(-2.0), "kind": "a"}]}
    assert_same(model.featurise([numpy_record]), plain)
    for on in (True, 1, 1.0, np.bool_(True), np.int8(1)):
        assert model.featurise([{**GOOD, "g": {**GOOD["g"], "on": on}}])["g"][0, 2] == 1.0
    for off in (False, 0, 0.0, np.bool_(False)):
        assert model.featurise([{**GOOD, "g": {**GOOD["g"], "on": off}}])["g"][0, 2] == 0.0
    assert model.featurise([{**GOOD, "g": {**GOOD["g"], "n": 4.0}}])["g"][0, 1] == 4.0
    with pytest.raises(ss.UserError) as e:
        model.featurise([{**GOOD, "g": {**GOOD["g"], "on": 2}}])
    assert str(e.value) == "record 0: g.on: 2 is not one of [False, True, 0, 1]"
    with pytest.raises(ss.UserError, match=r"record 0: g.n: 1.5 is not of type 'integer'"):
        model.featurise([{**GOOD, "g": {**GOOD["g"], "n": 1.5}}])


def test_featurise_without_validation_still_refuses_cleanly(model):
    with pytest.raises(ss.UserError, match=r"record 0: g: 'k' is a required property"):
        model.featurise([{**GOOD, "g": {"x": 1.0, "n": 1, "on": True}}], validate=False)
    same = model.featurise([GOOD], validate=False)
    assert_same(same, model.featurise([GOOD]))


# ---------------------------------------------------------------------------
# the output buffer: handed out again once nothing of a batch is referenced

FULL = {**GOOD, "items": [{"w": 3.0, "kind": "b"}] * 4}  # every entity slot taken


def buffer_of(model):
    """The reader's current output buffer, as a weak reference (a strong one would keep it busy)."""
    return weakref.ref(reader_for(model._ss_graph.schema)._outputs.buffer)


def expected_of(model, records: list) -> dict:
    return model.inputs(columns_of(schema_of(model), records))


def test_a_batch_still_held_is_never_written_over(model):
    first = model.featurise([FULL, FULL], validate=False)
    kept = {k: v.clone() for k, v in first.items()}
    held = buffer_of(model)
    recs = [GOOD, {**GOOD, "items": []}]
    second = model.featurise(recs, validate=False)
    assert buffer_of(model)() is not held()
    assert_same(first, kept)
    assert_same(second, expected_of(model, recs))


def test_a_reused_buffer_holds_exactly_the_new_batch(model):
    model.featurise([FULL, FULL])  # dropped at once: its buffer is free
    held = buffer_of(model)
    recs = [GOOD, {**GOOD, "items": []}]
    out = model.featurise(recs, validate=False)
    assert buffer_of(model)() is held()  # the same memory, the earlier entities zeroed
    assert_same(out, expected_of(model, recs))
    assert out["items"][1].abs().sum() == 0 and out["items.kind"][1].abs().sum() == 0


def test_a_view_of_one_tensor_keeps_its_batch(model):
    view = model.featurise([FULL, FULL])["items"][1, 3]  # a view of one entity: the batch stays
    model.featurise([GOOD, GOOD])
    assert view.tolist() == [3.0]
    array = model.featurise([FULL, FULL])["items#mask"].numpy()  # numpy shares the memory too
    model.featurise([GOOD, GOOD])
    assert array.tolist() == [[1.0] * 4] * 2


def test_a_batch_refused_halfway_leaves_nothing_behind(model):
    with pytest.raises(ss.UserError):
        model.featurise([FULL, {**FULL, "items": [{"w": "x", "kind": "a"}]}], validate=False)
    recs = [GOOD, {**GOOD, "items": []}]
    assert_same(model.featurise(recs, validate=False), expected_of(model, recs))


def test_a_batch_read_in_many_chunks_is_the_same_batch(model, monkeypatch):
    """Records are read a few at a time and each entity set scattered once per
    batch: chunks of 3 give the tensors of the arrays, validated or not, and a
    second batch in the same buffer keeps none of the first's entities."""
    from specsurgery import record_reader

    monkeypatch.setattr(record_reader, "CHUNK", 3)
    schema = schema_of(model)
    rng = random.Random(7)
    first = [FULL, {**GOOD, "items": []}] + [random_record(schema, rng) for _ in range(8)] + [FULL]
    second = [{**GOOD, "items": []}] * 5 + [random_record(schema, rng) for _ in range(5)] + [GOOD]
    for validate in (False, True):
        assert_same(model.featurise(first, validate=validate), expected_of(model, first))
        held = buffer_of(model)
        assert_same(model.featurise(second, validate=validate), expected_of(model, second))
        assert buffer_of(model)() is held()  # the second batch was read into the first's buffer


def test_more_entities_than_a_set_holds_are_refused_without_validation(model):
    """No entity spills into the next record's slots: the set's limit is checked anyway."""
    five = {**GOOD, "items": [{"w": 1.0, "kind": "a"}] * 5}
    with pytest.raises(ss.UserError) as e:
        model.featurise([five, GOOD], validate=False)
    assert str(e.value) == "record 0: items: 5 entities, at most 4 allowed"


def test_inputs_land_in_the_model_dtype():
    model = ss.compile(SPEC).to(torch.float64)
    cols = columns_of(schema_of(model), [GOOD])
    out = model.inputs(cols)
    assert out["g"].dtype == torch.float64 and out["items#mask"].dtype == torch.float64
    assert out["g.k"].dtype == torch.long
    assert_same(out, model.featurise([GOOD]))


# ---------------------------------------------------------------------------
# mistakes name the group and the feature

def _bad(cols: dict, key, value) -> dict:
    out = dict(cols)
    if value is None:
        del out[key]
    else:
        out[key] = value
    return out


@pytest.mark.parametrize("edit, message", [
    (lambda c: _bad(c, "g", None), "inputs: group g is missing"),
    (lambda c: _bad(c, "g", np.zeros((1, 2))), "inputs: g has shape [1, 2], expected [B, 3]"),
    (lambda c: _bad(c, "items", np.zeros((1, 3, 1))), "inputs: items has shape [1, 3, 1], expected [1, 4, 1]"),
    (lambda c: _bad(c, "g.k", None), "inputs: group g: feature 'k' is missing (give it as 'g.k' beside the group's array, or the group as a dict)"),
    (lambda c: _bad(c, "g.k", np.zeros(2, dtype=np.int64)), "inputs: g.k has shape [2], expected [1]"),
    (lambda c: _bad(c, "g.k", np.zeros(1)), "inputs: g.k: torch.float64 is not an integer dtype"),
    (lambda c: _bad(c, "g.k", np.array(["d"])), "inputs: g.k: 'd' is not one of ['a', 'b', 'c']"),
    (lambda c: _bad(c, "items#mask", None), "inputs: entity set items needs either 'items#mask' [B, 4] or 'items#count' [B]"),
    (lambda c: _bad(c, "items#count", np.array([5])), "inputs: entity set items needs either 'items#mask' [B, 4] or 'items#count' [B]"),
    (lambda c: _bad(_bad(c, "items#mask", None), "items#count", np.array([5])), "inputs: items#count must be between 0 and 4"),
    (lambda c: _bad(c, "units", np.zeros(1)), "inputs: 'units' is not a group of schema s (groups: g, items)"),
    (lambda c: _bad(c, "g", {"x": np.zeros(1), "n": np.zeros(1), "on": np.zeros(1)}), "inputs: group g: feature 'k' is missing"),
    (lambda c: _bad(c, "g", {"x": np.zeros(1), "n": np.zeros(1), "on": np.zeros(1), "k": np.zeros(1, dtype=int), "y": np.zeros(1)}),
     "inputs: group g has no feature 'y' (features: x, k, n, on)"),
    (lambda c: _bad(c, "g", {"x": np.zeros((1, 2)), "n": np.zeros(1), "on": np.zeros(1), "k": np.zeros(1, dtype=int)}),
     "inputs: g.x has shape [1, 2], expected [B]"),
])
def test_inputs_mistakes_name_group_and_feature(model, edit, message):
    cols = columns_of(schema_of(model), [GOOD])
    with pytest.raises(ss.UserError) as e:
        model.inputs(edit(cols))
    assert str(e.value) == message


def test_an_index_outside_the_vocab_is_named_when_the_model_reads_it(model):
    cols = columns_of(schema_of(model), [GOOD])
    cols["items.kind"] = np.array([[0, 7, 0, 0]])
    inputs = model.inputs(cols)  # shapes are fine; indices are checked where they are read
    with pytest.raises(ss.UserError) as e:
        model(inputs)
    assert str(e.value) == "inputs: items.kind: index 7 is not an item of vocab kinds (0 to 2)"
