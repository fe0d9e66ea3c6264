"""Index keys: what one index of a value or parameter axis *is*.

Surgery matches the indices of an old and a new axis by these keys (DESIGN.md,
"The surgery plan"). A key is one of

  Feature(name)              an input feature: `hero.mana`, `hero.hero_id=axe`
  Unit(scope, tag, ordinal)  unit `ordinal` of the op at `scope` (`core.lstm`),
                             inside the structural block `tag` (an LSTM gate)
  Wrapped(op, inner)         what an index-by-index op (relu, a pool) made of `inner`
  Normed(scope, inner)       index `inner` after the normalisation at `scope`
  Joined(op, left, right)    index i of a two-input op (add, mul): both sides' index i

Keys are small frozen values, built by the ops' shadow rules (ops.py) and read
here and in surgery/, never taken apart by position. They are interned: equal
keys are one object, so equality and hashing are by identity, in C, whatever
the depth (a chain of 100,000 statements nests keys 100,000 deep, and nothing
here recurses on that depth). Shadow rules make a whole axis of keys at once
(`features`, `units`, `wrapped_axis`, `normed_axis`, `joined_axis`,
`chained`): made again from the same input axes, an axis is the same object,
and `origin` says how it was made. An axis is a `Lazy` one: its keys are made
when it is first read, so the keys of the many axes planning only compares by
identity (those no change touched) are never made; questions about a whole
axis (`bases`, Renames in surgery/diff.py) are answered from how it was made.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import gc
import itertools
import operator
import weakref
from itertools import repeat
from typing import Callable, Optional, Union

# Interning: signature -> a weak reference to the one key with it. A key inside
# a signature is named by its id: a live key holds its insides, so their ids are
# theirs while it lives, and a signature never keeps a key alive. Each death
# is counted (a reference's callback), and the entries of dead keys are swept
# once they are half the table: a process that only makes keys (a command
# planning one surgery) never walks it.
_LIVE: dict = {}
_DEAD = [0]  # keys died since the last sweep
_NEW = object.__new__


def _died(_reference) -> None:
    _DEAD[0] += 1


PROMOTE_SURVIVORS = False  # the process is the command's (cli.entry): bulk() may move every young object


@contextlib.contextmanager
def bulk():
    """While maps and plans make keys by the hundred thousand: no cyclic
    garbage collection. Keys, their signatures and references hold no cycles,
    yet each batch of new containers makes the collector walk the whole heap
    again (half of planning a large model); it runs as usual afterwards.

    Left young, what the batch leaves alive (the keys in the caches here) is
    walked at once by the first allocation after (0.08 s after a plan of
    8192-wide layers), only to find no garbage. In the command's own process
    (PROMOTE_SURVIVORS, set by cli.entry) it is moved to the oldest generation
    as it is, with gc.freeze: that moves every young object of the process,
    which a library must not do to its caller's; where the process froze
    objects of its own, they stay frozen and the walk is paid."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            if PROMOTE_SURVIVORS and not gc.get_freeze_count():
                gc.freeze()  # every tracked object to the permanent generation,
                gc.unfreeze()  # and from there to the oldest one: no walk
            gc.enable()


def _sweep() -> None:
    _DEAD[0] = 0
    for signature in [s for s, r in _LIVE.items() if r() is None]:
        del _LIVE[signature]


def _keep(signature: tuple, key):
    _LIVE[signature] = weakref.ref(key, _died)
    if _DEAD[0] > len(_LIVE) >> 1:
        _sweep()
    return key


class _Key:
    """Equal keys are one object, so the default identity equality and hash
    (in C, whatever the depth) are the right ones."""

    __slots__ = ("__weakref__",)
    _fields: tuple[str, ...] = ()

    def __setattr__(self, name, value):
        raise AttributeError(f"{type(self).__name__} is frozen")

    def __reduce__(self):
        return (type(self), tuple(getattr(self, f) for f in self._fields))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(repr(getattr(self, f)) for f in self._fields)})"


def _setters(cls) -> tuple:
    """The slots' own setters: a key is frozen to everyone but its constructor."""
    return tuple(getattr(cls, f).__set__ for f in cls._fields)


class Feature(_Key):
    __slots__ = ("name",)
    _fields = ("name",)

    def __new__(cls, name: str):
        signature = (cls, name)
        found = _LIVE.get(signature)
        if found is not None:
            found = found()
            if found is not None:
                return found
        key = _NEW(cls)
        _FEATURE[0](key, name)
        return _keep(signature, key)

    def describe(self) -> str:
        return f"feature {self.name}"


class Unit(_Key):
    __slots__ = ("scope", "tag", "ordinal")
    _fields = ("scope", "tag", "ordinal")

    def __new__(cls, scope: str, tag: Optional[str], ordinal: int):
        signature = (cls, scope, tag, ordinal)
        found = _LIVE.get(signature)
        if found is not None:
            found = found()
            if found is not None:
                return found
        key = _NEW(cls)
        set_scope, set_tag, set_ordinal = _UNIT
        set_scope(key, scope)
        set_tag(key, tag)
        set_ordinal(key, ordinal)
        return _keep(signature, key)

    def describe(self) -> str:
        gate = f" gate {self.tag}" if self.tag else ""
        return f"{self.scope}{gate} unit {self.ordinal}"


class Wrapped(_Key):
    """`inner` through an index-by-index op; `idempotent` is the op's own declaration."""

    __slots__ = ("op", "inner", "idempotent")
    _fields = ("op", "inner", "idempotent")

    def __new__(cls, op: str, inner: "Key", idempotent: bool = False):
        signature = (cls, op, id(inner), idempotent)
        found = _LIVE.get(signature)
        if found is not None:
            found = found()
            if found is not None:
                return found
        key = _NEW(cls)
        set_op, set_inner, set_idempotent = _WRAPPED
        set_op(key, op)
        set_inner(key, inner)
        set_idempotent(key, idempotent)
        return _keep(signature, key)

    def describe(self) -> str:
        return base(self).describe()


class Normed(_Key):
    __slots__ = ("scope", "inner")
    _fields = ("scope", "inner")

    def __new__(cls, scope: str, inner: "Key"):
        signature = (cls, scope, id(inner))
        found = _LIVE.get(signature)
        if found is not None:
            found = found()
            if found is not None:
                return found
        key = _NEW(cls)
        set_scope, set_inner = _NORMED
        set_scope(key, scope)
        set_inner(key, inner)
        return _keep(signature, key)

    def describe(self) -> str:
        return base(self).describe()


class Joined(_Key):
    __slots__ = ("op", "left", "right")
    _fields = ("op", "left", "right")

    def __new__(cls, op: str, left: "Key", right: "Key"):
        signature = (cls, op, id(left), id(right))
        found = _LIVE.get(signature)
        if found is not None:
            found = found()
            if found is not None:
                return found
        key = _NEW(cls)
        set_op, set_left, set_right = _JOINED
        set_op(key, op)
        set_left(key, left)
        set_right(key, right)
        return _keep(signature, key)

    def describe(self) -> str:
        return f"{self.op} of {base(self.left).describe()} and {base(self.right).describe()}"


_SETTERS = {cls: _setters(cls) for cls in (Feature, Unit, Wrapped, Normed, Joined)}
_FEATURE, _UNIT, _WRAPPED, _NORMED, _JOINED = _SETTERS.values()

Key = Union[Feature, Unit, Wrapped, Normed, Joined]


@functools.lru_cache(maxsize=1024)
def units(scope: str, n: int, tag: Optional[str] = None) -> tuple[Unit, ...]:
    """The keys of n units of one op (one block of them): built once, shared by
    every graph that has the op (the old and the new version mostly do)."""
    return _derived(("units", scope, tag, n), (), n, lambda: _made(Unit, (repeat(scope, n), repeat(tag, n), range(n)),
                                                                  (repeat(scope, n), repeat(tag, n), range(n))))


def _made(cls, signature_fields: tuple, fields: tuple) -> tuple:
    """Many keys of one class at once, interned: per key its signature's
    fields (after the class) and its own fields, as columns (iterables). Keys
    of a whole axis are made by C loops, not one call each: those that live
    already are found (a layer widened keeps its first units), the others
    made together. An axis that has a key twice (concat(x, x)) is made key
    by key."""
    signatures = list(zip(repeat(cls), *signature_fields))
    n = len(signatures)
    if not n:
        return ()
    found = list(map(_LIVE.get, signatures))
    absent = found.count(None)  # no entry at all
    if absent != n:
        found = [r if r is None else r() for r in found]  # a dead key's entry reads None too
    missing = found.count(None)
    if not missing:
        return tuple(found)
    columns = every = [list(column) for column in fields]
    if missing < n:
        todo = list(itertools.compress(range(n), map(operator.is_, found, repeat(None))))
        signatures = list(map(signatures.__getitem__, todo))
        columns = [list(map(column.__getitem__, todo)) for column in columns]
    keys = list(map(_NEW, repeat(cls, len(signatures))))
    for setter, column in zip(_SETTERS[cls], columns):
        collections.deque(map(setter, keys, column), maxlen=0)
    before = len(_LIVE)
    _LIVE.update(zip(signatures, map(weakref.ref, keys, repeat(_died))))
    # A key twice (the table grew by less; with dead entries rewritten, ask a set):
    # the table kept the last one made, so make them one by one.
    if (len(_LIVE) - before != absent) if missing == absent else len(set(signatures)) != len(signatures):
        for signature in signatures:
            _LIVE.pop(signature, None)
        return tuple([cls(*row) for row in zip(*every)])
    if missing < n:
        made = iter(keys)
        keys = [k if k is not None else next(made) for k in found]
    if _DEAD[0] > len(_LIVE) >> 1:
        _sweep()
    return tuple(keys)


def features(names: tuple[str, ...]) -> tuple[Feature, ...]:
    """The keys of input features, by name (an input op's axis)."""
    return _derived(("features", names), (), len(names), lambda: _made(Feature, (names,), (names,)))


def wrap(op: str, key: Key, idempotent: bool) -> Key:
    """`op` applied to `key`; an idempotent op applied twice is applied once
    (relu(relu(x)) is relu(x): an identity layer between two relus keeps the key)."""
    if idempotent and type(key) is Wrapped and key.op == op:
        return key
    return Wrapped(op, key, idempotent)


class Lazy:
    """An axis of keys made when first read; its length is known at once. The
    maps hold every axis of both versions and planning reads those that
    changed: of a model of 8192-wide layers, most of the hundreds of
    thousands of keys are never made. Read like a tuple; made without
    recursion (a chain of 100,000 statements nests axes 100,000 deep)."""

    __slots__ = ("_n", "_inputs", "_build", "_keys")

    def __init__(self, n: int, inputs: tuple, build: Callable[[], tuple]):
        self._n, self._inputs, self._build, self._keys = n, inputs, build, None

    def made(self) -> tuple:
        """The keys, as a tuple."""
        if self._keys is None:
            stack = [self]
            while stack:
                axis = stack[-1]
                if axis._keys is not None:
                    stack.pop()
                    continue
                pending = [x for x in axis._inputs if type(x) is Lazy and x._keys is None]
                if pending:
                    stack.extend(pending)
                    continue
                stack.pop()
                axis._keys = axis._build()
                axis._build = axis._inputs = None  # made: what it was made of may go
        return self._keys

    def __len__(self) -> int:
        return self._n

    def __iter__(self):
        return iter(self.made())

    def __getitem__(self, i):
        return self.made()[i]

    def __contains__(self, key) -> bool:
        return key in self.made()

    def __eq__(self, other):
        if isinstance(other, (tuple, list, Lazy)):
            return len(other) == self._n and self.made() == tuple(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.made())

    def __add__(self, other) -> tuple:
        return self.made() + tuple(other)

    def __radd__(self, other) -> tuple:
        return tuple(other) + self.made()

    def count(self, key) -> int:
        return self.made().count(key)

    def index(self, key, *bounds) -> int:
        return self.made().index(key, *bounds)

    def __repr__(self) -> str:
        return repr(self.made())


# Whole axes of keys derived from others (an op's output from its inputs'),
# remembered by how they were made: the old and the new version of a model
# share most values, and a value made again from the same key tuples is the
# same tuple, so comparing the versions' axes is one identity test (and
# translating one into old names is a question about how it was made:
# `origin`). Keyed by the inputs' ids, each entry holding its inputs (an id is
# not reused while they live); the oldest entries go once there are more than
# _AXES_LIMIT[0] or they hold more keys than _AXES_LIMIT[1].
_AXES: dict = {}  # signature -> (inputs, axis)
_ORIGINS: dict = {}  # id(axis) -> (axis, how, inputs)
_AXES_HELD = [0]
_AXES_LIMIT = (1 << 13, 1 << 21)


def _derived(how: tuple, inputs: tuple, n: int, build: Callable[[], tuple]):
    """The axis of `n` keys `build` makes from `inputs` (a Lazy one, made when read)."""
    if not n:
        return ()  # the empty tuple is one object: it tells nothing
    signature = (*how, *map(id, inputs))
    hit = _AXES.get(signature)
    if hit is not None and all(map(operator.is_, hit[0], inputs)):
        return hit[1]
    out = Lazy(n, inputs, build)
    if hit is not None:
        _forget(signature)
    _AXES[signature] = (inputs, out)
    _ORIGINS[id(out)] = (out, how, inputs)
    _AXES_HELD[0] += n
    while len(_AXES) > 1 and (len(_AXES) > _AXES_LIMIT[0] or _AXES_HELD[0] > _AXES_LIMIT[1]):
        _forget(next(iter(_AXES)))
    return out


def _forget(signature: tuple) -> None:
    _, out = _AXES.pop(signature)
    _AXES_HELD[0] -= len(out)
    found = _ORIGINS.get(id(out))
    if found is not None and found[0] is out:
        del _ORIGINS[id(out)]


def origin(keys: tuple) -> Optional[tuple[tuple, tuple]]:
    """How an axis of keys was made, while that is remembered: (how, inputs),
    `how` one of ("features", names), ("units", scope, tag, n), ("wrap", op,
    idempotent), ("norm", scope), ("join", op), ("chain",); `inputs` the axes
    it was made of."""
    found = _ORIGINS.get(id(keys))
    if found is not None and found[0] is keys:
        return found[1], found[2]
    return None


def wrapped_axis(op: str, keys: tuple, idempotent: bool) -> tuple:
    """`wrap(op, k, idempotent)` of each key of an axis."""
    def build() -> tuple:
        if idempotent and Wrapped in set(map(type, keys)) and any(type(k) is Wrapped and k.op == op for k in keys):
            return tuple([wrap(op, k, True) for k in keys])  # some keys are kept as they are
        n = len(keys)
        return _made(Wrapped, (repeat(op, n), map(id, keys), repeat(idempotent, n)),
                     (repeat(op, n), keys, repeat(idempotent, n)))

    return _derived(("wrap", op, idempotent), (keys,), len(keys), build)


def normed_axis(scope: str, keys: tuple) -> tuple:
    """Each key of an axis after the normalisation at `scope`."""
    n = len(keys)
    return _derived(("norm", scope), (keys,), n,
                    lambda: _made(Normed, (repeat(scope, n), map(id, keys)), (repeat(scope, n), keys)))


def joined_axis(op: str, left: tuple, right: tuple) -> tuple:
    """Index i of a two-input op over two axes: Joined(op, left[i], right[i])."""
    n = min(len(left), len(right))
    return _derived(("join", op), (left, right), n,
                    lambda: _made(Joined, (repeat(op, n), map(id, left), map(id, right)), (repeat(op, n), left, right)))


def chained(axes: tuple) -> tuple:
    """The keys of several axes, one after another (concat)."""
    return _derived(("chain",), axes, sum(map(len, axes)), lambda: tuple(itertools.chain.from_iterable(axes)))


def children(k: Key) -> tuple:
    if isinstance(k, (Wrapped, Normed)):
        return (k.inner,)
    if isinstance(k, Joined):
        return (k.left, k.right)
    return ()


def transform(key: Key, deps: Callable[[Key], tuple], build: Callable[[Key, dict], Key],
              memo: Optional[dict] = None) -> Key:
    """Rebuild `key` bottom-up without recursion: `build(k, memo)` makes k's new
    key once every key of `deps(k)` has its own in `memo`."""
    memo = {} if memo is None else memo
    stack = [key]
    while stack:
        k = stack[-1]
        if k in memo:
            stack.pop()
            continue
        pending = [d for d in deps(k) if d not in memo]
        if pending:
            stack.extend(pending)
            continue
        stack.pop()
        memo[k] = build(k, memo)
    return memo[key]


_BASES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _base_of(k: Key, memo: dict) -> Key:
    if isinstance(k, (Wrapped, Normed)):
        return memo[k.inner]
    if isinstance(k, Joined):
        return Joined(k.op, memo[k.left], memo[k.right])
    return k


def base(key: Key) -> Key:
    """The key with index-by-index wrappers and normalisations looked through:
    what the index still carries when an op around it changed."""
    inner = key
    for _ in range(8):  # a few wrappers around a unit or a feature (the common case): no table
        kind = type(inner)
        if kind is Unit or kind is Feature:
            return inner
        if kind is Joined:
            break
        inner = inner.inner
    found = _BASES.get(key)
    if found is None:
        found = _BASES[key] = transform(key, children, _base_of, _BASES)
    return found


def parts(key: Key) -> list[Key]:
    """The values a joined key carries, each side and theirs (`h` in `add(h, g)`)."""
    out, stack = [], [key]
    while stack:
        k = stack.pop()
        if isinstance(k, Joined):
            out.extend((k.left, k.right))
            stack.extend((k.right, k.left))
    return out


def over_origins(keys, memo: dict, follows: Callable, step: Callable):
    """`step(axis, made, answers)` for an axis, once it has been asked of every
    axis it was made from (`made`: its origin, None where that is not
    remembered; `answers`: theirs, in order), where `follows(axis, made)`;
    each axis once (`memo`: id(axis) -> (axis, answer)). Without recursion: a
    chain of 100,000 statements makes axes 100,000 deep."""
    stack = [keys]
    while stack:
        axis = stack[-1]
        hit = memo.get(id(axis))
        if hit is not None and hit[0] is axis:
            stack.pop()
            continue
        made = origin(axis)
        inputs = made[1] if made is not None and follows(axis, made) else ()
        pending = [x for x in inputs if not (id(x) in memo and memo[id(x)][0] is x)]
        if pending:
            stack.extend(pending)
            continue
        stack.pop()
        memo[id(axis)] = (axis, step(axis, made, [memo[id(x)][1] for x in inputs]))  # `axis` held: its id stays its
    return memo[id(keys)][1]


def bases(keys, memo: dict) -> tuple:
    """`base` of each key of an axis, read from how the axis was made where
    that is remembered (origin): a relu's or a layernorm's axis has its
    input's bases, a block of units or features is its own. `memo` (one per
    walk) keeps each axis's answer."""
    return over_origins(keys, memo, lambda axis, made: made[0][0] in ("wrap", "norm", "chain"), _bases)


def _bases(axis, made, inputs: list) -> tuple:
    kind = made[0][0] if made else None
    if kind in ("units", "features"):
        return axis
    if kind in ("wrap", "norm"):  # index by index, wrappers looked through
        return inputs[0]
    if kind == "chain":
        return tuple(itertools.chain.from_iterable(inputs))
    return tuple(map(base, axis))  # joins, and axes made elsewhere: key by key


def carried_by(keys, memo: dict, bases_memo: dict) -> set:
    """The union of `carried` over an axis's keys."""
    out = set(bases(keys, bases_memo))  # carried(k) is {base(k)} but for a join
    if Joined in set(map(type, keys)):
        for k in keys:
            if type(k) is Joined:
                out |= carried(k, memo)
    return out


def carried(key: Key, memo: dict) -> frozenset:
    """The base of `key` and of every value it joins. `memo` (one per walk) keeps
    each key's answer: a residual stream 30 adds deep is walked once per index,
    not once per reader."""
    stack = [key]
    while stack:  # bottom-up without recursion, as transform
        k = stack[-1]
        if k in memo:
            stack.pop()
            continue
        sides = (k.left, k.right) if isinstance(k, Joined) else ()
        pending = [d for d in sides if d not in memo]
        if pending:
            stack.extend(pending)
            continue
        stack.pop()
        memo[k] = frozenset((base(k),)).union(*(memo[d] for d in sides))
    return memo[key]


def source(key: Key, depth: int = 4) -> str:
    """What made a value, without the unit: `g.linear`, `feature hero.mana`."""
    key = base(key)
    if isinstance(key, Unit):
        return key.scope
    if isinstance(key, Feature):
        return key.describe()
    if depth == 0:
        return f"{key.op}(...)"
    return f"{key.op}({source(key.left, depth - 1)}, {source(key.right, depth - 1)})"
