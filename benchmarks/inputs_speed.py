"""Inputs of a training loop on OpenAI Five's schema: arrays and records against their floors.

    python benchmarks/inputs_speed.py [--batch 4096] [--entities 4] [--repeat 5]

A batch of --batch random observations of specs/five.spec (each entity set
holding up to --entities entities), measured in one run:

  * model.inputs(columns), the arrays path, against its floor: the same arrays,
    already laid out, each turned into a tensor with torch.as_tensor.
    Requirement: at most 2x.
  * model.featurise(records) against its floor: a plain Python loop reading
    every value of the same records into one flat list (what any record path
    must at least do). Requirement: at most 3x validated, 1.5x with validate=False.

What is timed is the public methods themselves, model.inputs and
model.featurise, on an ss.Model of Five's graph whose 158M parameters are
stand-ins of one element each (neither method reads a weight; the module tree
is Five's, so their own lookups of the model's dtype and device are timed too).
Five has an lstm, so each batch item is a sequence of one observation
([B, 1, ...] arrays); the floors read the same observations. Each time is the
fastest of --repeat runs (x10 for arrays), the candidates run in turn so a busy
moment falls on all alike. Times are this process's CPU time (time.process_time,
kernel time such as page faults included; torch runs on one thread): on a
machine shared with other work, wall time also counts their turns, and the
fastest of a few runs is then further from the truth the longer a run takes.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from specsurgery.features import random_record  # noqa: E402
from specsurgery.ir import build_graph  # noqa: E402
from specsurgery.model import Model  # noqa: E402
from specsurgery.spec.load import load  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def best_times(fns: list, repeat: int) -> list[float]:
    """The fastest of `repeat` runs of each function (CPU time), run in turn (so a
    busy moment of the machine falls on all of them alike)."""
    best = [float("inf")] * len(fns)
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            start = time.process_time()
            fn()
            best[i] = min(best[i], time.process_time() - start)
    return best


def floor_loop(schema):
    """Every value of every record into one flat list, in plain loops."""
    plan = [(g.name, g.is_entity_set, tuple(f.name for f in g.features)) for g in schema.groups]

    def read(records: list) -> list:
        out = []
        append = out.append
        for record in records:
            for group, entity_set, names in plan:
                value = record[group]
                if entity_set:
                    for entity in value:
                        for name in names:
                            append(entity[name])
                else:
                    for name in names:
                        append(value[name])
        return out

    return read


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--entities", type=int, default=4, help="most entities per entity set in a record")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)

    spec = load([os.path.join(ROOT, "specs", "five.spec")]).model()
    schema = spec.schema
    graph = build_graph(spec)
    model = Model(graph, tensors=lambda name: torch.zeros(1))  # stand-in weights (see above)
    rng = random.Random(0)
    records = [random_record(schema, rng, args.entities) for _ in range(args.batch)]
    batch = [[r] for r in records] if graph.has_time else records  # a sequence of one step per item
    floor = floor_loop(schema)
    values = len(floor(records))
    print(f"{args.batch:,} observations of specs/five.spec, at most {args.entities} entities per set: "
          f"{values:,} values ({values / args.batch:,.0f} per observation)")

    # arrays already laid out, as a training loop would hold them
    laid_out = {k: v.numpy() for k, v in model.featurise(batch).items()}
    nbytes = sum(a.nbytes for a in laid_out.values())
    t_floor_arrays, t_inputs = best_times([lambda: {k: torch.as_tensor(v) for k, v in laid_out.items()},
                                           lambda: model.inputs(laid_out)],
                                          10 * args.repeat)
    print(f"arrays ({len(laid_out)} arrays, {nbytes / 1e6:,.1f} MB):")
    print(f"  floor, torch.as_tensor of each   {1e3 * t_floor_arrays:9.3f} ms")
    print(f"  model.inputs                     {1e3 * t_inputs:9.3f} ms   {t_inputs / t_floor_arrays:5.2f}x "
          f"(requirement: at most 2x)")

    t_floor, t_valid, t_plain = best_times([
        lambda: floor(records),
        lambda: model.featurise(batch),
        lambda: model.featurise(batch, validate=False)], args.repeat)
    print("records:")
    print(f"  floor, every value to a list     {1e3 * t_floor:9.1f} ms   {1e9 * t_floor / values:5.1f} ns a value")
    print(f"  model.featurise                  {1e3 * t_valid:9.1f} ms   {t_valid / t_floor:5.2f}x "
          "(requirement: at most 3x)")
    print(f"  model.featurise(validate=False)  {1e3 * t_plain:9.1f} ms   {t_plain / t_floor:5.2f}x "
          "(requirement: at most 1.5x)")
    print(f"  per observation: {1e6 * t_valid / args.batch:.1f} µs validated, {1e6 * t_plain / args.batch:.1f} µs not")
    print("load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
