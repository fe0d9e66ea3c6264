"""Golden parser tests: every example of the language reference parses to the typed spec it means.

The examples are copied from the language reference (docs/language.md, whose
own examples tests/test_docs.py runs). Expected specs are written out by hand as
pydantic nodes; spans are left at their defaults, since `Span` equals any span.
"""
from __future__ import annotations

import textwrap

import pytest

from specsurgery.ir import build_graph, feature_table
from specsurgery.spec import model as m
from specsurgery.spec.canonical import canonical
from specsurgery.spec.load import load, load_text
from specsurgery.spec.parse import parse_text

# The whole file at the top of docs/language.md, verbatim.
DOC_EXAMPLE = """\
# Comments start with '#' and run to the end of the line.

schema dota {
  vocab heroes = [axe, bane, crystal_maiden, drow_ranger]
  vocab unit_kinds = [creep, tower, hero, courier]

  group hero {                      # one vector per observation
    health: float
    max_health: float
    mana: float
    level: int
    alive: bool
    hero_id: category(heroes)
  }

  group units[64] {                 # an entity set: up to 64 entities, shared weights
    x: float
    y: float
    health: float
    kind: category(unit_kinds)
  }
}

model policy(obs: dota) {
  hero_e = embed(obs.hero.hero_id, 16)
  hero_h = relu(linear(concat(obs.hero, hero_e), 128))
  unit_h = maxpool(relu(linear(concat(obs.units, embed(obs.units.kind, 8)), 128)))
  core   = lstm(concat(hero_h, unit_h), 512)
  out action = linear(core, 9)
  out value  = linear(core, 1)
}
"""


# --- building expected nodes by hand ------------------------------------------


def P(dotted: str) -> m.Path:
    return m.Path(parts=tuple(dotted.split(".")))


def I(value: int) -> m.IntArg:
    return m.IntArg(value=value)


def C(op: str, *args, alias: str | None = None, **keywords) -> m.Call:
    args = tuple(P(a) if isinstance(a, str) else I(a) if isinstance(a, int) else a for a in args)
    return m.Call(op=op, args=args, keywords=tuple(m.Keyword(name=k, value=v) for k, v in keywords.items()), alias=alias)


def S(name: str, expr, out: bool = False, was: str | None = None) -> m.Statement:
    return m.Statement(name=name, expr=expr, out=out, was=was)


def F(name: str, type_: str, was: str | None = None) -> m.Feature:
    if type_.startswith("category("):
        return m.Feature(name=name, type="category", vocab=type_[len("category("):-1], was=was)
    return m.Feature(name=name, type=type_, was=was)


def V(name: str, *items: str) -> m.Vocab:
    def item(text: str) -> m.VocabItem:
        new, _, old = text.partition(" was ")
        return m.VocabItem(name=new, was=old or None)

    return m.Vocab(name=name, items=tuple(item(i) for i in items))


DOTA = m.Schema(
    name="dota",
    vocabs=(
        V("heroes", "axe", "bane", "crystal_maiden", "drow_ranger"),
        V("unit_kinds", "creep", "tower", "hero", "courier"),
    ),
    groups=(
        m.Group(name="hero", features=(
            F("health", "float"), F("max_health", "float"), F("mana", "float"), F("level", "int"),
            F("alive", "bool"), F("hero_id", "category(heroes)"),
        )),
        m.Group(name="units", entities=64, features=(
            F("x", "float"), F("y", "float"), F("health", "float"), F("kind", "category(unit_kinds)"),
        )),
    ),
)

POLICY = m.Model(
    name="policy",
    input_name="obs",
    schema_name="dota",
    statements=(
        S("hero_e", C("embed", "obs.hero.hero_id", 16)),
        S("hero_h", C("relu", C("linear", C("concat", "obs.hero", "hero_e"), 128))),
        S("unit_h", C("maxpool", C("relu", C("linear", C("concat", "obs.units", C("embed", "obs.units.kind", 8)), 128)))),
        S("core", C("lstm", C("concat", "hero_h", "unit_h"), 512)),
        S("action", C("linear", "core", 9), out=True),
        S("value", C("linear", "core", 1), out=True),
    ),
)

# The schema the smaller examples below sit in (a two-group cut of the one above).
SMALL_SCHEMA = """\
schema dota {
  vocab heroes = [axe, bane, crystal_maiden, drow_ranger]
  vocab unit_kinds = [creep, tower, hero, courier]
  group hero {
    health: float
    mana: float
    hero_id: category(heroes)
  }
  group units[64] {
    x: float
    y: float
    kind: category(unit_kinds)
  }
}
"""


def model_spec(body: str, schema: str = SMALL_SCHEMA) -> m.ModelSpec:
    text = schema + "\nmodel policy(obs: dota) {\n" + textwrap.indent(textwrap.dedent(body), "  ") + "}\n"
    return load_text(text, "example.spec").model("policy")


def parameter_shapes(spec: m.ModelSpec) -> dict[str, tuple[int, ...]]:
    return {key: node.params[local].shape for key, (node, local) in build_graph(spec).parameters().items()}


# --- the whole-file example ---------------------------------------------------


def test_doc_example_parses_to_the_spec_it_means():
    parsed = parse_text(DOC_EXAMPLE, "policy.spec")
    assert parsed == m.SpecFile(path="policy.spec", schemas=(DOTA,), models=(POLICY,))


def test_doc_example_loads_as_model_and_schema():
    spec = load_text(DOC_EXAMPLE, "policy.spec").model("policy")
    assert spec == m.ModelSpec(schema=DOTA, model=POLICY)


def test_equality_sees_every_difference_but_spans():
    parsed = parse_text(DOC_EXAMPLE, "policy.spec").models[0]
    moved = parse_text("\n\n" + DOC_EXAMPLE.replace("  ", "    "), "elsewhere.spec").models[0]
    assert moved == parsed  # other lines, columns and file: the same spec
    assert parsed.statements[0].span.line == 25 and moved.statements[0].span.line == 27
    wider = parse_text(DOC_EXAMPLE.replace("embed(obs.hero.hero_id, 16)", "embed(obs.hero.hero_id, 17)"), "p.spec")
    assert wider.models[0] != parsed


def test_doc_example_spans_point_at_names():
    parsed = parse_text(DOC_EXAMPLE, "policy.spec")
    hero = parsed.schemas[0].groups[0]
    assert (hero.span.line, hero.span.column) == (7, 9)
    assert (hero.features[5].span.line, hero.features[5].span.column) == (13, 5)
    assert parsed.schemas[0].groups[1].entities_span.line == 16
    core = parsed.models[0].statements[3]
    assert (core.span.line, core.span.column) == (28, 3)
    assert (core.expr.op_span.line, core.expr.op_span.column) == (28, 12)



def test_a_node_spans_from_its_first_token_to_its_last():
    text = ("schema s {\n  vocab v = [a, b was c]\n  group g {\n    x: float\n  }\n}\n"
            "model m(obs: s) {\n  h = relu(linear(obs.g,\n    8, bias=false) as first)  # a comment\n"
            "  out y = linear( h , 2 )\n}\n")
    parsed = parse_text(text, "s.spec")

    def where(node):
        span = node.span
        return span.file, span.line, span.column, span.end_line, span.end_column

    relu, out = (s.expr for s in parsed.models[0].statements)
    linear = relu.args[0]
    assert where(relu) == ("s.spec", 8, 7, 9, 29)  # to the end of its ')'
    assert where(linear) == ("s.spec", 8, 12, 9, 28)  # to the end of the alias' name
    assert where(linear.args[0]) == ("s.spec", 8, 19, 8, 24)  # obs.g
    assert where(linear.args[1]) == ("s.spec", 9, 5, 9, 6)
    assert where(linear.keywords[0]) == ("s.spec", 9, 8, 9, 18)  # bias=false
    assert where(out) == ("s.spec", 10, 11, 10, 26)
    assert [where(i) for i in parsed.schemas[0].vocabs[0].items] == [("s.spec", 2, 14, 2, 15), ("s.spec", 2, 17, 2, 18)]
    assert parsed.schemas[0].vocabs[0].items[1].was == "c"


def test_doc_example_parameters_follow_the_op_table():
    """Names `statement.op.param`, shapes as in the operations table."""
    spec = load_text(DOC_EXAMPLE, "policy.spec").model("policy")
    assert parameter_shapes(spec) == {
        "hero_e.embed.weight": (4, 16),  # [vocab, dim]
        "hero_h.linear.weight": (128, 5 + 16),  # [units, in]: 5 numeric hero features + hero_e
        "hero_h.linear.bias": (128,),
        "unit_h.embed.weight": (4, 8),
        "unit_h.linear.weight": (128, 3 + 8),
        "unit_h.linear.bias": (128,),
        "core.lstm.weight_ih": (4 * 512, 128 + 128),
        "core.lstm.weight_hh": (4 * 512, 512),
        "core.lstm.bias_ih": (4 * 512,),
        "core.lstm.bias_hh": (4 * 512,),
        "action.linear.weight": (9, 512),
        "action.linear.bias": (9,),
        "value.linear.weight": (1, 512),
        "value.linear.bias": (1,),
    }


def test_feature_identity_of_the_doc_example():
    """Numeric features are `group.feature`, categories one feature per item `group.feature=item`."""
    schema = load_text(DOC_EXAMPLE, "policy.spec").schemas["dota"]
    assert feature_table(schema).names == (
        "hero.health", "hero.max_health", "hero.mana", "hero.level", "hero.alive",
        "hero.hero_id=axe", "hero.hero_id=bane", "hero.hero_id=crystal_maiden", "hero.hero_id=drow_ranger",
        "units.x", "units.y", "units.health",
        "units.kind=creep", "units.kind=tower", "units.kind=hero", "units.kind=courier",
    )


# --- schemas ------------------------------------------------------------------


def test_feature_and_group_order_is_kept():
    text = """\
    schema s {
      group b { z: float
                a: int
                m: bool }
      group a[3] { y: float }
      vocab v = [c, a, b]
    }
    """
    schema = parse_text(textwrap.dedent(text)).schemas[0]
    assert [g.name for g in schema.groups] == ["b", "a"]
    assert [f.name for f in schema.groups[0].features] == ["z", "a", "m"]
    assert schema.vocabs[0].item_names == ("c", "a", "b")
    swapped = parse_text(textwrap.dedent(text).replace("z: float", "TMP").replace("a: int", "z: float")
                         .replace("TMP", "a: int")).schemas[0]
    assert swapped != schema  # order is part of the schema


def test_vocab_trailing_comma_and_lines():
    one_line = parse_text("schema s { vocab heroes = [axe, bane, crystal_maiden,] }").schemas[0]
    many_lines = parse_text("""
        schema s {
          vocab heroes = [
            axe,     # the first
            bane,
            crystal_maiden,
          ]
        }""").schemas[0]
    plain = parse_text("schema s { vocab heroes = [axe, bane, crystal_maiden] }").schemas[0]
    assert one_line == many_lines == plain == m.Schema(name="s", vocabs=(V("heroes", "axe", "bane", "crystal_maiden"),))


def test_entity_set_and_plain_group():
    schema = parse_text("schema s { group hero { a: float } group units[64] { x: float } }").schemas[0]
    assert schema.groups[0].entities is None and not schema.groups[0].is_entity_set
    assert schema.groups[1].entities == 64 and schema.groups[1].is_entity_set


def test_every_feature_type():
    schema = parse_text("""
        schema s {
          vocab v = [a]
          group g { f: float  i: int  b: bool  c: category(v) }
        }""").schemas[0]
    assert schema.groups[0].features == (F("f", "float"), F("i", "int"), F("b", "bool"), F("c", "category(v)"))
    assert schema.groups[0].features[3].vocab == "v"


def test_renames_on_feature_group_and_vocab_item():
    """`NAME: TYPE was OLD`, `group NAME was OLD { ... }`, `[new_item was old_item, ...]`."""
    schema = parse_text("""
        schema dota {
          vocab heroes = [axe, bane, crystal_maiden was rylai, drow_ranger]
          group player was hero {
            hit_points: float was health
            mana: float
            hero_id: category(heroes)
          }
          group units[64] was creeps { x: float }
        }""").schemas[0]
    assert schema == m.Schema(
        name="dota",
        vocabs=(V("heroes", "axe", "bane", "crystal_maiden was rylai", "drow_ranger"),),
        groups=(
            m.Group(name="player", was="hero", features=(
                F("hit_points", "float", was="health"), F("mana", "float"), F("hero_id", "category(heroes)"))),
            m.Group(name="units", entities=64, was="creeps", features=(F("x", "float"),)),
        ),
    )


def test_comments_anywhere():
    with_comments = parse_text("""\
        # a file comment
        schema s {   # after a brace
          # a line of its own
          vocab v = [a, # inside a list
                     b]
          group g {
            x: float   # after a feature
          }
        }
        model p(o: s) {  # after a header
          # before a statement
          out y = linear(o.g, 1)  # after a statement
        }
        # the end""")
    without = parse_text("""\
        schema s { vocab v = [a, b] group g { x: float } }
        model p(o: s) { out y = linear(o.g, 1) }""")
    assert with_comments == without


def test_names_may_look_like_keywords_where_a_name_is_expected():
    """`group`, `out`, ... are only keywords where they start something."""
    spec = parse_text("schema s { group g { group: float  out: int } } model m(o: s) { out value = linear(o.g, 1) }")
    assert [f.name for f in spec.schemas[0].groups[0].features] == ["group", "out"]


# --- models -------------------------------------------------------------------


def test_statement_and_output_head():
    spec = model_spec("""\
        hero_h = relu(linear(obs.hero, 64))
        out value = linear(hero_h, 1)
    """)
    assert spec.model.statements == (
        S("hero_h", C("relu", C("linear", "obs.hero", 64))),
        S("value", C("linear", "hero_h", 1), out=True),
    )


def test_bias_false_keyword():
    spec = model_spec("""\
        hero_h = linear(obs.hero, 64, bias=false)
        out value = linear(hero_h, 1, bias=true)
    """)
    assert spec.model.statements[0].expr == C("linear", "obs.hero", 64, bias=False)
    assert spec.model.statements[0].expr.keywords[0].value is False
    assert spec.model.statements[1].expr == C("linear", "hero_h", 1, bias=True)
    assert parameter_shapes(spec) == {
        "hero_h.linear.weight": (64, 2),  # no hero_h.linear.bias
        "value.linear.weight": (1, 64),
        "value.linear.bias": (1,),
    }


def test_parameter_name_is_statement_op_parameter():
    spec = model_spec("""\
        hero_h = relu(linear(obs.hero, 128))
        out value = linear(hero_h, 1)
    """)
    assert list(parameter_shapes(spec)) == [
        "hero_h.linear.weight", "hero_h.linear.bias", "value.linear.weight", "value.linear.bias"]


def test_ops_of_one_kind_are_numbered_in_order_of_appearance():
    spec = model_spec("""\
        unit_h = maxpool(concat(embed(obs.units.kind, 8), embed(obs.units.kind, 4)))
        out value = linear(linear(unit_h, 16), 1)
    """)
    shapes = parameter_shapes(spec)
    assert shapes["unit_h.embed.weight"] == (4, 8)  # the first embed, left to right
    assert shapes["unit_h.embed_2.weight"] == (4, 4)
    assert shapes["value.linear.weight"] == (1, 16)  # the outer call comes first in the text
    assert shapes["value.linear_2.weight"] == (16, 12)


def test_as_names_the_op():
    spec = model_spec("""\
        unit_h = maxpool(relu(linear(concat(obs.units, embed(obs.units.kind, 8)), 128) as proj))
        out value = linear(unit_h, 1)
    """)
    assert spec.model.statements[0].expr == C(
        "maxpool", C("relu", C("linear", C("concat", "obs.units", C("embed", "obs.units.kind", 8)), 128, alias="proj")))
    assert list(parameter_shapes(spec)) == [
        "unit_h.embed.weight", "unit_h.proj.weight", "unit_h.proj.bias", "value.linear.weight", "value.linear.bias"]


def test_as_with_keywords():
    spec = model_spec("""\
        out value = linear(obs.hero, 1, bias=false) as head
    """)
    assert spec.model.statements[0].expr == C("linear", "obs.hero", 1, alias="head", bias=False)
    assert list(parameter_shapes(spec)) == ["value.head.weight"]


def test_statement_was():
    spec = model_spec("""\
        hero_h = relu(linear(obs.hero, 64))
        core was trunk = lstm(hero_h, 32)
        out value = linear(core, 1)
    """)
    assert spec.model.statements[1] == S("core", C("lstm", "hero_h", 32), was="trunk")
    assert "core.lstm.weight_ih" in parameter_shapes(spec)  # named by the new name; `was` tells surgery the old


def test_out_head_with_was():
    spec = model_spec("""\
        out value was critic = linear(obs.hero, 1)
    """)
    assert spec.model.statements[0] == S("value", C("linear", "obs.hero", 1), out=True, was="critic")


def test_paths_group_feature_and_statement_names():
    spec = model_spec("""\
        hero_h = concat(obs.hero, obs.hero.mana, onehot(obs.hero.hero_id))
        out value = linear(hero_h, 1)
    """)
    concat = spec.model.statements[0].expr
    assert concat.args == (P("obs.hero"), P("obs.hero.mana"), C("onehot", "obs.hero.hero_id"))
    assert concat.args[1].parts == ("obs", "hero", "mana")
    assert str(concat.args[1]) == "obs.hero.mana"
    assert parameter_shapes(spec)["value.linear.weight"] == (1, 2 + 1 + 4)


# --- use ----------------------------------------------------------------------


def test_use_is_parsed():
    spec_file = parse_text('use "other.spec"\nuse "lib/common.spec"\n\nmodel p(o: s) { out y = linear(o.g, 1) }', "a.spec")
    assert spec_file.uses == (m.Use(path="other.spec"), m.Use(path="lib/common.spec"))


def test_use_makes_another_files_schema_visible(tmp_path):
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "dota.spec").write_text(SMALL_SCHEMA)
    (tmp_path / "policy.spec").write_text(
        'use "lib/dota.spec"   # relative to this file\n\n'
        "model policy(obs: dota) {\n  out value = linear(obs.hero, 1)\n}\n")
    loaded = load([str(tmp_path / "policy.spec")])
    assert loaded.model("policy").schema == parse_text(SMALL_SCHEMA).schemas[0]
    assert loaded.model_files["policy"].endswith("policy.spec")


# --- canonical text -----------------------------------------------------------

ROUND_TRIP_SPECS = {
    "doc example": DOC_EXAMPLE,
    "renames, aliases and keywords": """\
        schema dota {
          vocab heroes = [axe, bane, crystal_maiden was rylai,]
          vocab unit_kinds = [creep, tower]
          group player was hero {
            hit_points: float was health
            alive: bool
            hero_id: category(heroes)
          }
          group units[16] was creeps {
            x: float
            kind: category(unit_kinds) was type
          }
        }
        model policy(obs: dota) {
          hero_h = layernorm(gelu(linear(concat(obs.player, onehot(obs.player.hero_id)), 32, bias=false) as proj))
          unit_h = avgpool(tanh(linear(concat(obs.units, embed(obs.units.kind, 4), embed(obs.units.kind, 2)), 32)))
          gate = sigmoid(linear(hero_h, 32))
          core was trunk = lstm(add(mul(hero_h, gate), unit_h), 64)
          out value was critic = linear(core, 1)
          out pick = sumpool(relu(linear(obs.units, 8)))
        }
    """,
}


@pytest.mark.parametrize("name", ROUND_TRIP_SPECS)
def test_canonical_text_round_trips(name):
    spec = model_spec_from(ROUND_TRIP_SPECS[name])
    text = canonical(spec)
    again = load_text(text, "canonical.spec").model(spec.model.name)
    assert again == spec
    assert canonical(again) == text  # a fixed point


def model_spec_from(text: str) -> m.ModelSpec:
    loaded = load_text(textwrap.dedent(text), "example.spec")
    (spec,) = loaded.models.values()
    return spec
