"""The typed spec: frozen pydantic nodes, each keeping its source span.

These are what the parser produces and every later stage reads. Equality
ignores spans (`Span` compares equal to any other span), so a spec parsed
from its canonical text equals the spec it was printed from.
"""
from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from ..errors import Span


class Node(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def built(cls, **fields):
    """A node of `cls` from every one of its fields, each already of its type
    (the parser's tokens, for the nodes made by the thousand: spans, vocabulary
    items): what pydantic's model_construct makes, without its cost per call
    (7 us, a third of parsing a large vocabulary)."""
    node = object.__new__(cls)
    object.__setattr__(node, "__dict__", fields)
    object.__setattr__(node, "__pydantic_fields_set__", set(fields))
    object.__setattr__(node, "__pydantic_extra__", None)
    object.__setattr__(node, "__pydantic_private__", None)
    return node


NO_SPAN = Span()

NumericType = Literal["float", "int", "bool"]
FeatureType = Literal["float", "int", "bool", "category"]


class VocabItem(Node):
    name: str
    was: Optional[str] = None
    span: Span = NO_SPAN


class Vocab(Node):
    name: str
    items: tuple[VocabItem, ...]
    span: Span = NO_SPAN

    @property
    def item_names(self) -> tuple[str, ...]:
        return tuple(item.name for item in self.items)


class Feature(Node):
    name: str
    type: FeatureType
    vocab: Optional[str] = None  # only for type == "category"
    was: Optional[str] = None
    span: Span = NO_SPAN

    @property
    def is_category(self) -> bool:
        return self.type == "category"


class Group(Node):
    name: str
    entities: Optional[int] = None  # None: a plain group; N: an entity set of at most N
    was: Optional[str] = None
    features: tuple[Feature, ...] = ()
    span: Span = NO_SPAN
    entities_span: Span = NO_SPAN

    @property
    def is_entity_set(self) -> bool:
        return self.entities is not None

    @property
    def numeric_features(self) -> tuple[Feature, ...]:
        return tuple(f for f in self.features if not f.is_category)

    @property
    def category_features(self) -> tuple[Feature, ...]:
        return tuple(f for f in self.features if f.is_category)

    def feature(self, name: str) -> Optional[Feature]:
        return next((f for f in self.features if f.name == name), None)


class Schema(Node):
    name: str
    vocabs: tuple[Vocab, ...] = ()
    groups: tuple[Group, ...] = ()
    span: Span = NO_SPAN

    def vocab(self, name: str) -> Optional[Vocab]:
        return next((v for v in self.vocabs if v.name == name), None)

    def group(self, name: str) -> Optional[Group]:
        return next((g for g in self.groups if g.name == name), None)


class Path(Node):
    """`obs.hero`, `obs.hero.mana` or a statement name like `hero_h`."""

    kind: Literal["path"] = "path"
    parts: tuple[str, ...]
    span: Span = NO_SPAN

    def __str__(self) -> str:
        return ".".join(self.parts)


class Keyword(Node):
    name: str
    value: Union[bool, int]
    span: Span = NO_SPAN


class IntArg(Node):
    kind: Literal["int"] = "int"
    value: int
    span: Span = NO_SPAN


class DecimalArg(Node):
    """A decimal argument (`dropout(x, 0.1)`); only ops that declare `decimals` take one."""

    kind: Literal["decimal"] = "decimal"
    value: float
    span: Span = NO_SPAN


NUMBER_ARGS = (IntArg, DecimalArg)


class Call(Node):
    kind: Literal["call"] = "call"
    op: str
    args: tuple[Union["Call", Path, IntArg, DecimalArg], ...] = ()
    keywords: tuple[Keyword, ...] = ()
    alias: Optional[str] = None
    span: Span = NO_SPAN
    op_span: Span = NO_SPAN


Expr = Union[Call, Path]
Argument = Union[Call, Path, IntArg, DecimalArg]


class Statement(Node):
    name: str
    expr: Union[Call, Path] = Field(discriminator="kind")
    out: bool = False
    was: Optional[str] = None
    span: Span = NO_SPAN


class Model(Node):
    name: str
    input_name: str
    schema_name: str
    statements: tuple[Statement, ...] = ()
    span: Span = NO_SPAN
    schema_span: Span = NO_SPAN


class Use(Node):
    path: str
    span: Span = NO_SPAN


class SpecFile(Node):
    """One parsed .spec file, before `use` is resolved."""

    path: str
    uses: tuple[Use, ...] = ()
    schemas: tuple[Schema, ...] = ()
    models: tuple[Model, ...] = ()


class ModelSpec(Node):
    """A model and the schema it reads: everything needed to build it."""

    schema_: Schema = Field(alias="schema")
    model: Model

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    @property
    def schema(self) -> Schema:  # noqa: D401 - a plain accessor
        return self.schema_


Call.model_rebuild()
Statement.model_rebuild()
