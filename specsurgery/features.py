"""Observations, from JSON-like records or from arrays, turned into the model's tensors.

A record maps group -> feature -> value; an entity set is a list of up to N
such objects. `record_schema` is the JSON Schema (Draft 2020-12) records must
satisfy: it is the definition. `featurise` reads and checks records with a
reader built once per schema (record_reader.py), which accepts and refuses
exactly what the JSON Schema does on JSON values (tests/test_inputs.py proves
it), and asks jsonschema only to word the message once a record is refused. Both paths
build, in schema order:

  inputs["hero"]          float [B, (T), n]      the group's numeric features
  inputs["units"]         float [B, (T), N, n]   for an entity set, padded to N
  inputs["hero.hero_id"]  long  [B, (T), (N)]    one per category feature
  inputs["units#mask"]    float [B, (T), N]      1 for a real entity, 0 for padding

The time axis T is there when the model has a recurrent op: then each record
of the batch is a list of observations, one per step. Numeric features take
numbers (numpy scalars too); a bool feature takes true, false, 0 or 1.
`inputs_from_columns` is the fast path from arrays a training loop already holds.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional

from .errors import UserError
from .record_reader import Refused, reader_for
from .spec import model as m

DRAFT = "https://json-schema.org/draft/2020-12/schema"
FLOAT_MAX = 1.7976931348623157e308  # a value must fit a float (JSON numbers have no bound)
_JSON_TYPES = {
    "float": {"type": "number", "minimum": -FLOAT_MAX, "maximum": FLOAT_MAX},
    "int": {"type": "integer", "minimum": -FLOAT_MAX, "maximum": FLOAT_MAX},
    "bool": {"enum": [False, True, 0, 1]},
}


def _feature_schema(schema: m.Schema, feature: m.Feature) -> dict:
    if feature.is_category:
        return {"enum": list(schema.vocab(feature.vocab).item_names)}
    return dict(_JSON_TYPES[feature.type])


def _object_schema(schema: m.Schema, group: m.Group) -> dict:
    return {
        "type": "object",
        "properties": {f.name: _feature_schema(schema, f) for f in group.features},
        "required": [f.name for f in group.features],
        "additionalProperties": False,
    }


def record_schema(schema: m.Schema) -> dict:
    """The JSON Schema of one observation under `schema`."""
    properties = {}
    for group in schema.groups:
        obj = _object_schema(schema, group)
        if group.is_entity_set:
            properties[group.name] = {"type": "array", "maxItems": group.entities, "items": obj}
        else:
            properties[group.name] = obj
    return {
        "$schema": DRAFT,
        "title": f"observation of schema {schema.name}",
        "type": "object",
        "properties": properties,
        "required": [g.name for g in schema.groups],
        "additionalProperties": False,
    }


def _json_path(parts: Iterable[Any]) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


_VALIDATORS: dict = {}


def _json_validator(schema: m.Schema):
    """jsonschema's validator of the record schema, told that numpy scalars are numbers."""
    import jsonschema
    import numpy as np

    hit = _VALIDATORS.get(id(schema))
    validator = hit[1] if hit is not None and hit[0] is schema else None
    if validator is None:
        base = jsonschema.Draft202012Validator
        checker = base.TYPE_CHECKER.redefine_many({
            "number": lambda c, v: base.TYPE_CHECKER.is_type(v, "number") or isinstance(v, (np.integer, np.floating)),
            "integer": lambda c, v: base.TYPE_CHECKER.is_type(v, "integer") or isinstance(v, np.integer)
            or (isinstance(v, np.floating) and float(v).is_integer()),
        })
        cls = jsonschema.validators.extend(base, type_checker=checker, validators={
            "minimum": _numpy_bound(base.VALIDATORS["minimum"]), "maximum": _numpy_bound(base.VALIDATORS["maximum"])})
        validator = cls(record_schema(schema))
        if len(_VALIDATORS) >= 16:
            _VALIDATORS.pop(next(iter(_VALIDATORS)))
        _VALIDATORS[id(schema)] = (schema, validator)
    return validator


def _numpy_bound(keyword):
    """jsonschema's minimum or maximum, also right for a numpy scalar: numpy
    compares np.float32(inf) with the bound in float32, where the bound itself
    is inf, and lets it through; such a scalar is compared again as a Python number."""
    import numpy as np

    def check(validator, bound, instance, schema):
        with np.errstate(over="ignore", invalid="ignore"):
            errors = list(keyword(validator, bound, instance, schema))
        if not errors and isinstance(instance, (np.integer, np.floating)):
            number = float(instance) if isinstance(instance, np.floating) else int(instance)
            errors = list(keyword(validator, bound, number, schema))
        yield from errors

    return check


def validate_record(schema: m.Schema, record: Any, where: str = "record") -> None:
    """Raise UserError, worded by jsonschema, when `record` does not satisfy the schema."""
    import jsonschema

    error = jsonschema.exceptions.best_match(_json_validator(schema).iter_errors(_plain(record)))
    if error is not None:
        message = error.message
        if error.validator == "maxItems":  # jsonschema's own message prints the whole list
            message = f"{len(error.instance)} entities, at most {error.validator_value} allowed"
        path = _json_path(error.absolute_path)
        raise UserError(f"{where}: {path}: {message}" if path else f"{where}: {message}")


def _plain(value):
    """numpy bools as Python bools, so the schema's enum knows them."""
    import numpy as np

    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def featurise(schema: m.Schema, records, time: bool = False, validate: bool = True,
              dtype=None, device=None) -> dict:
    """A batch of records (or, with `time`, of record sequences) -> input tensors
    (numeric ones in `dtype`, default float32; all on `device`, default CPU)."""
    import torch

    dtype = dtype or torch.float32
    records = list(records) if not isinstance(records, list) else records
    if time:
        steps = {len(seq) if isinstance(seq, list) else -1 for seq in records}
        if len(steps) != 1 or -1 in steps or 0 in steps:
            raise UserError("records: a model with an lstm takes, per batch item, a list of observations of one length")
        lead = (len(records), steps.pop())
        flat = [obs for seq in records for obs in seq]
    else:
        flat, lead = records, (len(records),)
    try:
        out = reader_for(schema).read(flat, validate, dtype)
    except (Refused, KeyError, TypeError, ValueError, AttributeError, OverflowError, RuntimeError, IndexError):
        _explain(schema, flat, lead, time)
        raise UserError("records: not valid observations (featurise them with validate=True to see why)") from None
    out = {k: v.reshape(*lead, *v.shape[1:]) for k, v in out.items()}
    return {k: v.to(device) for k, v in out.items()} if device is not None else out


def _explain(schema: m.Schema, flat: list, lead: tuple, time: bool) -> None:
    """Raise the message of the first record jsonschema refuses."""
    for i, record in enumerate(flat):
        where = f"record {i // lead[1]}, step {i % lead[1]}" if time else f"record {i}"
        validate_record(schema, record, where=where)


# ---------------------------------------------------------------------------
# random observations (verify, tests, benchmarks)


def random_object(schema: m.Schema, group: m.Group, rng) -> dict:
    """Random values for one observation of `group` (one entity of an entity set)."""
    obj = {}
    for f in group.features:
        if f.is_category:
            obj[f.name] = rng.choice(schema.vocab(f.vocab).item_names)
        elif f.type == "float":
            obj[f.name] = rng.gauss(0.0, 1.0)
        elif f.type == "int":
            obj[f.name] = rng.randint(-3, 3)
        else:
            obj[f.name] = rng.random() < 0.5
    return obj


def random_record(schema: m.Schema, rng, max_entities: int | None = None) -> dict:
    """A random observation of `schema` (values drawn from `rng`, a random.Random);
    an entity set holds a random number of entities, at most `max_entities`."""
    record: dict = {}
    for group in schema.groups:
        if group.is_entity_set:
            limit = group.entities if max_entities is None else min(group.entities, max_entities)
            record[group.name] = [random_object(schema, group, rng) for _ in range(rng.randint(0, limit))]
        else:
            record[group.name] = random_object(schema, group, rng)
    return record


# ---------------------------------------------------------------------------
# arrays: the fast path


@dataclass(frozen=True)
class _GroupColumns:
    """What inputs_from_columns needs of one group, worked out once per schema."""

    name: str
    entities: Optional[int]
    numeric: tuple[str, ...]
    categories: tuple[tuple[str, str, tuple[str, ...]], ...]  # (feature, "<group>.<feature>", vocab items)
    features: frozenset
    listing: str  # "x, k, n" for messages
    rest: tuple[int, ...]  # the axes after batch (and time) of a feature: (N,) for an entity set, else ()
    rest_names: str  # ", N" or "" for messages
    mask_key: str
    count_key: str
    values_rest: tuple[int, ...]  # the axes after batch (and time) of the group's array: (n,) or (N, n)
    values_names: str  # ", n" or ", N, n" for messages


@dataclass(frozen=True)
class _ColumnPlan:
    groups: tuple[_GroupColumns, ...]
    keys: frozenset  # every key `columns` may hold: groups, "<group>.<category>", "<set>#mask", "<set>#count"


_COLUMN_PLANS: dict = {}


_INTEGER_DTYPES = _REAL_DTYPES = None  # filled on first use (torch is imported late)


def _dtypes():
    import torch

    integer = frozenset({torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8})
    real = integer | {torch.bool, torch.float16, torch.bfloat16, torch.float32, torch.float64}
    return integer, real


def _column_plan(schema: m.Schema) -> _ColumnPlan:
    hit = _COLUMN_PLANS.get(id(schema))  # by identity: hashing a schema walks all of it
    if hit is not None and hit[0] is schema:
        return hit[1]
    groups = tuple(
        _GroupColumns(g.name, g.entities, tuple(f.name for f in g.numeric_features),
                      tuple((f.name, f"{g.name}.{f.name}", schema.vocab(f.vocab).item_names)
                            for f in g.category_features),
                      frozenset(f.name for f in g.features), ", ".join(f.name for f in g.features),
                      (g.entities,) if g.is_entity_set else (), f", {g.entities}" if g.is_entity_set else "",
                      f"{g.name}#mask", f"{g.name}#count",
                      ((g.entities,) if g.is_entity_set else ()) + (len(g.numeric_features),),
                      (f", {g.entities}" if g.is_entity_set else "") + f", {len(g.numeric_features)}")
        for g in schema.groups)
    keys = {g.name for g in groups} | {key for g in groups for _, key, _ in g.categories}
    keys |= {k for g in groups if g.entities is not None for k in (g.mask_key, g.count_key)}
    plan = _ColumnPlan(groups, frozenset(keys))
    if len(_COLUMN_PLANS) >= 16:
        _COLUMN_PLANS.pop(next(iter(_COLUMN_PLANS)))
    _COLUMN_PLANS[id(schema)] = (schema, plan)
    return plan


def inputs_from_columns(schema: m.Schema, columns: Mapping, time: bool = False, dtype=None, device=None) -> dict:
    """Arrays a training loop holds -> input tensors (see ss.Model.inputs).

    Per group, either one array of its numeric features in schema order
    (`[B, (T), n]`, `[B, (T), N, n]` for an entity set), its categories beside it
    under "<group>.<feature>", or a dict feature -> array (`[B, (T)]`, `[B, (T), N]`).
    An entity set comes with "<group>#mask" `[B, (T), N]` or "<group>#count" `[B, (T)]`.
    Arrays are taken as they are where they can be (no copy when dtype and device
    already fit); only shapes are checked here, category indices are checked
    when the model reads them (Model.forward explains a bad one)."""
    import numpy as np
    import torch

    dtype = dtype or torch.float32
    if not isinstance(columns, Mapping):
        raise UserError(f"inputs: columns must be a dict of group -> array, got {type(columns).__name__}")
    global _INTEGER_DTYPES, _REAL_DTYPES
    if _REAL_DTYPES is None:
        _INTEGER_DTYPES, _REAL_DTYPES = _dtypes()
    plan = _column_plan(schema)
    if not plan.keys.issuperset(columns):
        _check_keys(schema, plan.groups, columns)
    n_lead = 2 if time else 1
    lead_names = "[B, T" if time else "[B"
    lead: Optional[tuple] = None
    out: dict = {}
    on_cpu = device is None or torch.device(device).type == "cpu"

    def tensor(value, what: str, integer: bool = False):
        try:
            if on_cpu and type(value) is np.ndarray:
                t = torch.from_numpy(value)  # what torch.as_tensor does for an array, in half the time
            elif isinstance(value, torch.Tensor):
                t = value if on_cpu and value.device.type == "cpu" else value.to(device)
            else:
                t = torch.as_tensor(value, device=device)
        except (TypeError, ValueError, RuntimeError) as e:
            raise UserError(f"inputs: {what}: not a numeric array ({e})") from None
        if t.dtype not in (_INTEGER_DTYPES if integer else _REAL_DTYPES):
            raise UserError(f"inputs: {what}: {t.dtype} is not {'an integer' if integer else 'a real'} dtype")
        return t

    def fits(t, what: str, rest: tuple, names: str) -> None:
        nonlocal lead
        shape = t.shape
        if lead is not None:
            if shape == lead + rest:
                return
        elif len(shape) == n_lead + len(rest) and shape[n_lead:] == rest:
            lead = tuple(shape[:n_lead])
            return
        expected = list(lead) + list(rest) if lead is not None else f"{lead_names}{names}]"
        raise UserError(f"inputs: {what} has shape {list(shape)}, expected {expected}")

    for g in plan.groups:
        entity, ent_names = g.rest, g.rest_names
        given = columns.get(g.name)
        if given is None:
            raise UserError(f"inputs: group {g.name} is missing")
        if isinstance(given, Mapping):
            unknown = [k for k in given if k not in g.features]
            if unknown:
                raise UserError(f"inputs: group {g.name} has no feature {unknown[0]!r} (features: {g.listing})")
            missing = [f for f in g.features if f not in given]
            if missing:
                first = next(f for f in g.listing.split(", ") if f in missing)
                raise UserError(f"inputs: group {g.name}: feature {first!r} is missing")
            parts = []
            for f in g.numeric:
                t = tensor(given[f], f"{g.name}.{f}")
                fits(t, f"{g.name}.{f}", entity, ent_names)
                parts.append(t)
            values = torch.stack(parts, dim=-1).to(dtype) if parts else None
            cats = {f: given[f] for f, _, _ in g.categories}
        else:
            t = tensor(given, g.name)
            fits(t, g.name, g.values_rest, g.values_names)
            values = t if t.dtype == dtype else t.to(dtype)
            cats = {}
            for f, key, _ in g.categories:
                if key not in columns:
                    raise UserError(f"inputs: group {g.name}: feature {f!r} is missing "
                                    f"(give it as {key!r} beside the group's array, or the group as a dict)")
                cats[f] = columns[key]
        for f, key, items in g.categories:
            ids = _category_indices(items, cats[f], key, tensor, device)
            fits(ids, key, entity, ent_names)
            out[key] = ids
        if values is None:  # no numeric features: an empty last axis
            values = torch.zeros(*lead, *entity, 0, dtype=dtype, device=device)
        out[g.name] = values
        if g.entities is not None:
            mask, count = columns.get(g.mask_key), columns.get(g.count_key)
            if (mask is None) == (count is None):
                raise UserError(f"inputs: entity set {g.name} needs either '{g.mask_key}' "
                                f"{lead_names}, {g.entities}] or '{g.count_key}' {lead_names}]")
            if mask is not None:
                t = tensor(mask, g.mask_key)
                fits(t, g.mask_key, entity, ent_names)
                out[g.mask_key] = t if t.dtype == dtype else t.to(dtype)
            else:
                t = tensor(count, g.count_key, integer=True)
                fits(t, g.count_key, (), "")
                if t.numel() and (int(t.min()) < 0 or int(t.max()) > g.entities):
                    raise UserError(f"inputs: {g.name}#count must be between 0 and {g.entities}")
                slots = torch.arange(g.entities, device=t.device)
                out[g.mask_key] = (slots < t.unsqueeze(-1)).to(dtype)
    return out


def _check_keys(schema: m.Schema, plan: tuple[_GroupColumns, ...], columns: Mapping) -> None:
    """Every key names a group, a category beside a group's array, or an entity set's mask or count."""
    groups = {g.name: g for g in plan}
    for key in columns:
        if key in groups:
            continue
        if not isinstance(key, str):
            raise UserError(f"inputs: keys are group names, got {key!r}")
        base = key.split("#", 1)[0].split(".", 1)[0]
        group = groups.get(base)
        if group is None:
            raise UserError(f"inputs: {key!r} is not a group of schema {schema.name} "
                            f"(groups: {', '.join(groups)})")
        if "#" in key:
            if group.entities is None or key.split("#", 1)[1] not in ("mask", "count"):
                raise UserError(f"inputs: {key!r} is not an entity set's mask or count")
        elif "." in key:
            if key not in {k for _, k, _ in group.categories}:
                raise UserError(f"inputs: {key!r} is not a category feature of group {base} (numeric features "
                                "go in the group's array)")


def _category_indices(items: tuple[str, ...], given, what: str, tensor, device):
    """Vocabulary indices (long) from indices or item strings."""
    import numpy as np
    import torch

    array = given if isinstance(given, np.ndarray) else None
    if array is None and not isinstance(given, torch.Tensor):
        probe = np.asarray(given)
        array = probe if probe.dtype.kind in "UO" else None
    if array is not None and array.dtype.kind in "UO":  # item strings
        order = np.argsort(np.asarray(items))
        sorted_items = np.asarray(items)[order]
        flat = array.astype(str).reshape(-1)
        pos = np.searchsorted(sorted_items, flat).clip(0, len(items) - 1)
        bad = sorted_items[pos] != flat
        if bad.any():
            raise UserError(f"inputs: {what}: {str(flat[bad.argmax()])!r} is not one of {list(items)}")
        return torch.as_tensor(order[pos].reshape(array.shape), dtype=torch.long, device=device)
    t = tensor(given, what, integer=True)
    return t if t.dtype == torch.long else t.to(torch.long)


def explain_bad_indices(schema: m.Schema, inputs: Mapping) -> None:
    """Raise UserError naming the category input whose indices fall outside its
    vocabulary (what makes embed or onehot fail inside the model)."""
    for group in schema.groups:
        for f in group.category_features:
            what = f"{group.name}.{f.name}"
            t = inputs.get(what)
            if t is None or not t.numel():
                continue
            n = len(schema.vocab(f.vocab).items)
            low, high = int(t.min()), int(t.max())
            if low < 0 or high >= n:
                raise UserError(f"inputs: {what}: index {low if low < 0 else high} is not an item of vocab "
                                f"{f.vocab} (0 to {n - 1})")
