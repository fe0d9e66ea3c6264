"""Benchmark: the boolean map and the surgery plan of an entity-transformer agent
of about 100M parameters (requirement: each at most 1 s).

    python benchmarks/attention_speed.py [--blocks 7] [--width 1024]

The agent is generated: a unit encoder, BLOCKS pre-norm transformer blocks over
`units[64]` (attention of 16 heads of 64, projected back to the residual
width, then a feed-forward of 4x the width, each with a residual add and
layernorm), a GRU core of the residual width, a pointer head over the units,
and action and value heads. The change planned is the one of
examples/entity_transformer_next.spec at this size: two new unit features and
a seventeenth head in the first block.

Figures, each the median of REPS runs after one warm-up, in this process:
  * parse + check + graph of the spec (what every command pays first);
  * the boolean map (shadow_map) of the old spec;
  * the plan (make_plan, both maps included, graphs built beforehand);
and, as baselines in the same run: the same three for specs/five.spec (157.9M
parameters, version 1 ops only: pools and one LSTM), and building the torch
module of the agent (allocating and initialising its parameters), which any
tool that looked at weights would pay at least once. Nothing is asserted.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

REPS = 5
HEADS, HEAD_DIM = 16, 64


def agent_text(blocks: int, width: int, new_features: bool = False, first_heads: int = HEADS) -> str:
    """The agent's spec; `new_features` adds two unit features, `first_heads` heads block 1."""
    unit_features = ["x: float", "y: float", "health: float", "mine: bool"]
    if new_features:
        unit_features += ["shield: float", "cooldown: float"]
    lines = [
        "schema arena {",
        "  vocab unit_kinds = [worker, soldier, tower, scout, hero, courier, building, neutral]",
        "  group me {", "    health: float", "    energy: float", "    gold: float", "    level: int", "  }",
        "  group units[64] {", *(f"    {f}" for f in unit_features), "    kind: category(unit_kinds)", "  }",
        "}",
        "",
        "model agent(obs: arena) {",
        f"  b0 = linear(concat(obs.units, embed(obs.units.kind, 32)), {width})",
    ]
    for i in range(1, blocks + 1):
        heads = first_heads if i == 1 else HEADS
        lines.append(f"  a{i} = add(b{i - 1}, linear(attention(layernorm(b{i - 1}), {heads}, {HEAD_DIM}), {width}))")
        lines.append(f"  b{i} = add(a{i}, linear(relu(linear(layernorm(a{i}), {4 * width})), {width}))")
    lines += [
        "  me = relu(linear(obs.me, 256))",
        f"  core = gru(concat(me, maxpool(b{blocks})), {width})",
        f"  out target = pointer(core, b{blocks}, 128)",
        "  out action = linear(dropout(core, 0.1), 32)",
        "  out value = linear(core, 1)",
        "}",
    ]
    return "\n".join(lines) + "\n"


def median_time(fn, reps: int = REPS) -> tuple[float, object]:
    fn()  # warm-up: the first run also fills caches every later command shares
    times, result = [], None
    for _ in range(reps):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def measure(old_text: str, new_text: str, label: str) -> dict:
    from specsurgery.backends.shadow import shadow_map
    from specsurgery.ir import build_graph
    from specsurgery.spec.load import load_text
    from specsurgery.surgery.diff import make_plan

    def load(text, path):
        return load_text(text, path).model()

    t_load, old = median_time(lambda: load(old_text, f"{label}.spec"))
    new = load(new_text, f"{label}_next.spec")
    old_graph, new_graph = build_graph(old), build_graph(new)
    t_map, phi = median_time(lambda: shadow_map(old_graph))
    t_plan, plan = median_time(lambda: make_plan(old, new))
    return {"label": label, "params": old_graph.parameter_count(), "new_params": new_graph.parameter_count(),
            "features": len(old_graph.features), "load": t_load, "map": t_map, "plan": t_plan,
            "pairs": phi.pair_count(), "plan_summary": plan.summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--blocks", type=int, default=7)
    parser.add_argument("--width", type=int, default=HEADS * HEAD_DIM)
    args = parser.parse_args()

    old_text = agent_text(args.blocks, args.width)
    new_text = agent_text(args.blocks, args.width, new_features=True, first_heads=HEADS + 1)
    with open(os.path.join(ROOT, "specs", "five.spec")) as f:
        five = f.read()
    with open(os.path.join(ROOT, "specs", "five_next.spec")) as f:
        five_next = f.read()

    agent = measure(old_text, new_text, "agent")
    baseline = measure(five, five_next, "five")

    import torch

    from specsurgery.ir import build_graph
    from specsurgery.model import Model
    from specsurgery.spec.load import load_text

    torch.set_num_threads(1)
    graph = build_graph(load_text(old_text, "agent.spec").model())
    start = time.perf_counter()
    Model(graph, seed=0)
    t_torch = time.perf_counter() - start

    load = os.getloadavg()[0]
    print(f"entity-transformer agent: {args.blocks} blocks of width {args.width} over units[64], "
          f"{agent['params']:,} parameters, {agent['features']} input features "
          f"(load average {load:.2f} on {os.cpu_count()} cores)")
    s = agent["plan_summary"]
    print(f"  change: 2 new unit features, a 17th head in block 1: {s.transferred:,} of {s.old_params:,} "
          f"transferred, {s.zeroed:,} zero, {s.fresh:,} fresh, function preserved: {s.function_preserving}")
    rows = [("parse + check + graph", "load"), ("boolean map", "map"), ("plan (both maps included)", "plan")]
    print(f"  {'step':<28}{'agent (s)':>12}{'five.spec (s)':>16}{'agent / five':>14}")
    for name, key in rows:
        print(f"  {name:<28}{agent[key]:>12.3f}{baseline[key]:>16.3f}{agent[key] / baseline[key]:>13.2f}x")
    print(f"  five.spec: {baseline['params']:,} parameters, version 1 ops (pools, one LSTM)")
    print(f"  baseline: building the agent's torch module (allocate + init, one thread): {t_torch:.2f} s; "
          f"the boolean map is {t_torch / agent['map']:.0f}x faster, the plan {t_torch / agent['plan']:.0f}x")
    verdict = "met" if agent["map"] <= 1.0 and agent["plan"] <= 1.0 else "NOT met"
    print(f"  requirement (boolean map <= 1 s, plan <= 1 s): {verdict}")


if __name__ == "__main__":
    main()
