"""Presenting interaction maps: gradient maps read like boolean ones, and plots."""
from __future__ import annotations

import numpy as np

from .backends.shadow import InteractionMap, _runs, plot_bins
from .ir import Graph


def dense_slices(name: str, mask: np.ndarray) -> list[str]:
    """Slices text for an element-level mask: whole rows / columns where it is that."""
    if mask.all():
        return [name]
    if not mask.any():
        return []
    if mask.ndim == 1:
        return [f"{name}[{a}:{b}]" if b - a > 1 else f"{name}[{a}]" for a, b in _runs(mask)]
    flat = mask.reshape(mask.shape[0], -1)
    cols, rows = flat.all(axis=0), flat.all(axis=1)
    covered = np.zeros_like(flat)
    covered[:, cols] = True
    covered[rows, :] = True
    if mask.ndim == 2 and np.array_equal(covered, flat):
        out = [f"{name}[:, {a}:{b}]" if b - a > 1 else f"{name}[:, {a}]" for a, b in _runs(cols)]
        out += [f"{name}[{a}:{b}, :]" if b - a > 1 else f"{name}[{a}, :]" for a, b in _runs(rows)]
        return out
    return [f"{name} ({int(mask.sum()):,} of {mask.size:,} elements)"]


def gradient_rows(graph: Graph, gmap, per_feature: bool = False) -> list[dict]:
    names = graph.features.names
    by_group: dict[str, list[int]] = {}
    for i, n in enumerate(names):  # once, not once per group
        by_group.setdefault(n.split("=")[0].split(".")[0], []).append(i)
    rows = []
    for group in graph.schema.groups:
        members = by_group.get(group.name, [])
        units = [[i] for i in members] if per_feature else [members]
        for unit in units:
            touched, elements = [], 0
            for pname, masks in gmap.masks.items():
                hit = masks[unit].any(axis=0)
                elements += int(hit.sum())
                touched.extend(dense_slices(pname, hit))
            rows.append({"features": names[unit[0]] if per_feature else group.name, "count": len(unit),
                         "elements": elements, "slices": touched})
    return rows


def _gradient_bins(gmap, width: int = 1200):
    total = sum(m[0].size for m in gmap.masks.values()) or 1
    cols, spans = [], []
    for name, masks in gmap.masks.items():
        flat = masks.reshape(masks.shape[0], -1)
        n = min(max(2, round(width * flat.shape[1] / total)), flat.shape[1])
        edges = np.linspace(0, flat.shape[1], n + 1).round().astype(int)
        start = len(cols)
        cols.extend(flat[:, a:b].any(axis=1) for a, b in zip(edges[:-1], edges[1:]))
        spans.append((name, start, len(cols)))
    return np.stack(cols, axis=1), spans


def plot_map(phi_or_gmap, path: str, title: str = "") -> None:
    """Features down, parameters across (the paper's Figure 2), as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from .errors import UserError

        raise UserError("error: --plot needs matplotlib (pip install 'specsurgery[plot]')") from None
    if isinstance(phi_or_gmap, InteractionMap):
        picture, spans = plot_bins(phi_or_gmap)
        graph = phi_or_gmap.graph
    else:
        picture, spans = _gradient_bins(phi_or_gmap)
        graph = phi_or_gmap.graph
    names = graph.features.names
    height = min(40, max(4, len(names) * 0.12))
    fig, ax = plt.subplots(figsize=(14, height))
    ax.imshow(picture, aspect="auto", interpolation="nearest", cmap="Greys")
    # Group labels down the side: one tick per feature group.
    groups, ticks, labels = [], [], []
    for i, n in enumerate(names):
        g = n.split(".")[0]
        if not groups or groups[-1] != g:
            groups.append(g)
            ticks.append(i)
            labels.append(g)
            ax.axhline(i - 0.5, color="tab:blue", linewidth=0.3)
    ax.set_yticks(ticks, labels, fontsize=7)
    centers = [(a + b) / 2 for _, a, b in spans]
    for _, a, _ in spans:
        ax.axvline(a - 0.5, color="tab:red", linewidth=0.3)
    ax.set_xticks(centers, [s[0] for s in spans], rotation=90, fontsize=6)
    ax.set_ylabel("input features (by group)")
    ax.set_xlabel("parameters (columns along each one's input axis)")
    ax.set_title(title)
    fig.tight_layout()
    from .files import atomic_file

    with atomic_file(path) as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
