"""The IR graph: a checked model as op applications with inferred shapes.

Built once from a typed spec (`build_graph`); every back end walks the same
nodes in order with `walk`, supplying one hook per node. Nothing here imports
torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional

from .errors import Diagnostic, SpecError
from .ops import INPUT_OPS, OPS, READ_CATEGORY, READ_FEATURE, READ_GROUP, Node, OpError, Value
from .spec import model as m


@dataclass(frozen=True)
class FeatureTable:
    """The input feature schema: every scalar input feature, named and numbered."""

    names: tuple[str, ...]

    @property
    def index(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.names)}

    def __len__(self) -> int:
        return len(self.names)

    def names_of(self, bits: int) -> list[str]:
        out, i = [], 0
        while bits:
            if bits & 1:
                out.append(self.names[i])
            bits >>= 1
            i += 1
        return out


def feature_name(group: m.Group, feature: m.Feature, item: Optional[str] = None) -> str:
    return f"{group.name}.{feature.name}" + (f"={item}" if item is not None else "")


def feature_table(schema: m.Schema) -> FeatureTable:
    names: list[str] = []
    for group in schema.groups:
        for feature in group.features:
            if feature.is_category:
                vocab = schema.vocab(feature.vocab)
                names.extend(feature_name(group, feature, item) for item in (vocab.item_names if vocab else ()))
            else:
                names.append(feature_name(group, feature))
    return FeatureTable(tuple(names))


@dataclass
class Graph:
    spec: m.ModelSpec
    nodes: list[Node]
    outputs: dict[str, int]  # head name -> node
    statements: dict[str, int]  # statement name -> node holding its value
    features: FeatureTable
    has_time: bool

    @property
    def schema(self) -> m.Schema:
        return self.spec.schema

    @property
    def model(self) -> m.Model:
        return self.spec.model

    def parameters(self) -> dict[str, tuple[Node, str]]:
        """Checkpoint key ("hero_h.linear.weight") -> (node, local name), in graph order."""
        return {f"{node.scope}.{name}": (node, name) for node in self.nodes for name in node.params}

    def names_0_1_0(self) -> dict[str, str]:
        """Checkpoint key -> the key specsurgery 0.1.0 wrote for it, where they differ
        (0.1.0 numbered named ops too: `linear(x, 2) as p, linear(y, 3)` had `linear_2`)."""
        out = {}
        for node in self.nodes:
            legacy = node.attrs.get("scope_0_1_0", node.scope)
            if legacy != node.scope:
                out.update({f"{node.scope}.{name}": f"{legacy}.{name}" for name in node.params})
        return out

    def parameter_count(self) -> int:
        total = 0
        for node in self.nodes:
            for spec in node.params.values():
                n = 1
                for d in spec.shape:
                    n *= d
                total += n
        return total

    def entity_sets(self) -> list[m.Group]:
        return [g for g in self.schema.groups if g.is_entity_set]


def walk(graph: Graph, visit: Callable[[Node, list[Any]], Any]) -> dict[int, Any]:
    """Run `visit(node, input_values)` over the graph in order; node index -> value."""
    values: dict[int, Any] = {}
    for node in graph.nodes:
        values[node.index] = visit(node, [values[i] for i in node.inputs])
    return values


# ---------------------------------------------------------------------------
# building


class _Skip(Exception):
    """A sub-expression already failed and was reported; stop this statement."""


@dataclass
class _Builder:
    spec: m.ModelSpec
    table: FeatureTable
    nodes: list[Node] = field(default_factory=list)
    diagnostics: list[Diagnostic] = field(default_factory=list)
    cache: dict[tuple, int] = field(default_factory=dict)

    def add(self, op: str, inputs: tuple[int, ...], value: Value, statement: str, span, scope: str = "", attrs=None, params=None, arg_spans=()) -> int:
        node = Node(len(self.nodes), op, inputs, value, attrs or {}, params or {}, scope, statement, span, arg_spans)
        self.nodes.append(node)
        return node.index

    def error(self, message: str, span, hint: Optional[str] = None) -> None:
        self.diagnostics.append(Diagnostic(message, span, hint))
        raise _Skip()


def build_graph(spec: m.ModelSpec) -> Graph:
    """Type every statement; all errors of the model are reported together.

    Build it once per loaded spec (spec.load keeps the graphs it built) and
    hand the graph along: planning and applying take a Graph as readily as a spec."""
    schema, model = spec.schema, spec.model
    table = feature_table(schema)
    bits = table.index
    b = _Builder(spec, table)
    defined: dict[str, int] = {}  # statement -> node
    failed: set[str] = set()
    lines: dict[str, int] = {}
    for s in model.statements:
        lines.setdefault(s.name, s.span.line)  # where each name is first defined
    outputs: dict[str, int] = {}

    def input_path(path: m.Path, stmt: str) -> int:
        parts = path.parts
        group = schema.group(parts[1])
        if group is None:
            b.error(f"schema {schema.name} has no group {parts[1]!r}", path.span,
                    "groups: " + ", ".join(g.name for g in schema.groups))
        if len(parts) == 2:
            numeric = group.numeric_features
            if not numeric:
                b.error(f"group {group.name} has no numeric features to read as a tensor", path.span,
                        "reach its category features with embed or onehot")
            names = tuple(feature_name(group, f) for f in numeric)
            key = ("group", group.name)
            if key not in b.cache:
                b.cache[key] = b.add(READ_GROUP, (), Value(len(names), group.name if group.is_entity_set else None,
                                                        label=f"{'entity set' if group.is_entity_set else 'group'} {group.name}",
                                                        cap=group.entities),
                                     stmt, path.span, attrs={"group": group.name, "features": names,
                                                             "bits": tuple(1 << bits[n] for n in names)})
            return b.cache[key]
        if len(parts) > 3:
            b.error(f"{path} is not a feature: paths are INPUT.group or INPUT.group.feature", path.span)
        feature = group.feature(parts[2])
        if feature is None:
            b.error(f"group {group.name} has no feature {parts[2]!r}", path.span,
                    "features: " + ", ".join(f.name for f in group.features))
        entities = group.name if group.is_entity_set else None
        label = f"{feature.type} {group.name}.{feature.name}"
        if feature.is_category:
            vocab = schema.vocab(feature.vocab)
            names = tuple(feature_name(group, feature, item) for item in vocab.item_names)
            return b.add(READ_CATEGORY, (), Value(len(names), entities, vocab=vocab.name, label=label, cap=group.entities),
                         stmt, path.span,
                         attrs={"group": group.name, "feature": feature.name, "features": names,
                                "bits": tuple(1 << bits[n] for n in names)})
        column = group.numeric_features.index(feature)
        name = feature_name(group, feature)
        return b.add(READ_FEATURE, (), Value(1, entities, label=label, cap=group.entities), stmt, path.span,
                     attrs={"group": group.name, "feature": feature.name, "column": column,
                            "features": (name,), "bits": (1 << bits[name],)})

    def path_value(path: m.Path, stmt: str) -> int:
        head = path.parts[0]
        if head in failed:
            raise _Skip()  # already reported
        if head == model.input_name:
            if len(path.parts) == 1:
                b.error(f"{head} is the whole observation; read a group ({head}.GROUP) or a feature", path.span)
            return input_path(path, stmt)
        if head in defined:
            if len(path.parts) > 1:
                b.error(f"{head} is a statement, not an input: {path} has no meaning", path.span)
            return defined[head]
        if head in failed:
            raise _Skip()
        if head in lines:
            b.error(f"{head} is used before its definition (line {lines[head]})", path.span)
        b.error(f"unknown name {head!r}", path.span,
                f"names in scope: {model.input_name}, " + ", ".join(defined) if defined else None)

    def name_ops(stmt: m.Statement) -> dict[int, tuple[str, str]]:
        """Scope of every call: its `as` name, or its kind numbered among the
        unnamed ops of that kind in order of appearance (a named op takes no
        number). Beside it, the name 0.1.0 gave it (which numbered named ops too)."""
        names: dict[int, tuple[str, str]] = {}
        counts: dict[str, int] = {}
        counts_0_1_0: dict[str, int] = {}
        taken: dict[str, m.Call] = {}

        def numbered(kind: str, n: int) -> str:
            return kind if n == 1 else f"{kind}_{n}"

        def visit(expr) -> None:
            if not isinstance(expr, m.Call):
                return
            counts_0_1_0[expr.op] = counts_0_1_0.get(expr.op, 0) + 1
            if not expr.alias:
                counts[expr.op] = counts.get(expr.op, 0) + 1
            scope = expr.alias or numbered(expr.op, counts[expr.op])
            if scope in taken:
                b.diagnostics.append(Diagnostic(f"{stmt.name}.{scope} names two ops in one statement", expr.span,
                                                "give one of them another name with `as NAME`"))
            taken[scope] = expr
            names[id(expr)] = (scope, expr.alias or numbered(expr.op, counts_0_1_0[expr.op]))
            for a in expr.args:
                visit(a)

        visit(stmt.expr)
        return names

    def call_value(call: m.Call, stmt: str, scopes: dict[int, tuple[str, str]]) -> int:
        op = OPS.get(call.op)
        if op is None or call.op in INPUT_OPS:
            known = ", ".join(n for n in OPS if n not in INPUT_OPS)
            b.error(f"unknown op {call.op!r}", call.op_span, f"ops: {known}")
        tensors = [a for a in call.args if not isinstance(a, m.NUMBER_ARGS)]
        ints = [a for a in call.args if isinstance(a, m.NUMBER_ARGS)]
        signature = f"{op.name}({', '.join(['x'] * (op.n_tensors or 1) + list(op.int_names))}{', ...' if op.n_tensors is None else ''})"
        if op.n_tensors is None and not tensors:
            b.error(f"{op.name} needs at least one input", call.span)
        if (op.n_tensors is not None and len(tensors) != op.n_tensors) or len(ints) != op.n_ints:
            b.error(f"{op.name} takes {signature}, got {len(call.args)} argument{'s' if len(call.args) != 1 else ''}", call.span)
        order = [isinstance(a, m.NUMBER_ARGS) for a in call.args]
        if order != sorted(order):
            b.error(f"{op.name} takes {signature}: widths come after the inputs", call.span)
        for a in ints:
            if isinstance(a, m.DecimalArg) and not op.decimals:
                b.error(f"{op.name} takes whole numbers, got {a.value:g}", a.span)
        kw = dict(op.keywords)
        for k in call.keywords:
            if k.name not in op.keywords:
                allowed = ", ".join(op.keywords) or "none"
                b.error(f"{op.name} has no keyword {k.name!r} (keywords: {allowed})", k.span)
            if type(k.value) is not type(op.keywords[k.name]):
                wanted = type(op.keywords[k.name]).__name__.replace("bool", "true or false")
                got = str(k.value).lower() if isinstance(k.value, bool) else k.value
                b.error(f"{op.name} keyword {k.name} takes {wanted}, got {got}", k.span)
            kw[k.name] = k.value
        inputs = []
        for arg in tensors:
            if isinstance(arg, m.Path):
                index = path_value(arg, stmt)
            else:
                index = call_value(arg, stmt, scopes)
            value = b.nodes[index].value
            if OPS[b.nodes[index].op].head_only:
                b.error(f"{b.nodes[index].op} makes an output head, which no op may read "
                        f"(its scores are -inf at padding entities)", arg.span)
            if value.is_category and not op.takes_category:
                b.error(f"{op.name} needs a numeric input, got {value.describe()}", arg.span,
                        "read a category through embed or onehot")
            inputs.append(index)
        values = [b.nodes[i].value for i in inputs]
        try:
            value, params = op.infer(values, [i.value for i in ints], kw)
        except OpError as e:
            spans = list(tensors) + list(ints)
            span = spans[e.argument].span if e.argument is not None and e.argument < len(spans) else call.span
            b.error(e.message, span)
        if value.entities and value.cap is None:  # every value over an entity set knows its size
            value = replace(value, cap=schema.group(value.entities).entities)
        local, local_0_1_0 = scopes[id(call)]
        attrs = {"ints": [i.value for i in ints], **kw, "alias": call.alias, "scope_0_1_0": f"{stmt}.{local_0_1_0}"}
        if op.surgery.layout.entities == "required":
            # whose mask the forward reads: the entity set among its inputs
            attrs["entities"] = next(v.entities for v in values if v.entities)
        scope = f"{stmt}.{local}"
        return b.add(op.name, tuple(inputs), value, stmt, call.span, scope=scope, attrs=attrs, params=params,
                     arg_spans=tuple(a.span for a in tensors))

    for stmt in model.statements:
        if stmt.name == model.input_name:
            b.diagnostics.append(Diagnostic(f"{stmt.name} is the model's input; a statement cannot take its name", stmt.span))
            failed.add(stmt.name)
            continue
        if stmt.name in defined or stmt.name in failed:
            b.diagnostics.append(Diagnostic(f"{stmt.name} is defined twice (first on line {lines[stmt.name]})", stmt.span))
            continue
        try:
            if isinstance(stmt.expr, m.Path):
                index = path_value(stmt.expr, stmt.name)
            else:
                index = call_value(stmt.expr, stmt.name, name_ops(stmt))
            value = b.nodes[index].value
            if OPS[b.nodes[index].op].head_only and not stmt.out:
                b.error(f"{b.nodes[index].op} makes an output head: write `out {stmt.name} = ...`", stmt.expr.span)
            if value.is_category:
                b.error(f"statement {stmt.name} would hold {value.describe()}, which is not a tensor", stmt.expr.span,
                        f"read it through embed({stmt.expr}, DIM) or onehot({stmt.expr})")
            if stmt.out and value.entities:
                b.error(f"output head {stmt.name} ranges over entity set {value.entities}; pool it first", stmt.expr.span)
            defined[stmt.name] = index
            if stmt.out:
                outputs[stmt.name] = index
        except _Skip:
            failed.add(stmt.name)

    if not outputs and not failed:
        b.diagnostics.append(Diagnostic(f"model {model.name} has no output head", model.span,
                                        "mark a statement as a head: out NAME = EXPR"))
    if b.diagnostics:
        raise SpecError(b.diagnostics)
    return Graph(spec, b.nodes, outputs, defined, table, any(OPS[n.op].surgery.layout.time for n in b.nodes))
