"""Index keys (keys.py): typed, interned, and safe at any depth: a chain of
100,000 statements nests keys 100,000 deep, and nothing here recurses on it."""
from __future__ import annotations

import sys

from specsurgery import keys as K
from specsurgery.surgery.diff import Renames


def test_equal_keys_are_one_object():
    assert K.Unit("h.linear", None, 3) is K.Unit("h.linear", None, 3)
    assert K.Unit("h.linear", None, 3) != K.Unit("h.linear", "f", 3)
    assert K.Feature("a.x") != K.Unit("a.x", None, 0)
    assert {K.Joined("add", K.Feature("a"), K.Feature("b")): 1}[K.Joined("add", K.Feature("a"), K.Feature("b"))] == 1


def test_relu_twice_is_relu_once_and_tanh_twice_is_not():
    x = K.Unit("h.linear", None, 0)
    relu = K.wrap("relu", x, idempotent=True)
    assert K.wrap("relu", relu, idempotent=True) is relu
    tanh = K.wrap("tanh", x, idempotent=False)
    assert K.wrap("tanh", tanh, idempotent=False) is not tanh
    assert K.base(K.wrap("tanh", tanh, idempotent=False)) is x


def test_keys_100000_deep_hash_compare_and_translate():
    assert sys.getrecursionlimit() < 100_000
    deep = old = K.Unit("s0.linear", None, 1)
    for _ in range(100_000):
        deep = K.Wrapped("tanh", deep)
    again = K.Unit("s0.linear", None, 1)
    for _ in range(100_000):
        again = K.Wrapped("tanh", again)
    assert deep is again and hash(deep) == hash(again)
    assert K.base(deep) is old
    renames = Renames(scopes={"t0": "s0"}, ops={"t0.linear": "s0.linear"})
    moved = K.Unit("t0.linear", None, 1)
    for _ in range(100_000):
        moved = K.Wrapped("tanh", moved)
    assert renames.key(moved) is deep
    joined = K.Feature("g.x")
    for i in range(50_000):
        joined = K.Joined("add", joined, K.Feature(f"g.y{i % 7}"))
    assert len(K.parts(joined)) == 100_000
    assert K.source(joined).startswith("add(add(add(add(")


def test_keys_made_for_a_whole_axis_are_the_keys_made_one_by_one():
    """Axes are keyed in bulk (C loops); an axis holding a key twice (concat(x, x))
    still gets one object per key, and the same ones as built key by key."""
    x = K.units("bulk.linear", 3)
    twice = x + x
    tanh = K.wrapped_axis("tanh", twice, idempotent=False)
    assert tanh[0] is tanh[3] and tanh == tuple(K.Wrapped("tanh", k) for k in twice)
    normed = K.normed_axis("bulk.layernorm", twice)
    assert normed[1] is normed[4] and normed == tuple(K.Normed("bulk.layernorm", k) for k in twice)
    joined = K.joined_axis("add", twice, tanh)
    assert joined[2] is joined[5] and joined == tuple(K.Joined("add", a, b) for a, b in zip(twice, tanh))
    relu = K.wrapped_axis("relu", K.wrapped_axis("relu", x, idempotent=True), idempotent=True)
    assert relu == tuple(K.wrap("relu", k, idempotent=True) for k in x)
    assert K.units("bulk.linear", 3) is x and x[2] is K.Unit("bulk.linear", None, 2)


def test_an_axis_reads_in_old_names_as_its_keys_do_one_by_one():
    """Renames translate a whole axis from how it was made (K.origin) when they can:
    the answer is the one key-by-key translation gives, and an axis nothing
    renamed touches is returned as it is."""
    moved, kept = K.units("t.linear", 4), K.units("u.linear", 4)
    relu = K.wrapped_axis("relu", moved, idempotent=True)
    joined = K.joined_axis("add", relu, kept)
    normed = K.normed_axis("u.layernorm", kept)
    both = K.chained((joined, normed))
    renames = Renames(scopes={"t": "s"})
    assert renames.keys(kept) is kept and renames.keys(normed) is normed
    old_relu = [K.wrap("relu", K.Unit("s.linear", None, i), idempotent=True) for i in range(4)]
    assert list(renames.keys(both))[:4] == [K.Joined("add", r, k) for r, k in zip(old_relu, kept)]
    assert list(renames.keys(both)) == [Renames(scopes={"t": "s"}).key(k) for k in both]
    # a join with a side that starts at zero stands for its other side, even over unchanged inputs
    plain = K.joined_axis("add", kept, K.units("v.linear", 4))
    renames = Renames(new_ops={"w.linear"}, zero_joins={plain[1]: kept[1]})
    assert list(renames.keys(plain)) == [plain[0], kept[1], plain[2], plain[3]]
