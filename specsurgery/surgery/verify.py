"""Proof on data: run old and new models on the same states.

Each state is one JSON record per observation (a sequence of them for a
recurrent model), made under the old schema (or the caller's own records) and
carried to the new one through the renames (values of features the new
version added are random; category values are drawn from the items both
versions share), then featurised under each schema. The result is the largest
absolute difference per output head the two models share, in float64.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..errors import UserError
from ..features import random_object, random_record
from ..spec import model as m
from .diff import Renames, find_renames


def load_module(path: str):
    """(spec, model in eval mode) of a checkpoint."""
    from ..model import load_model

    model = load_model(path)
    model.eval()
    return model._ss_graph.spec, model


_CAST = {"float": float, "int": int, "bool": bool}


def _correspondence(new: m.Schema, renames: Renames) -> dict[str, tuple]:
    """New group -> (old group or None, new feature -> old feature, new feature -> {old item: new item})."""
    table = {}
    for group in new.groups:
        old_group, features, items = None, {}, {}
        for f in group.features:
            names = [f"{group.name}.{f.name}={i}" for i in new.vocab(f.vocab).item_names] if f.is_category else [f"{group.name}.{f.name}"]
            for name in names:
                old = renames.features.get(name)
                if old is None:
                    continue
                old_group, rest = old.split(".", 1)
                old_feature, _, old_item = rest.partition("=")
                features[f.name] = old_feature
                if f.is_category:
                    items.setdefault(f.name, {})[old_item] = name.split("=", 1)[1]
        table[group.name] = (old_group, features, items)
    return table


def _carry(record: dict, new: m.Schema, table: dict, rng: random.Random) -> dict:
    """The same state as a record of the new schema; what the old one lacks is random."""
    out: dict = {}
    for group in new.groups:
        old_group, features, items = table[group.name]

        def one(old_obj) -> dict:
            obj = random_object(new, group, rng)
            for f in group.features:
                if f.name in features and isinstance(old_obj, dict):
                    value = old_obj[features[f.name]]
                    obj[f.name] = items[f.name].get(value, obj[f.name]) if f.is_category else _CAST[f.type](value)
            return obj

        old_value = record.get(old_group) if old_group else None
        if group.is_entity_set:
            entities = old_value if isinstance(old_value, list) else []
            out[group.name] = [one(e) for e in entities[: group.entities]]
        else:
            out[group.name] = one(old_value)
    return out


def _shared_items(old: m.Schema, new: m.Schema, renames: Renames) -> m.Schema:
    """The old schema with each category's vocab cut to items the new version keeps."""
    kept = set(renames.features.values())
    vocabs = []
    for vocab in old.vocabs:
        items = []
        for item in vocab.items:
            users = [f"{g.name}.{f.name}={item.name}" for g in old.groups for f in g.category_features if f.vocab == vocab.name]
            if all(u in kept for u in users) or not users:
                items.append(item)
        vocabs.append(vocab.model_copy(update={"items": tuple(items) or vocab.items}))
    return old.model_copy(update={"vocabs": tuple(vocabs)})


@dataclass
class Verification:
    """What ss.verify found: the largest difference per head both models have
    (`max_diff`, compared in float64), whether all are within `tolerance`
    (`ok`; a NaN is never ok), and the heads one side only has."""

    max_diff: dict[str, float]
    tolerance: float
    states: int
    steps: int
    only_old: list[str] = field(default_factory=list)
    only_new: list[str] = field(default_factory=list)
    inputs: str = "random states"  # or "records": the caller's own observations
    compared_in: str = "float64"

    @property
    def ok(self) -> bool:
        """Every shared head within tolerance (NaN compares false); nothing shared is not ok."""
        return bool(self.max_diff) and all(d <= self.tolerance for d in self.max_diff.values())

    @property
    def largest(self) -> float:
        values = list(self.max_diff.values())
        if any(math.isnan(v) for v in values):
            return math.nan
        return max(values, default=0.0)

    def report(self) -> dict:
        """The JSON form (a NaN is null: JSON has no NaN)."""
        def number(v: float):
            return None if math.isnan(v) else v

        return {"states": self.states, "steps": self.steps, "inputs": self.inputs, "compared_in": self.compared_in,
                "tolerance": self.tolerance, "ok": self.ok,
                "heads": {h: number(d) for h, d in self.max_diff.items()}, "max": number(self.largest),
                "only_old": self.only_old, "only_new": self.only_new}

    def __str__(self) -> str:
        from ..render import verification_text

        return verification_text(self)


def _count(value, what: str, least: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise UserError(f"error: {what} must be a whole number of at least {least}, got {value!r}")
    return value


def verify_models(old_model, new_model, states: int = 1000, records=None, tolerance: float = 1e-5, seed: int = 0,
                  steps: Optional[int] = None, batch: int = 250, max_entities: int = 6) -> Verification:
    """Both models on the same states, batch by batch (memory holds one batch of
    states, whatever their number), heads compared output by output as the plan
    pairs them. A model without a time axis beside one with it is run on every
    step's observation alone: the old model is the new one run step by step."""
    from .diff import make_plan
    from .plan import head_columns

    if not isinstance(tolerance, (int, float)) or isinstance(tolerance, bool) or not tolerance >= 0:
        raise UserError(f"error: tolerance must be a number of at least 0, got {tolerance!r}")
    old_graph, new_graph = old_model._ss_graph, new_model._ss_graph
    old_spec, new_spec = old_graph.spec, new_graph.spec
    has_time = old_graph.has_time or new_graph.has_time
    steps = _count(steps, "steps") if steps is not None else (3 if has_time else 1)
    if records is not None:
        records = _old_records(records, old_model, has_time)
        states = len(records)
        steps = len(records[0]) if has_time and records else steps
    else:
        states = _count(states, "states")
    plan = make_plan(old_graph, new_graph)
    renames = find_renames(old_spec, new_spec)
    columns = {h: (old_h, torch.tensor(new_cols), torch.tensor(old_cols))
               for h, (old_h, new_cols, old_cols) in head_columns(plan).items() if new_cols}
    rng = random.Random(seed)
    draw_schema = _shared_items(old_spec.schema, new_spec.schema, renames)
    table = _correspondence(new_spec.schema, renames)
    worst = {h: 0.0 for h in columns}
    modes = (old_model.training, new_model.training)
    old_model.eval()
    new_model.eval()
    try:
        with torch.no_grad():
            for start in range(0, states, batch):
                n = min(batch, states - start)
                if records is not None:
                    seq_old = records[start:start + n]
                else:  # few entities per set keep it cheap; padding is masked anyway
                    seq_old = [[random_record(draw_schema, rng, max_entities) for _ in range(steps)] for _ in range(n)]
                out_old = _run(old_model, seq_old, has_time, validate=records is not None)  # checks records first
                seq_new = [[_carry(r, new_spec.schema, table, rng) for r in seq] for seq in seq_old]
                out_new = _run(new_model, seq_new, has_time, validate=False)
                for h, (old_h, new_cols, old_cols) in columns.items():
                    a = out_old[old_h].index_select(-1, old_cols.to(out_old[old_h].device)).double()
                    b = out_new[h].index_select(-1, new_cols.to(out_new[h].device)).double().to(a.device)
                    # Two equal infinities (a pointer's padding scores, -inf) are equal: inf - inf is nan.
                    d = torch.where(a == b, 0.0, (a - b).abs()).max().item() if a.numel() else 0.0
                    if not math.isnan(worst[h]) and (math.isnan(d) or d > worst[h]):
                        worst[h] = d  # once NaN, it stays NaN
    finally:
        old_model.train(modes[0])
        new_model.train(modes[1])
    return Verification(worst, float(tolerance), states, steps, list(plan.old_only_heads), list(plan.new_only_heads),
                        "records" if records is not None else "random states")


def _old_records(records, old_model, has_time: bool) -> list:
    """The caller's records as sequences of observations of the old schema."""
    records = list(records) if not isinstance(records, list) else records
    if not records:
        raise UserError("error: records= holds no observation")
    if old_model._ss_graph.has_time:
        return records  # each already a sequence (featurise says so if not)
    return [[r] for r in records]  # one observation: a sequence of one step


def _run(model, sequences: list, has_time: bool, validate: bool) -> dict:
    """Heads [B, (T), w] of `model` on `sequences` (a list of observation lists)."""
    if model._ss_graph.has_time:
        return model(model.featurise(sequences, validate=validate))
    flat = [obs for seq in sequences for obs in seq]
    heads = model(model.featurise(flat, validate=validate))
    if not has_time:
        return heads
    batch, steps = len(sequences), len(sequences[0])
    return {h: t.reshape(batch, steps, *t.shape[1:]) for h, t in heads.items()}


def verify(old_path: str, new_path: str, states: int = 1000, steps: Optional[int] = None, seed: int = 0) -> dict:
    """Two checkpoints on the same random states: Verification.report()."""
    from ..model import load_model

    return verify_models(load_model(old_path), load_model(new_path), states=states, steps=steps, seed=seed).report()
