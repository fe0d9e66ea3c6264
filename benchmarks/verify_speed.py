"""ss.verify against its floor, and its peak memory, at several numbers of states.

    python benchmarks/verify_speed.py [--states 1000,10000] [--steps 3] [--repeat 1] [--old specs/five.spec --new specs/five_next.spec]

A fresh checkpoint of OLD is carried over to NEW (ss.apply), then, in a fresh
child process per run (both models loaded with ss.load before the clock starts):

  * verify: ss.verify(old, new, states=N) on the two models (random states
    made, carried to the new schema, run through both models, compared in
    float64), all of it timed;
  * the floor: what a user would write by hand, the same number of states
    through the two models' forward passes, batches of 250, under
    torch.inference_mode; only the forward passes are timed (the records are
    made and featurised off the clock).

Printed: both times (wall, and CPU of the process) and the wall ratio
(requirement: at most 1.5x; with --repeat R, the fastest of R runs of each,
taken in turn), and the peak memory (VmHWM, this child only) of each child
against the two checkpoint files' size plus 512 MB (requirement: within it, at
any number of states), with the load average before and after.
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
wall, cpu = time.perf_counter(), time.process_time()
if mode == "verify":
    result = ss.verify(old, new, states=states, steps=steps)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    detail = {{"ok": result.ok, "largest": result.largest}}
else:  # the floor: featurised states through both forward passes, nothing else timed
    from specsurgery.features import random_record
    from specsurgery.spec.load import load_text
    rng = random.Random(0)
    schemas = [load_text(m.spec).model().schema for m in (old, new)]
    wall = cpu = 0.0
    old.eval(); new.eval()
    with torch.inference_mode():
        for begin in range(0, states, 250):
            n = min(250, states - begin)
            inputs = [m.featurise([[random_record(s, rng, 6) for _ in range(steps)] for _ in range(n)]
                                  if m._ss_graph.has_time else
                                  [random_record(s, rng, 6) for _ in range(n)], validate=False)
                      for m, s in zip((old, new), schemas)]
            t, c = time.perf_counter(), time.process_time()
            old(inputs[0]); new(inputs[1])
            wall += time.perf_counter() - t
            cpu += time.process_time() - c
            del inputs
    detail = {{}}
print(json.dumps({{"seconds": wall, "cpu": cpu, "peak_mb": vm_status()["VmHWM"], **detail}}))
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
    parser.add_argument("--repeat", type=int, default=1, help="runs of each side, taken in turn; the fastest counts")
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
            load = os.getloadavg()
            runs = {"verify": [], "floor": []}
            for _ in range(args.repeat):  # in turn, so both sides see the same moments of the machine
                for mode in runs:
                    runs[mode].append(child(old_ckpt, new_ckpt, states, args.steps, mode, args.threads))
            verify, floor = (min(runs[mode], key=lambda r: r["seconds"]) for mode in ("verify", "floor"))
            peak = max(r["peak_mb"] for r in runs["verify"])
            limit = size + 512
            print(f"{states:>7,} states: verify {verify['seconds']:7.1f} s ({verify['cpu']:.1f} s CPU), "
                  f"floor (two forward passes) {floor['seconds']:7.1f} s ({floor['cpu']:.1f} s CPU): "
                  f"{verify['seconds'] / floor['seconds']:.2f}x (requirement: at most 1.5x); "
                  f"peak {peak:,.0f} MB, limit {limit:,.0f} MB ({'within' if peak <= limit else 'OVER'}; "
                  f"the floor's {max(r['peak_mb'] for r in runs['floor']):,.0f} MB); ok={verify['ok']}, "
                  f"largest difference {verify['largest']:.3g}; load average "
                  f"{load[0]:.1f} before, {os.getloadavg()[0]:.1f} after")


if __name__ == "__main__":
    main()
