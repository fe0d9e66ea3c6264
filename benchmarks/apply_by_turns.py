"""Whole-process `specsurgery apply` of two source trees by turns, and what the
run before does to a copy on this machine.

    python benchmarks/apply_by_turns.py OLD_TREE [NEW_TREE] [--reps N]   # NEW_TREE: this tree
    BENCH_TMP=/some/disk python benchmarks/apply_by_turns.py ...         # ~5 GB of files go there

OLD_TREE is another checkout of the project (`git worktree add /tmp/old REV`).
The checkpoints and changes are benchmarks/sharded_apply.py's: the 1.9 GB
sharded one and its change, and Five's one 632 MB file.

Part 1, what ran before: `cp -r` of the sharded checkpoint, timed three times
right after another `cp -r` and three times right after an apply (NEW_TREE's),
with how far /proc/vmstat's `nr_free_pages_blocks` (free pages in whole free
blocks) fell during the copy. On a virtual machine that reports free memory
to its host, a page reported free costs a host fault when next touched, and
such pages sit in whole free blocks.

Part 2: `apply --no-fsync` of OLD_TREE and of NEW_TREE, taken by turns, REPS
times each (default 8), every run right after an untimed copy of the same
checkpoint (sharded_apply.after_a_copy): the median and fastest of each, for
both cases. Nothing is asserted.
"""
from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from sharded_apply import WIDTH, after_a_copy, big_spec, pattern_tensors, read_through, rm  # noqa: E402


def free_block_pages() -> int:
    with open("/proc/vmstat") as f:
        for line in f:
            if line.startswith("nr_free_pages_blocks "):
                return int(line.split()[1])
    return -1  # an older kernel: not counted


def wall(cmd: list[str], cwd: str) -> float:
    os.sync()
    t = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    reps = int(sys.argv[sys.argv.index("--reps") + 1]) if "--reps" in sys.argv else 8
    if "--reps" in sys.argv:
        args.remove(str(reps))
    if not args:
        raise SystemExit(__doc__)
    old_tree, new_tree = os.path.abspath(args[0]), os.path.abspath(args[1] if len(args) > 1 else ROOT)
    from specsurgery.ir import build_graph
    from specsurgery.shards import write_sharded
    from specsurgery.spec.canonical import canonical
    from specsurgery.spec.load import load_text
    from specsurgery.workflow.build import write_fresh

    tmp = tempfile.mkdtemp(prefix="specsurgery-turns-", dir=os.environ.get("BENCH_TMP") or None)
    try:
        spec = load_text(big_spec(0, 0, WIDTH), "big.spec").model()
        graph = build_graph(spec)
        shapes = {name: tuple(node.params[local].shape) for name, (node, local) in graph.parameters().items()}
        big, big_next = os.path.join(tmp, "big"), os.path.join(tmp, "big_next.spec")
        write_sharded(big, canonical(spec), "big", shapes, pattern_tensors(shapes), "400MB")
        with open(big_next, "w") as f:
            f.write(big_spec(8, 16, 8320))
        five = os.path.join(tmp, "five.safetensors")
        write_fresh(build_graph(load_text(open(os.path.join(ROOT, "specs", "five.spec")).read(), "five.spec").model()),
                    five)
        five_next = os.path.join(ROOT, "specs", "five_next.spec")
        out, copy = os.path.join(tmp, "out"), os.path.join(tmp, "copy")
        apply = [sys.executable, "-m", "specsurgery", "apply"]

        print(f"apply_by_turns: load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
              f"old {old_tree}, new {new_tree}")
        for before in ("cp -r", "apply") * 3:  # part 1
            if before == "cp -r":
                subprocess.run(["cp", "-r", big, copy], check=True)
                rm(copy)()
            else:
                subprocess.run(apply + [big, big_next, "-o", out, "--no-fsync"], cwd=new_tree, check=True,
                               stdout=subprocess.DEVNULL)
                rm(out)()
            read_through(big)
            blocks = free_block_pages()
            t = wall(["cp", "-r", big, copy], tmp)
            fell = blocks - free_block_pages()
            rm(copy)()
            print(f"cp -r right after {before:5s}: {t:.2f} s; nr_free_pages_blocks fell by {fell:,}")

        for case, ckpt, new, scratch in (("sharded", big, big_next, copy), ("Five", five, five_next, copy + ".st")):
            times: dict[str, list[float]] = {"old": [], "new": []}
            for _ in range(reps):  # part 2
                for name, tree in (("old", old_tree), ("new", new_tree)):
                    after_a_copy(ckpt, scratch)()
                    times[name].append(wall(apply + [ckpt, new, "-o", out, "--no-fsync"], tree))
                    rm(out)()
            for name, got in times.items():
                print(f"{case} apply --no-fsync, {name} tree: median {statistics.median(got):.2f} s, "
                      f"fastest {min(got):.2f} s [{', '.join(f'{t:.2f}' for t in got)}]")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
