"""Checks of a file's schemas and models that need no shapes.

Shape and name checks of model statements happen while the IR is built
(ir.build_graph); both gather every error of a file before reporting.
"""
from __future__ import annotations

from typing import Iterable

from ..errors import Diagnostic
from ..names import MODULE_ATTRIBUTES
from . import model as m


def _duplicates(items: Iterable, what: str, where: str) -> list[Diagnostic]:
    items = tuple(items)
    if len({item.name for item in items}) == len(items):
        return []  # the common case, at a set's speed (a vocabulary has thousands of items)
    seen: dict[str, object] = {}
    out = []
    for item in items:
        if item.name in seen:
            first = seen[item.name].span
            at = f"at column {first.column}" if first.line == item.span.line else f"on line {first.line}"
            out.append(Diagnostic(f"{what} {item.name!r} is defined twice in {where} (first {at})", item.span))
        else:
            seen[item.name] = item
    return out


def _renames(items: Iterable, what: str, where: str) -> list[Diagnostic]:
    """`was OLD` must name something other than itself and its living siblings."""
    items = tuple(items)
    if all(i.was is None for i in items):
        return []  # nothing renamed
    names = {i.name for i in items}
    olds: dict[str, object] = {}
    out = []
    for item in items:
        if item.was is None:
            continue
        if item.was == item.name:
            out.append(Diagnostic(f"{what} {item.name!r} says it was {item.was!r}, its own name", item.span,
                                  f"`was` names the old name of a renamed thing; drop `was {item.was}`"))
        elif item.was in names:
            out.append(Diagnostic(
                f"{what} {item.name!r} was {item.was!r}, but {item.was!r} still exists in {where}", item.span,
                "a rename names the old name of a thing that is gone; drop `was` or the old one"))
        elif item.was in olds:
            out.append(Diagnostic(
                f"{item.was!r} was renamed twice in {where} (to {olds[item.was].name!r} and {item.name!r})", item.span,
                f"its weights can follow one new name only; keep `was {item.was}` on one of them"))
        olds.setdefault(item.was, item)
    return out


def check_schema(schema: m.Schema) -> list[Diagnostic]:
    where = f"schema {schema.name}"
    errors = _duplicates(schema.vocabs, "vocab", where) + _duplicates(schema.groups, "group", where)
    errors += _renames(schema.groups, "group", where)
    for vocab in schema.vocabs:
        if not vocab.items:
            errors.append(Diagnostic(f"vocab {vocab.name!r} is empty", vocab.span))
        errors += _duplicates(vocab.items, "item", f"vocab {vocab.name}")
        errors += _renames(vocab.items, "item", f"vocab {vocab.name}")
    for group in schema.groups:
        if group.entities is not None and group.entities <= 0:
            errors.append(Diagnostic(
                f"entity set {group.name} must hold a positive whole number of entities, got {group.entities}",
                group.entities_span))
        if not group.features:
            errors.append(Diagnostic(f"group {group.name!r} has no features", group.span))
        errors += _duplicates(group.features, "feature", f"group {group.name}")
        errors += _renames(group.features, "feature", f"group {group.name}")
        for feature in group.category_features:
            if schema.vocab(feature.vocab) is None:
                known = ", ".join(v.name for v in schema.vocabs) or "none"
                errors.append(Diagnostic(
                    f"feature {group.name}.{feature.name} uses unknown vocab {feature.vocab!r} (vocabs: {known})",
                    feature.span))
    return errors


def check_model_names(model: m.Model) -> list[Diagnostic]:
    # All statements: `c was a` while a new statement takes the name `a` is refused.
    return _renames(model.statements, "statement", f"model {model.name}") + _module_attributes(model)


def _module_attributes(model: m.Model) -> list[Diagnostic]:
    """Statements and op names are submodules of ss.Model: they may not be
    named like an attribute it already has (names.py says why)."""
    hint = "ss.Model is a torch.nn.Module with one submodule per statement and op; choose another name"
    out = []

    def aliases(expr):
        if isinstance(expr, m.Call):
            if expr.alias in MODULE_ATTRIBUTES:
                out.append(Diagnostic(f"op name {expr.alias!r} is taken: a module already has an attribute {expr.alias}",
                                      expr.span, hint))
            for arg in expr.args:
                aliases(arg)

    for s in model.statements:
        if s.name in MODULE_ATTRIBUTES:
            out.append(Diagnostic(f"statement name {s.name!r} is taken: the model already has an attribute {s.name}",
                                  s.span, hint))
        aliases(s.expr)
    return out
