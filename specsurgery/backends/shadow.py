"""The boolean shadow back end: the IR walked with feature sets, giving Φ.

Each value is an `Axis`: per index of its last axis, a structural key and the
set of input features (a Python int used as a bitset, the paper's bitfield)
that reach it. Each op's `shadow` rule (ops.py) says what its output carries
and what every axis of each of its parameters meets. A parameter element
meets the union of the sets of its indices along each axis (a linear weight
[j, i] meets what input i carries), so Φ is kept per axis index, never as a
parameters x features matrix. No torch here, and numpy only where element
views are asked for (the pre-commit hook plans without either).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

if TYPE_CHECKING:
    import numpy as np

from .. import keys as K
from ..ir import FeatureTable, Graph, walk
from ..ops import OPS, Axis


@dataclass(frozen=True)
class ParamMap:
    """Φ of one parameter: per axis, the key and feature set of each index."""

    name: str
    shape: tuple[int, ...]
    roles: tuple[str, ...]
    axes: tuple[Axis, ...]

    @property
    def size(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def hits(self, bits: int) -> list[np.ndarray]:
        """Per axis, which indices carry any of the features in `bits`."""
        import numpy as np

        return [np.fromiter(((s & bits) != 0 for s in axis.sets), dtype=bool, count=len(axis)) for axis in self.axes]

    def touched(self, bits: int) -> int:
        """How many elements meet any feature of `bits`."""
        untouched = 1
        for axis, n in zip(self.axes, self.shape):
            untouched *= n - sum(1 for s in axis.sets if s & bits)
        return self.size - untouched

    def mask(self, bits: int) -> np.ndarray:
        """Element-level: which elements meet a feature of `bits` (materialised)."""
        import numpy as np

        out = np.zeros(self.shape, dtype=bool)
        for k, hit in enumerate(self.hits(bits)):
            view = [1] * len(self.shape)
            view[k] = self.shape[k]
            out |= hit.reshape(view)
        return out

    def features_of(self, index: tuple[int, ...]) -> int:
        bits = 0
        for axis, i in zip(self.axes, index):
            bits |= axis.sets[i]
        return bits

    def pair_count(self) -> int:
        """Σ over elements of |features met| without visiting elements."""
        groups = []
        for axis in self.axes:
            counts: dict[int, int] = {}
            for s in axis.sets:
                counts[s] = counts.get(s, 0) + 1
            groups.append(counts)
        combos: dict[int, int] = {0: 1}
        for counts in groups:
            nxt: dict[int, int] = {}
            for s0, c0 in combos.items():
                for s1, c1 in counts.items():
                    u = s0 | s1
                    nxt[u] = nxt.get(u, 0) + c0 * c1
            combos = nxt
        return sum(bin(s).count("1") * c for s, c in combos.items())


@dataclass
class InteractionMap:
    """Φ: for every scalar parameter, the input features it interacts with."""

    graph: Graph
    params: dict[str, ParamMap]
    values: dict[int, Axis]  # node -> its last axis, keys and sets

    @property
    def features(self) -> FeatureTable:
        return self.graph.features

    def bits_of(self, names: list[str]) -> int:
        index = self.features.index
        bits = 0
        for name in names:
            bits |= 1 << index[name]
        return bits

    def elements_of(self, feature: str) -> dict[str, int]:
        """Parameter -> number of its elements that `feature` touches (non-zero only)."""
        bits = self.bits_of([feature])
        out = {}
        for name, p in self.params.items():
            n = p.touched(bits)
            if n:
                out[name] = n
        return out

    def features_of(self, param: str, index: tuple[int, ...]) -> list[str]:
        return self.features.names_of(self.params[param].features_of(index))

    def pair_count(self) -> int:
        return sum(p.pair_count() for p in self.params.values())

    def distinct_sets(self) -> int:
        seen = set()
        for p in self.params.values():
            for axis in p.axes:
                seen.update(axis.sets)
        return len(seen)


def shadow_map(graph: Graph, inputs: Optional[Callable] = None, output: Optional[Callable] = None) -> InteractionMap:
    """Φ of `graph`. `inputs(node, xs)` may stand other input axes for a node's,
    `output(node, xs, out)` another output axis (how surgery reads the new
    graph as it starts: an op at zero carries nothing)."""
    params: dict[str, ParamMap] = {}

    def visit(node, xs):
        if inputs is not None:
            xs = inputs(node, xs)
        out, param_axes = OPS[node.op].shadow(node, xs)
        if output is not None:
            out = output(node, xs, out)
        for local, axes in param_axes.items():
            spec = node.params[local]
            assert tuple(len(a) for a in axes) == spec.shape, (node.scope, local)
            params[f"{node.scope}.{local}"] = ParamMap(f"{node.scope}.{local}", spec.shape, spec.roles, axes)
        return out

    with K.bulk():
        values = walk(graph, visit)
    ordered = {name: params[name] for name in graph.parameters()}
    return InteractionMap(graph, ordered, values)


# ---------------------------------------------------------------------------
# reading Φ the way a person thinks: per feature group, parameter slices


def _runs(hit: np.ndarray) -> list[tuple[int, int]]:
    import numpy as np

    idx = np.flatnonzero(hit)
    if idx.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(idx) != 1)
    starts = np.concatenate(([idx[0]], idx[breaks + 1]))
    ends = np.concatenate((idx[breaks], [idx[-1]])) + 1
    return list(zip(starts.tolist(), ends.tolist()))


def slices(name: str, shape: tuple[int, ...], hits: list[np.ndarray]) -> list[str]:
    """`hero_h.linear.weight[:, 0:5]`-style text for the elements the axis hits select."""
    if any(hit.all() for hit in hits):
        return [name]  # one axis fully hit: every element is touched
    out = []
    for k, hit in enumerate(hits):
        for a, b in _runs(hit):
            parts = [":"] * len(shape)
            parts[k] = f"{a}:{b}" if b - a > 1 else str(a)
            out.append(f"{name}[{', '.join(parts)}]")
    return out


def _index_runs(indices: list[int]) -> list[tuple[int, int]]:
    """Sorted distinct indices as (start, stop) runs."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and runs[-1][1] == i:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return [(a, b) for a, b in runs]


def group_rows(phi: InteractionMap, per_feature: bool = False) -> list[dict]:
    """One row per feature group (or feature): what it touches, parameter by parameter.

    Each axis is read once: its indices grouped by their (interned, so few)
    feature sets, each set split into the rows it touches. A schema of 20,000
    groups costs what its axes and sets cost, not groups x axes."""
    schema = phi.graph.schema
    names = phi.features.names
    labels: list[str] = []  # row -> its label
    row_of_bit: list[int] = []
    counts: list[int] = []
    group_row: dict[str, int] = {}
    for name in names:
        group = name.split("=")[0].split(".")[0]
        if per_feature:
            labels.append(name)
            counts.append(1)
            row_of_bit.append(len(labels) - 1)
        else:
            if group not in group_row:
                group_row[group] = len(labels)
                labels.append(group)
                counts.append(0)
            counts[group_row[group]] += 1
            row_of_bit.append(group_row[group])
    if not per_feature:  # groups without a feature that reaches the model still get a (empty) row
        for group in schema.groups:
            if group.name not in group_row:
                group_row[group.name] = len(labels)
                labels.append(group.name)
                counts.append(0)
    order = ([group_row[g.name] for g in schema.groups] if not per_feature else list(range(len(labels))))
    # row -> param -> per axis the indices it touches
    hits: list[dict[str, list[list[int]]]] = [dict() for _ in labels]
    rows_of_set: dict[int, list[int]] = {}
    for pname, p in phi.params.items():
        for k, axis in enumerate(p.axes):
            by_set: dict[int, list[int]] = {}
            for i, bits in enumerate(axis.sets):
                if bits:
                    by_set.setdefault(bits, []).append(i)
            for bits, indices in by_set.items():
                if bits not in rows_of_set:
                    touched, b = set(), bits
                    while b:  # one step per feature in the set, lowest first
                        low = b & -b
                        touched.add(row_of_bit[low.bit_length() - 1])
                        b ^= low
                    rows_of_set[bits] = sorted(touched)
                for row in rows_of_set[bits]:
                    hits[row].setdefault(pname, [[] for _ in p.axes])[k].extend(indices)
    out = []
    for row in order:
        touched_slices, elements = [], 0
        for pname, axes in hits[row].items():
            p = phi.params[pname]
            axes = [sorted(set(ix)) for ix in axes]
            untouched = 1
            for ix, n in zip(axes, p.shape):
                untouched *= n - len(ix)
            elements += p.size - untouched
            if any(len(ix) == n for ix, n in zip(axes, p.shape)):
                touched_slices.append(pname)  # one axis fully hit: every element is touched
                continue
            for k, ix in enumerate(axes):
                for a, b in _index_runs(ix):
                    parts = [":"] * len(p.shape)
                    parts[k] = f"{a}:{b}" if b - a > 1 else str(a)
                    touched_slices.append(f"{pname}[{', '.join(parts)}]")
        out.append({"features": labels[row], "count": counts[row], "elements": elements, "slices": touched_slices})
    return out


def plot_bins(phi: InteractionMap, width: int = 1200) -> tuple[np.ndarray, list[tuple[str, int, int]]]:
    """A features x columns picture of Φ (the paper's Figure 2).

    Each parameter gets columns along its most telling axis (the one whose
    indices carry the most distinct feature sets: a weight's input axis, an
    embedding's items), in proportion to the log of its size so small ones
    stay visible; a pixel is lit when some element of that column meets the
    feature.
    """
    import numpy as np

    weights = {name: 1.0 + np.log10(max(p.size, 1)) for name, p in phi.params.items()}
    scale = width / (sum(weights.values()) or 1.0)
    columns: list[int] = []
    spans = []
    for name, p in phi.params.items():
        axis = max(range(len(p.axes)), key=lambda k: len(set(p.axes[k].sets)))
        n = max(1, min(p.shape[axis], round(weights[name] * scale)))
        if len(set(p.axes[axis].sets)) == 1:
            n = min(n, 8)  # a uniform parameter needs no more than a strip
        rest = 0
        for k, other in enumerate(p.axes):
            if k != axis:
                rest |= other.union()
        sets = p.axes[axis].sets
        edges = np.linspace(0, len(sets), n + 1).round().astype(int)
        start = len(columns)
        for a, b in zip(edges[:-1], edges[1:]):
            bits = rest
            for s in set(sets[a:b]):
                bits |= s
            columns.append(bits)
        spans.append((name, start, len(columns)))
    picture = np.zeros((len(phi.features), len(columns)), dtype=bool)
    for c, bits in enumerate(columns):
        for f in range(bits.bit_length()):
            if bits >> f & 1:
                picture[f, c] = True
    return picture, spans
