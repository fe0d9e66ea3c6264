"""The record reader: a batch of JSON-like records -> tensors, checked as they are read.

Built once per schema (`reader_for`), it holds per group an itemgetter of the
group's features and a struct of its numeric ones, so the loops over objects
and values run in C. Reading is memory-bound (the records' dicts and floats
are far bigger than the caches), so records are read 64 at a time: the
objects of a chunk, and the lists made of their values, are still in cache
for the second look at them. A plain group's rows go straight to its
output; an entity set's rows are kept chunk by chunk and scattered into the
padded layout once per batch, with its mask. The outputs of a batch live in
one buffer that the next batch of its size reuses once nothing refers to it
(`_Outputs`).

  * validate=False: per object, struct packs the numeric values straight from
    the itemgetter's tuple (each value touched once); then the categories, a
    second look at the objects while they are in cache, looked up in the
    vocabulary by one itemgetter over it.
  * validate=True: the values of all objects go to one flat list first, so the
    types can be checked column by column; category items become vocabulary
    indices in that list; struct packs it with one call.

The checks are the record JSON Schema's (features.record_schema, the
definition), written out so that they run over whole columns:

  * exact keys per object: its length, and the lookup of each feature;
  * at most N entities in a set; category items by dict lookup;
  * a type per value: in each column, a count of its kind's plain Python
    type (by identity, the common case) or else the set of types met, within
    the types its kind takes;
  * the few value rules, on the doubles at once: no value beyond a float
    (inf), a float in an int feature is a whole number, a number in a bool
    feature is 0 or 1.

Any refusal raises `Refused` (or the KeyError or TypeError of a lookup);
features.featurise then asks jsonschema to word the message
(tests/test_inputs.py proves both accept and refuse the same records).
"""
from __future__ import annotations

import math
import struct
import sys
import threading
from dataclasses import dataclass
from itertools import chain, starmap
from operator import itemgetter
from typing import Callable, Optional

from .spec import model as m

CHUNK = 64  # records read at a time: their objects stay in cache between the looks at them
_PLAIN_TYPE = {"float": float, "int": int, "bool": bool}  # per kind, the Python type a JSON value of it has


class Refused(Exception):
    """A record does not satisfy the schema; jsonschema words why."""


def _type_sets() -> tuple[dict[str, frozenset], dict[str, frozenset]]:
    """Per kind of feature: the Python and numpy types it takes as they are, and
    those it takes only for some values (looked at once converted). These are
    the record schema's types, with numpy scalars as jsonschema is told to take them."""
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
    width: int  # features of an object, numeric and category
    kinds: tuple[str, ...]  # float | int | bool, per numeric feature (schema order)
    read_all: Callable  # object -> its values: the numeric ones, then the categories (one value if width is 1)
    read_numeric: Optional[Callable]  # object -> its numeric values (one value if there is one)
    pack_numeric: Callable  # the numeric values of one object -> their doubles
    pack_numeric32: Callable  # ... -> their float32s
    categories: tuple[tuple[str, Callable, dict], ...]  # ("<group>.<feature>", object -> item, item -> index)
    mask_key: str


def _plan(schema: m.Schema, group: m.Group) -> _GroupPlan:
    numeric = [f.name for f in group.numeric_features]
    cats = [f.name for f in group.category_features]
    return _GroupPlan(
        name=group.name, entities=group.entities, width=len(group.features),
        kinds=tuple(f.type for f in group.numeric_features),
        read_all=itemgetter(*numeric, *cats), read_numeric=itemgetter(*numeric) if numeric else None,
        pack_numeric=struct.Struct(f"{len(numeric)}d").pack, pack_numeric32=struct.Struct(f"{len(numeric)}f").pack,
        categories=tuple((f"{group.name}.{f.name}", itemgetter(f.name),
                          {item: k for k, item in enumerate(schema.vocab(f.vocab).item_names)})
                         for f in group.category_features),
        mask_key=f"{group.name}#mask")


class RecordReader:
    """Reads a batch of records into tensors (see the module's docstring)."""

    def __init__(self, schema: m.Schema):
        self.schema = schema
        self.groups = tuple(_plan(schema, g) for g in schema.groups)
        self._group_values = itemgetter(*(g.name for g in self.groups))  # record -> its groups' values
        self._outputs: Optional[_Outputs] = None  # the last batch's buffer, reused once free
        self._lock = threading.Lock()
        self._as_they_are, self._by_value = _type_sets()

    def read(self, flat: list, validate: bool, dtype) -> dict:
        import numpy as np
        import torch

        # float64 only for a float64 model; numpy has no bfloat16: build in float32 and convert
        wide = np.float64 if dtype == torch.float64 else np.float32
        count = len(flat)
        arrays, dirty = self._claim_outputs(count, wide)
        sets = {g.name: _SetPieces(g) for g in self.groups if g.entities is not None}
        for start in range(0, count, CHUNK):
            self._read_chunk(flat[start:start + CHUNK], start, validate, arrays, wide, sets)
        for pieces in sets.values():
            pieces.scatter(arrays, dirty)
        out: dict[str, torch.Tensor] = {}
        for g in self.groups:
            lead = (count,) if g.entities is None else (count, g.entities)
            out[g.name] = _tensor(arrays[g.name].reshape(*lead, len(g.kinds)), dtype)
            if g.entities is not None:
                out[g.mask_key] = _tensor(arrays[g.mask_key].reshape(lead), dtype)
            for key, _, _ in g.categories:
                out[key] = torch.from_numpy(arrays[key].reshape(lead))
        return out

    def _claim_outputs(self, count: int, wide) -> tuple[dict, list]:
        """Zeroed output arrays for `count` records, and the list their scattered
        rows are noted in: the buffer of the last batch of this size if nothing
        of that batch is referenced any more, else a new one."""
        import numpy as np

        key = (count, np.dtype(wide).str)
        with self._lock:  # a buffer is handed to one caller at a time
            outputs = self._outputs
            if outputs is None or outputs.key != key or not outputs.idle():
                layout: dict = {}
                for g in self.groups:
                    slots = count if g.entities is None else count * g.entities
                    layout[g.name] = ((slots, len(g.kinds)), wide)
                    if g.entities is not None:
                        layout[g.mask_key] = ((slots,), wide)
                    for cat, _, _ in g.categories:
                        layout[cat] = ((slots,), np.int64)
                outputs = self._outputs = _Outputs(key, layout)
            return outputs.arrays(), outputs.dirty

    def _read_chunk(self, part: list, start: int, validate: bool, arrays: dict, wide, sets: dict) -> None:
        """Records `part` (the batch's from `start` on): a plain group's rows
        into `arrays`, an entity set's objects into its `sets` pieces (scattered
        into the padding once all chunks are read)."""
        count = len(part)
        if validate and (set(map(type, part)) != {dict} or set(map(len, part)) != {len(self.groups)}):
            raise Refused
        # each group's value in every record of the chunk, with one lookup per record
        per_group = zip(*map(self._group_values, part)) if len(self.groups) > 1 else [list(map(self._group_values, part))]
        for g, objs in zip(self.groups, per_group):
            if g.entities is None:
                numeric, ids = self._objects(g, objs, validate, wide)
                arrays[g.name][start:start + count] = numeric
                for (key, _, _), column in zip(g.categories, ids):
                    arrays[key][start:start + count] = column
                continue
            if validate and (set(map(type, objs)) != {list} or max(map(len, objs)) > g.entities):
                raise Refused
            pieces = sets[g.name]
            pieces.counts.extend(map(len, objs))
            objects = list(chain.from_iterable(objs))
            if objects:
                pieces.add(*self._objects(g, objects, validate, wide))

    def _objects(self, g: _GroupPlan, objects: list, validate: bool, wide) -> tuple:
        """The objects' numeric values ([objects, n], float64 or `wide`) and category indices (per feature)."""
        import numpy as np

        if validate:
            if set(map(type, objects)) != {dict} or set(map(len, objects)) != {g.width}:
                raise Refused
            return self._checked(g, objects)
        count, n = len(objects), len(g.kinds)
        if n:
            # straight to float32 for a float32 model (rounded as numpy casts; beyond a float32, inf)
            pack = g.pack_numeric32 if wide == np.float32 else g.pack_numeric
            rows = map(g.read_numeric, objects)
            try:  # struct refuses what is not a number (a string, None, a list)
                packed = b"".join(map(pack, rows) if n == 1 else starmap(pack, rows))
            except (struct.error, OverflowError, TypeError):
                raise Refused from None
            numeric = np.frombuffer(packed, dtype=wide).reshape(count, n)
        else:
            numeric = np.zeros((count, 0))
        # the categories after the numbers: the objects are still in cache
        ids = [_indices(index, map(get, objects), count) for _, get, index in g.categories]
        return numeric, ids

    def _checked(self, g: _GroupPlan, objects: list) -> tuple:
        """_objects with every value checked (see the module's docstring)."""
        import numpy as np

        w, n = g.width, len(g.kinds)
        values = list(map(g.read_all, objects)) if w == 1 else list(chain.from_iterable(map(g.read_all, objects)))
        for j, (_, _, index) in enumerate(g.categories):
            column = slice(n + j, None, w)
            values[column] = list(map(index.__getitem__, values[column]))  # KeyError: not an item
        by_value = self._check_types(g, values)
        try:
            table = np.frombuffer(struct.pack(f"{len(values)}d", *values), dtype=np.float64)
        except (struct.error, OverflowError, TypeError):
            raise Refused from None
        table = table.reshape(len(objects), w)
        numeric = table[:, :n]
        if np.isinf(numeric).any():
            raise Refused
        for i in by_value:
            column = numeric[:, i]
            ok = column == np.floor(column) if g.kinds[i] == "int" else (column == 0) | (column == 1)
            if not ok.all():
                raise Refused
        return numeric, [table[:, n + j].astype(np.int64) for j in range(len(g.categories))]

    def _check_types(self, g: _GroupPlan, values: list) -> list[int]:
        """Refuse a value of a type its feature does not take (`values`: the
        objects' values one after the other). Returns the columns whose values
        need a look at by value: floats in an int feature (whole numbers only),
        numbers in a bool feature (0 or 1 only)."""
        w = g.width
        count = len(values) // w
        types = list(map(type, values))
        by_value = []
        for i, kind in enumerate(g.kinds):
            column = types[i::w]
            if column.count(_PLAIN_TYPE[kind]) == count:  # the common case, counted by identity (no set to build)
                continue
            seen = set(column)
            if seen <= self._as_they_are[kind]:
                continue
            if not seen <= self._as_they_are[kind] | self._by_value[kind]:
                raise Refused
            by_value.append(i)
        return by_value


def _indices(index: dict, items, count: int):
    """The vocabulary indices of `count` items (KeyError: not an item, TypeError:
    not hashable): one itemgetter over the vocabulary does all the lookups in C."""
    import numpy as np

    if count < 2:  # an itemgetter of one key gives a value, not a tuple
        return np.array([index[item] for item in items], dtype=np.int64)
    return np.fromiter(itemgetter(*items)(index), dtype=np.int64, count=count)


class _SetPieces:
    """An entity set's objects as the chunks read them: the number per record,
    and their numeric rows and category indices, chunk by chunk. Scattered into
    the padded layout once per batch (a few numpy calls for the whole batch,
    not per chunk)."""

    def __init__(self, group: _GroupPlan):
        self.group = group
        self.counts: list[int] = []  # objects per record, in record order
        self.numeric: list = []  # [objects, n] per chunk
        self.ids: list[list] = [[] for _ in group.categories]  # per category: [objects] per chunk

    def add(self, numeric, ids: list) -> None:
        self.numeric.append(numeric)
        for column, part in zip(self.ids, ids):
            column.append(part)

    def scatter(self, arrays: dict, dirty: list) -> None:
        """The objects into their slots of `arrays`, and 1 into the same slots
        of the mask (the rows noted in `dirty`)."""
        import numpy as np

        g, size = self.group, self.group.entities
        counts = np.array(self.counts, dtype=np.int64)
        if len(counts) and counts.max() > size:  # more than N: would spill into the next record's slots
            raise Refused
        if not self.numeric:
            return
        # the slot of each entity in the padded layout [records * N]
        first_slots = np.arange(0, len(counts) * size, size) - (np.cumsum(counts) - counts)
        rows = np.repeat(first_slots, counts) + np.arange(int(counts.sum()))
        dirty.append((g.mask_key, rows))  # before writing: a refusal halfway leaves none unnoted
        arrays[g.mask_key][rows] = 1
        dirty.append((g.name, rows))
        arrays[g.name][rows] = _joined(self.numeric)
        for (key, _, _), column in zip(g.categories, self.ids):
            dirty.append((key, rows))
            arrays[key][rows] = _joined(column)


def _joined(parts: list):
    """The chunks' arrays as one."""
    import numpy as np

    return parts[0] if len(parts) == 1 else np.concatenate(parts)


class _Outputs:
    """The output arrays of one batch size, in one zeroed buffer.

    A training loop featurises batch after batch of one size, and drops each
    batch's tensors before the next. A fresh buffer costs the kernel a page
    fault and a zeroed page for every 4 kB of padding (on Five, 278 MB a
    batch of 4,096: a fifth of the time), so the buffer is handed out again
    once nothing refers to it any more (no tensor of the batch, nor a view,
    a storage or a numpy array of one, is alive). Only the rows an entity set's
    objects were scattered into are zeroed again; every other array is written
    whole by each batch."""

    def __init__(self, key: tuple, layout: dict):
        import numpy as np

        self.key = key
        self.offsets = {}
        size = 0
        for name, (shape, dtype) in layout.items():
            size = -(-size // 64) * 64  # each array aligned for its dtype (and a cache line)
            nbytes = math.prod(shape) * np.dtype(dtype).itemsize
            self.offsets[name] = (size, nbytes, shape, dtype)
            size += nbytes
        self.buffer = np.zeros(max(size, 1), dtype=np.uint8)
        self.dirty: list = []  # (array, rows) scattered into since the buffer was zeroed
        self._free_refs = sys.getrefcount(self.buffer)  # the count when only this holds it

    def idle(self) -> bool:
        """Whether nothing but this object refers to the buffer (CPython counts
        references; elsewhere a buffer is never handed out twice)."""
        return hasattr(sys, "getrefcount") and sys.getrefcount(self.buffer) == self._free_refs

    def arrays(self) -> dict:
        """The arrays, views of the buffer, with every earlier batch's scattered rows zeroed."""
        arrays = {name: self.buffer[at:at + nbytes].view(dtype).reshape(shape)
                  for name, (at, nbytes, shape, dtype) in self.offsets.items()}
        for name, rows in self.dirty:
            arrays[name][rows] = 0
        self.dirty.clear()
        return arrays


def _tensor(array, dtype):
    """A numpy array as a tensor of `dtype` (no copy when it already is one)."""
    import torch

    t = torch.from_numpy(array)
    return t if t.dtype == dtype else t.to(dtype)


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
