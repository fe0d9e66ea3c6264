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
from dataclasses import dataclass, field
from typing import Optional

from .. import keys as K
from ..backends.shadow import InteractionMap, shadow_map
from ..errors import Diagnostic, SpecError
from ..ir import Graph, build_graph, feature_name
from ..ops import OPS, OUT, Indices
from ..spec import model as m
from ..spec.canonical import canonical
from .plan import AxisMap, DroppedParam, ParamPlan, Plan, Reason, Run, Summary


# ---------------------------------------------------------------------------
# 1. renames


@dataclass
class Renames:
    """How the new version's names read in the old one's terms."""

    features: dict[str, str] = field(default_factory=dict)  # new feature name -> old
    scopes: dict[str, str] = field(default_factory=dict)  # new statement -> old
    ops: dict[str, str] = field(default_factory=dict)  # new op scope -> the old op it is (matched by what it does)
    _any: Optional[bool] = None
    _memo: dict = field(default_factory=dict)

    def feature(self, name: str) -> str:
        return self.features.get(name, name)

    def scope(self, scope: str) -> str:
        if scope in self.ops:
            return self.ops[scope]
        stmt, _, rest = scope.partition(".")
        old = self.scopes.get(stmt, stmt)
        return f"{old}.{rest}" if rest else old

    def __bool__(self) -> bool:
        """Whether anything was renamed (asked per axis, so counted once)."""
        if self._any is None:
            self._any = (bool(self.scopes) or any(k != v for k, v in self.ops.items())
                         or any(k != v for k, v in self.features.items()))
        return self._any

    def keys(self, keys) -> list:
        """`key` of each, skipped when nothing was renamed (the common, large case)."""
        return [self.key(k) for k in keys] if self else list(keys)

    def key(self, key: K.Key) -> K.Key:
        return K.transform(key, K.children, self._build, self._memo)

    def _build(self, k: K.Key, memo: dict) -> K.Key:
        if isinstance(k, K.Feature):
            return K.Feature(self.feature(k.name))
        if isinstance(k, K.Unit):
            return K.Unit(self.scope(k.scope), k.tag, k.ordinal)
        if isinstance(k, K.Wrapped):
            return K.wrap(k.op, memo[k.inner], k.idempotent)
        if isinstance(k, K.Normed):
            return K.Normed(self.scope(k.scope), memo[k.inner])
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
                old_items = set(old_vocab.item_names)
                for item in new_vocab.items:
                    old_item = item.was if item.was and item.name not in old_items and item.was in old_items else item.name
                    renames.features[feature_name(group, feature, item.name)] = feature_name(old_group, old_feature, old_item)
            elif not feature.is_category and not old_feature.is_category:
                renames.features[feature_name(group, feature)] = feature_name(old_group, old_feature)
    for vocab in ns.vocabs:
        old_vocab = os_.vocab(vocab.name)
        old_items = set(old_vocab.item_names) if old_vocab else set()
        for item in vocab.items:
            if item.was and item.name not in old_items and item.was not in old_items:
                errors.append(_rename_error(f"item {item.name} of vocab {vocab.name} was {item.was!r}, but the old vocab has no item {item.was!r}", item.span))
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
# 2. matching indices by key


def _numbered(keys) -> list[tuple]:
    """Keys made unique by their ordinal among equal keys."""
    seen: dict = {}
    out = []
    for k in keys:
        n = seen.get(k, 0)
        seen[k] = n + 1
        out.append((k, n))
    return out


def _runs(indices: list[int]) -> tuple[Run, ...]:
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


def match_axis(new_keys, old_keys, renames: Renames) -> list[int]:
    """New index -> old index (or -1): by exact key, then through element-wise
    wrappers, then a value newly joined by add or mul by the old value it carries."""
    if not renames and new_keys == old_keys:
        return list(range(len(new_keys)))  # the common case, and the large axes: nothing moved
    translated = renames.keys(new_keys)
    # Exact keys first: relu(x) and x both carry x, and must not be paired by order.
    exact = {k: i for i, k in enumerate(_numbered(old_keys))}
    indices = [exact.get(k, -1) for k in _numbered(translated)]

    def fill(candidates) -> None:
        """Match still-unmatched new indices to free old ones, by `candidates(key)`."""
        taken = set(indices)
        free: dict = {}
        for i, k in enumerate(old_keys):
            if i not in taken:
                free.setdefault(K.base(k), []).append(i)
        for j, key in enumerate(translated):
            if indices[j] < 0:
                for candidate in candidates(key):
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


def function_check(old_graph: Graph, new_graph: Graph, old: InteractionMap, new: InteractionMap,
                   renames: Renames, old_feature_spans: dict[str, m.Span]) -> list[Reason]:
    """One walk of the new graph; each op says, through its `surgery`, how its
    output indices depend on its inputs' (see the module's docstring, step 4)."""
    check = _Check()
    old_keys = set()
    for axis in old.values.values():
        old_keys.update(axis.keys)
    old_ops = {n.scope: n for n in old_graph.nodes if n.params}
    old_bases: dict[int, set] = {}  # old node -> base keys of its value, made on first use
    # taint[node][i]: names of the reasons index i no longer computes what it did
    taint: dict[int, list[frozenset]] = {}
    empty = frozenset()

    def missing_reasons(node, missing_keys) -> frozenset:
        """One reason per removed feature (each at its own line), one for the rest."""
        bases = [K.base(k) for k in missing_keys]
        features = sorted({b.name for b in bases if isinstance(b, K.Feature)})
        others = [k for k, b in zip(missing_keys, bases) if not isinstance(b, K.Feature)]
        out = {check.add(f"feature {name} was removed, but {node.scope} read it: "
                         f"the function changes wherever it was non-zero", old_feature_spans.get(name))
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
        old_node = old_ops.get(renames.scope(node.scope))
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
            new_in_base = {K.base(k) for k in new_in_keys}
            for k in new_in_keys:
                new_in_base.update(K.base(p) for p in K.parts(k))
            missing = [k for k in old_in.keys if K.base(k) not in new_in_base]
            if missing:
                unit_taint |= missing_reasons(node, missing)
            if old_input not in old_bases:
                old_bases[old_input] = {K.base(o) for o in old_in.keys}
            old_in_base = old_bases[old_input]
            changed = [k for k in new_in_keys if k not in old_keys and K.base(k) in old_in_base]
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
        out = []
        for i in range(len(new.values[node.index])):
            t = empty.union(*(x[i] for x in ins))
            side_keys = [renames.key(x.keys[i]) for x in sides]
            known = [k in old_keys for k in side_keys]
            if any(known) and not all(known):
                old_side = side_keys[known.index(True)]
                new_side = side_keys[known.index(False)]
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
    old_heads = {s.name for s in old_graph.model.statements if s.out}
    for head, index in new_graph.outputs.items():
        old_head = renames.scopes.get(head, head)
        if old_head not in old_heads:
            continue
        old_value = old.values[old_graph.outputs[old_head]]
        new_value = new.values[index]
        new_keys = renames.keys(new_value.keys)
        new_key_set = set(new_keys)
        stmt = next(s for s in new_graph.model.statements if s.name == head)
        gone = [k for k in old_value.keys if k not in new_key_set]
        if gone and len(new_value) >= len(old_value):
            reasons.add(check.add(f"output head {head} no longer computes {K.source(gone[0])}"
                                  + (f" (and {len(gone) - 1} more outputs)" if len(gone) > 1 else ""), stmt.span))
        for i, k in enumerate(new_keys):
            if k in old_keys:
                reasons |= set(taint[index][i])
        if len(new_value) < len(old_value):
            reasons.add(check.add(f"output head {head} narrowed from {len(old_value)} to {len(new_value)}", stmt.span))
    new_heads = {renames.scopes.get(h, h) for h in new_graph.outputs}
    for head in old_heads:
        if head not in new_heads:
            stmt = next(s for s in old_graph.model.statements if s.name == head)
            reasons.add(check.add(f"output head {head} was removed", stmt.span))
    return [check.reasons[r] for r in check.reasons if r in reasons]


# ---------------------------------------------------------------------------
# the plan


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def make_plan(old_spec: m.ModelSpec, new_spec: m.ModelSpec,
              old_map: Optional[InteractionMap] = None, new_map: Optional[InteractionMap] = None) -> Plan:
    """The surgery plan from `old_spec` to `new_spec` (maps are computed if not given)."""
    renames = find_renames(old_spec, new_spec)
    old_graph = old_map.graph if old_map else build_graph(old_spec)
    new_graph = new_map.graph if new_map else build_graph(new_spec)
    old = old_map or shadow_map(old_graph)
    new = new_map or shadow_map(new_graph)
    shared = shared_features(old, new, renames)
    params: list[ParamPlan] = []
    used_old: set[str] = set()
    unproven = 0
    matched_axes: dict = {}
    for name, p in new.params.items():
        source = renames.scope(name)
        q = old.params.get(source)
        if q is None or len(q.shape) != len(p.shape) or q.roles != p.roles:
            params.append(ParamPlan(name=name, shape=p.shape, fresh=p.size))
            continue
        used_old.add(source)
        axes = []
        for axis_new, axis_old, role in zip(p.axes, q.axes, p.roles):
            # Parameters of one op share axis objects (an LSTM's four row axes): match each once.
            cache_key = (id(axis_new), id(axis_old))
            if cache_key not in matched_axes:
                indices = match_axis(axis_new.keys, axis_old.keys, renames)
                matched_axes[cache_key] = (indices, _runs(indices), _unproven(indices, axis_new, axis_old, shared))
            indices, runs, bad = matched_axes[cache_key]
            unproven += bad
            axes.append(AxisMap(role=role, new_size=len(axis_new), old_size=len(axis_old), runs=runs))
        matched = [a.matched for a in axes]
        out_matched = 1
        for a, n in zip(axes, p.shape):
            out_matched *= a.matched if a.role == OUT else n
        copied = _numel(matched)
        params.append(ParamPlan(name=name, shape=p.shape, source=source, old_shape=q.shape, axes=tuple(axes),
                                copied=copied, zeroed=out_matched - copied, fresh=p.size - out_matched))
    dropped = tuple(DroppedParam(name=n, shape=q.shape, elements=q.size) for n, q in old.params.items() if n not in used_old)
    reasons = function_check(old_graph, new_graph, old, new, renames, _old_feature_spans(old_spec))
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
        dropped=old_total - transferred,
        function_preserving=not reasons,
        reasons=tuple(reasons),
    )
    return Plan(old_model=old_spec.model.name, new_model=new_spec.model.name, old_spec=canonical(old_spec),
                new_spec=canonical(new_spec), params=tuple(params), dropped=dropped, summary=summary)


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


def _unproven(indices, axis_new, axis_old, shared) -> int:
    """Matched indices whose features, among those both versions have, differ."""
    mask, translate = shared
    old_sets, new_sets = axis_old.sets, axis_new.sets
    # Few distinct (new set, old set) pairs stand behind many indices: count
    # them (in C), then test each distinct pair once.
    if len(indices) == len(old_sets) and indices == list(range(len(indices))):
        pairs = collections.Counter(zip(new_sets, old_sets))
    else:
        pairs = collections.Counter((new_sets[i], old_sets[j]) for i, j in enumerate(indices) if j >= 0)
    return sum(n for (s_new, s_old), n in pairs.items() if translate_bits(s_new, translate) != s_old & mask)
