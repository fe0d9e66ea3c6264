"""Hypothesis strategies for random, valid .spec texts.

Specs are valid by construction: the generator keeps, for every value it can
name, its width and the entity set it ranges over (None for a plain vector),
and only combines compatible things:

  * concat joins values over one entity set (or all plain);
  * add / mul get a second operand brought to the first one's width with a
    linear;
  * pools and attention read entity-set values only; lstm and gru read plain
    values only (at most two per model, and only in some models);
  * output heads are plain; a pointer (plain query, entity-set keys) is a
    whole head statement, which nothing reads.

The generator is written against a tiny "picker" interface, so the same code
runs under hypothesis (`spec_texts()`, which shrinks well: every choice
shrinks towards the simplest option) and under a seeded `random.Random`
(`spec_text_from_seed`), which the coverage test uses to check that every op
of the language is generated.

Names are drawn from a pool that mixes plain names with awkward ones a user
may well write: Python keywords and builtins (`class`, `None`, `type`),
names near the module tree's own (`state`, `weight`, `op_params`; the attributes
themselves, `forward` or `training`, are refused by the check), names that start
with a keyword of the language (`outer`, `asx`, `was_`) and op names used as
statement names (`relu`). Language keywords are never used as names.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Optional, Sequence

from hypothesis import strategies as st

from specsurgery.features import featurise, random_record
from specsurgery.names import MODULE_ATTRIBUTES
from specsurgery.spec.load import load_text

# The language's keywords and type names: never names.
RESERVED = frozenset({
    "schema", "model", "vocab", "group", "use", "was", "as", "out",
    "float", "int", "bool", "true", "false", "category",
})

# Simplest first: hypothesis shrinks a choice towards the start of the list.
NAMES = (
    "a", "b", "c", "d", "e", "x", "y", "z", "h", "k",
    "obs", "hero", "units", "mana", "kind",
    "state", "weight", "bias", "module", "ss", "torch",
    "class", "None", "lambda", "self", "types", "input",
    "outer", "asx", "was_", "groups", "model_", "schema2", "float32", "int8", "true_",
    "_", "_p", "X1", "T", "relu", "linear", "embed", "mask",
    "_modules_", "_params", "version", "T_dest", "op_params", "probe_variant",
)

OPS = ("linear", "embed", "onehot", "concat", "relu", "tanh", "sigmoid", "gelu",
       "add", "mul", "layernorm", "maxpool", "avgpool", "sumpool", "lstm",
       "attention", "pointer", "gru", "dropout")
ACTIVATIONS = ("relu", "tanh", "sigmoid", "gelu")
POOLS = ("maxpool", "avgpool", "sumpool")
FEATURE_TYPES = ("float", "int", "bool", "category")

_AUTO_SCOPE = re.compile(r"(%s)(_\d+)?" % "|".join(OPS))
# Aliases must not collide with the automatic op scopes (`linear`, `linear_2`).
ALIASES = tuple(n for n in NAMES if not _AUTO_SCOPE.fullmatch(n)) + ("proj", "gate", "enc")

assert not RESERVED & set(NAMES)
assert not MODULE_ATTRIBUTES & set(NAMES)
assert all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", n) for n in NAMES + ALIASES)

MAX_WIDTH = 12
MAX_ENTITIES = 5
MAX_VOCAB = 6


# ---------------------------------------------------------------------------
# pickers: where the random choices come from


class _HypothesisPick:
    def __init__(self, draw):
        self.draw = draw

    def integer(self, lo: int, hi: int) -> int:
        return self.draw(st.integers(lo, hi))

    def choice(self, seq: Sequence):
        return self.draw(st.sampled_from(list(seq)))

    def chance(self, p: float) -> bool:
        # Shrinks to 0, i.e. to False: optional decorations vanish when shrinking.
        return self.draw(st.integers(0, 99)) >= 100 - round(100 * p)


class _RandomPick:
    def __init__(self, rng: random.Random):
        self.rng = rng

    def integer(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def choice(self, seq: Sequence):
        return self.rng.choice(list(seq))

    def chance(self, p: float) -> bool:
        return self.rng.random() < p


# ---------------------------------------------------------------------------
# the generator


@dataclass
class Val:
    """A value the model can name: its text, width and entity set (None: plain)."""

    text: str
    width: int
    ent: Optional[str]
    is_path: bool = False  # a bare name or input path (usable as a whole statement)


@dataclass
class _GroupInfo:
    name: str
    entities: Optional[int]
    numeric: list[str] = field(default_factory=list)
    categories: list[tuple[str, str]] = field(default_factory=list)  # (feature, vocab)


class _Gen:
    def __init__(self, pick):
        self.p = pick
        self.olds = 0  # counter for fresh `was OLD` names
        self.ops: set[str] = set()

    # -- names -------------------------------------------------------------

    def name(self, taken: set, pool: Sequence[str] = NAMES) -> str:
        options = [n for n in pool if n not in taken]
        i = self.p.integer(0, len(options))
        if i < len(options):
            return options[i]
        k = len(taken)
        while f"n{k}" in taken:
            k += 1
        return f"n{k}"

    def was(self, p: float = 0.1) -> str:
        # `old…` never occurs in the pool, so it names nothing living.
        if not self.p.chance(p):
            return ""
        self.olds += 1
        return f" was old{self.olds}"

    def comment(self) -> str:
        return "  # a comment" if self.p.chance(0.05) else ""

    # -- schema ------------------------------------------------------------

    def schema(self) -> str:
        self.schema_name = self.name(set())
        lines = [f"schema {self.schema_name} {{{self.comment()}"]
        self.vocabs: dict[str, int] = {}
        for _ in range(self.p.integer(1, 3)):
            vocab = self.name(set(self.vocabs))
            items: list[str] = []
            seen: set[str] = set()
            for _ in range(self.p.integer(1, MAX_VOCAB)):
                item = self.name(seen)
                seen.add(item)
                items.append(item + self.was(0.05))
            self.vocabs[vocab] = len(items)
            trailing = "," if self.p.chance(0.1) else ""
            lines.append(f"  vocab {vocab} = [{', '.join(items)}{trailing}]{self.comment()}")
        self.groups: list[_GroupInfo] = []
        for _ in range(self.p.integer(1, 4)):
            name = self.name({g.name for g in self.groups})
            entities = self.p.integer(1, MAX_ENTITIES) if self.p.chance(0.5) else None
            group = _GroupInfo(name, entities)
            count = f"[{entities}]" if entities is not None else ""
            lines.append(f"  group {name}{count}{self.was(0.05)} {{{self.comment()}")
            taken: set[str] = set()
            for _ in range(self.p.integer(1, 5)):
                feature = self.name(taken)
                taken.add(feature)
                type_ = self.p.choice(FEATURE_TYPES)
                if type_ == "category":
                    vocab = self.p.choice(list(self.vocabs))
                    group.categories.append((feature, vocab))
                    text = f"category({vocab})"
                else:
                    group.numeric.append(feature)
                    text = type_
                lines.append(f"    {feature}: {text}{self.was(0.05)}{self.comment()}")
            lines.append("  }")
            self.groups.append(group)
        lines.append("}")
        self.entity_sets = [g.name for g in self.groups if g.entities is not None]
        return "\n".join(lines)

    # -- expressions -------------------------------------------------------

    def call(self, op: str, args: Sequence[str], ints: Sequence[int] = (), kw: str = "") -> str:
        self.ops.add(op)
        parts = list(args) + [str(i) for i in ints] + ([kw] if kw else [])
        alias = ""
        if self.p.chance(0.15):
            a = self.name(self.aliases, ALIASES)
            self.aliases.add(a)
            alias = f" as {a}"
        return f"{op}({', '.join(parts)}){alias}"

    def leaves(self, ent: Optional[str], paths_only: bool = False) -> list:
        """Thunks making the values over `ent` that need no computation."""
        out = []
        inp = self.input_name
        for g in self.groups:
            if (g.name if g.entities is not None else None) != ent:
                continue
            if g.numeric:
                out.append(lambda g=g: Val(f"{inp}.{g.name}", len(g.numeric), ent, True))
                for f in g.numeric:
                    out.append(lambda g=g, f=f: Val(f"{inp}.{g.name}.{f}", 1, ent, True))
            if not paths_only:
                for f, vocab in g.categories:
                    out.append(lambda g=g, f=f, vocab=vocab: self.category(f"{inp}.{g.name}.{f}", vocab, ent))
        for s in self.statements:
            if s.ent == ent:
                out.append(lambda s=s: s)
        return out

    def category(self, path: str, vocab: str, ent: Optional[str]) -> Val:
        if self.p.chance(0.5):
            dim = self.p.integer(1, MAX_WIDTH)
            return Val(self.call("embed", [path], [dim]), dim, ent)
        return Val(self.call("onehot", [path]), self.vocabs[vocab], ent)

    def pool(self, depth: int) -> Val:
        ent = self.p.choice(self.entity_sets)
        x = self.term(ent, max(depth - 1, 0))
        return Val(self.call(self.p.choice(POOLS), [x.text]), x.width, None)

    def fit(self, x: Val, width: int) -> Val:
        if x.width == width and not self.p.chance(0.3):
            return x
        return self.linear(x, width)

    def linear(self, x: Val, units: int) -> Val:
        kw = ""
        if self.p.chance(0.3):
            kw = "bias=false"
        elif self.p.chance(0.05):
            kw = "bias=true"
        return Val(self.call("linear", [x.text], [units], kw), units, x.ent)

    def term(self, ent: Optional[str], depth: int) -> Val:
        leaves = self.leaves(ent)
        if depth <= 0:
            if not leaves:  # plain, but nothing plain yet: pool an entity set
                return self.pool(0)
            return self.p.choice(leaves)()
        kinds = (["leaf"] if leaves else []) + ["linear", "activation", "layernorm", "concat", "binary"]
        if ent is not None:
            kinds.append("attention")
        if ent is None:
            if self.entity_sets:
                kinds.append("pool")
            if self.lstm_budget > 0:
                kinds.append("lstm")
        kind = self.p.choice(kinds)
        d = depth - 1
        if kind == "leaf":
            return self.p.choice(leaves)()
        if kind == "linear":
            return self.linear(self.term(ent, d), self.p.integer(1, MAX_WIDTH))
        if kind == "activation":
            x = self.term(ent, d)
            op = self.p.choice(ACTIVATIONS + ("dropout",))
            if op == "dropout":
                return Val(self.call("dropout", [x.text], [self.p.choice(("0.1", "0.5", "0"))]), x.width, ent)
            return Val(self.call(op, [x.text]), x.width, ent)
        if kind == "attention":
            x = self.term(ent, d)
            heads, head_dim = self.p.integer(1, 2), self.p.integer(1, 3)
            return Val(self.call("attention", [x.text], [heads, head_dim]), heads * head_dim, ent)
        if kind == "layernorm":
            x = self.term(ent, d)
            return Val(self.call("layernorm", [x.text]), x.width, ent)
        if kind == "concat":
            count = 1 if self.p.chance(0.1) else self.p.integer(2, 3)
            xs = [self.term(ent, d) for _ in range(count)]
            return Val(self.call("concat", [x.text for x in xs]), sum(x.width for x in xs), ent)
        if kind == "binary":
            a = self.term(ent, d)
            b = self.fit(self.term(ent, d), a.width)
            return Val(self.call(self.p.choice(("add", "mul")), [a.text, b.text]), a.width, ent)
        if kind == "pool":
            return self.pool(depth)
        assert kind == "lstm"
        self.lstm_budget -= 1
        x = self.term(None, d)
        units = self.p.integer(1, MAX_WIDTH)
        return Val(self.call(self.p.choice(("lstm", "gru")), [x.text], [units]), units, None)

    def pointer(self, depth: int) -> str:
        """A pointer head: a plain query scoring the entities of one set."""
        ent = self.p.choice(self.entity_sets)
        query, keys = self.term(None, depth), self.term(ent, depth)
        return self.call("pointer", [query.text, keys.text], [self.p.integer(1, 4)])

    # -- model -------------------------------------------------------------

    def model(self) -> str:
        self.model_name = self.name(set())
        self.input_name = self.name(set())
        self.lstm_budget = self.p.choice((0, 0, 1, 2))
        self.statements: list[Val] = []
        lines = [f"model {self.model_name}({self.input_name}: {self.schema_name}) {{{self.comment()}"]
        n = self.p.integer(1, 5)
        taken = {self.input_name}
        for i in range(n):
            head = i == n - 1 or self.p.chance(0.35)
            ent = None if head else self.p.choice([None] + self.entity_sets)
            name = self.name(taken)
            taken.add(name)
            self.aliases: set[str] = set()
            if head and self.entity_sets and self.p.chance(0.2):
                text = self.pointer(self.p.integer(0, 2))
                lines.append(f"  out {name}{self.was(0.1)} = {text}{self.comment()}")
                continue  # a pointer's scores are read by no statement
            paths = self.leaves(ent, paths_only=True)
            if paths and self.p.chance(0.1):
                value = self.p.choice(paths)()
            else:
                value = self.term(ent, self.p.integer(1, 3))
            out = "out " if head else ""
            lines.append(f"  {out}{name}{self.was(0.1)} = {value.text}{self.comment()}")
            self.statements.append(Val(name, value.width, value.ent, True))
        lines.append("}")
        return "\n".join(lines)

    def text(self) -> str:
        return self.schema() + "\n\n" + self.model() + "\n"


def generate(pick) -> tuple[str, str, set[str]]:
    """(spec text, model name, ops used) from a picker."""
    gen = _Gen(pick)
    text = gen.text()
    return text, gen.model_name, gen.ops


def spec_text_from_seed(seed: int) -> tuple[str, str, set[str]]:
    """The same generator driven by random.Random(seed) (no hypothesis)."""
    return generate(_RandomPick(random.Random(seed)))


# ---------------------------------------------------------------------------
# strategies


@st.composite
def _named_spec_texts(draw) -> tuple[str, str]:
    text, model, _ = generate(_HypothesisPick(draw))
    return text, model


def spec_texts() -> st.SearchStrategy[str]:
    """Random valid .spec texts: one schema and one model."""
    return _named_spec_texts().map(lambda pair: pair[0])


@st.composite
def specs(draw):
    """(text, ModelSpec): a random valid spec, loaded with load_text."""
    text, model = draw(_named_spec_texts())
    path = "<random-%d>" % draw(st.integers(0, 9))
    return text, load_text(text, path).model(model)


def random_batch(spec, graph, rng: random.Random, batch: int = 3, steps: int = 2) -> dict:
    """Featurised random records for `spec` (a time axis of `steps` when the graph has one)."""
    schema = spec.schema
    if graph.has_time:
        records = [[random_record(schema, rng) for _ in range(steps)] for _ in range(batch)]
    else:
        records = [random_record(schema, rng) for _ in range(batch)]
    return featurise(schema, records, time=graph.has_time)
