"""ss.verify against its floor, and its peak memory, at several numbers of states.

    python benchmarks/verify_speed.py [--states 1000,10000] [--steps 3] [--old specs/five.spec --new specs/five_next.spec]

A fresh checkpoint of OLD is carried over to NEW (ss.apply), then, in a child
process per run:

  * verify: ss.verify(old, new, states=N) on the two checkpoints (random
    states made, featurised, run through both models, compared in float64);
  * the floor: the same number of states, already featurised, through the two
    models' forward passes only (batches of 250, as verify runs them).

Printed: both times and their ratio (requirement: at most 1.5x), and the peak
memory (VmHWM) of the verify child against the two checkpoints' size plus
512 MB (requirement: within it, at any number of states).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
MB = 1 << 20

CHILD = r"""
import json, random, sys, time
sys.path.insert(0, {root!r})
import torch
torch.set_num_threads({threads})
import specsurgery as ss
from benchmarks.measure import vm_status
old, new = ss.load({old!r}), ss.load({new!r})
states, steps, mode = {states}, {steps}, {mode!r}
start = time.perf_counter()
if mode == "verify":
    result = ss.verify(old, new, states=states, steps=steps)
    detail = {{"ok": result.ok, "largest": result.largest}}
else:  # the floor: featurised states through both forward passes, nothing else timed
    from specsurgery.features import random_record
    from specsurgery.spec.load import load_text
    rng = random.Random(0)
    schemas = [load_text(m.spec).model().schema for m in (old, new)]
    elapsed = 0.0
    old.eval(); new.eval()
    with torch.no_grad():
        for begin in range(0, states, 250):
            n = min(250, states - begin)
            inputs = [m.featurise([[random_record(s, rng, 6) for _ in range(steps)] for _ in range(n)]
                                  if m._ss_graph.has_time else
                                  [random_record(s, rng, 6) for _ in range(n)], validate=False)
                      for m, s in zip((old, new), schemas)]
            t = time.perf_counter()
            old(inputs[0]); new(inputs[1])
            elapsed += time.perf_counter() - t
    start = time.perf_counter() - elapsed
    detail = {{}}
print(json.dumps({{"seconds": time.perf_counter() - start, "peak_mb": vm_status()["VmHWM"], **detail}}))
"""


def child(old: str, new: str, states: int, steps: int, mode: str, threads: int) -> dict:
    code = CHILD.format(root=ROOT, old=old, new=new, states=states, steps=steps, mode=mode, threads=threads)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(result.stderr)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", default=os.path.join(ROOT, "specs", "five.spec"))
    parser.add_argument("--new", default=os.path.join(ROOT, "specs", "five_next.spec"))
    parser.add_argument("--states", default="1000,10000", help="comma-separated numbers of states")
    parser.add_argument("--steps", type=int, default=3, help="observations per state of a recurrent model")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import specsurgery as ss

    with tempfile.TemporaryDirectory() as tmp:
        old_ckpt, new_ckpt = os.path.join(tmp, "old.safetensors"), os.path.join(tmp, "new.safetensors")
        t = time.perf_counter()
        ss.compile(args.old, seed=1).save(old_ckpt)
        ss.apply(old_ckpt, args.new, new_ckpt)
        size = (os.path.getsize(old_ckpt) + os.path.getsize(new_ckpt)) / MB
        print(f"{os.path.basename(args.old)} -> {os.path.basename(args.new)}: checkpoints {size:,.0f} MB together "
              f"(made in {time.perf_counter() - t:.1f} s); {args.steps} steps per state, {args.threads} threads")
        for states in (int(s) for s in args.states.split(",")):
            verify = child(old_ckpt, new_ckpt, states, args.steps, "verify", args.threads)
            floor = child(old_ckpt, new_ckpt, states, args.steps, "floor", args.threads)
            limit = size + 512
            print(f"{states:>7,} states: verify {verify['seconds']:7.1f} s, floor (two forward passes) "
                  f"{floor['seconds']:7.1f} s: {verify['seconds'] / floor['seconds']:.2f}x (requirement: at most 1.5x); "
                  f"peak {verify['peak_mb']:,.0f} MB, limit {limit:,.0f} MB "
                  f"({'within' if verify['peak_mb'] <= limit else 'OVER'}); ok={verify['ok']}, "
                  f"largest difference {verify['largest']:.3g}")


if __name__ == "__main__":
    main()
