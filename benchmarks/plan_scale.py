"""Benchmark: planning and mapping grow linearly with a spec's size.

    python benchmarks/plan_scale.py [FACTOR]

Each case is timed at a base size and at FACTOR (default 10) times it, in this
run; the line prints both and their ratio (about FACTOR when the work is
linear, about FACTOR squared when quadratic):

  head     make_plan of `out o = linear(h, N)` after a feature is added (N units)
  chain    make_plan of N statements `s_i = tanh(s_(i-1))` (keys nest N deep)
  groups   group_rows (what `map` prints) of N one-feature groups read through one concat

Loading (parse and check) is not timed here. Nothing is asserted.
"""
from __future__ import annotations

import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from specsurgery.backends.shadow import group_rows, shadow_map  # noqa: E402
from specsurgery.spec.load import load_text  # noqa: E402
from specsurgery.surgery.diff import make_plan  # noqa: E402

SCHEMA = "schema s {\n  group g {\n    x: float\n  }\n}\n"


def head(n: int):
    text = SCHEMA + f"model m(obs: s) {{\n  h = relu(linear(obs.g, 4))\n  out o = linear(h, {n})\n}}\n"
    old, new = load_text(text, "a.spec"), load_text(text.replace("x: float", "x: float\n    y: float"), "b.spec")
    return lambda: make_plan(old.graphs["m"], new.graphs["m"])


def chain(n: int):
    body = ["  s0 = linear(obs.g, 4)"] + [f"  s{i} = tanh(s{i - 1})" for i in range(1, n)] + [f"  out o = linear(s{n - 1}, 2)"]
    text = SCHEMA + "model m(obs: s) {\n" + "\n".join(body) + "\n}\n"
    old, new = load_text(text, "a.spec"), load_text(text.replace("x: float", "x: float\n    y: float"), "b.spec")
    return lambda: make_plan(old.graphs["m"], new.graphs["m"])


def groups(n: int):
    schema = "schema s {\n" + "".join(f"  group g{i} {{\n    x: float\n  }}\n" for i in range(n)) + "}\n"
    reads = ", ".join(f"obs.g{i}" for i in range(n))
    text = schema + f"model m(obs: s) {{\n  h = relu(linear(concat({reads}), 4))\n  out o = linear(h, 2)\n}}\n"
    phi = shadow_map(load_text(text, "a.spec").graphs["m"])
    return lambda: group_rows(phi)


CASES = [("head", head, 2000), ("chain", chain, 200), ("groups", groups, 300)]


def timed(run) -> float:
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    factor = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    for name, make, base in CASES:
        small, large = timed(make(base)), timed(make(base * factor))
        print(f"{name:7s} N={base:>6,}: {small:.3f} s   N={base * factor:>7,}: {large:.3f} s   "
              f"ratio {large / small:.1f} (linear: {factor}, quadratic: {factor * factor})")


if __name__ == "__main__":
    main()
