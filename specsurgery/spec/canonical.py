"""The canonical text of a spec: one normal layout, parseable back to an equal spec.

A checkpoint embeds the canonical text of its model and schema, so it alone
says what it is; `parse(canonical(spec)) == spec` (spans aside).
"""
from __future__ import annotations

from . import model as m


def _was(name) -> str:
    return f" was {name}" if name else ""


def schema_text(schema: m.Schema) -> str:
    lines = [f"schema {schema.name} {{"]
    for vocab in schema.vocabs:
        items = ", ".join(item.name + _was(item.was) for item in vocab.items)
        lines.append(f"  vocab {vocab.name} = [{items}]")
    for group in schema.groups:
        count = f"[{group.entities}]" if group.entities is not None else ""
        lines.append(f"  group {group.name}{count}{_was(group.was)} {{")
        for f in group.features:
            type_ = f"category({f.vocab})" if f.is_category else f.type
            lines.append(f"    {f.name}: {type_}{_was(f.was)}")
        lines.append("  }")
    lines.append("}")
    return "\n".join(lines)


def expr_text(expr) -> str:
    if isinstance(expr, m.Path):
        return str(expr)
    if isinstance(expr, m.IntArg):
        return str(expr.value)
    if isinstance(expr, m.DecimalArg):
        return repr(expr.value)  # the shortest text that reads back as the same float
    args = [expr_text(a) for a in expr.args]
    args += [f"{k.name}={str(k.value).lower() if isinstance(k.value, bool) else k.value}" for k in expr.keywords]
    alias = f" as {expr.alias}" if expr.alias else ""
    return f"{expr.op}({', '.join(args)}){alias}"


def model_text(model: m.Model) -> str:
    lines = [f"model {model.name}({model.input_name}: {model.schema_name}) {{"]
    for s in model.statements:
        lines.append(f"  {'out ' if s.out else ''}{s.name}{_was(s.was)} = {expr_text(s.expr)}")
    lines.append("}")
    return "\n".join(lines)


def canonical(spec: m.ModelSpec) -> str:
    return schema_text(spec.schema) + "\n\n" + model_text(spec.model) + "\n"
