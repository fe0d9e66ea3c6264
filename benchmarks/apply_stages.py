"""Where a whole-process `specsurgery apply` spends its time, stage by stage.

    python benchmarks/apply_stages.py            # both cases of sharded_apply.py
    python benchmarks/apply_stages.py CKPT NEW_SPEC [--no-fsync]   # one case, in this process

The two cases of benchmarks/sharded_apply.py (a 1.9 GB sharded checkpoint
through a change to an 8192-item spec, and Five's one 632 MB file), each run
in a fresh interpreter that times, wall and CPU, the stages apply goes
through, as ss.apply runs them (api.apply_checkpoint): the imports, reading
and checking the new spec, its graph (the new files laid out and the early
copies begun: early_copy.py), reading and checking the old spec (from the
checkpoint), its graph, the plan, writing the rest (with fsync unless
--no-fsync), and the wait for the early copies to end. Wall and CPU are this
thread's stages; the early copies run beside them, in the kernel, on another
core (the CPU column counts them where they overlap a stage).
With no arguments each case runs once durable, once with --no-fsync. Nothing is asserted.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def stages(checkpoint: str, new_path: str, out: str, durable: bool) -> None:
    marks, last = [], [time.perf_counter(), time.process_time()]

    def mark(name: str) -> None:
        now = [time.perf_counter(), time.process_time()]
        marks.append((name, now[0] - last[0], now[1] - last[1]))
        last[:] = now

    import specsurgery.cli  # noqa: F401  (what the command imports first)
    from specsurgery import api
    from specsurgery.checkpoint import load_spec, read_header
    from specsurgery.early_copy import early_output
    from specsurgery.ir import build_graph
    from specsurgery.shards import is_folder_checkpoint

    mark("imports")
    header = read_header(checkpoint)
    new_spec = api.read_spec(new_path)
    mark("new spec: read, parsed, checked")
    new_graph = build_graph(new_spec)
    sharded = is_folder_checkpoint(checkpoint)
    with early_output(header, new_graph, out, sharded, durable=durable) as early:
        mark("new graph, files laid out, copies begun")
        old_spec = load_spec(header)
        mark("old spec: read, parsed, checked")
        old_graph = build_graph(old_spec)
        mark("old graph")
        plan = api._checked_plan(None, old_graph, new_graph)._plan
        mark("plan")
        if sharded:
            from specsurgery.shard_apply import apply_sharded

            apply_sharded(plan, checkpoint, new_graph, out, checked=True, durable=durable, early=early)
        else:
            from specsurgery.shard_apply import default_jobs
            from specsurgery.surgery.apply import apply_plan

            apply_plan(plan, checkpoint, new_graph, out, checked=True, durable=durable, threads=default_jobs(),
                       early=early)
        mark("the rest written" + (" and fsynced" if durable else " (no fsync)"))
    mark("early copies finished, renamed")
    for name, wall, cpu in marks:
        print(f"  {name:40s} wall {wall:6.3f} s  CPU {cpu:6.3f} s")
    print(f"  {'whole process (CPU)':40s}                CPU {time.process_time():6.3f} s")


def main() -> None:
    if len(sys.argv) >= 3:
        checkpoint, new_path = sys.argv[1:3]
        out = tempfile.mkdtemp(prefix="specsurgery-stages-", dir=os.path.dirname(os.path.abspath(checkpoint)))
        try:
            stages(checkpoint, new_path, os.path.join(out, "new" if os.path.isdir(checkpoint) else "new.safetensors"),
                   durable="--no-fsync" not in sys.argv)
        finally:
            shutil.rmtree(out, ignore_errors=True)
        return
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from sharded_apply import WIDTH, big_spec, pattern_tensors

    from specsurgery.ir import build_graph
    from specsurgery.shards import write_sharded
    from specsurgery.spec.canonical import canonical
    from specsurgery.spec.load import load_text
    from specsurgery.workflow.build import write_fresh

    print(f"apply_stages: load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} cpus")
    tmp = tempfile.mkdtemp(prefix="specsurgery-stages-bench-", dir=os.environ.get("BENCH_TMP") or None)
    try:
        spec = load_text(big_spec(0, 0, WIDTH), "big.spec").model()
        graph = build_graph(spec)
        shapes = {name: tuple(node.params[local].shape) for name, (node, local) in graph.parameters().items()}
        write_sharded(os.path.join(tmp, "big"), canonical(spec), "big", shapes, pattern_tensors(shapes), "400MB")
        with open(os.path.join(tmp, "big_next.spec"), "w") as f:
            f.write(big_spec(8, 16, 8320))
        five = load_text(open(os.path.join(ROOT, "specs", "five.spec")).read(), "five.spec").model()
        write_fresh(build_graph(five), os.path.join(tmp, "five.safetensors"))
        cases = [("sharded, 1.9 GB", os.path.join(tmp, "big"), os.path.join(tmp, "big_next.spec")),
                 ("Five, one 632 MB file", os.path.join(tmp, "five.safetensors"),
                  os.path.join(ROOT, "specs", "five_next.spec"))]
        for label, checkpoint, new_path in cases:
            for flags in ([], ["--no-fsync"]):
                os.sync()
                print(f"{label}{' --no-fsync' if flags else ''}:", flush=True)
                subprocess.run([sys.executable, os.path.abspath(__file__), checkpoint, new_path, *flags], check=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"load average now {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
