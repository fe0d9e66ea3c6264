"""The quick reader (spec/descent.py) gives, for every text it reads, the nodes
lark gives, spans included; what it is not sure of it leaves to lark (None),
so the errors stay lark's. A well-formed spec is read without importing lark."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from specsurgery.errors import SpecError
from specsurgery.spec import parse
from specsurgery.spec.descent import read_well_formed
from strategies import spec_texts

ROOT = Path(__file__).resolve().parents[1]


def lark_reading(text: str, path: str):
    """lark's nodes for `text`, or the SpecError it raises."""
    parse._STATE.file, parse._STATE.errors = path, []
    try:
        spec_file = parse._lark_parse(text, path)
        return SpecError(parse._STATE.errors) if parse._STATE.errors else spec_file
    except SpecError as e:
        return e
    finally:
        parse._STATE.errors = []


def same_reading(text: str, path: str = "t.spec") -> bool:
    """True where the quick reader read `text` (as lark does); False where it left it to lark."""
    quick, slow = read_well_formed(text, path), lark_reading(text, path)
    if quick is None:
        return False
    assert not isinstance(slow, SpecError), f"read what lark refuses: {slow}"
    assert quick.model_dump() == slow.model_dump()  # spans too
    return True


SPEC_FILES = sorted(p for folder in ("specs", "examples", "tests/corpus") for p in (ROOT / folder).rglob("*.spec"))


def test_every_spec_of_the_repository_reads_as_lark_reads_it():
    read = [path.name for path in SPEC_FILES if same_reading(path.read_text(encoding="utf-8"), str(path))]
    assert "five.spec" in read and "policy.spec" in read and len(read) > 40


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec_texts())
def test_random_specs_read_as_lark_reads_them(text):
    assert same_reading(text)


SCHEMA = "schema s {{ {} }}\n"
MODEL = "schema s {{ group g {{ x: float }} }}\nmodel m(o: s) {{\n{}\n}}\n"

READ = [  # keywords where only a name can stand are names; `out` and `was` where they can stand are keywords
    SCHEMA.format("group group { model: float  schema: int was vocab  was: bool }"),
    SCHEMA.format("vocab was = [was, out, a, was] group g was out { k: category(was) was category }"),
    SCHEMA.format("vocab v = [a, b was c, d,\n  e # note\n , f,\r\n g was h]"),
    SCHEMA.format("vocab v = [a,\x0cb, c]\x0c group g[3] { x: float }"),
    SCHEMA.format("vocab v = []"),
    MODEL.format("  out out = linear(o.g, 1)\n  b = o.g\n  as = b\n  out was was y = f(as, x=true, y=-3, z=false) as as"),
    MODEL.format("  a = f(g(h(o.g)) as b, 0.5, -1e-3, 2E+4, 7, k=0) as c\n  out y = a.b.c"),
    MODEL.format("  y = f()\n  z = true.false\n  out w = linear(z, 1)"),
    'use "a.spec"\nuse "b c.spec"\n' + MODEL.format("  out y = linear(o.g, 1)"),
    "# only a comment",
    "",
]

LEFT_TO_LARK = [  # errors, and what lark's contextual lexer reads another way (a keyword as a prefix)
    "schemax { }",
    SCHEMA.format("groupg { x: float }"),
    SCHEMA.format("group g { x: floaty: int }"),
    SCHEMA.format("group g wasx { x: float }"),
    MODEL.format("  a wasb = f(o.g)"),
    MODEL.format("  y = f(x=0.5)"),
    MODEL.format("  a = f(o.g)\n  as = a"),  # after a call, `as` names it
    MODEL.format("  y = f(x, )"),
    MODEL.format("  y = f(1.)"),
    MODEL.format("  y = f(10000000000)"),
    SCHEMA.format("group g[1.5] { x: float }"),
    SCHEMA.format("group g[2000000] { x: float }"),
    SCHEMA.format("vocab v = [a, b c]"),
    SCHEMA.format("vocab v = [a, was b]"),
    SCHEMA.format("vocab v = [,]"),
    MODEL.format("  y = " + "f(" * 101 + "o.g" + ")" * 101),
    'schema s { } use "late.spec"',
    'use "open',
    MODEL.format("  y = a-b"),
    MODEL.format("  y = f(o.g) + 1"),
    "schema s { group g { x: float }",
    "schéma s { }",
]


@pytest.mark.parametrize("text", READ)
def test_what_the_quick_reader_reads(text):
    assert same_reading(text)


@pytest.mark.parametrize("text", LEFT_TO_LARK)
def test_what_the_quick_reader_leaves_to_lark(text):
    assert not same_reading(text)


def test_nesting_up_to_the_limit_is_read():
    depth = parse.MAX_NESTING
    assert same_reading(MODEL.format("  out y = " + "f(" * depth + "o.g" + ")" * depth))


def test_a_well_formed_spec_and_a_checkpoint_are_read_without_lark(tmp_path):
    code = ("import sys; from specsurgery.spec.load import load, load_text; from specsurgery.spec.canonical import canonical\n"
            "spec = load(['specs/five.spec']).model()\n"
            "assert load_text(canonical(spec), 'ckpt').model() == spec\n"
            "assert 'lark' not in sys.modules, 'lark imported'")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
