"""A vocabulary's plain names in a row are read as one token (the parser's cost
is per token); what a user sees must be what item-by-item reading gave: the
same items, each with its own span, renames, and the same syntax errors at the
same places. The expected values below were printed by the parser before runs
existed."""
from __future__ import annotations

import pytest

import specsurgery as ss
from specsurgery.spec.parse import parse_text

SPEC = """schema s {{
  vocab v = [{items}]
  group g {{
    k: category(v)
  }}
}}
model m(obs: s) {{
  out y = linear(embed(obs.g.k, 2), 1)
}}
"""


def items_of(items: str) -> list[tuple]:
    vocab = parse_text(SPEC.format(items=items)).schemas[0].vocabs[0]
    return [(i.name, i.was, i.span.line, i.span.column, i.span.end_line, i.span.end_column) for i in vocab.items]


@pytest.mark.parametrize("items, expected", [
    ("a, was, b", [("a", None, 2, 14, 2, 15), ("was", None, 2, 17, 2, 20), ("b", None, 2, 22, 2, 23)]),
    ("float, int", [("float", None, 2, 14, 2, 19), ("int", None, 2, 21, 2, 24)]),
    ("x was y, b", [("x", "y", 2, 14, 2, 15), ("b", None, 2, 23, 2, 24)]),
    ("a, b was c, d, e", [("a", None, 2, 14, 2, 15), ("b", "c", 2, 17, 2, 18), ("d", None, 2, 26, 2, 27),
                          ("e", None, 2, 29, 2, 30)]),
    ("a, b,", [("a", None, 2, 14, 2, 15), ("b", None, 2, 17, 2, 18)]),
    ("a,\n   b, # c\n d", [("a", None, 2, 14, 2, 15), ("b", None, 3, 4, 3, 5), ("d", None, 4, 2, 4, 3)]),
    ("a, b, c\n  , d", [("a", None, 2, 14, 2, 15), ("b", None, 2, 17, 2, 18), ("c", None, 2, 20, 2, 21),
                        ("d", None, 3, 5, 3, 6)]),
    ("a, b, c, model", [("a", None, 2, 14, 2, 15), ("b", None, 2, 17, 2, 18), ("c", None, 2, 20, 2, 21),
                        ("model", None, 2, 23, 2, 28)]),
])
def test_a_run_of_names_gives_each_item_its_own_span(items, expected):
    assert items_of(items) == expected


@pytest.mark.parametrize("items, message", [
    ("a b", "<string>:2:16: error: expected ',', ']' or 'was' after 'a', found 'b'"),
    ("a b, c", "<string>:2:16: error: expected ',', ']' or 'was' after 'a', found 'b'"),
    ("a,, b", "<string>:2:16: error: expected ']' or a name after ',', found ','"),
    ("a, 1b", "<string>:2:17: error: expected ']' or a name after ',', found '1'"),
    ("a, b c", "<string>:2:19: error: expected ',', ']' or 'was' after 'b', found 'c'"),
    ("a, b, c d, e", "<string>:2:22: error: expected ',', ']' or 'was' after 'c', found 'd'"),
    ("a, was b", "<string>:2:21: error: expected ',', ']' or 'was' after 'was', found 'b'"),
    ("a, b, c was", "<string>:2:25: error: expected a name after 'was', found ']'"),
    ("a, b\n  group", "<string>:2:18: error: expected ',', ']' or 'was' after 'b' in vocab v, "
                      "found 'group' on line 3"),
    ("a, a", "<string>:2:17: error: item 'a' is defined twice in vocab v (first at column 14)"),
])
def test_a_broken_list_is_reported_where_it_breaks(items, message):
    with pytest.raises(ss.SpecError) as raised:
        ss.api.read_spec(SPEC.format(items=items))
    assert str(raised.value).splitlines()[0] == message


def test_a_large_vocabulary_keeps_every_item_in_order():
    names = [f"v{k}" for k in range(5000)]
    lines = ",\n    ".join(", ".join(names[k:k + 10]) for k in range(0, 5000, 10))
    got = items_of(lines + " was old")
    assert [name for name, *_ in got] == names
    assert got[-1] == ("v4999", "old", 501, 68, 501, 73)
    assert got[10] == ("v10", None, 3, 5, 3, 8)
