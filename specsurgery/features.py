"""Observations as JSON records, checked and turned into the model's tensors.

A record maps group -> feature -> value; an entity set is a list of up to N
such objects. `record_schema` is the JSON Schema (Draft 2020-12) records must
satisfy; `featurise` validates with jsonschema, then builds, in schema order:

  inputs["hero"]          float [B, (T), n]      the group's numeric features
  inputs["units"]         float [B, (T), N, n]   for an entity set, padded to N
  inputs["hero.hero_id"]  long  [B, (T), (N)]    one per category feature
  inputs["units#mask"]    float [B, (T), N]      1 for a real entity, 0 for padding

The time axis T is there when the model has an lstm: then each record of the
batch is a list of observations, one per step.
"""
from __future__ import annotations

from typing import Any, Iterable

from .errors import UserError
from .spec import model as m

DRAFT = "https://json-schema.org/draft/2020-12/schema"
_JSON_TYPES = {"float": {"type": "number"}, "int": {"type": "integer"}, "bool": {"type": "boolean"}}


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


def validate_record(schema: m.Schema, record: Any, where: str = "record") -> None:
    import jsonschema

    validator = _VALIDATORS.get(schema)
    if validator is None:
        validator = _VALIDATORS[schema] = jsonschema.Draft202012Validator(record_schema(schema))
    error = jsonschema.exceptions.best_match(validator.iter_errors(record))
    if error is not None:
        message = error.message
        if error.validator == "maxItems":  # jsonschema's own message prints the whole list
            message = f"{len(error.instance)} entities, at most {error.validator_value} allowed"
        path = _json_path(error.absolute_path)
        raise UserError(f"{where}: {path}: {message}" if path else f"{where}: {message}")


def featurise(schema: m.Schema, records: list, time: bool = False, validate: bool = True,
              dtype=None, device=None) -> dict:
    """A batch of records (or, with `time`, of record sequences) -> input tensors
    (numeric ones in `dtype`, default float32; all on `device`, default CPU)."""
    import torch

    if time:
        steps = {len(seq) if isinstance(seq, list) else -1 for seq in records}
        if len(steps) != 1 or -1 in steps or 0 in steps:
            raise UserError("records: a model with an lstm takes, per batch item, a list of observations of one length")
        flat = [obs for seq in records for obs in seq]
        lead = (len(records), steps.pop())
    else:
        flat, lead = list(records), (len(records),)
    if validate:
        for i, record in enumerate(flat):
            where = f"record {i // lead[1]}, step {i % lead[1]}" if time else f"record {i}"
            validate_record(schema, record, where=where)
    out: dict[str, torch.Tensor] = {}
    for group in schema.groups:
        numeric = group.numeric_features
        categories = group.category_features
        index = {f.name: {item: k for k, item in enumerate(schema.vocab(f.vocab).item_names)} for f in categories}
        if group.is_entity_set:
            n = group.entities
            values = torch.zeros(len(flat), n, len(numeric))
            mask = torch.zeros(len(flat), n)
            cats = {f.name: torch.zeros(len(flat), n, dtype=torch.long) for f in categories}
            for b, record in enumerate(flat):
                entities = record[group.name]
                if entities:
                    values[b, : len(entities)] = torch.tensor(
                        [[float(e[f.name]) for f in numeric] for e in entities]).reshape(len(entities), len(numeric))
                    mask[b, : len(entities)] = 1.0
                    for f in categories:
                        cats[f.name][b, : len(entities)] = torch.tensor([index[f.name][e[f.name]] for e in entities])
            out[group.name] = values.reshape(*lead, n, len(numeric))
            out[f"{group.name}#mask"] = mask.reshape(*lead, n)
            for f in categories:
                out[f"{group.name}.{f.name}"] = cats[f.name].reshape(*lead, n)
        else:
            values = torch.tensor([[float(r[group.name][f.name]) for f in numeric] for r in flat]).reshape(len(flat), len(numeric))
            out[group.name] = values.reshape(*lead, len(numeric))
            for f in categories:
                ids = torch.tensor([index[f.name][r[group.name][f.name]] for r in flat], dtype=torch.long)
                out[f"{group.name}.{f.name}"] = ids.reshape(*lead)
    if dtype is not None or device is not None:
        out = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else None) for k, v in out.items()}
    return out


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
