"""Benchmark: the boolean map and the surgery plan of an entity-transformer agent
of about 100M parameters (requirement: each at most 1 s).

    python benchmarks/attention_speed.py [--blocks 7] [--width 1024] [--runs 3]

The agent is generated: a unit encoder, BLOCKS pre-norm transformer blocks over
`units[64]` (attention of 16 heads of 64, projected back to the residual
width, then a feed-forward of 4x the width, each with a residual add and
layernorm), a GRU core of the residual width, a pointer head over the units,
and action and value heads. The change planned is the one of
examples/entity_transformer_next.spec at this size: two new unit features and
a seventeenth head in the first block.

Each figure is the median of RUNS child processes (fresh interpreters: index
keys are interned per process, so a warm second run in one process would
flatter the command a user runs once). A child loads and types the spec(s)
untimed, then times one step, wall clock and CPU:
  * load: parse + check + graph of the old spec;
  * map: the boolean map (shadow_map) of the old spec;
  * plan: make_plan(old, new), both maps included.
Baselines in the same run: the same steps for specs/five.spec -> five_next.spec
(157.9M parameters, version 1 ops only: pools and one LSTM), and building the
agent's torch module (allocating and initialising its parameters, one
thread), which any tool that looked at the weights would pay at least once.
The load average is printed: other work on the machine inflates wall times.
Nothing is asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

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


CHILD = """
import json, sys, time
sys.path.insert(0, {root!r})
step, old_text, new_text = json.loads(sys.stdin.read())
from specsurgery.spec.load import load_text
from specsurgery.ir import build_graph
def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu
if step == "load":
    out = timed(lambda: build_graph(load_text(old_text, "old.spec").model()))
else:
    old, new = load_text(old_text, "old.spec").model(), load_text(new_text, "new.spec").model()
    old_graph, new_graph = build_graph(old), build_graph(new)
    if step == "map":
        from specsurgery.backends.shadow import shadow_map
        out = timed(lambda: shadow_map(old_graph))
    elif step == "plan":
        from specsurgery.surgery.diff import make_plan
        out = timed(lambda: make_plan(old, new))
    else:
        import torch
        from specsurgery.model import Model
        torch.set_num_threads(1)
        out = timed(lambda: Model(old_graph, seed=0))
print(json.dumps(out))
"""


def child_time(step: str, old_text: str, new_text: str, runs: int) -> tuple[float, float]:
    """(wall, cpu) seconds of `step`, each the median over `runs` fresh interpreters."""
    walls, cpus = [], []
    for _ in range(runs):
        done = subprocess.run([sys.executable, "-c", CHILD.format(root=ROOT)], input=json.dumps([step, old_text, new_text]),
                              capture_output=True, text=True, check=True)
        wall, cpu = json.loads(done.stdout)
        walls.append(wall)
        cpus.append(cpu)
    return statistics.median(walls), statistics.median(cpus)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--blocks", type=int, default=7)
    parser.add_argument("--width", type=int, default=HEADS * HEAD_DIM)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    from specsurgery.ir import build_graph
    from specsurgery.spec.load import load_text
    from specsurgery.surgery.diff import make_plan

    old_text = agent_text(args.blocks, args.width)
    new_text = agent_text(args.blocks, args.width, new_features=True, first_heads=HEADS + 1)
    with open(os.path.join(ROOT, "specs", "five.spec")) as f:
        five = f.read()
    with open(os.path.join(ROOT, "specs", "five_next.spec")) as f:
        five_next = f.read()
    old, new = load_text(old_text, "old.spec").model(), load_text(new_text, "new.spec").model()
    graph = build_graph(old)
    summary = make_plan(old, new).summary

    figures = {}
    for label, pair in (("agent", (old_text, new_text)), ("five", (five, five_next))):
        for step in ("load", "map", "plan"):
            figures[label, step] = child_time(step, *pair, runs=args.runs)
    torch_wall, torch_cpu = child_time("torch", old_text, new_text, runs=1)

    print(f"entity-transformer agent: {args.blocks} blocks of width {args.width} over units[64], "
          f"{graph.parameter_count():,} parameters, {len(graph.features)} input features")
    print(f"  change: 2 new unit features, a 17th head in block 1: {summary.transferred:,} of {summary.old_params:,} "
          f"transferred, {summary.zeroed:,} zero, {summary.fresh:,} fresh, "
          f"function preserved: {summary.function_preserving}")
    print(f"  {'step (median of ' + str(args.runs) + ' processes)':<34}{'agent wall / cpu (s)':>22}"
          f"{'five.spec wall / cpu (s)':>26}{'agent / five (cpu)':>20}")
    for name, step in (("parse + check + graph", "load"), ("boolean map", "map"), ("plan (both maps included)", "plan")):
        (aw, ac), (fw, fc) = figures["agent", step], figures["five", step]
        print(f"  {name:<34}{aw:>12.3f} / {ac:.3f}{fw:>16.3f} / {fc:.3f}{ac / fc:>19.2f}x")
    print("  five.spec: 157,906,450 parameters, version 1 ops (pools, one LSTM)")
    map_cpu, plan_cpu = figures["agent", "map"][1], figures["agent", "plan"][1]
    print(f"  baseline: building the agent's torch module (allocate + init, one thread): {torch_wall:.2f} s wall, "
          f"{torch_cpu:.2f} s cpu; the boolean map takes {map_cpu / torch_cpu:.2f} of that, the plan {plan_cpu / torch_cpu:.2f}")
    for what, cpu in (("boolean map", map_cpu), ("plan", plan_cpu)):
        print(f"  requirement: {what} at most 1 s: {'met' if cpu <= 1.0 else 'NOT met'} ({cpu:.2f} s of cpu)")
    print(f"  load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
