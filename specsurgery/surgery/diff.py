"""From two specs to a surgery plan: Φ_old and Φ_new, diffed index by index.

1. Renames. A `was` in the new spec says what a feature, group, vocab item or
   statement was called before; new keys are translated into old names.
2. Matching. Each new parameter is matched to its old one by name; every
   index of every axis by its key (an input feature, or a unit of the op that
   made it, with its structural tag, through concat, pools and element-wise
   ops), numbered by ordinal among equal keys.
3. Fills. An element with an unmatched index on its output axis starts fresh;
   one whose output side is old but some input index is new starts at zero;
   all else is copied.
4. Function check. One walk of the new graph marks each value index that no
   longer computes what it did, asking each op what it means for surgery
   (ops.Surgery: element-wise, mixing, concatenating or joining; whether a
   changed input axis changes every output): a dropped input, a narrowed op,
   a mixing op over a changed axis, a new value joined to an old one, a
   changed op on the path. Any old head index so marked makes the plan say the
   function is not preserved, naming the spec lines to blame. Feature sets restricted to the
   features both versions have must agree on every matched index (the proof
   that a match means the same thing).
"""
from __future__ import annotations

import collections
import itertools
import operator
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

from .. import keys as K
from ..backends.shadow import InteractionMap, shadow_map
from ..errors import Diagnostic, SpecError, UserError
from ..ir import Graph, build_graph, feature_name
from ..ops import OPS, OUT, Axis, Indices
from ..spec import model as m
from ..spec.canonical import canonical
from .plan import AxisMap, DroppedParam, Fill, HeadMap, ParamPlan, Plan, Reason, Run, Summary


# ---------------------------------------------------------------------------
# 1. renames


@dataclass
class Renames:
    """How the new version's names read in the old one's terms.

    Beyond the `was` of the spec, planning adds what it found: which old op
    each new op is (`ops`, matched by what it does), the ops that are new
    (`new_ops`), an inserted layer that starts as the identity (its unit i is
    its input's index i: `identity_inputs`), and a join with a value that
    starts at zero (it is its old side: `zero_joins`)."""

    features: dict[str, str] = field(default_factory=dict)  # new feature name -> old
    groups: dict[str, str] = field(default_factory=dict)  # new group -> old
    scopes: dict[str, str] = field(default_factory=dict)  # new statement -> old
    ops: dict[str, str] = field(default_factory=dict)  # new op scope -> the old op it is
    new_ops: set[str] = field(default_factory=set)  # op scopes with no old counterpart
    identity_inputs: dict[str, tuple] = field(default_factory=dict)  # identity op scope -> its input's keys
    zero_joins: dict = field(default_factory=dict)  # Joined key -> the side it stands for
    _features_moved: Optional[bool] = None
    _memo: dict = field(default_factory=dict)
    _axes: dict = field(default_factory=dict)
    _scopes: dict = field(default_factory=dict)  # op scope -> `scope(it)`, asked once per planning
    _unchanged_axes: dict = field(default_factory=dict)  # id(axis) -> (axis, whether it reads as it is)

    def feature(self, name: str) -> str:
        return self.features.get(name, name)

    def scope(self, scope: str) -> str:
        if scope in self.ops:
            return self.ops[scope]
        if scope in self.new_ops:
            return f"{scope} (new)"  # a name no old op has
        stmt, _, rest = scope.partition(".")
        old = self.scopes.get(stmt, stmt)
        return f"{old}.{rest}" if rest else old

    def _features_renamed(self) -> bool:
        if self._features_moved is None:
            self._features_moved = any(k != v for k, v in self.features.items())
        return self._features_moved

    def __bool__(self) -> bool:
        """Whether any key reads differently in the old version's terms."""
        return (self._features_renamed() or bool(self.scopes) or bool(self.new_ops) or bool(self.zero_joins)
                or any(k != v for k, v in self.ops.items()))

    def keys(self, keys):
        """`key` of each, skipped when nothing was renamed (the common, large case:
        then `keys` itself, as for an axis that no rename touches). Read it,
        never change it. An axis is translated once: the same value is read by
        several ops."""
        if not self:
            return keys
        hit = self._axes.get(id(keys))
        if hit is not None and hit[0] is keys:
            return hit[1]
        out = keys if self._unchanged(keys) else self._translated(keys)
        self._axes[id(keys)] = (keys, out)  # holding `keys` keeps its id from being reused
        return out

    def _translated(self, keys):
        """An axis in old names, remade from how it was made (K.origin) where that
        is known: the translated inputs through the same step (a relu of a renamed
        op's units is a relu of the old op's), the keys one by one elsewhere."""
        def step(axis, made, inputs):
            if made is None:
                return self._each(axis)
            return axis if self._unchanged(axis) else self._remade(made[0], axis, inputs)

        return K.over_origins(keys, self._axes, lambda axis, made: not self._unchanged(axis), step)

    def _remade(self, how: tuple, axis, inputs: list):
        """The step `how` (of K.origin) in old names over its inputs in old names:
        what `key` gives each key of `axis`."""
        kind = how[0]
        if kind == "features":
            return K.features(tuple(map(self.feature, how[1])))
        if kind == "units" and how[1] not in self.identity_inputs:
            return K.units(self._scope(how[1]), how[3], how[2])
        if kind == "wrap":
            return K.wrapped_axis(how[1], inputs[0], how[2])
        if kind == "norm":
            return K.normed_axis(self._scope(how[1]), inputs[0])
        if kind == "join" and (not self.zero_joins or self.zero_joins.keys().isdisjoint(axis)):
            return K.joined_axis(how[1], inputs[0], inputs[1])
        if kind == "chain":
            return K.chained(tuple(inputs))
        return self._each(axis)  # a unit of an identity start, a join at zero: key by key

    def _each(self, keys) -> list:
        out = list(map(self._memo.get, keys))  # keys translated before, in C
        if None in out:
            out = [self.key(k) if t is None else t for k, t in zip(keys, out)]
        return out

    def _unchanged(self, keys) -> bool:
        """Whether every key of an axis reads as it is, told where possible from
        how the axis was made (K.origin): a block of units of an op not renamed,
        an op not renamed over axes unchanged."""
        def step(axis, made, inputs) -> bool:
            if made is None:
                return _same(self._each(axis), axis)  # read key by key
            return all(inputs) and self._made_alike(made[0], axis)

        return K.over_origins(keys, self._unchanged_axes, lambda axis, made: True, step)

    def _made_alike(self, how: tuple, axis) -> bool:
        """Whether the step `how` (of K.origin) reads the same in old names, its inputs unchanged."""
        kind = how[0]
        if kind == "features":
            return not self._features_renamed() or all(map(operator.eq, map(self.feature, how[1]), how[1]))
        if kind == "units":
            return how[1] not in self.identity_inputs and self._scope(how[1]) == how[1]
        if kind == "norm":
            return self._scope(how[1]) == how[1]
        if kind == "join":
            return not self.zero_joins or self.zero_joins.keys().isdisjoint(axis)
        return True  # wrap, chain: index by index what their inputs are

    def _scope(self, scope: str) -> str:
        """`scope(scope)`, asked once per planning."""
        found = self._scopes.get(scope)
        if found is None:
            found = self._scopes[scope] = self.scope(scope)
        return found

    def key(self, key: K.Key) -> K.Key:
        found = self._memo.get(key)
        if found is not None:
            return found
        memo = self._memo
        if type(key) is K.Unit and key.scope not in self.identity_inputs:  # the common case, at once
            scope = self._scope(key.scope)
            found = memo[key] = key if scope == key.scope else K.Unit(scope, key.tag, key.ordinal)
            return found
        kind = type(key)
        if (kind is K.Feature or (kind is K.Joined and key.left in memo and key.right in memo)
                or ((kind is K.Wrapped or kind is K.Normed) and key.inner in memo)):
            found = memo[key] = self._build(key, memo)  # its insides translated already: no walk
            return found
        return K.transform(key, self._deps, self._build, memo)

    def _deps(self, k: K.Key) -> tuple:
        if isinstance(k, K.Unit) and k.scope in self.identity_inputs:
            return (self.identity_inputs[k.scope][k.ordinal],)
        return K.children(k)

    def _build(self, k: K.Key, memo: dict) -> K.Key:
        if isinstance(k, K.Feature):
            return K.Feature(self.feature(k.name))
        if isinstance(k, K.Unit):
            if k.scope in self.identity_inputs:
                return memo[self.identity_inputs[k.scope][k.ordinal]]
            return K.Unit(self.scope(k.scope), k.tag, k.ordinal)
        if isinstance(k, K.Wrapped):
            return K.wrap(k.op, memo[k.inner], k.idempotent)
        if isinstance(k, K.Normed):
            return K.Normed(self.scope(k.scope), memo[k.inner])
        if k in self.zero_joins:
            return memo[self.zero_joins[k]]
        return K.Joined(k.op, memo[k.left], memo[k.right])


def _rename_error(message: str, span) -> Diagnostic:
    return Diagnostic(message, span, "`was` names what the thing was called in the previous version")


def find_renames(old: m.ModelSpec, new: m.ModelSpec) -> Renames:
    """Read the new spec's `was` against the old spec.

    A `was` whose thing already has its new name in the old version is stale
    (the rename happened before) and ignored; one that names nothing in the old
    version is an error.
    """
    renames = Renames()
    errors: list[Diagnostic] = []
    os_, ns = old.schema, new.schema
    old_vocabs: dict = {}  # new vocab -> the old vocab its features read (a vocab may be renamed)
    for group in ns.groups:
        old_group_name = group.name
        if group.was and os_.group(group.name) is None:
            if os_.group(group.was) is None:
                errors.append(_rename_error(f"group {group.name} was {group.was!r}, but the old version has no group {group.was!r}", group.span))
                continue
            old_group_name = group.was
        old_group = os_.group(old_group_name)
        if old_group is None:
            continue
        renames.groups[group.name] = old_group.name
        for feature in group.features:
            old_feature_name = feature.name
            if feature.was and old_group.feature(feature.name) is None:
                if old_group.feature(feature.was) is None:
                    errors.append(_rename_error(f"feature {group.name}.{feature.name} was {feature.was!r}, but the old group "
                                                f"{old_group.name} has no feature {feature.was!r}", feature.span))
                    continue
                old_feature_name = feature.was
            old_feature = old_group.feature(old_feature_name)
            if old_feature is None:
                continue
            if feature.is_category and old_feature.is_category:
                new_vocab, old_vocab = ns.vocab(feature.vocab), os_.vocab(old_feature.vocab)
                old_vocabs.setdefault(new_vocab.name, old_vocab)
                old_items = set(old_vocab.item_names)
                for item in new_vocab.items:
                    old_item = item.was if item.was and item.name not in old_items and item.was in old_items else item.name
                    renames.features[feature_name(group, feature, item.name)] = feature_name(old_group, old_feature, old_item)
            elif not feature.is_category and not old_feature.is_category:
                renames.features[feature_name(group, feature)] = feature_name(old_group, old_feature)
    for vocab in ns.vocabs:
        old_vocab = old_vocabs.get(vocab.name) or os_.vocab(vocab.name)
        old_items = set(old_vocab.item_names) if old_vocab else set()
        for item in vocab.items:
            if item.was and item.name not in old_items and item.was not in old_items:
                where = f"the old vocab {old_vocab.name}" if old_vocab else "the old version"
                errors.append(_rename_error(f"item {item.name} of vocab {vocab.name} was {item.was!r}, but {where} "
                                            f"has no item {item.was!r}", item.span))
    old_statements = {s.name for s in old.model.statements}
    for stmt in new.model.statements:
        if stmt.was and stmt.name not in old_statements:
            if stmt.was not in old_statements:
                errors.append(_rename_error(f"statement {stmt.name} was {stmt.was!r}, but the old model has no statement {stmt.was!r}", stmt.span))
                continue
            renames.scopes[stmt.name] = stmt.was
    if errors:
        raise SpecError(errors)
    return renames


# ---------------------------------------------------------------------------
# 2. matching ops by what they do


def _descriptions(graph: Graph, renames: Optional[Renames], table: dict) -> dict[int, int]:
    """Node -> the number of what it does to which inputs: its kind, arguments and
    inputs (a read of an input, another statement, or a nested op's own
    description), in the old version's names. Equal numbers, equal meanings."""
    groups = renames.groups if renames else {}
    feature = renames.feature if renames else (lambda name: name)
    statements = renames.scopes if renames else {}
    out: dict[int, int] = {}
    for node in graph.nodes:
        if OPS[node.op].surgery.indices is Indices.SOURCE:
            group = node.attrs["group"]
            read = feature(node.attrs["features"][0]).split("=")[0] if node.attrs.get("feature") else groups.get(group, group)
            what = (node.op, read)
        else:
            inputs = []
            for i in node.inputs:
                source = graph.nodes[i]
                if source.statement != node.statement and OPS[source.op].surgery.indices is not Indices.SOURCE:
                    inputs.append(("statement", statements.get(source.statement, source.statement)))
                else:
                    inputs.append(out[i])
            keywords = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in node.attrs.items()
                                    if k not in ("alias", "scope_0_1_0", "entities")))
            what = (node.op, keywords, tuple(inputs))
        out[node.index] = table.setdefault(what, len(table))
    return out


def match_ops(old_graph: Graph, new_graph: Graph, renames: Renames) -> None:
    """Fill `renames.ops` and `renames.new_ops`: each new op with parameters is
    matched to the old op of its statement that does the same thing, so a
    number that shifts (`linear_2` <-> `linear_3`) moves no weights.

    Levels, each over what is still unmatched, unnamed ops first: the same
    `as` name; the same kind, arguments and inputs; the same kind and inputs
    (a widened op); the same kind and arguments (an op whose inputs changed);
    then unnamed ops of one kind in order of appearance. Where two old ops
    do the same thing (two layernorms of one value), the one at the new op's
    place keeps it: its number is all that tells them apart."""
    table: dict = {}
    old_what = _descriptions(old_graph, None, table)
    new_what = _descriptions(new_graph, renames, table)

    def by_statement(graph: Graph) -> dict[str, list]:
        out: dict[str, list] = {}
        for node in graph.nodes:
            if node.params:
                out.setdefault(node.statement, []).append(node)
        return out

    old_ops, new_ops = by_statement(old_graph), by_statement(new_graph)

    reverse = {v: k for k, v in table.items()}
    levels = (
        lambda n, what: (n.attrs.get("alias"),) if n.attrs.get("alias") else None,
        lambda n, what: (what[n.index],),
        lambda n, what: (n.op, reverse[what[n.index]][2]),
        lambda n, what: (n.op, reverse[what[n.index]][1]),
    )
    for stmt, nodes in new_ops.items():
        old_stmt = renames.scopes.get(stmt, stmt)
        free = list(old_ops.get(old_stmt, ()))
        todo = sorted(nodes, key=lambda n: bool(n.attrs.get("alias")))  # unnamed first, in order
        for level in levels:
            for node in list(todo):
                want = level(node, new_what)
                if want is None:
                    continue
                alike = [o for o in free if o.op == node.op and level(o, old_what) == want]
                same_place = old_stmt + node.scope[len(stmt):]
                found = next((o for o in alike if o.scope == same_place), alike[0] if alike else None)
                if found is not None:
                    renames.ops[node.scope] = found.scope
                    free.remove(found)
                    todo.remove(node)
        for node in list(todo):  # unnamed ops of one kind, in order of appearance
            if node.attrs.get("alias"):
                continue
            found = next((o for o in free if o.op == node.op and not o.attrs.get("alias")), None)
            if found is not None:
                renames.ops[node.scope] = found.scope
                free.remove(found)
                todo.remove(node)
        renames.new_ops.update(n.scope for n in todo)


# ---------------------------------------------------------------------------
# 3. matching indices by key


def _same(keys, old_keys) -> bool:
    """Whether two axes have the same keys in the same order (keys are interned: by identity)."""
    return keys is old_keys or (len(keys) == len(old_keys) and all(map(operator.is_, keys, old_keys)))


def _numbered(keys) -> list[tuple]:
    """Keys made unique by their ordinal among equal keys."""
    seen: dict = {}
    out = []
    for k in keys:
        n = seen.get(k, 0)
        seen[k] = n + 1
        out.append((k, n))
    return out


def _runs(indices) -> tuple[Run, ...]:
    if type(indices) is range:  # match_axis's answer for an axis that did not move
        return (Run(new=0, old=0, length=len(indices)),) if indices else ()
    if indices and indices[0] == 0 and indices[-1] == len(indices) - 1 and indices == list(range(len(indices))):
        return (Run(new=0, old=0, length=len(indices)),)
    runs: list[Run] = []
    start = None
    for i, old in enumerate(indices + [-1]):
        if start is not None and (old != indices[start] + (i - start) or old < 0):
            runs.append(Run(new=start, old=indices[start], length=i - start))
            start = None
        if start is None and old >= 0:
            start = i
    return tuple(runs)


def match_axis(new_keys, old_keys, renames: Renames) -> Sequence[int]:
    """New index -> old index (or -1): by exact key, then through element-wise
    wrappers, then a value newly joined by add or mul by the old value it carries
    (a range where nothing moved)."""
    if not renames and _same(new_keys, old_keys):
        return range(len(new_keys))  # the common case, and the large axes: nothing moved
    translated = renames.keys(new_keys)
    if _same(translated, old_keys):
        return range(len(new_keys))
    # Exact keys first: relu(x) and x both carry x, and must not be paired by order.
    exact = dict(zip(old_keys, range(len(old_keys))))
    if len(exact) == len(old_keys) and len(set(translated)) == len(translated):
        indices = [exact.get(k, -1) for k in translated]  # no key twice on either side: none to number
    else:
        exact = {k: i for i, k in enumerate(_numbered(old_keys))}
        indices = [exact.get(k, -1) for k in _numbered(translated)]

    def fill(candidates) -> None:
        """Match still-unmatched new indices to free old ones, by `candidates(key)`."""
        free_indices = list(itertools.filterfalse(set(indices).__contains__, range(len(old_keys))))
        if not free_indices:  # a widened layer: every old index is matched already
            return
        free: dict = {}
        for i in free_indices:
            free.setdefault(K.base(old_keys[i]), []).append(i)
        for j in [j for j, i in enumerate(indices) if i < 0]:
            for candidate in candidates(translated[j]):
                spare = free.get(K.base(candidate))
                if spare:
                    indices[j] = spare.pop(0)
                    break

    if -1 in indices:
        fill(lambda key: [key])  # relu -> tanh on the path keeps the weights (the check says it changed)
    if -1 in indices:
        fill(K.parts)  # `h` -> `add(h, g)`: still carries h
    return indices


# ---------------------------------------------------------------------------
# 4. the function check


def _reason(message: str, span) -> Reason:
    if span is None or not getattr(span, "line", 0):
        return Reason(message=message)
    return Reason(message=message, file=span.file, line=span.line, column=span.column)


def _old_feature_spans(spec: m.ModelSpec) -> dict[str, m.Span]:
    spans = {}
    for group in spec.schema.groups:
        for f in group.features:
            if f.is_category:
                vocab = spec.schema.vocab(f.vocab)
                for item in vocab.items:
                    spans[feature_name(group, f, item.name)] = item.span
            else:
                spans[feature_name(group, f)] = f.span
    return spans


@dataclass
class _Check:
    """Reasons by message (one each, in the order found), each with its span."""

    reasons: dict[str, Reason] = field(default_factory=dict)

    def add(self, message: str, span) -> str:
        self.reasons.setdefault(message, _reason(message, span))
        return message


class OldKeys:
    """Every key of the old version's values, asked as a set. An axis that is an
    old value's (one object: the versions share their unchanged axes) is
    answered at once; the set is made on the first question that needs it, so
    the keys of the many unchanged axes are never made."""

    def __init__(self, old: InteractionMap):
        self._values = old.values
        self._axes = {id(v.keys): v.keys for v in old.values.values()}
        self._set: Optional[set] = None

    def covers(self, keys) -> bool:
        """Whether the axis is one an old value has."""
        return self._axes.get(id(keys)) is keys

    def _all(self) -> set:
        if self._set is None:
            self._set = set()
            for axis in self._values.values():
                self._set.update(axis.keys)
        return self._set

    def __contains__(self, key) -> bool:
        return key in self._all()

    def issuperset(self, keys) -> bool:
        return self.covers(keys) or self._all().issuperset(keys)

    def isdisjoint(self, keys) -> bool:
        return (not keys) if self.covers(keys) else self._all().isdisjoint(keys)


def function_check(old_graph: Graph, new_graph: Graph, old: InteractionMap, new: InteractionMap,
                   renames: Renames, old_keys: OldKeys) -> list[Reason]:
    """One walk of the new graph; each op says, through its `surgery`, how its
    output indices depend on its inputs' (see the module's docstring, step 4)."""
    check = _Check()
    old_ops = {n.scope: n for n in old_graph.nodes if n.params}
    spans: list[dict] = []  # the old features' spans, read once a removed feature is named

    def old_feature_span(name: str):
        if not spans:
            spans.append(_old_feature_spans(old_graph.spec))
        return spans[0].get(name)

    old_bases: dict[int, tuple[set, set]] = {}  # old node -> (base keys of its value, its keys), made on first use
    carried: dict = {}  # key -> the bases it carries (K.carried), shared by every reader
    axis_bases: dict = {}  # id(axis) -> (axis, the base of each of its keys), shared likewise
    # taint[node][i]: names of the reasons index i no longer computes what it did
    taint: dict[int, list[frozenset]] = {}
    empty = frozenset()

    def missing_reasons(node, missing_keys) -> frozenset:
        """One reason per removed feature (each at its own line), one for the rest."""
        bases = [K.base(k) for k in missing_keys]
        features = sorted({b.name for b in bases if isinstance(b, K.Feature)})
        others = [k for k, b in zip(missing_keys, bases) if not isinstance(b, K.Feature)]
        out = {check.add(f"feature {name} was removed, but {node.scope} read it: "
                         f"the function changes wherever it was non-zero", old_feature_span(name))
               for name in features}
        scopes = sorted({b.scope for b in map(K.base, others) if isinstance(b, K.Unit)})
        if scopes:
            out.add(check.add(f"{node.scope} no longer reads {len(others)} of its old inputs "
                              f"({', '.join(scopes[:3])}): their weights are dropped", node.span))
        elif others:
            out.add(check.add(f"{node.scope} no longer reads {K.base(others[0]).describe()}", node.span))
        return frozenset(out)

    def mixing(node, ins) -> list[frozenset]:
        """Every output reads every input index: one taint for all of them."""
        width = len(new.values[node.index])
        if node.scope in renames.identity_inputs:
            return list(ins[0])  # it starts as the identity: index i is its input's index i
        old_node = old_ops.get(renames.ops.get(node.scope))
        if old_node is None:
            return [empty] * width  # a new op: its outputs are new values
        meaning = OPS[node.op].surgery
        unit_taint: frozenset = empty
        if old_node.op == node.op:  # an argument the op's function depends on, whatever its weights
            for name, why in meaning.fixed_args.items():
                k = OPS[node.op].int_names.index(name)
                was, now = old_node.attrs["ints"][k], node.attrs["ints"][k]
                if was != now:
                    unit_taint |= {check.add(f"{node.scope} {name} changed from {was} to {now}: {why}", node.span)}
        for new_input, old_input, in_taint in zip(node.inputs, old_node.inputs, ins):
            new_in, old_in = new.values[new_input], old.values[old_input]
            new_in_keys = renames.keys(new_in.keys)
            if _same(new_in_keys, old_in.keys):
                missing = ()  # the input is what it was (the common case): nothing dropped, nothing changed
            else:
                new_in_base = K.carried_by(new_in_keys, carried, axis_bases)  # what it still carries, through joins too
                missing = [k for k, b in zip(old_in.keys, K.bases(old_in.keys, axis_bases)) if b not in new_in_base]
                if missing:
                    unit_taint |= missing_reasons(node, missing)
                if old_input not in old_bases:  # most are this input's old keys: asked first
                    old_bases[old_input] = (set(K.bases(old_in.keys, axis_bases)), set(old_in.keys))
                old_in_base, old_in_keys = old_bases[old_input]
                changed = [k for k, b in zip(new_in_keys, K.bases(new_in_keys, axis_bases))
                           if b in old_in_base and k not in old_in_keys and k not in old_keys]
                if changed:
                    unit_taint |= {check.add(f"{node.scope} reads {K.source(changed[0])} through a changed path "
                                             f"(an op around it changed)", node.span)}
            for t in set(in_taint):
                unit_taint |= t
            if meaning.axis_change and (missing or len(new_in.keys) != len(old_in.keys)):
                said = meaning.axis_change.format(old=len(old_in.keys), new=len(new_in.keys))
                unit_taint |= {check.add(f"{node.op} {node.scope} {said}", node.span)}
        old_width = len(old.values[old_node.index])
        if width < old_width and not meaning.axis_change:
            unit_taint |= {check.add(f"{node.scope} narrowed from {old_width} to {width} units", node.span)}
        return [unit_taint] * width

    def join(node, ins) -> list[frozenset]:
        sides = [new.values[i] for i in node.inputs]
        translated = [renames.keys(x.keys) for x in sides]
        if all(old_keys.issuperset(t) for t in translated) or all(old_keys.isdisjoint(t) for t in translated):
            return list(map(frozenset.union, *ins))  # old joined to old, or new to new: index by index
        renamed = bool(renames)  # asked once: it looks at every op's match
        out = []
        for i, key in enumerate(new.values[node.index].keys):
            t = empty.union(*(x[i] for x in ins))
            if key in renames.zero_joins:  # joined with a value that starts at zero: it is its old side
                out.append(t)
                continue
            side_keys = [renames.key(x.keys[i]) if renamed else x.keys[i] for x in sides]
            known = [k in old_keys for k in side_keys]
            if any(known) and not all(known):
                old_side = side_keys[known.index(True)]
                new_side = sides[known.index(False)].keys[i]  # named as in the new version
                t = t | {check.add(f"{node.op} joins a new input ({K.source(new_side)}) to "
                                   f"{K.source(old_side)}", node.span)}
            out.append(t)
        return out

    for node in new_graph.nodes:
        indices = OPS[node.op].surgery.indices
        ins = [taint[i] for i in node.inputs]
        if indices is Indices.SOURCE:
            taint[node.index] = [empty] * len(new.values[node.index])
        elif indices is Indices.MIXING:
            taint[node.index] = mixing(node, ins)
        elif indices is Indices.JOIN:
            taint[node.index] = join(node, ins)
        elif indices is Indices.CONCAT:
            taint[node.index] = [t for x in ins for t in x]
        elif indices is Indices.ELEMENTWISE:
            taint[node.index] = list(ins[0])
        else:
            raise AssertionError(f"{node.op}: no function-check rule for {indices}")

    reasons: set[str] = set()
    for head, index in new_graph.outputs.items():
        old_head = renames.scopes.get(head, head)
        if old_head not in old_graph.outputs:
            continue
        old_value = old.values[old_graph.outputs[old_head]]
        new_value = new.values[index]
        new_keys = renames.keys(new_value.keys)
        stmt = next(s for s in new_graph.model.statements if s.name == head)
        # Output by output: a head that computed one value at two outputs
        # (concat(x, x)) and computes it at one now has lost an output.
        unclaimed = collections.Counter(new_keys)
        gone = []
        for k in old_value.keys:
            if unclaimed[k]:
                unclaimed[k] -= 1
            else:
                gone.append(k)
        if gone and len(new_value) >= len(old_value):
            reasons.add(check.add(f"output head {head} no longer computes {K.source(gone[0])}"
                                  + (f" (and {len(gone) - 1} more outputs)" if len(gone) > 1 else ""), stmt.span))
        if old_keys.covers(new_keys):  # the head's axis is an old value's: every output is old
            reasons.update(*taint[index])
        else:
            for i, k in enumerate(new_keys):
                if k in old_keys:
                    reasons |= set(taint[index][i])
        if len(new_value) < len(old_value):
            reasons.add(check.add(f"output head {head} narrowed from {len(old_value)} to {len(new_value)}", stmt.span))
    new_heads = {renames.scopes.get(h, h) for h in new_graph.outputs}
    for head in old_graph.outputs:  # in the order of the spec, not of a set's hashes
        if head not in new_heads:
            stmt = next(s for s in old_graph.model.statements if s.name == head)
            reasons.add(check.add(f"output head {head} was removed", stmt.span))
    return [check.reasons[r] for r in check.reasons if r in reasons]


# ---------------------------------------------------------------------------
# 5. how new ops start: fresh, at zero (a join), or as the identity (a new layer)


def choose_starts(new_graph: Graph, new: InteractionMap, old_keys: "OldKeys", renames: Renames,
                  old_heads: set) -> dict[str, str]:
    """New op scope -> "zero" or "identity" where that keeps the function (else it
    starts fresh), recording in `renames` what each such start makes its keys mean.

    * A join whose neutral value is 0 (add) of an old value and a new one: the
      new side starts at zero when every path back from it reaches a new op
      that can start at zero through ops that map 0 to 0.
    * A new op that can be the identity, square over an old value (or one that
      gained indices too: the identity passes new ones on as well), read by an
      old op or an old head (directly, or through index-by-index ops, concats and
      joins, whose index i carries its input's index i): it starts as the identity."""
    starts: dict[str, str] = {}
    nodes = new_graph.nodes
    readers: dict[int, list] = {}
    for node in nodes:
        for i in node.inputs:
            readers.setdefault(i, []).append(node)
    old_head_values = {index for head, index in new_graph.outputs.items() if renames.scopes.get(head, head) in old_heads}

    def is_old(index: int) -> Optional[bool]:
        """True: every index of the value is an old one; False: none is; None: some are."""
        translated = renames.keys(new.values[index].keys)
        if not translated:
            return None
        if old_keys.issuperset(translated):
            return True
        return False if old_keys.isdisjoint(translated) else None

    def zero_start(index: int, chosen: set) -> bool:
        """Whether the value at `index` can start at zero; the ops to zero go in `chosen`."""
        stack = [index]
        while stack:
            node = nodes[stack.pop()]
            meaning = OPS[node.op].surgery
            if node.params:
                if node.scope not in renames.new_ops or not meaning.starts_at_zero or node.scope in starts:
                    return False
                chosen.add(node.scope)
            elif meaning.zero_to_zero and node.inputs:
                stack.extend(node.inputs)
            else:
                return False
        return True

    def read_by_an_old_op(node) -> bool:
        """Whether an old op or head reads the value (through index-by-index ops, concats and joins)."""
        stack, seen = [node.index], set()
        while stack:
            index = stack.pop()
            if index in old_head_values:
                return True
            for reader in readers.get(index, ()):
                if reader.index in seen:
                    continue
                seen.add(reader.index)
                indices = OPS[reader.op].surgery.indices
                if indices is Indices.MIXING:
                    if reader.scope in renames.ops:
                        return True
                elif indices in (Indices.ELEMENTWISE, Indices.CONCAT, Indices.JOIN):
                    stack.append(reader.index)
        return False

    for node in nodes:
        meaning = OPS[node.op].surgery
        if meaning.indices is Indices.JOIN and meaning.join_neutral == 0.0:
            sides = [is_old(i) for i in node.inputs]
            if sorted(sides, key=repr) == [False, True]:
                chosen: set = set()
                new_side = node.inputs[sides.index(False)]
                old_side = node.inputs[sides.index(True)]
                if zero_start(new_side, chosen):
                    starts.update(dict.fromkeys(chosen, "zero"))
                    for k, kept in zip(new.values[node.index].keys, new.values[old_side].keys):
                        renames.zero_joins[k] = kept
        elif (meaning.identity and node.scope in renames.new_ops and len(node.inputs) == 1
              and len(new.values[node.index]) == len(new.values[node.inputs[0]])
              and is_old(node.inputs[0]) is not False and read_by_an_old_op(node)):
            starts[node.scope] = "identity"
            renames.identity_inputs[node.scope] = new.values[node.inputs[0]].keys
    return starts


# ---------------------------------------------------------------------------
# the plan


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


SpecOrGraph = Union[m.ModelSpec, Graph]


def as_graph(spec: SpecOrGraph) -> Graph:
    return spec if isinstance(spec, Graph) else build_graph(spec)


def _copy_fills(roles: tuple[str, ...], axes: tuple[AxisMap, ...]) -> tuple[Fill, ...]:
    """What a carried parameter's uncopied elements start as: a new unit fresh,
    an old unit's weight for a new input zero (so the old unit computes as before)."""
    fills = []
    out_new = tuple("new" if r == OUT else "all" for r in roles)
    if any(a.matched < a.new_size for a, r in zip(axes, roles) if r == OUT):
        fills.append(Fill(value="fresh", where=out_new))
    for k, (a, r) in enumerate(zip(axes, roles)):
        if r != OUT and a.matched < a.new_size:
            where = ["old" if rr == OUT else "all" for rr in roles]
            where[k] = "new"
            fills.append(Fill(value="zero", where=tuple(where)))
    return tuple(fills)


def _start_fills(node, local: str, rank: int, start: str) -> tuple[Fill, ...]:
    everything = ("all",) * rank
    if start == "identity":
        return (Fill(value=OPS[node.op].surgery.identity[local], where=everything),)
    return (Fill(value=start, where=everything),)


def _counted(p: ParamPlan) -> ParamPlan:
    counts = {"zero": 0, "fresh": 0, "identity": 0}
    for fill in p.fills:
        counts[fill.value] += p.region_size(fill)
    copied = _numel([a.matched for a in p.axes]) if p.source is not None else 0
    return p.model_copy(update={"copied": copied, "zeroed": counts["zero"], "fresh": counts["fresh"],
                                "identity": counts["identity"]})


def head_maps(old_graph: Graph, new_graph: Graph, old: InteractionMap, new: InteractionMap,
              renames: Renames) -> tuple[HeadMap, ...]:
    """Per head both versions have, which old output each new one is compared with:
    matched by key; outputs whose derivation changed are paired by position."""
    out = []
    for head, index in new_graph.outputs.items():
        old_head = renames.scopes.get(head, head)
        if old_head not in old_graph.outputs:
            continue
        old_keys = old.values[old_graph.outputs[old_head]].keys
        matched = match_axis(new.values[index].keys, old_keys, renames)
        taken = set(matched)
        spare_old = iter(i for i in range(len(old_keys)) if i not in taken)
        paired = list(matched)
        for j, i in enumerate(matched):
            if i < 0:
                paired[j] = next(spare_old, -1)
        out.append(HeadMap(name=head, old_name=old_head, new_size=len(matched), old_size=len(old_keys),
                           runs=_runs(paired)))
    return tuple(out)


def _param_plans(new_graph: Graph, new: InteractionMap, old: InteractionMap, renames: Renames,
                 starts: dict[str, str]) -> tuple[list[ParamPlan], tuple, list]:
    """Per new parameter its plan; the old parameters dropped; and what the
    proof checks (_unproven): per matched axis (parameter, axis, runs, old sets)."""
    params: list[ParamPlan] = []
    used_old: set[str] = set()
    matched: list[tuple] = []
    matched_keys: dict = {}  # (new keys, old keys) -> runs: axes of one op share their keys
    for name, (node, local) in new_graph.parameters().items():
        p = new.params[name]
        old_scope = renames.ops.get(node.scope)
        source = f"{old_scope}.{local}" if old_scope else None
        q = old.params.get(source) if source else None
        if q is None or len(q.shape) != len(p.shape) or q.roles != p.roles:
            fills = _start_fills(node, local, len(p.shape), starts.get(node.scope, "fresh"))
            params.append(_counted(ParamPlan(name=name, shape=p.shape, fills=fills)))
            continue
        used_old.add(source)
        axes = []
        for k, (axis_new, axis_old, role) in enumerate(zip(p.axes, q.axes, p.roles)):
            # Parameters of one op share axes (an LSTM's four row axes): match each once.
            keys_key = (id(axis_new.keys), id(axis_old.keys))
            if keys_key not in matched_keys:
                matched_keys[keys_key] = _runs(match_axis(axis_new.keys, axis_old.keys, renames))
            runs = matched_keys[keys_key]
            matched.append((name, k, runs, axis_old.sets))
            axes.append(AxisMap(role=role, new_size=len(axis_new), old_size=len(axis_old), runs=runs))
        axes = tuple(axes)
        params.append(_counted(ParamPlan(name=name, shape=p.shape, source=source, old_shape=q.shape, axes=axes,
                                         fills=_copy_fills(p.roles, axes))))
    dropped = tuple(DroppedParam(name=n, shape=q.shape, elements=q.size) for n, q in old.params.items() if n not in used_old)
    return params, dropped, matched


def _unproven(proof: InteractionMap, matched: list, proof_check: "_Proof") -> int:
    """How many matched indices carry, in `proof`, other features than before."""
    return sum(proof_check.unproven(runs, proof.params[name].axes[k].sets, old_sets)
               for name, k, runs, old_sets in matched)


def make_plan(old_spec: SpecOrGraph, new_spec: SpecOrGraph,
              old_map: Optional[InteractionMap] = None, new_map: Optional[InteractionMap] = None) -> Plan:
    """The surgery plan from the old version to the new one (each a ModelSpec or
    its Graph; the maps are computed if not given)."""
    with K.bulk():
        return _make_plan(old_spec, new_spec, old_map, new_map)


def _make_plan(old_spec: SpecOrGraph, new_spec: SpecOrGraph, old_map: Optional[InteractionMap],
               new_map: Optional[InteractionMap]) -> Plan:
    old_graph = old_map.graph if old_map else as_graph(old_spec)
    new_graph = new_map.graph if new_map else as_graph(new_spec)
    renames = find_renames(old_graph.spec, new_graph.spec)
    old = old_map or shadow_map(old_graph)
    new = new_map or shadow_map(new_graph)
    match_ops(old_graph, new_graph, renames)
    old_keys = OldKeys(old)
    starts = choose_starts(new_graph, new, old_keys, renames, set(old_graph.outputs))
    proof_check = _Proof(shared_features(old, new, renames))
    params, dropped, matched = _param_plans(new_graph, new, old, renames, starts)
    unproven = _unproven(new, matched, proof_check)
    if unproven:  # new inputs may carry features old units never met: they start at zero, so prove on that
        unproven = _unproven(proof_map(new_graph, new, renames, starts, old_graph, old), matched, proof_check)
    reasons = function_check(old_graph, new_graph, old, new, renames, old_keys)
    if unproven and not reasons:  # never claim what the maps do not show
        reasons.append(Reason(message=f"{unproven} matched indices carry other input features than before"))
    transferred = sum(p.copied for p in params)
    old_total = sum(q.size for q in old.params.values())
    summary = Summary(
        old_params=old_total,
        new_params=sum(p.size for p in new.params.values()),
        transferred=transferred,
        zeroed=sum(p.zeroed for p in params),
        fresh=sum(p.fresh for p in params),
        identity=sum(p.identity for p in params),
        dropped=old_total - transferred,
        function_preserving=not reasons,
        reasons=tuple(reasons),
    )
    heads = head_maps(old_graph, new_graph, old, new, renames)
    kept = {h.old_name for h in heads}
    return Plan(old_model=old_graph.model.name, new_model=new_graph.model.name, old_spec=canonical(old_graph.spec),
                new_spec=canonical(new_graph.spec), params=tuple(params), dropped=dropped, heads=heads,
                old_only_heads=tuple(h for h in old_graph.outputs if h not in kept),
                new_only_heads=tuple(h for h in new_graph.outputs if h not in {x.name for x in heads}),
                summary=summary)


def proof_map(new_graph: Graph, new: InteractionMap, renames: Renames, starts: dict[str, str],
              old_graph: Graph, old: InteractionMap) -> InteractionMap:
    """Φ of the new graph as it starts: what each index carries once new ops sit
    at zero or as the identity and old ops' weights for new inputs are zero.
    Matched indices must carry, in it, what they carried before."""
    old_nodes = {n.scope: n for n in old_graph.nodes if n.params}
    old_input_keys: dict[int, set] = {}

    def inputs(node, xs):
        old_scope = renames.ops.get(node.scope)
        if old_scope is None or OPS[node.op].surgery.indices is not Indices.MIXING:
            return xs
        old_node = old_nodes[old_scope]
        out = []
        for x, old_input in zip(xs, old_node.inputs):
            translated = renames.keys(x.keys)
            if translated is old.values[old_input].keys:  # the input it had: every key known
                out.append(x)
                continue
            if old_input not in old_input_keys:
                old_input_keys[old_input] = set(old.values[old_input].keys)
            known = old_input_keys[old_input]
            if all(k in known for k in translated):
                out.append(x)
            else:  # a new input meets weights that start at zero: it carries nothing yet
                out.append(Axis(x.keys, tuple(s if k in known else 0 for s, k in zip(x.sets, translated))))
        return out

    def output(node, xs, value: Axis) -> Axis:
        start = starts.get(node.scope)
        if start == "zero":
            return Axis(value.keys, (0,) * len(value))
        if start == "identity":
            return Axis(value.keys, xs[0].sets)
        return value

    return shadow_map(new_graph, inputs=inputs, output=output)


def shared_features(old: InteractionMap, new: InteractionMap, renames: Renames) -> tuple[int, list[tuple[int, int, int]]]:
    """Bits of old features the new version still has, and new -> old bit runs
    (new_start, old_start, length): features move in blocks, so few runs."""
    old_index = old.features.index
    pairs = [(i, old_index.get(renames.feature(name))) for i, name in enumerate(new.features.names)]
    pairs = [(i, j) for i, j in pairs if j is not None]
    runs: list[list[int]] = []
    for i, j in pairs:
        if runs and runs[-1][0] + runs[-1][2] == i and runs[-1][1] + runs[-1][2] == j:
            runs[-1][2] += 1
        else:
            runs.append([i, j, 1])
    shared = 0
    for _, j, n in runs:
        shared |= ((1 << n) - 1) << j
    return shared, [tuple(r) for r in runs]


def translate_bits(bits: int, runs: list[tuple[int, int, int]]) -> int:
    out = 0
    for i, j, n in runs:
        out |= ((bits >> i) & ((1 << n) - 1)) << j
    return out


class _Proof:
    """Matched indices whose features, among those both versions have, differ.

    Few set objects stand behind many indices (a linear's units share one), in
    runs: each run of an index map whose new and old sets are one object each
    is judged once, for its whole length (`tuple.count` finds that in C, by
    identity first); other runs count their (new set, old set) pairs by
    identity. A set's translation into old numbering is made once per plan:
    the axes of many parameters share their sets."""

    def __init__(self, shared: tuple[int, list[tuple[int, int, int]]]):
        self.mask, self.runs = shared
        self._translated: dict = {}  # id(new set) -> (it, its bits in old numbering)
        self._counted: dict = {}  # (ids of runs, new sets, old sets) -> (them, the count)
        self._old_bit: Optional[dict] = None  # new feature number -> old, made when first asked

    def unproven(self, runs: tuple[Run, ...], new_sets: tuple, old_sets: tuple) -> int:
        key = (id(runs), id(new_sets), id(old_sets))
        hit = self._counted.get(key)
        if hit is not None and all(map(operator.is_, hit[0], (runs, new_sets, old_sets))):
            return hit[1]
        total = 0
        for r in runs:
            new, old = new_sets[r.new:r.new + r.length], old_sets[r.old:r.old + r.length]
            if new.count(new[0]) == r.length and old.count(old[0]) == r.length:
                total += r.length if self._differ(new[0], old[0]) else 0
                continue
            new_by_id, old_by_id = dict(zip(map(id, new), new)), dict(zip(map(id, old), old))
            pairs = collections.Counter(zip(map(id, new), map(id, old)))
            total += sum(n for (a, b), n in pairs.items() if self._differ(new_by_id[a], old_by_id[b]))
        self._counted[key] = ((runs, new_sets, old_sets), total)
        return total

    def _differ(self, new_set: int, old_set: int) -> bool:
        hit = self._translated.get(id(new_set))
        if hit is None or hit[0] is not new_set:
            hit = self._translated[id(new_set)] = (new_set, self._translate(new_set))
        return hit[1] != old_set & self.mask

    def _translate(self, bits: int) -> int:
        if bits & (bits - 1):
            return translate_bits(bits, self.runs)
        # One feature (an input's index, a vocabulary item's row): its old bit, looked up.
        if self._old_bit is None:
            self._old_bit = {i + k: j + k for i, j, n in self.runs for k in range(n)}
        j = self._old_bit.get(bits.bit_length() - 1)
        return 0 if j is None else 1 << j


# ---------------------------------------------------------------------------
# a plan from elsewhere


def check_plan(plan: Plan, old_graph: Graph, new_graph: Graph) -> None:
    """Refuse a plan (read from a file, say) that is not the one the two specs
    give: a changed shape, a removed or duplicated run, a fill or a count that
    does not fit. Call it before anything is written."""
    expected = make_plan(old_graph, new_graph)
    got, want = plan.model_dump(), expected.model_dump()
    for dump in (got, want):  # reasons point into the files the specs were read from: compare their words
        dump["summary"]["reasons"] = [r["message"] for r in dump["summary"]["reasons"]]
    if got != want:
        raise UserError(f"error: the plan does not fit the specs: {_first_difference(got, want)}; "
                        "make it again with `specsurgery plan`")


def _first_difference(got, want, where: str = "") -> str:
    if isinstance(want, dict) and isinstance(got, dict):
        for k in want:
            if got.get(k) != want[k]:
                return _first_difference(got.get(k), want[k], f"{where}.{k}" if where else k)
    elif isinstance(want, (list, tuple)) and isinstance(got, (list, tuple)):
        if len(got) != len(want):
            return f"{where} has {len(got)} entries, the specs give {len(want)}"
        for i, (a, b) in enumerate(zip(got, want)):
            if a != b:
                return _first_difference(a, b, f"{where}[{i}]")
    return f"{where} is {got!r}, the specs give {want!r}"
