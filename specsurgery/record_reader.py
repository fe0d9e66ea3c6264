"""The record reader: a batch of JSON-like records -> numpy tables, checked as they are read.

Built once per schema (`reader_for`). Per group it holds one itemgetter of all
the group's features (numeric ones in schema order, then categories), so each
object of a record is visited once, in C, and its values land in one flat
list: a table of one row per object. Category items become vocabulary indices
in that list (a dict lookup, which is also their check), so the whole table
turns into one float64 array with a single numpy call; numeric features,
masks and indices are then columns of it, scattered into the padded layout.

The checks are the record JSON Schema's (features.record_schema, the
definition), written out so that they run over whole columns:

  * exact keys per object: its length, and the itemgetter's lookup of each feature;
  * at most N entities in a set, category items by dict lookup;
  * a type per value: the set of types met in each column (from the distinct
    rows of types, or column by column when rows differ a lot) within the
    types its kind takes;
  * the few value rules, on the float64 table at once: no value beyond a float
    (inf), a float in an int feature is a whole number, a number in a bool
    feature is 0 or 1.

Any refusal raises `Refused`; features.featurise then asks jsonschema to word
the message (tests/test_inputs.py proves both accept and refuse the same records).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from itertools import chain
from operator import itemgetter
from typing import Callable, Optional

from .spec import model as m


CHUNK = 512  # records read at a time: their values stay in cache between the passes over them


class Refused(Exception):
    """A record does not satisfy the schema; jsonschema words why."""


def _type_sets() -> tuple[dict[str, frozenset], dict[str, frozenset]]:
    """Per kind of feature: the Python and numpy types it takes as they are, and
    those it takes only for some values (looked at in the float64 table). These
    are the record schema's types, with numpy scalars as jsonschema is told to take them."""
    import numpy as np

    ints = frozenset({int} | {np.dtype(c).type for c in np.typecodes["AllInteger"]})
    floats = frozenset({float} | {np.dtype(c).type for c in "efdg"})
    as_they_are = {"float": ints | floats, "int": ints, "bool": frozenset({bool, np.bool_})}
    by_value = {"float": frozenset(), "int": floats, "bool": ints | floats}  # whole numbers; 0 or 1
    return as_they_are, by_value


@dataclass(frozen=True)
class _GroupPlan:
    """How one group is read, worked out once per schema."""

    name: str
    entities: Optional[int]  # N of an entity set, None for a plain group
    width: int  # features of an object: the numeric ones (schema order), then the categories
    read: Callable  # object -> its values in that order (one value when width is 1)
    kinds: tuple[str, ...]  # float | int | bool | category, per column
    categories: tuple[tuple[str, dict], ...]  # ("<group>.<feature>", item -> index)
    mask_key: str

    @property
    def n_numeric(self) -> int:
        return self.width - len(self.categories)


def _plan(schema: m.Schema, group: m.Group) -> _GroupPlan:
    numeric = [f.name for f in group.numeric_features]
    cats = [f.name for f in group.category_features]
    return _GroupPlan(
        name=group.name, entities=group.entities, width=len(numeric) + len(cats),
        read=itemgetter(*numeric, *cats),
        kinds=tuple(f.type for f in group.numeric_features) + ("category",) * len(cats),
        categories=tuple((f"{group.name}.{f.name}", {item: k for k, item in enumerate(schema.vocab(f.vocab).item_names)})
                         for f in group.category_features),
        mask_key=f"{group.name}#mask")


class RecordReader:
    """Reads a batch of records into tensors (see the module's docstring)."""

    def __init__(self, schema: m.Schema):
        self.schema = schema
        self.groups = tuple(_plan(schema, g) for g in schema.groups)
        self._as_they_are, self._by_value = _type_sets()

    def read(self, flat: list, validate: bool, dtype) -> dict:
        import numpy as np
        import torch

        # float64 only for a float64 model; numpy has no bfloat16: build in float32 and convert
        wide = np.float64 if dtype == torch.float64 else np.float32
        count = len(flat)
        # The outputs, filled chunk by chunk: a chunk's values stay in cache while
        # they are checked and converted. np.zeros maps zero pages lazily, so
        # padding nobody writes costs nothing here.
        arrays: dict = {}
        for g in self.groups:
            slots = count if g.entities is None else count * g.entities
            arrays[g.name] = np.zeros((slots, g.n_numeric), dtype=wide)
            for key, _ in g.categories:
                arrays[key] = np.zeros(slots, dtype=np.int64)
            if g.entities is not None:
                arrays[g.mask_key] = np.zeros(slots, dtype=wide)
        for start in range(0, count, CHUNK):
            self._read_chunk(flat[start:start + CHUNK], start, validate, arrays)
        out: dict[str, torch.Tensor] = {}
        for g in self.groups:
            lead = (count,) if g.entities is None else (count, g.entities)
            out[g.name] = torch.from_numpy(arrays[g.name].reshape(*lead, g.n_numeric)).to(dtype)
            if g.entities is not None:
                out[g.mask_key] = torch.from_numpy(arrays[g.mask_key].reshape(lead)).to(dtype)
            for key, _ in g.categories:
                out[key] = torch.from_numpy(arrays[key].reshape(lead))
        return out

    def _read_chunk(self, part: list, start: int, validate: bool, arrays: dict) -> None:
        """Records part (the batch's from `start` on) into their rows of `arrays`."""
        import numpy as np

        count = len(part)
        if validate and (set(map(type, part)) != {dict} or set(map(len, part)) != {len(self.groups)}):
            raise Refused
        for g in self.groups:
            objs = list(map(itemgetter(g.name), part))
            n = g.n_numeric
            if g.entities is None:
                table = self._table(g, objs, validate)
                arrays[g.name][start:start + count] = table[:, :n]
                for j, (key, _) in enumerate(g.categories):
                    arrays[key][start:start + count] = table[:, n + j]
                continue
            if validate and (set(map(type, objs)) != {list} or max(map(len, objs)) > g.entities):
                raise Refused
            objects = list(chain.from_iterable(objs))
            if not objects:
                continue
            table = self._table(g, objects, validate)
            # the row of each entity in the padded layout [records * N]
            counts = np.fromiter(map(len, objs), dtype=np.int64, count=count)
            size = g.entities
            rows = np.repeat(np.arange(start, start + count, dtype=np.int64) * size - (np.cumsum(counts) - counts),
                             counts) + np.arange(len(objects))
            arrays[g.name][rows] = table[:, :n]
            arrays[g.mask_key][rows] = 1.0
            for j, (key, _) in enumerate(g.categories):
                arrays[key][rows] = table[:, n + j]

    def _table(self, g: _GroupPlan, objects: list, validate: bool):
        """The float64 table [objects, width] of the group's values, category items as indices."""
        import numpy as np

        w, n = g.width, g.n_numeric
        if validate and (set(map(type, objects)) != {dict} or set(map(len, objects)) != {w}):
            raise Refused
        values = list(map(g.read, objects)) if w == 1 else list(chain.from_iterable(map(g.read, objects)))
        for j, (_, index) in enumerate(g.categories):
            column = slice(n + j, None, w)
            values[column] = list(map(index.__getitem__, values[column]))  # KeyError: not an item
        by_value = self._check_types(g, values) if validate else ()
        try:
            # struct converts a list of numbers to doubles faster than numpy does,
            # and refuses what is not a number (a string, None, a list)
            table = np.frombuffer(struct.pack(f"{len(values)}d", *values), dtype=np.float64)
        except (struct.error, OverflowError, TypeError):
            raise Refused from None
        table = table.reshape(len(objects), w)
        if validate:
            if np.isinf(table[:, :n]).any():
                raise Refused
            for i in by_value:
                column = table[:, i]
                ok = column == np.floor(column) if g.kinds[i] == "int" else (column == 0) | (column == 1)
                if not ok.all():
                    raise Refused
        return table

    def _check_types(self, g: _GroupPlan, values: list) -> list[int]:
        """Refuse a value of a type its feature does not take. Returns the columns
        whose values need a look at by value: floats in an int feature (whole
        numbers only), numbers in a bool feature (0 or 1 only)."""
        w = g.width
        by_value = []
        for i, kind in enumerate(g.kinds[:g.n_numeric]):
            seen = set(map(type, values[i::w]))
            if seen <= self._as_they_are[kind]:
                continue
            if not seen <= self._as_they_are[kind] | self._by_value[kind]:
                raise Refused
            by_value.append(i)
        return by_value


_READERS: dict = {}


def reader_for(schema: m.Schema) -> RecordReader:
    hit = _READERS.get(id(schema))  # by identity: hashing a schema walks all of it
    if hit is not None and hit[0] is schema:
        return hit[1]
    if len(_READERS) >= 16:
        _READERS.pop(next(iter(_READERS)))
    reader = RecordReader(schema)
    _READERS[id(schema)] = (schema, reader)
    return reader
