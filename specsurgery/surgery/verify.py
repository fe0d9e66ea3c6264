"""Proof on data: run old and new models on the same states.

A state is one observation per step (a sequence of them for a recurrent
model), as the old model's inputs: drawn at random straight into the input
layout (category values from the items both versions share; entity sets hold
a few entities), or the caller's own records featurised under the old schema.
It is carried to the new schema through the renames, tensor to tensor (values
of features the new version added are random), and each model runs on its
version. The result is the largest absolute difference per output head the
two models share, in float64.

States go through in batches sized by bytes (BATCH_BYTES), one step of every
state of a batch at a time (a recurrent model carries its state from step to
step), so memory holds one step of one batch whatever the number of states,
and nothing per state is kept but the running maximum per head.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..errors import UserError
from ..spec import model as m
from .diff import Renames, find_renames

# What one batch may hold beyond the two models: one step's inputs of both
# versions, their recurrent states and the larger forward pass's live values
# (model.forward_bytes). For Five that is 113 states (111 a batch for 1,000). The
# process's resident memory runs to two or three times what is live: glibc keeps
# the freed tensors in its heap, and the next ones of other sizes do not fit the
# holes. The limit is the two checkpoints plus 512 MB, of which torch itself
# takes 250 MB. Measured on Five, 3,000 states: in batches of 137 the peak stays
# at 1,633 MB from the first batch to the last; in batches of 200 or 250 it is
# 1,729 to 1,763 MB, over the limit of 1,725, and no faster. At 1,000 states,
# three runs each: batches of 125 peaked at 1,642, 1,642 and 1,721 MB, of 111 at
# 1,607, 1,609 and 1,609 MB, and took no longer (18 to 23 s against 20 to 26 s). With the two models
# taking turns step by step (each one's recurrent state kept across the other's
# forward pass) the peak climbed from batch to batch: 1,765 MB at 10,000 states.
# Fixing malloc's mmap threshold keeps the heap small but costs 15% more time in
# page faults.
BATCH_BYTES = 104 << 20
MAX_BATCH = 1024


def _shared_items(old: m.Schema, new: m.Schema, renames: Renames) -> dict[str, torch.Tensor]:
    """Per category input of the old schema ("<group>.<feature>"), the indices
    of the items random states draw from: those the new version keeps (all of
    them where it keeps none)."""
    kept = set(renames.features.values())
    allowed = {}
    for vocab in old.vocabs:
        readers = [f"{g.name}.{f.name}" for g in old.groups for f in g.category_features if f.vocab == vocab.name]
        items = [k for k, item in enumerate(vocab.items) if all(f"{r}={item.name}" in kept for r in readers)]
        indices = torch.tensor(items or range(len(vocab.items)), dtype=torch.long)
        allowed.update((r, indices) for r in readers)
    return allowed


def _random_values(group: m.Group, shape: tuple, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """Numeric features of `group` [*shape, n]: floats N(0, 1), ints in -3..3, bools 0 or 1."""
    kinds = [f.type for f in group.numeric_features]
    values = torch.randn(*shape, len(kinds), generator=gen, dtype=dtype)
    ints = [i for i, k in enumerate(kinds) if k == "int"]
    bools = [i for i, k in enumerate(kinds) if k == "bool"]
    if ints:
        values[..., ints] = torch.randint(-3, 4, (*shape, len(ints)), generator=gen).to(dtype)
    if bools:
        values[..., bools] = (torch.rand(*shape, len(bools), generator=gen) < 0.5).to(dtype)
    return values


def _random_items(count: int, shape: tuple, gen: torch.Generator, allowed: Optional[torch.Tensor] = None):
    """Category indices [*shape], uniform over `count` items (or over `allowed` ones)."""
    if allowed is None:
        return torch.randint(count, shape, generator=gen)
    return allowed[torch.randint(len(allowed), shape, generator=gen)]


def _pad_entities(t: torch.Tensor, entities: int, axis: int) -> torch.Tensor:
    """`t` (the first slots of an entity set along `axis`) with zero slots added up to `entities`."""
    have = t.shape[axis]
    if have == entities:
        return t
    shape = list(t.shape)
    shape[axis] = entities
    full = t.new_zeros(shape)
    full.narrow(axis, 0, have).copy_(t)
    return full


def _random_states(old: m.Schema, allowed: dict, lead: tuple, gen: torch.Generator, max_entities: int,
                   dtype: torch.dtype) -> dict:
    """Random inputs of the old schema (the featurised layout, numbers in `dtype`), lead axes `lead`,
    category items drawn from `allowed` (_shared_items). An entity set holds 0
    to max_entities entities at its front; padding is zero (and never drawn)."""
    out: dict = {}
    for group in old.groups:
        slots = min(group.entities, max_entities) if group.is_entity_set else None
        shape = lead + ((slots,) if slots is not None else ())
        values = _random_values(group, shape, gen, dtype)
        items = {}
        for f in group.category_features:
            key = f"{group.name}.{f.name}"
            items[key] = _random_items(len(old.vocab(f.vocab).items), shape, gen, allowed[key])
        if slots is not None:
            count = torch.randint(0, slots + 1, lead, generator=gen)
            mask = torch.arange(slots) < count.unsqueeze(-1)
            values, items, out[f"{group.name}#mask"] = _entities(group.entities, values, items, mask)
        out[group.name] = values
        out.update(items)
    return out


def _entities(entities: int, values: torch.Tensor, items: dict, mask: torch.Tensor) -> tuple:
    """The first slots of an entity set, zero where `mask` is false, padded with zero slots to `entities`."""
    values = _pad_entities(values.mul_(mask.unsqueeze(-1)), entities, -2)
    items = {k: _pad_entities(v.mul_(mask), entities, -1) for k, v in items.items()}
    return values, items, _pad_entities(mask.to(values.dtype), entities, -1)


@contextmanager
def _one_thread():
    """Drawing and carrying states is many small ops: they run on one thread.
    Spread over threads, each op waits for all of them at its end, and on a
    busy machine for a core: drawing Five's states took 5 to 10 times as long
    on 2 threads as on 1 with other work running."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


_CASTS = {"float": lambda v: v, "int": torch.trunc, "bool": lambda v: (v != 0).to(v.dtype)}


@dataclass(frozen=True)
class _GroupCarry:
    """How one group of the new schema is made from the old inputs."""

    group: m.Group
    before: Optional[m.Group]  # its old group, if that is of the same kind (entity set or not)
    columns: tuple  # (cast, new columns, old columns) per type that has carried numeric features
    items: dict  # new category key -> (its vocab's size, old category key, old index -> new index or -1);
    # the last two None where no item has an old one
    as_is: bool  # every column, item and slot is the old one's: the old tensors are taken as they are


@dataclass(frozen=True)
class CarryPlan:
    """How states of the old schema become inputs of the new one (_carry),
    worked out once per call, not once per batch."""

    lead_group: m.Group  # the old group whose values give the lead axes ([B, T] or [B])
    groups: tuple[_GroupCarry, ...]


def carry_plan(old: m.Schema, new: m.Schema, renames: Renames) -> CarryPlan:
    """Per group of the new schema, where its columns and items come from."""
    return CarryPlan(old.groups[0], tuple(_group_carry(old, new, renames, group) for group in new.groups))


def _group_carry(old: m.Schema, new: m.Schema, renames: Renames, group: m.Group) -> _GroupCarry:
    before = old.group(renames.groups.get(group.name, ""))
    sizes = {f"{group.name}.{f.name}": len(new.vocab(f.vocab).items) for f in group.category_features}
    if before is None or before.is_entity_set != group.is_entity_set:
        return _GroupCarry(group, None, (), {key: (size, None, None) for key, size in sizes.items()}, False)
    column = {f.name: k for k, f in enumerate(before.numeric_features)}
    columns, carried = [], []
    for kind, cast in _CASTS.items():
        pairs = [(j, column[was.split(".", 1)[1]]) for j, f in enumerate(group.numeric_features)
                 if f.type == kind and (was := renames.features.get(f"{group.name}.{f.name}"))]
        if pairs:
            js, ks = zip(*pairs)
            columns.append((cast, list(js), list(ks)))
            carried += [(j, k, kind) for j, k in pairs]
    items = {}
    for f in group.category_features:
        key = f"{group.name}.{f.name}"
        items[key] = (sizes[key], *_item_table(old, renames, before, group, f, new.vocab(f.vocab).item_names))
    numbers_as_is = len(carried) == len(before.numeric_features) == len(group.numeric_features) and all(
        j == k and before.numeric_features[k].type == kind for j, k, kind in carried)
    items_as_is = len(items) == len(before.category_features) and all(
        was == f"{before.name}.{b.name}" and torch.equal(table, torch.arange(len(table)))
        for (_, was, table), b in zip(items.values(), before.category_features))
    return _GroupCarry(group, before, tuple(columns), items,
                       numbers_as_is and items_as_is and before.entities == group.entities)


def _item_table(old: m.Schema, renames: Renames, before: m.Group, group: m.Group, feature: m.Feature,
                names: tuple) -> tuple:
    """A new category feature's old feature ("<group>.<feature>") and its item
    table (old index -> new index, -1 where the new version lacks the item),
    through the renames; (None, None) if no item of it has an old one."""
    table, old_feature, index = None, None, {}
    for j, item in enumerate(names):
        was = renames.features.get(f"{group.name}.{feature.name}={item}")
        if was is None:
            continue
        name, _, old_item = was.split(".", 1)[1].partition("=")
        if table is None:
            old_feature = before.feature(name)
            index = {n: k for k, n in enumerate(old.vocab(old_feature.vocab).item_names)}
            table = torch.full((len(index),), -1, dtype=torch.long)
        if old_item in index:
            table[index[old_item]] = j
    return (None, None) if table is None else (f"{before.name}.{old_feature.name}", table)


def _carry(inputs: dict, plan: CarryPlan, gen: torch.Generator, dtype: torch.dtype) -> dict:
    """The same states as inputs of the new schema, from the old one's inputs:
    each feature the renames pair is taken from its old column (cast to its
    new type, category items mapped; an item the new version lacks is
    random), the rest is random. An entity set keeps its first entities (as
    many as the new one holds) and an entity set new to the version is empty.
    A group that is its old one column for column, item for item, is the old
    tensors themselves: nothing copied, nothing drawn."""
    first = inputs[plan.lead_group.name]
    lead = tuple(first.shape[: first.dim() - 1 - plan.lead_group.is_entity_set])
    out: dict = {}
    for carry in plan.groups:
        group, before = carry.group, carry.before
        if carry.as_is and inputs[before.name].dtype == dtype:
            out[group.name] = inputs[before.name]
            out.update((key, inputs[was]) for key, (_, was, _) in carry.items.items())
            if group.is_entity_set:
                out[f"{group.name}#mask"] = inputs[f"{before.name}#mask"]
            continue
        slots = None
        if group.is_entity_set:  # the slots any state fills; the rest is padding
            used = inputs[f"{before.name}#mask"].reshape(-1, before.entities).any(0).nonzero() if before else None
            slots = min(group.entities, int(used.max()) + 1) if used is not None and len(used) else 0
        shape = lead + ((slots,) if slots is not None else ())
        values = _random_values(group, shape, gen, dtype)
        if before is not None:
            old_values = inputs[before.name]
            if slots is not None:
                old_values = old_values[..., :slots, :]
            for cast, js, ks in carry.columns:
                values[..., js] = cast(old_values[..., ks].to(dtype))
        items = {}
        for key, (size, was, table) in carry.items.items():
            ids = _random_items(size, shape, gen)
            if was is not None:  # its old feature's, mapped item to item; drawn where the old item has no new one
                old_ids = inputs[was] if slots is None else inputs[was][..., :slots]
                mapped = table[old_ids]
                ids = torch.where(mapped >= 0, mapped, ids)
            items[key] = ids
        if slots is not None:
            mask = (inputs[f"{before.name}#mask"][..., :slots] != 0 if before is not None
                    else torch.zeros(shape, dtype=torch.bool))
            values, items, out[f"{group.name}#mask"] = _entities(group.entities, values, items, mask)
        out[group.name] = values
        out.update(items)
    return out


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
                  steps: Optional[int] = None, batch: Optional[int] = None, max_entities: int = 6) -> Verification:
    """Both models on the same states, batch by batch (`batch` states at a time;
    by default as many as BATCH_BYTES holds), heads compared output by output as
    the plan pairs them. A model without a time axis beside one with it is run
    on every step's observation alone: the old model is the new one run step by step."""
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
        steps = len(records[0])  # each a sequence of steps (of one step without a time axis)
    else:
        states = _count(states, "states")
    batch = _count(batch, "batch") if batch is not None else batch_size(old_model, new_model, steps, records is not None)
    plan = make_plan(old_graph, new_graph)
    renames = find_renames(old_spec, new_spec)
    columns = {h: (old_h, torch.tensor(new_cols), torch.tensor(old_cols))
               for h, (old_h, new_cols, old_cols) in head_columns(plan).items() if new_cols}
    gen = torch.Generator().manual_seed(seed)  # the states
    carry_gen = torch.Generator().manual_seed(seed + 1)  # what the new version adds to them
    allowed = _shared_items(old_spec.schema, new_spec.schema, renames)
    carrying = carry_plan(old_spec.schema, new_spec.schema, renames)
    worst = {h: 0.0 for h in columns}
    modes = (old_model.training, new_model.training)
    old_model.eval()
    new_model.eval()
    try:
        with torch.inference_mode():
            _settle_malloc()
            start = 0
            for n in _batches(states, batch):
                # checked and featurised under the old schema, all steps of the batch at once
                recorded = _featurised(old_model, records[start:start + n], steps) if records is not None else None

                def old_inputs(t: int) -> dict:
                    """Step t of every state of the batch, as the old model's inputs."""
                    if recorded is not None:
                        return {k: v[:, t:t + 1] if old_graph.has_time else v[:, t] for k, v in recorded.items()}
                    with _one_thread():
                        drawn = _random_states(old_spec.schema, allowed, _lead(old_graph, n), gen, max_entities,
                                               _drawn_dtype(old_model))
                    return old_model.inputs(drawn)

                # One step of every state at a time (a recurrent model runs one step at a
                # time anyway, carrying its state), the old model over all steps, then the
                # new one on the same states drawn again: each model's state lives within
                # its own steps, and a step's inputs are all that is held.
                drawing = gen.get_state()
                out_old, state = [], None
                for t in range(steps):
                    heads, state = _step(old_model, old_inputs(t), state)
                    out_old.append(heads)
                gen.set_state(drawing)
                state, lead = None, _lead(new_graph, n)
                for t in range(steps):
                    as_new = {k: v.reshape(*lead, *v.shape[1 + old_graph.has_time:]) for k, v in old_inputs(t).items()}
                    with _one_thread():
                        carried = _carry(as_new, carrying, carry_gen, _drawn_dtype(new_model))
                    del as_new
                    heads, state = _step(new_model, new_model.inputs(carried), state)
                    del carried
                    _compare(out_old[t], heads, columns, worst)
                    del heads
                del recorded, out_old, state
                start += n
    finally:
        old_model.train(modes[0])
        new_model.train(modes[1])
    return Verification(worst, float(tolerance), states, steps, list(plan.old_only_heads), list(plan.new_only_heads),
                        "records" if records is not None else "random states")


def batch_size(old_model, new_model, steps: int, records: bool = False) -> int:
    """States per batch: as many as BATCH_BYTES holds (one step's inputs of both
    versions, their recurrent states and the larger forward pass of one step; the
    caller's records featurised, every step of the batch, if there are), at least
    1, at most MAX_BATCH."""
    from ..model import forward_bytes, model_dtype

    per_state = forward = 0
    for model in (old_model, new_model):
        itemsize = model_dtype(model).itemsize
        per_state += _input_bytes(model._ss_graph.schema, itemsize) + 2 * _state_bytes(model._ss_graph, itemsize)
        forward = max(forward, forward_bytes(model._ss_graph, itemsize))
    if records:
        per_state += steps * _input_bytes(old_model._ss_graph.schema, model_dtype(old_model).itemsize)
    return max(1, min(MAX_BATCH, BATCH_BYTES // (per_state + forward)))


def _state_bytes(graph, itemsize: int) -> int:
    """One state's recurrent state (h, and c for an lstm, per recurrent op)."""
    from ..ops import OPS

    return sum(len(OPS[n.op].recurrent_state) * n.value.width * itemsize
               for n in graph.nodes if OPS[n.op].recurrent_state)


def _input_bytes(schema: m.Schema, itemsize: int) -> int:
    """One observation's inputs as verify makes them: numbers drawn in float32
    (or float64), then in the model's dtype; category indices (int64)."""
    total = 0
    for g in schema.groups:
        numbers = len(g.numeric_features) + g.is_entity_set  # an entity set's mask
        total += (g.entities or 1) * (numbers * max(4, itemsize) * 2 + 8 * len(g.category_features))
    return total


def _drawn_dtype(model) -> torch.dtype:
    """Numbers are drawn in float32 (in float64 for a float64 model), as featurise reads them."""
    from ..model import model_dtype

    return torch.float64 if model_dtype(model) == torch.float64 else torch.float32


def _old_records(records, old_model, has_time: bool) -> list:
    """The caller's records as sequences of observations of the old schema."""
    records = list(records) if not isinstance(records, list) else records
    if not records:
        raise UserError("error: records= holds no observation")
    if old_model._ss_graph.has_time:
        return records  # each already a sequence (featurise says so if not)
    return [[r] for r in records]  # one observation: a sequence of one step


def _compare(out_old: dict, out_new: dict, columns: dict, worst: dict) -> None:
    """Raise `worst` (head -> largest difference so far) to one step's differences
    of the columns the plan pairs, in float64; once NaN, a head stays NaN."""
    for h, (old_h, new_cols, old_cols) in columns.items():
        # Upcast one step's compared outputs only: float64 copies of nothing else.
        a = out_old[old_h].index_select(-1, old_cols.to(out_old[old_h].device)).double()
        b = out_new[h].index_select(-1, new_cols.to(out_new[h].device)).double().to(a.device)
        # Two equal infinities (a pointer's padding scores, -inf) are equal: inf - inf is nan.
        d = torch.where(a == b, 0.0, (a - b).abs()).max().item() if a.numel() else 0.0
        if not math.isnan(worst[h]) and (math.isnan(d) or d > worst[h]):
            worst[h] = d


def _settle_malloc() -> None:
    """glibc's malloc gives a block above its mmap threshold a mapping of its own
    and, once such a block is freed, raises the threshold to that block's size (up
    to 32 MB). In the first batch the threshold then climbs tensor by tensor, and
    the heap keeps the layout of that climb. Measured on Five with the models taking
    turns step by step, four runs of 500 states: a peak of 1,621 to 1,716 MB; with
    one block of 31 MB made and freed first, which puts the threshold there at once,
    1,620 to 1,635 MB. (Elsewhere: 31 MB asked and given back.)"""
    torch.empty(31 << 20, dtype=torch.uint8)


def _batches(states: int, most: int) -> list[int]:
    """`states` split into batches of at most `most`, as even as can be: batches of
    one size make the same allocations, which the heap can then reuse."""
    count = -(-states // most)
    return [states // count + (k < states % count) for k in range(count)]


def _lead(graph, states: int) -> tuple:
    """The lead axes of one step's inputs of `states` states: [B, 1] for a recurrent model, else [B]."""
    return (states, 1) if graph.has_time else (states,)


def _step(model, inputs: dict, state: Optional[dict]) -> tuple[dict, Optional[dict]]:
    """Heads of `model` on one step's `inputs` ([B, ...] each), and a recurrent
    model's state after it (None: the zero state). A model without a time axis
    beside a recurrent one thus runs on one step's observations at a time too, so
    both multiply matrices of the same shapes and round alike (all steps at once,
    outputs near 15 came 4e-5 apart)."""
    if not model._ss_graph.has_time:
        return model(inputs), None
    if state is None:
        state = model.initial_state(len(next(iter(inputs.values()))))
    heads, state = model(inputs, state=state)
    return {h: v[:, 0] for h, v in heads.items()}, state


def _featurised(old_model, records: list, steps: int) -> dict:
    """A batch of the caller's records (sequences of `steps` observations) featurised
    under the old schema, lead axes [B, T]."""
    graph = old_model._ss_graph
    if graph.has_time:
        return old_model.featurise(records)
    inputs = old_model.featurise([obs for seq in records for obs in seq])
    return {k: v.reshape(len(records), steps, *v.shape[1:]) for k, v in inputs.items()}


def verify(old_path: str, new_path: str, states: int = 1000, steps: Optional[int] = None, seed: int = 0) -> dict:
    """Two checkpoints on the same random states: Verification.report()."""
    from ..model import load_model

    return verify_models(load_model(old_path), load_model(new_path), states=states, steps=steps, seed=seed).report()
