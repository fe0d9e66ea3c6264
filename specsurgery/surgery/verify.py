"""Proof on data: run old and new models on the same random states.

Each state is one JSON record per observation, made under the old schema and
carried to the new one through the renames (values of features the new
version added are random too; category values are drawn from the items both
versions share), then featurised under each schema. The report is the largest
absolute difference per output head the two models share.
"""
from __future__ import annotations

import random
from typing import Optional

import torch

from ..features import featurise, random_object, random_record
from ..spec import model as m
from ..backends.shadow import shadow_map
from .diff import Renames, find_renames, match_axis


def load_module(path: str):
    from ..api import load

    model = load(path)
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


def verify(old_path: str, new_path: str, states: int = 1000, steps: Optional[int] = None, seed: int = 0,
           batch: int = 250, max_entities: int = 6) -> dict:
    old_spec, old_module = load_module(old_path)
    new_spec, new_module = load_module(new_path)
    renames = find_renames(old_spec, new_spec)
    has_time = old_module._ss_graph.has_time or new_module._ss_graph.has_time
    steps = steps or (3 if has_time else 1)
    rng = random.Random(seed)
    draw_schema = _shared_items(old_spec.schema, new_spec.schema, renames)
    table = _correspondence(new_spec.schema, renames)
    # Compare each head output by output: a widened head's new outputs have no
    # old counterpart, a reordered one's move (matched by key, as the plan does).
    old_graph, new_graph = old_module._ss_graph, new_module._ss_graph
    old_phi, new_phi = shadow_map(old_graph), shadow_map(new_graph)
    columns = {}
    for h, index in new_graph.outputs.items():
        old_head = renames.scopes.get(h, h)
        if old_head not in old_graph.outputs:
            continue
        old_keys = old_phi.values[old_graph.outputs[old_head]].keys
        matched = match_axis(new_phi.values[index].keys, old_keys, renames)
        pairs = [(j, i) for j, i in enumerate(matched) if i >= 0]
        # Outputs whose derivation changed have no key match: pair the rest by position.
        spare_old = [i for i in range(len(old_keys)) if i not in set(matched)]
        spare_new = [j for j, i in enumerate(matched) if i < 0]
        pairs += list(zip(spare_new, spare_old))
        if pairs:
            columns[h] = (torch.tensor([j for j, _ in pairs]), torch.tensor([i for _, i in pairs]))
    heads = list(columns)
    worst = {h: 0.0 for h in heads}
    done = 0
    with torch.no_grad():
        while done < states:
            n = min(batch, states - done)
            old_records, new_records = [], []
            for _ in range(n):
                # Few entities per set keep featurising cheap; padding is masked anyway.
                seq_old = [random_record(draw_schema, rng, max_entities) for _ in range(steps)]
                seq_new = [_carry(r, new_spec.schema, table, rng) for r in seq_old]
                old_records.append(seq_old if has_time else seq_old[0])
                new_records.append(seq_new if has_time else seq_new[0])
            out_old = old_module(featurise(old_spec.schema, old_records, time=old_module._ss_graph.has_time, validate=False))
            out_new = new_module(featurise(new_spec.schema, new_records, time=new_module._ss_graph.has_time, validate=False))
            for h in heads:
                new_cols, old_cols = columns[h]
                old_out = out_old[renames.scopes.get(h, h)].index_select(-1, old_cols)
                new_out = out_new[h].index_select(-1, new_cols)
                # Two equal infinities (a pointer's padding scores, -inf) are equal: inf - inf is nan.
                diff = torch.where(old_out == new_out, 0.0, (old_out - new_out).abs()).max().item()
                worst[h] = max(worst[h], diff)
            done += n
    return {"states": states, "steps": steps, "heads": worst, "max": max(worst.values(), default=0.0)}
