"""Sub-commands of the later stages: map, plan, apply, verify, check.

Each registers its parser in cli.EXTRA_PARSERS and its runner in cli.COMMANDS;
heavy imports (torch) stay inside the runners that need them.
"""
from __future__ import annotations

import sys

from .cli import COMMANDS, EXTRA_PARSERS, command, emit_json, table
from .errors import UserError


def _model_arg(p) -> None:
    p.add_argument("--model", metavar="M", help="which model, when the file has several")


# ---------------------------------------------------------------------------
# map


@command("map", "print the interaction map: which parameters each input feature touches")
def cmd_map(args) -> int:
    from .ir import build_graph
    from .spec.load import load
    from .backends.shadow import group_rows, shadow_map

    spec = load([args.spec]).model(args.model)
    graph = build_graph(spec)
    phi = shadow_map(graph)
    if args.method == "boolean":
        rows = group_rows(phi, per_feature=args.features)
        pairs = phi.pair_count()
    else:
        from .backends.probe import gradient_map
        from .mapping import gradient_rows

        gmap = gradient_map(graph, args.method)
        rows = gradient_rows(graph, gmap, per_feature=args.features)
        pairs = gmap.pair_count()
    summary = {"model": spec.model.name, "method": args.method, "features": len(graph.features),
               "parameters": graph.parameter_count(), "interactions": pairs,
               "boolean_interactions": phi.pair_count()}
    summary["found"] = pairs / summary["boolean_interactions"] if summary["boolean_interactions"] else 1.0
    if args.plot:
        from .mapping import plot_map

        plot_map(phi if args.method == "boolean" else gmap, args.plot, title=f"{spec.model.name}: {args.method} map")
        summary["plot"] = args.plot
    if args.json:
        emit_json({**summary, "groups": rows})
        return 0
    print(f"model {spec.model.name}: {summary['features']:,} input features, {summary['parameters']:,} parameters, "
          f"{pairs:,} (feature, element) interactions by {args.method}"
          + ("" if args.method == "boolean" else f" = {100 * summary['found']:.2f}% of the boolean map's"))
    body = []
    for row in rows:
        shown = row["slices"] or ["(nothing)"]
        label = row["features"] + ("" if args.features else f" ({row['count']} features)")
        body.append([label, f"{row['elements']:,}", shown[0]])
        body.extend(["", "", s] for s in shown[1:])
    print(table(body, ["features", "elements", "parameter slices"], right=(1,)))
    if args.plot:
        print(f"wrote {args.plot}")
    return 0


def _map_parser(add) -> None:
    p = add("map")
    p.add_argument("spec", metavar="SPEC")
    _model_arg(p)
    p.add_argument("--method", choices=["boolean", "gradient", "gradient-random", "gradient-positive"],
                   default="boolean", help="boolean shadow graph (default), or gradients (see README)")
    p.add_argument("--features", action="store_true", help="one row per feature instead of per group")
    p.add_argument("--plot", metavar="FILE.png", help="draw the map: features down, parameters across")


EXTRA_PARSERS.append(_map_parser)
