"""Property: a sequence of function-preserving spec edits, each followed by
surgery, leaves a model that computes exactly what the first one did.

A random spec (strategies.py) gets a checkpoint with training-like weights
(every element ~ N(0, 0.5²), seeded: biases non-zero, layernorm weights far
from 1). Then 1 to 4 edits, each made on the typed spec (model_copy), printed
with canonical() and loaded again, each followed by make_plan + apply_plan:

  add a numeric feature anywhere in a group (plain or entity set); reorder a
  group's features; reorder the groups; grow a vocabulary; rename a feature,
  group, vocab item or statement with `was`; widen a linear, lstm or embed;
  reorder the arguments of a concat; add an output head.

Every plan must say the function is preserved. Finally the last checkpoint is
verified against the FIRST one on 300 random states: max |difference| < 1e-5.

Edits that change the function by construction are not made (the edit is
redrawn): one that changes the width of a layernorm's axis or of an add / mul
(layernorm statistics change; add / mul then fails to load), one that pairs
other indices in an add / mul, and one that changes the width of an output
head (a widened head is not the old function; verify cannot compare it, see
test_widen_head_verifies). The decision is made from the two graphs, not from
the plan, so the plan's claim is always checked.

verify() reads one step's `was` only, so first and last are compared through a
copy of the last checkpoint whose spec says, with `was`, what each renamed
thing was called in the FIRST version (the weights are the same tensors).
Names made by edits are fresh (never used by any version), so composed renames
cannot be confused with reused names. Before each edit the previous step's
`was` are dropped: they are stale (find_renames ignores a `was` whose thing
still has its name in the old version, but dropping them keeps each step's
renames exactly the ones it made).
"""
from __future__ import annotations

import collections
import os
import tempfile
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from specsurgery.backends.shadow import InteractionMap, shadow_map
from specsurgery.checkpoint import write_checkpoint
from specsurgery.errors import SpecError, UserError
from specsurgery.ir import Graph, build_graph
from specsurgery.ops import base_key
from specsurgery.spec import model as m
from specsurgery.spec.canonical import canonical
from specsurgery.spec.load import load_text
from specsurgery.surgery.apply import apply_plan
from specsurgery.surgery.diff import make_plan
from specsurgery.surgery.verify import verify

try:  # tests/ as a package or as a rootdir-relative folder
    from .strategies import specs
except ImportError:
    from strategies import specs

TOL = 1e-5
STATES = 300
STD = 0.5
TRIES = 6  # draws of an edit before a step is skipped

SETTINGS = settings(max_examples=25, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one torch thread is faster than several fighting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------
# typed-spec plumbing


def _rewrite(expr, path_fn: Callable[[m.Path], m.Path]):
    if isinstance(expr, m.Path):
        return path_fn(expr)
    if isinstance(expr, m.Call):
        return expr.model_copy(update={"args": tuple(_rewrite(a, path_fn) for a in expr.args)})
    return expr


def _calls(expr, at: tuple = ()):
    """(position, call) of every call in an expression tree."""
    if isinstance(expr, m.Call):
        yield at, expr
        for i, a in enumerate(expr.args):
            yield from _calls(a, at + (i,))


def _replace_at(expr, at: tuple, new):
    if not at:
        return new
    args = list(expr.args)
    args[at[0]] = _replace_at(args[at[0]], at[1:], new)
    return expr.model_copy(update={"args": tuple(args)})


def _with_statements(spec: m.ModelSpec, statements) -> m.ModelSpec:
    return spec.model_copy(update={"model": spec.model.model_copy(update={"statements": tuple(statements)})})


def _with_schema(spec: m.ModelSpec, **update) -> m.ModelSpec:
    return spec.model_copy(update={"schema_": spec.schema.model_copy(update=update)})


def _rename_paths(spec: m.ModelSpec, fn: Callable[[tuple], tuple]) -> m.ModelSpec:
    def path_fn(p: m.Path) -> m.Path:
        parts = fn(p.parts)
        return p if parts == p.parts else p.model_copy(update={"parts": parts})

    return _with_statements(spec, [s.model_copy(update={"expr": _rewrite(s.expr, path_fn)})
                                   for s in spec.model.statements])


def strip_was(spec: m.ModelSpec) -> m.ModelSpec:
    schema = spec.schema
    vocabs = tuple(v.model_copy(update={"items": tuple(i.model_copy(update={"was": None}) for i in v.items)})
                   for v in schema.vocabs)
    groups = tuple(g.model_copy(update={"was": None,
                                        "features": tuple(f.model_copy(update={"was": None}) for f in g.features)})
                   for g in schema.groups)
    spec = _with_schema(spec, vocabs=vocabs, groups=groups)
    return _with_statements(spec, [s.model_copy(update={"was": None}) for s in spec.model.statements])


def reload(spec: m.ModelSpec, where: str) -> m.ModelSpec:
    """The spec printed canonically and parsed again (raises SpecError if invalid)."""
    return load_text(canonical(spec), where).model(spec.model.name)


# ---------------------------------------------------------------------------
# a version of the spec, with what each thing was called in the first version


@dataclass(frozen=True)
class Version:
    spec: m.ModelSpec
    groups: dict  # group -> its first name
    features: dict  # (group, feature) -> its first name; None: added by an edit
    items: dict  # (vocab, item) -> its first name; None: added
    statements: dict  # statement -> its first name; None: added
    fresh: list = field(default_factory=lambda: [0])  # shared counter for fresh names

    @classmethod
    def first(cls, spec: m.ModelSpec) -> "Version":
        s = spec.schema
        return cls(spec,
                   groups={g.name: g.name for g in s.groups},
                   features={(g.name, f.name): f.name for g in s.groups for f in g.features},
                   items={(v.name, i.name): i.name for v in s.vocabs for i in v.items},
                   statements={st_.name: st_.name for st_ in spec.model.statements})

    def name(self, kind: str) -> str:
        self.fresh[0] += 1
        return f"fresh{kind}{self.fresh[0]}"  # never in the generator's pools

    def relabelled(self) -> m.ModelSpec:
        """This spec with `was` = the name in the first version, for everything renamed since."""
        spec = strip_was(self.spec)
        schema = spec.schema

        def was(now: str, first: Optional[str]) -> Optional[str]:
            return first if first is not None and first != now else None

        vocabs = tuple(v.model_copy(update={"items": tuple(i.model_copy(update={"was": was(i.name, self.items[v.name, i.name])})
                                                           for i in v.items)}) for v in schema.vocabs)
        groups = tuple(g.model_copy(update={"was": was(g.name, self.groups[g.name]), "features": tuple(
            f.model_copy(update={"was": was(f.name, self.features[g.name, f.name])}) for f in g.features)})
            for g in schema.groups)
        spec = _with_schema(spec, vocabs=vocabs, groups=groups)
        return _with_statements(spec, [s.model_copy(update={"was": was(s.name, self.statements[s.name])})
                                       for s in spec.model.statements])


# ---------------------------------------------------------------------------
# the edits: each draws its details and returns (description, version) or None


def add_feature(v: Version, draw):
    groups = list(v.spec.schema.groups)
    gi = draw(st.integers(0, len(groups) - 1))
    g = groups[gi]
    pos = draw(st.integers(0, len(g.features)))
    name = v.name("f")
    type_ = draw(st.sampled_from(("float", "int", "bool")))
    features = list(g.features)
    features.insert(pos, m.Feature(name=name, type=type_))
    groups[gi] = g.model_copy(update={"features": tuple(features)})
    spec = _with_schema(v.spec, groups=tuple(groups))
    return (f"add {type_} feature {g.name}.{name} at {pos}",
            replace(v, spec=spec, features={**v.features, (g.name, name): None}))


def reorder_features(v: Version, draw):
    groups = list(v.spec.schema.groups)
    gi = draw(st.integers(0, len(groups) - 1))
    g = groups[gi]
    if len(g.features) < 2:
        return None
    order = draw(st.permutations(range(len(g.features))))
    groups[gi] = g.model_copy(update={"features": tuple(g.features[i] for i in order)})
    return f"reorder features of {g.name}: {order}", replace(v, spec=_with_schema(v.spec, groups=tuple(groups)))


def reorder_groups(v: Version, draw):
    groups = v.spec.schema.groups
    if len(groups) < 2:
        return None
    order = draw(st.permutations(range(len(groups))))
    return f"reorder groups: {order}", replace(v, spec=_with_schema(v.spec, groups=tuple(groups[i] for i in order)))


def grow_vocab(v: Version, draw):
    vocabs = list(v.spec.schema.vocabs)
    vi = draw(st.integers(0, len(vocabs) - 1))
    voc = vocabs[vi]
    item = v.name("i")
    vocabs[vi] = voc.model_copy(update={"items": voc.items + (m.VocabItem(name=item),)})
    return (f"grow vocab {voc.name} by {item}",
            replace(v, spec=_with_schema(v.spec, vocabs=tuple(vocabs)), items={**v.items, (voc.name, item): None}))


def rename_feature(v: Version, draw):
    groups = list(v.spec.schema.groups)
    gi = draw(st.integers(0, len(groups) - 1))
    g = groups[gi]
    fi = draw(st.integers(0, len(g.features) - 1))
    old = g.features[fi].name
    new = v.name("f")
    features = list(g.features)
    features[fi] = features[fi].model_copy(update={"name": new, "was": old})
    groups[gi] = g.model_copy(update={"features": tuple(features)})
    spec = _with_schema(v.spec, groups=tuple(groups))
    inp = spec.model.input_name
    spec = _rename_paths(spec, lambda p: (inp, g.name, new) if p == (inp, g.name, old) else p)
    feats = {k: val for k, val in v.features.items() if k != (g.name, old)}
    feats[g.name, new] = v.features[g.name, old]
    return f"rename feature {g.name}.{old} -> {new}", replace(v, spec=spec, features=feats)


def rename_group(v: Version, draw):
    groups = list(v.spec.schema.groups)
    gi = draw(st.integers(0, len(groups) - 1))
    old = groups[gi].name
    new = v.name("g")
    groups[gi] = groups[gi].model_copy(update={"name": new, "was": old})
    spec = _with_schema(v.spec, groups=tuple(groups))
    inp = spec.model.input_name
    spec = _rename_paths(spec, lambda p: (inp, new) + p[2:] if len(p) >= 2 and p[:2] == (inp, old) else p)
    gs = {(new if k == old else k): val for k, val in v.groups.items()}
    feats = {((new if g == old else g), f): val for (g, f), val in v.features.items()}
    return f"rename group {old} -> {new}", replace(v, spec=spec, groups=gs, features=feats)


def rename_item(v: Version, draw):
    vocabs = list(v.spec.schema.vocabs)
    vi = draw(st.integers(0, len(vocabs) - 1))
    voc = vocabs[vi]
    ii = draw(st.integers(0, len(voc.items) - 1))
    old = voc.items[ii].name
    new = v.name("i")
    items = list(voc.items)
    items[ii] = items[ii].model_copy(update={"name": new, "was": old})
    vocabs[vi] = voc.model_copy(update={"items": tuple(items)})
    its = {k: val for k, val in v.items.items() if k != (voc.name, old)}
    its[voc.name, new] = v.items[voc.name, old]
    return (f"rename item {voc.name}.{old} -> {new}",
            replace(v, spec=_with_schema(v.spec, vocabs=tuple(vocabs)), items=its))


def rename_statement(v: Version, draw):
    statements = list(v.spec.model.statements)
    si = draw(st.integers(0, len(statements) - 1))
    old = statements[si].name
    new = v.name("s")
    statements[si] = statements[si].model_copy(update={"name": new, "was": old})
    spec = _rename_paths(_with_statements(v.spec, statements), lambda p: (new,) if p == (old,) else p)
    sts = {(new if k == old else k): val for k, val in v.statements.items()}
    return f"rename statement {old} -> {new}", replace(v, spec=spec, statements=sts)


def widen(v: Version, draw):
    statements = list(v.spec.model.statements)
    sites = [(si, at, c) for si, s in enumerate(statements) for at, c in _calls(s.expr)
             if c.op in ("linear", "lstm", "embed")]
    if not sites:
        return None
    si, at, call = draw(st.sampled_from(sites))
    by = draw(st.integers(1, 3))
    args = tuple(a.model_copy(update={"value": a.value + by}) if isinstance(a, m.IntArg) else a for a in call.args)
    statements[si] = statements[si].model_copy(update={"expr": _replace_at(statements[si].expr, at, call.model_copy(update={"args": args}))})
    return f"widen {call.op} at {statements[si].name}{list(at)} by {by}", replace(v, spec=_with_statements(v.spec, statements))


def reorder_concat(v: Version, draw):
    statements = list(v.spec.model.statements)
    sites = [(si, at, c) for si, s in enumerate(statements) for at, c in _calls(s.expr)
             if c.op == "concat" and len(c.args) > 1]
    if not sites:
        return None
    si, at, call = draw(st.sampled_from(sites))
    order = draw(st.permutations(range(len(call.args))))
    new = call.model_copy(update={"args": tuple(call.args[i] for i in order)})
    statements[si] = statements[si].model_copy(update={"expr": _replace_at(statements[si].expr, at, new)})
    return f"reorder concat at {statements[si].name}{list(at)}: {order}", replace(v, spec=_with_statements(v.spec, statements))


def add_head(v: Version, draw):
    graph = build_graph(v.spec)
    plain = [s.name for s in v.spec.model.statements if graph.nodes[graph.statements[s.name]].value.entities is None]
    source = draw(st.sampled_from(plain))  # the last statement is a head: never empty
    name = v.name("h")
    head = m.Statement(name=name, out=True, expr=m.Call(op="linear", args=(m.Path(parts=(source,)), m.IntArg(value=3))))
    spec = _with_statements(v.spec, v.spec.model.statements + (head,))
    return f"add head {name} = linear({source}, 3)", replace(v, spec=spec, statements={**v.statements, name: None})


EDITS = (add_feature, reorder_features, reorder_groups, grow_vocab, rename_feature, rename_group, rename_item,
         rename_statement, widen, reorder_concat, add_head)
RENAMES = (rename_feature, rename_group, rename_item, rename_statement)


# ---------------------------------------------------------------------------
# edits that change the function by construction


def _statement_index(graph: Graph) -> dict[str, int]:
    return {s.name: i for i, s in enumerate(graph.model.statements)}


def head_widths(graph: Graph) -> dict[int, int]:
    index = _statement_index(graph)
    return {index[h]: graph.nodes[n].value.width for h, n in graph.outputs.items()}


def norm_and_binary_widths(graph: Graph) -> collections.Counter:
    index = _statement_index(graph)
    return collections.Counter((index[n.statement], n.op, n.value.width) for n in graph.nodes
                               if n.op in ("layernorm", "add", "mul"))


def binary_pairings(graph: Graph, phi: InteractionMap) -> collections.Counter:
    """Per add / mul, the set of (index of a, index of b) pairs it joins, by key."""
    index = _statement_index(graph)
    return collections.Counter((index[n.statement], n.op, frozenset(base_key(k) for k in phi.values[n.index].keys))
                               for n in graph.nodes if n.op in ("add", "mul"))


def changes_function_by_construction(edit, old: Graph, old_phi: InteractionMap,
                                     new: Graph, new_phi: InteractionMap) -> Optional[str]:
    old_heads, new_heads = head_widths(old), head_widths(new)
    if any(new_heads.get(i) != w for i, w in old_heads.items()):
        return "changes the width of an output head"
    if norm_and_binary_widths(old) != norm_and_binary_widths(new):
        return "changes the width of a layernorm, add or mul"
    if edit not in RENAMES and binary_pairings(old, old_phi) != binary_pairings(new, new_phi):
        return "pairs other indices in an add or mul"
    return None


# ---------------------------------------------------------------------------
# checkpoints


def write_trained(spec: m.ModelSpec, path: str, seed: int) -> None:
    """Every parameter ~ N(0, STD²), seeded: what a trained model looks like to surgery."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {name: torch.randn(tuple(node.params[local].shape), generator=generator) * STD
               for name, (node, local) in build_graph(spec).parameters().items()}
    write_checkpoint(path, canonical(spec), spec.model.name, {k: tuple(t.shape) for k, t in tensors.items()},
                     tensors.items())


def relabel_checkpoint(source: str, spec: m.ModelSpec, path: str) -> None:
    """The same tensors under another spec text (only `was` differs)."""
    tensors = load_file(source)
    names = list(build_graph(spec).parameters())
    write_checkpoint(path, canonical(spec), spec.model.name, {k: tuple(tensors[k].shape) for k in names},
                     ((k, tensors[k]) for k in names))


# ---------------------------------------------------------------------------
# the property

SEEN: collections.Counter = collections.Counter()


@SETTINGS
@given(specs(), st.integers(1, 4), st.integers(0, 2**16), st.data())
def _surgery_sequence_preserves_function(pair, n_edits, weight_seed, data):
    text, first_spec = pair
    with tempfile.TemporaryDirectory(prefix="specsurgery-prop-") as folder:
        first_ckpt = os.path.join(folder, "v0.safetensors")
        write_trained(first_spec, first_ckpt, weight_seed)
        version = Version.first(first_spec)
        graph, phi = build_graph(first_spec), None
        phi = shadow_map(graph)
        ckpt = first_ckpt
        log = [f"v0:\n{canonical(first_spec)}"]
        steps = []  # (description, old ckpt, new ckpt)
        for step in range(1, n_edits + 1):
            base = replace(version, spec=strip_was(version.spec))
            for _ in range(TRIES):
                edit = data.draw(st.sampled_from(EDITS), label="edit")
                made = edit(base, data.draw)
                if made is None:
                    continue
                description, candidate = made
                try:
                    new_spec = reload(candidate.spec, f"<v{step}>")
                except (SpecError, UserError):
                    continue  # e.g. a widened operand of add / mul: not a valid spec
                new_graph = build_graph(new_spec)
                new_phi = shadow_map(new_graph)
                if changes_function_by_construction(edit, graph, phi, new_graph, new_phi):
                    continue
                break
            else:
                continue  # no applicable edit this step
            SEEN[edit.__name__] += 1
            log.append(f"v{step}: {description}\n{canonical(new_spec)}")
            plan = make_plan(version.spec, new_spec, phi, new_phi)
            assert plan.summary.function_preserving, (
                f"step {step} ({description}): the plan says the function changes:\n"
                + "\n".join(r.render() for r in plan.summary.reasons) + "\n\n" + "\n".join(log))
            new_ckpt = os.path.join(folder, f"v{step}.safetensors")
            apply_plan(plan, ckpt, new_spec, new_ckpt)
            steps.append((description, ckpt, new_ckpt))
            version, graph, phi, ckpt = replace(candidate, spec=new_spec), new_graph, new_phi, new_ckpt
        SEEN["sequences"] += 1
        SEEN["steps"] += len(steps)

        final_spec = reload(version.relabelled(), "<final>")
        final_ckpt = os.path.join(folder, "final.safetensors")
        relabel_checkpoint(ckpt, final_spec, final_ckpt)
        report = verify(first_ckpt, final_ckpt, states=STATES)
        first_heads = [s.name for s in first_spec.model.statements if s.out]
        assert len(report["heads"]) == len(first_heads), (report, "\n".join(log))
        if report["max"] >= TOL:
            # Find the first step that broke it (each step carries its own `was`).
            worst = [(d, verify(a, b, states=STATES)["max"]) for d, a, b in steps]
            raise AssertionError(f"first vs last: max difference {report['max']:.3g} ({report['heads']})\n"
                                 f"per step: {worst}\n\n" + "\n".join(log))


def test_surgery_sequence_preserves_function():
    """Random function-preserving edit sequences, surgery after each: the last model
    computes what the first did; and the run made every kind of edit."""
    SEEN.clear()
    _surgery_sequence_preserves_function()
    missing = {e.__name__ for e in EDITS} - set(SEEN)
    assert not missing, f"the run never made {sorted(missing)} (made: {dict(SEEN)})"
