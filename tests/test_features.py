"""Records -> tensors (featurise), record validation messages, and the record JSON Schema."""
from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import torch

from specsurgery.errors import UserError
from specsurgery.features import featurise, record_schema, validate_record
from specsurgery.spec.load import load, load_text

REPO = Path(__file__).resolve().parents[1]

# Categories placed between numeric features, names out of alphabetical order: the
# numeric tensor must follow the schema's order and skip the categories.
MIXED = """
schema mixed {
  vocab colors = [red, green, blue]
  vocab kinds = [small, large]

  group g {
    z: float
    c: category(colors)
    a: int
    flag: bool
  }

  group items[3] {
    k: category(kinds)
    w: float
    col: category(colors)
    v: int
  }
}
"""


@pytest.fixture(scope="module")
def mixed():
    return load_text(MIXED, "<mixed>").schemas["mixed"]


@pytest.fixture(scope="module")
def dota():
    return load([str(REPO / "specs" / "policy.spec")]).schemas["dota"]


R0 = {"g": {"z": 0.5, "c": "blue", "a": -2, "flag": True},
      "items": [{"k": "large", "w": 1.5, "col": "green", "v": 7}, {"k": "small", "w": -0.25, "col": "blue", "v": 0}]}
R1 = {"g": {"z": -1.0, "c": "red", "a": 3, "flag": False}, "items": []}
R2 = {"g": {"z": 2.0, "c": "green", "a": 0, "flag": True},
      "items": [{"k": "small", "w": 3.0, "col": "red", "v": -1} for _ in range(3)]}

# the tensors each record gives, by hand
G = {"R0": [0.5, -2.0, 1.0], "R1": [-1.0, 3.0, 0.0], "R2": [2.0, 0.0, 1.0]}
G_C = {"R0": 2, "R1": 0, "R2": 1}
ITEMS = {"R0": [[1.5, 7.0], [-0.25, 0.0], [0.0, 0.0]], "R1": [[0.0, 0.0]] * 3, "R2": [[3.0, -1.0]] * 3}
MASK = {"R0": [1.0, 1.0, 0.0], "R1": [0.0, 0.0, 0.0], "R2": [1.0, 1.0, 1.0]}
ITEMS_K = {"R0": [1, 0, 0], "R1": [0, 0, 0], "R2": [0, 0, 0]}
ITEMS_COL = {"R0": [1, 2, 0], "R1": [0, 0, 0], "R2": [0, 0, 0]}
RECORDS = {"R0": R0, "R1": R1, "R2": R2}


def expected(names: list[str]) -> dict[str, torch.Tensor]:
    return {
        "g": torch.tensor([G[n] for n in names]),
        "g.c": torch.tensor([G_C[n] for n in names]),
        "items": torch.tensor([ITEMS[n] for n in names]),
        "items#mask": torch.tensor([MASK[n] for n in names]),
        "items.k": torch.tensor([ITEMS_K[n] for n in names]),
        "items.col": torch.tensor([ITEMS_COL[n] for n in names]),
    }


def assert_same(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == (torch.long if not want.is_floating_point() else torch.float32)
    assert got.shape == want.shape
    assert torch.equal(got, want.to(got.dtype)), (got, want)


def test_featurise_exact_tensors(mixed):
    out = featurise(mixed, [R0, R1, R2])
    assert set(out) == {"g", "g.c", "items", "items#mask", "items.k", "items.col"}
    want = expected(["R0", "R1", "R2"])
    for key in want:
        assert_same(out[key], want[key])
    assert out["g"].shape == (3, 3)           # [B, numeric features]: z, a, flag
    assert out["items"].shape == (3, 3, 2)    # [B, N, numeric]: w, v
    assert out["items#mask"].shape == (3, 3)  # [B, N]
    assert out["g.c"].shape == (3,)           # [B]
    assert out["items.k"].shape == (3, 3)     # [B, N]


def test_featurise_policy_record(dota):
    record = {"hero": {"health": 520.0, "max_health": 600.0, "mana": 75.5, "level": 3, "alive": True,
                       "hero_id": "crystal_maiden"},
              "units": [{"x": 1.5, "y": -2.0, "health": 300.0, "kind": "courier"},
                        {"x": 0.0, "y": 10.0, "health": 1800.0, "kind": "tower"}]}
    out = featurise(dota, [record])
    assert_same(out["hero"], torch.tensor([[520.0, 600.0, 75.5, 3.0, 1.0]]))
    assert_same(out["hero.hero_id"], torch.tensor([2]))
    units = torch.zeros(1, 64, 3)
    units[0, 0] = torch.tensor([1.5, -2.0, 300.0])
    units[0, 1] = torch.tensor([0.0, 10.0, 1800.0])
    assert_same(out["units"], units)
    mask = torch.zeros(1, 64)
    mask[0, :2] = 1.0
    assert_same(out["units#mask"], mask)
    kinds = torch.zeros(1, 64, dtype=torch.long)
    kinds[0, :2] = torch.tensor([3, 1])
    assert_same(out["units.kind"], kinds)


def test_featurise_time_axis(mixed):
    seqs = [["R0", "R1", "R2"], ["R2", "R2", "R1"]]
    out = featurise(mixed, [[RECORDS[n] for n in seq] for seq in seqs], time=True)
    assert out["g"].shape == (2, 3, 3)             # [B, T, n]
    assert out["g.c"].shape == (2, 3)              # [B, T]
    assert out["items"].shape == (2, 3, 3, 2)      # [B, T, N, n]
    assert out["items#mask"].shape == (2, 3, 3)    # [B, T, N]
    assert out["items.col"].shape == (2, 3, 3)     # [B, T, N]
    for b, seq in enumerate(seqs):
        want = expected(seq)
        for key in want:
            assert_same(out[key][b], want[key])


@pytest.mark.parametrize("records", [
    [[R0, R1], [R0]],   # ragged
    [[], []],           # no steps
    [R0, R1],           # not sequences
    [],                 # no batch
])
def test_featurise_time_needs_equal_sequences(mixed, records):
    with pytest.raises(UserError) as e:
        featurise(mixed, records, time=True)
    assert str(e.value) == ("records: a model with an lstm takes, per batch item, "
                            "a list of observations of one length")


def test_featurise_names_the_bad_record(mixed):
    bad = copy.deepcopy(R2)
    bad["items"][1]["col"] = "purple"
    with pytest.raises(UserError) as e:
        featurise(mixed, [R0, R1, bad])
    assert str(e.value) == "record 2: items[1].col: 'purple' is not one of ['red', 'green', 'blue']"
    with pytest.raises(UserError) as e:
        featurise(mixed, [[R0, R1, R2], [R0, R1, bad]], time=True)
    assert str(e.value) == "record 1, step 2: items[1].col: 'purple' is not one of ['red', 'green', 'blue']"


# ---------------------------------------------------------------------------
# validate_record: one message naming the JSON path

GOOD = {"hero": {"health": 1.0, "max_health": 2.0, "mana": 3.0, "level": 4, "alive": True, "hero_id": "bane"},
        "units": [{"x": 1.0, "y": 2.0, "health": 3.0, "kind": "tower"},
                  {"x": 4.0, "y": 5.0, "health": 6.0, "kind": "courier"}]}


def edited(edit) -> dict:
    record = copy.deepcopy(GOOD)
    edit(record)
    return record


BAD = {
    "unknown item": (lambda r: r["units"][1].update(kind="tree"),
                     "units[1].kind: 'tree' is not one of ['creep', 'tower', 'hero', 'courier']"),
    "missing feature": (lambda r: r["hero"].pop("mana"), "hero: 'mana' is a required property"),
    "missing entity feature": (lambda r: r["units"][0].pop("y"), "units[0]: 'y' is a required property"),
    "missing group": (lambda r: r.pop("units"), "'units' is a required property"),
    "extra feature": (lambda r: r["hero"].update(armor=1),
                      "hero: Additional properties are not allowed ('armor' was unexpected)"),
    "extra entity feature": (lambda r: r["units"][1].update(z=1.0),
                             "units[1]: Additional properties are not allowed ('z' was unexpected)"),
    "extra group": (lambda r: r.update(items=[]), "Additional properties are not allowed ('items' was unexpected)"),
    "float for int": (lambda r: r["hero"].update(level=1.5), "hero.level: 1.5 is not of type 'integer'"),
    "string for int": (lambda r: r["hero"].update(level="3"), "hero.level: '3' is not of type 'integer'"),
    "bool for int": (lambda r: r["hero"].update(level=True), "hero.level: True is not of type 'integer'"),
    "bool for float": (lambda r: r["units"][0].update(x=False), "units[0].x: False is not of type 'number'"),
    "2 for bool": (lambda r: r["hero"].update(alive=2), "hero.alive: 2 is not one of [False, True, 0, 1]"),
    "string for bool": (lambda r: r["hero"].update(alive="yes"), "hero.alive: 'yes' is not one of [False, True, 0, 1]"),
    "past a float": (lambda r: r["hero"].update(mana=10 ** 400), "hero.mana: " + str(10 ** 400) + " is greater than the maximum of 1.7976931348623157e+308"),
    "category not a string": (lambda r: r["hero"].update(hero_id=0), "hero.hero_id: 0 is not one of ['axe', 'bane', 'crystal_maiden', 'drow_ranger']"),
    "group not an object": (lambda r: r.update(hero=[]), "hero: [] is not of type 'object'"),
    "entity set not a list": (lambda r: r.update(units={}), "units: {} is not of type 'array'"),
    "entity not an object": (lambda r: r["units"].append(5), "units[2]: 5 is not of type 'object'"),
    "too many entities": (lambda r: r.update(units=[r["units"][0]] * 65), "units: 65 entities, at most 64 allowed"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_validate_record_message(dota, case):
    edit, message = BAD[case]
    with pytest.raises(UserError) as e:
        validate_record(dota, edited(edit), where="record 0")
    assert str(e.value) == f"record 0: {message}"
    with pytest.raises(UserError) as e:  # the default prefix
        validate_record(dota, edited(edit))
    assert str(e.value) == f"record: {message}"


@pytest.mark.parametrize("record", [None, [], "obs", 3])
def test_validate_record_not_an_object(dota, record):
    with pytest.raises(UserError) as e:
        validate_record(dota, record, where="record 0")
    assert str(e.value) == f"record 0: {record!r} is not of type 'object'"


def test_validate_record_accepts_good_records(dota):
    validate_record(dota, GOOD)
    validate_record(dota, edited(lambda r: r.update(units=[])))
    validate_record(dota, edited(lambda r: r.update(units=[r["units"][0]] * 64)))
    validate_record(dota, edited(lambda r: r["hero"].update(level=2.0, health=7)))  # 2.0 is an integer in JSON
    for alive in (True, False, 0, 1, 0.0, 1.0):  # a bool feature takes true, false, 0 or 1
        validate_record(dota, edited(lambda r: r["hero"].update(alive=alive)))


# ---------------------------------------------------------------------------
# record_schema


def test_record_schema_is_valid_draft_2020_12(dota, mixed):
    for schema in (dota, mixed):
        document = record_schema(schema)
        jsonschema.Draft202012Validator.check_schema(document)
        assert document["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        assert jsonschema.validators.validator_for(document) is jsonschema.Draft202012Validator


def test_record_schema_content(mixed):
    document = record_schema(mixed)
    assert document["type"] == "object"
    assert document["additionalProperties"] is False
    assert list(document["properties"]) == ["g", "items"] == document["required"]
    g = document["properties"]["g"]
    bound = {"minimum": -1.7976931348623157e308, "maximum": 1.7976931348623157e308}
    assert g == {"type": "object",
                 "properties": {"z": {"type": "number", **bound}, "c": {"enum": ["red", "green", "blue"]},
                                "a": {"type": "integer", **bound}, "flag": {"enum": [False, True, 0, 1]}},
                 "required": ["z", "c", "a", "flag"], "additionalProperties": False}
    items = document["properties"]["items"]
    assert items["type"] == "array" and items["maxItems"] == 3
    assert list(items["items"]["properties"]) == ["k", "w", "col", "v"]
    assert items["items"]["properties"]["k"] == {"enum": ["small", "large"]}


def test_record_schema_agrees_with_validate_record(dota):
    validator = jsonschema.Draft202012Validator(record_schema(dota))
    assert validator.is_valid(GOOD)
    for case, (edit, _) in BAD.items():
        assert not validator.is_valid(edited(edit)), case
