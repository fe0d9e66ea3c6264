"""Benchmark: whole-process `specsurgery apply` on a sharded checkpoint, against `cp -r` of its shards.

    python benchmarks/sharded_apply.py
    BENCH_TMP=/some/disk python benchmarks/sharded_apply.py   # ~7 GB of files go there (default: system temp)
    python benchmarks/sharded_apply.py --jobs 2               # workers for apply (default: one per core)
    python benchmarks/sharded_apply.py --only sharded         # parts 1 and 3 only (--only five: part 2)

Part 1, sharded. A generated spec of ~500M parameters (a 2 GB float32
checkpoint): a group of 64 features and a vocabulary of 8192 items embedded
in 128, then eight linear layers of 8192 units. The old checkpoint is written
in 400 MB shards (values a cheap deterministic pattern: the benchmark times
moving bytes, not training). The change inserts 8 features mid-group, grows
the vocabulary by 16 items mid-list and widens the fourth layer from 8192 to
8320 units. Timed, in the same run, each after a read of the shards (the page cache warm
for the copy and for apply alike; os.sync() first, so no run pays for
another's dirty pages):
  * `cp -r OLD COPY`, and `cp -r` followed by `sync` of the copied files (apply
    fsyncs every shard, cp does not);
  * `specsurgery apply OLD NEW.spec -o OUT --jobs N --no-fsync` as a whole
    process (interpreter start, imports, planning, writing; no fsync, as cp):
    the issue's ratio, against `cp -r`, like for like (both leave the data in
    the page cache);
  * `specsurgery apply OLD NEW.spec -o OUT --jobs N` (durable: it fsyncs every
    shard before the rename), against `cp -r` + `sync`;
  * the same apply with torch imported first: what apply cost when it imported
    torch (it needs none for this change: copies, zero columns, uniform fresh rows).
Peak memory is the largest sum of the resident set sizes of the apply process
and its workers, sampled every 20 ms from /proc (and, as a cross-check, the
largest single child's ru_maxrss).

Part 2, one file: specs/five.spec -> five_next.spec, a fresh 632 MB checkpoint,
`specsurgery apply --no-fsync` as a whole process against `cp`, and `apply`
against `cp` + `sync` (all after a read of the file), the same apply with
torch imported first, and the same apply writing a sharded folder (in parallel).

Part 3, what the torch import costs: `python -c "import torch"` timed, and a
whole-process apply whose tensors are all only moved (the same spec: every
tensor a copy, most of them made by apply's early copies while it plans:
early_copy.py; torch never imported).

Part 1 also times `specsurgery plan` alone (a whole process), and apply with --jobs 1.

The two headline ratios (apply --no-fsync against cp -r, and against cp) come
from 5 runs of each, taken by turns (cp, apply, cp, apply, ...), so that
both meet the same moments of a machine whose speed drifts: the ratio of the
medians, and beside them the median of the 5 pairs' ratios and the fastest
over the fastest. Every one of those runs comes right after an untimed copy
of the same checkpoint (after_a_copy): what ran just before changes what a
run costs on this virtual machine (below), so both sides get the same. Median of 3 for
every other timing; `os.sync()` (untimed) before each. Nothing is asserted.
specsurgery's bytecode is compiled first, as pip does when it installs the
package: where PYTHONDONTWRITEBYTECODE is set (an editable install under it),
every process would otherwise compile the package again (~0.2 s each).
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

REPS = 3
PAIRED = 5  # the headline ratios: apply and its baseline by turns, this many times each
MB = 1e6
WIDTH = 8192


def big_spec(features: int, items: int, widened: int) -> str:
    names = [f"f{i}" for i in range(64)]
    if features:  # inserted mid-group
        names = names[:32] + [f"new{i}" for i in range(features)] + names[32:]
    vocab = [f"v{i}" for i in range(8192)]
    if items:  # grown mid-list
        vocab = vocab[:4096] + [f"w{i}" for i in range(items)] + vocab[4096:]
    group = "\n".join(f"    {n}: float" for n in names)
    layers = []
    prev = "concat(obs.g, e)"
    for k in range(1, 9):
        width = widened if k == 4 else WIDTH
        layers.append(f"  h{k} = relu(linear({prev}, {width}))")
        prev = f"h{k}"
    return (f"schema s {{\n  vocab v = [{', '.join(vocab)}]\n  group g {{\n{group}\n    k: category(v)\n  }}\n}}\n\n"
            f"model big(obs: s) {{\n  e = embed(obs.g.k, 128)\n" + "\n".join(layers)
            + f"\n  out y = linear({prev}, 16)\n}}\n")


def pattern_tensors(shapes):
    """Cheap, non-constant float32 values, one tensor at a time."""
    import torch

    for name, shape in shapes.items():
        t = torch.empty(shape)
        flat = t.view(-1)
        flat.copy_(torch.arange(flat.numel(), dtype=torch.float32).remainder_(977).mul_(1e-3))
        yield name, t


def tree_rss_mb(pid: int) -> tuple[float, float]:
    """Resident set of `pid` and all its descendants, in MB: (sum, largest one)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(entry))
        except OSError:
            continue
    total, largest, todo = 0.0, 0.0, [pid]
    while todo:
        p = todo.pop()
        todo.extend(children.get(p, []))
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss = int(line.split()[1]) / 1024.0
                        total += rss
                        largest = max(largest, rss)
        except OSError:
            pass
    return total, largest


def timed(cmd: list[str], sample: bool = False) -> tuple[float, tuple[float, float], float]:
    """(wall seconds, (peak tree RSS MB, peak RSS of one process MB), CPU seconds) of one
    command (CPU: user + system of it and its children, steadier than wall on a busy machine)."""
    import resource

    os.sync()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = [0.0, 0.0]
    if sample:
        def poll():
            while proc.poll() is None:
                tree, one = tree_rss_mb(proc.pid)
                peak[0], peak[1] = max(peak[0], tree), max(peak[1], one)
                time.sleep(0.02)
        thread = threading.Thread(target=poll)
        thread.start()
    _, err = proc.communicate()
    elapsed = time.perf_counter() - t
    if sample:
        thread.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err.decode()}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return elapsed, tuple(peak), (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def with_torch(args: list[str]) -> list[str]:
    """A specsurgery command run with torch imported first (what it cost when it imported torch)."""
    return [sys.executable, "-c", "import sys, torch; from specsurgery.cli import main; sys.exit(main(sys.argv[1:]))",
            *args]


def after_a_copy(path: str, scratch: str):
    """What runs before each of the headline runs: an untimed `cp -r` of
    `path` (removed again), then a read of it. On a virtual machine that
    reports free memory to its host (this one), a page reported free costs a
    host fault when next touched, and what ran just before a run can change
    how many such pages it meets: in a shell loop on 2026-12-02 a `cp -r` of
    the 1.9 GB shards took 0.6 s after another `cp -r` and 2.5 to 5.2 s right
    after an apply, all of it system time (benchmarks/apply_by_turns.py times
    the same; the effect comes and goes). Run after the same thing, cp and
    apply meet the same memory."""
    def before() -> None:
        subprocess.run(["cp", "-r", path, scratch], check=True)
        rm(scratch)()
        read_through(path)

    return before


def read_through(path: str) -> None:
    files = [os.path.join(path, f) for f in os.listdir(path)] if os.path.isdir(path) else [path]
    for file in files:
        with open(file, "rb") as f:
            while f.read(16 << 20):
                pass


class Times(list):
    """Wall seconds of the runs; `.cpu` their CPU seconds."""

    cpu: list


def median_runs(make_cmd, cleanup, reps=REPS, sample=False, before=None):
    times, peaks = Times(), []
    times.cpu = []
    for _ in range(reps):
        if before:
            before()
        t, p, c = timed(make_cmd(), sample=sample)
        times.append(t)
        times.cpu.append(c)
        peaks.append(p)
        cleanup()
    return statistics.median(times), times, (max(p[0] for p in peaks), max(p[1] for p in peaks))


def paired_runs(baseline, clean_baseline, apply, clean_apply, before):
    """The baseline and apply run by turns, PAIRED times each (each after
    `before`): both meet the same moments of a machine whose speed drifts
    (a virtual machine's cores are shared with others). Returns both Times,
    apply's peak memory, and (the median of the runs' pairwise ratios, the
    fastest apply over the fastest baseline: the least disturbed of each)."""
    base, ours, peaks = Times(), Times(), []
    base.cpu, ours.cpu = [], []
    for _ in range(PAIRED):
        for times, cmd, clean, sample in ((base, baseline, clean_baseline, False), (ours, apply, clean_apply, True)):
            before()
            t, p, c = timed(cmd(), sample=sample)
            times.append(t)
            times.cpu.append(c)
            if sample:
                peaks.append(p)
            clean()
    pairwise = statistics.median(a / b for a, b in zip(ours, base))
    return base, ours, (max(p[0] for p in peaks), max(p[1] for p in peaks)), (pairwise, min(ours) / min(base))


def cpu(times: Times) -> float:
    return statistics.median(times.cpu)


def rm(path: str):
    return lambda: (shutil.rmtree(path) if os.path.isdir(path) else os.path.exists(path) and os.remove(path), os.sync())


def fmt(times: Times) -> str:
    """The wall times, and the median CPU time."""
    return ", ".join(f"{t:.2f}" for t in times) + f"; CPU {cpu(times):.2f} s"


def main() -> None:
    jobs = sys.argv[sys.argv.index("--jobs") + 1] if "--jobs" in sys.argv else None
    only = sys.argv[sys.argv.index("--only") + 1] if "--only" in sys.argv else None  # sharded or five
    if only not in (None, "sharded", "five"):
        raise SystemExit("--only takes sharded (parts 1 and 3) or five (part 2)")
    from specsurgery.ir import build_graph
    from specsurgery.shards import read_sharded, write_sharded
    from specsurgery.spec.canonical import canonical
    from specsurgery.spec.load import load_text

    import compileall

    compileall.compile_dir(os.path.join(ROOT, "specsurgery"), quiet=1)
    specsurgery = [sys.executable, "-m", "specsurgery"]
    job_args = ["--jobs", jobs] if jobs else []
    print(f"sharded_apply: load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} cpus; "
          f"apply workers: {jobs or 'one per core'}")
    tmp = tempfile.mkdtemp(prefix="specsurgery-sharded-bench-", dir=os.environ.get("BENCH_TMP") or None)
    try:
        if only in (None, "sharded"):
            # ---- part 1: 500M parameters in 400 MB shards
            old_text, new_text = big_spec(0, 0, WIDTH), big_spec(8, 16, 8320)
            new_spec_path = os.path.join(tmp, "big_next.spec")
            with open(new_spec_path, "w") as f:
                f.write(new_text)
            spec = load_text(old_text, "big.spec").model()
            graph = build_graph(spec)
            shapes = {name: tuple(node.params[local].shape) for name, (node, local) in graph.parameters().items()}
            old = os.path.join(tmp, "big")
            t = time.perf_counter()
            write_sharded(old, canonical(spec), "big", shapes, pattern_tensors(shapes), "400MB")
            header = read_sharded(old)
            total = sum(i.end - i.start for i in header.tensors.values())
            print(f"old checkpoint: {graph.parameter_count():,} parameters, {total / MB:.0f} MB in {len(header.shards)} shards "
                  f"(largest {header.largest_shard() / MB:.0f} MB), written in {time.perf_counter() - t:.1f} s")
            copy, out = os.path.join(tmp, "copy"), os.path.join(tmp, "out")
            read_through(old)
            warm = lambda: read_through(old)  # noqa: E731
            cp_times, apn_times, peak_n, pairwise = paired_runs(
                lambda: ["cp", "-r", old, copy], rm(copy),
                lambda: specsurgery + ["apply", old, new_spec_path, "-o", out, "--no-fsync"] + job_args, rm(out),
                after_a_copy(old, os.path.join(tmp, "scratch")))
            t_cp, t_apn = statistics.median(cp_times), statistics.median(apn_times)
            t_cps, cps_times, _ = median_runs(lambda: ["sh", "-c", f'cp -r "{old}" "{copy}" && sync "{copy}"/*'], rm(copy),
                                              before=warm)
            t_ap, ap_times, peak = median_runs(lambda: specsurgery + ["apply", old, new_spec_path, "-o", out] + job_args,
                                               rm(out), sample=True, before=lambda: read_through(old))
            t_at, at_times, at_peak = median_runs(lambda: with_torch(["apply", old, new_spec_path, "-o", out] + job_args),
                                                  rm(out), sample=True, before=warm)
            plan_path = os.path.join(tmp, "plan.json")
            t_pl, pl_times, _ = median_runs(lambda: specsurgery + ["plan", old, new_spec_path, "-o", plan_path], lambda: None)
            t_ap_1, ap_1_times, peak_1 = median_runs(
                lambda: specsurgery + ["apply", old, new_spec_path, "-o", out, "--jobs", "1"], rm(out),
                sample=True, before=lambda: read_through(old))
            subprocess.run(specsurgery + ["apply", old, new_spec_path, "-o", out, "--json"] + job_args,
                           cwd=ROOT, check=True, capture_output=True)
            report = json.loads(subprocess.run(specsurgery + ["plan", old, new_spec_path, "--json"], cwd=ROOT, check=True,
                                               capture_output=True, text=True).stdout)
            actions = {}
            for p in report["params"]:
                kind = "copied" if p["source"] == p["name"] and p["zeroed"] == 0 and p["fresh"] == 0 and p["shape"] == p["old_shape"] else "built"
                actions[kind] = actions.get(kind, 0) + 1
            out_header = read_sharded(out)
            print(f"the change: +8 features mid-group, +16 vocabulary items mid-list, h4 8192 -> 8320; "
                  f"tensors {actions}; output {len(out_header.shards)} shards")
            rm(out)()
            print(f"cp -r:          median {t_cp:.2f} s [{fmt(cp_times)}]")
            print(f"cp -r + sync:   median {t_cps:.2f} s [{fmt(cps_times)}]")
            print(f"apply --no-fsync (whole process, plans, no fsync): median {t_apn:.2f} s [{fmt(apn_times)}], "
                  f"peak memory: process + workers {peak_n[0]:.0f} MB, largest one process {peak_n[1]:.0f} MB")
            print(f"apply (whole process, plans, fsyncs every shard): median {t_ap:.2f} s [{fmt(ap_times)}], "
                  f"peak memory: process + workers {peak[0]:.0f} MB, largest one process {peak[1]:.0f} MB")
            print(f"apply with torch imported first: median {t_at:.2f} s [{fmt(at_times)}], peak {at_peak[0]:.0f} MB; "
                  f"apply without torch saves {t_at - t_ap:.2f} s")
            print(f"plan alone (whole process `specsurgery plan -o plan.json`): median {t_pl:.2f} s [{fmt(pl_times)}]")
            print(f"apply --jobs 1: median {t_ap_1:.2f} s [{fmt(ap_1_times)}], peak {peak_1[0]:.0f} MB")
            print(f"RATIO sharded apply --no-fsync / cp -r = {t_apn / t_cp:.2f} x (requirement: at most 1.5x; "
                  f"{PAIRED} runs of each by turns, median over median; the median of the pairs' ratios {pairwise[0]:.2f} x, "
                  f"fastest over fastest {pairwise[1]:.2f} x); "
                  f"apply (durable) / (cp -r + sync) = {t_ap / t_cps:.2f} x; apply (durable) / cp -r = {t_ap / t_cp:.2f} x; "
                  f"(apply --no-fsync - plan alone) / cp -r = {(t_apn - t_pl) / t_cp:.2f} x; "
                  f"peak {max(peak[0], peak_n[0]):.0f} MB (requirement: at most 600 MB)")
            print(f"RATIO by CPU time: apply --no-fsync / cp -r = {cpu(apn_times) / cpu(cp_times):.2f} x; "
                  f"apply (durable) / (cp -r + sync) = {cpu(ap_times) / cpu(cps_times):.2f} x")

            # ---- part 3 first (the big folder is at hand): a change that only moves bytes
            same = os.path.join(tmp, "big_same.spec")
            with open(same, "w") as f:
                f.write(old_text)
            t_mv, mv_times, mv_peak = median_runs(lambda: specsurgery + ["apply", old, same, "-o", out] + job_args, rm(out),
                                                  sample=True, before=lambda: read_through(old))
            t_torch, torch_times, _ = median_runs(lambda: [sys.executable, "-c", "import torch"], lambda: None)
            t_py, py_times, _ = median_runs(lambda: [sys.executable, "-c", "import specsurgery.shard_apply"], lambda: None)
            print(f"apply where every tensor is only moved (no torch imported anywhere): median {t_mv:.2f} s "
                  f"[{fmt(mv_times)}], peak {mv_peak[0]:.0f} MB; RATIO / cp -r = {t_mv / t_cp:.2f} x")
            print(f"python -c 'import torch': median {t_torch:.2f} s [{fmt(torch_times)}] per process that needs it "
                  f"(python -c 'import specsurgery.shard_apply': {t_py:.2f} s)")
            shutil.rmtree(old)

        if only in (None, "five"):
            # ---- part 2: five.spec, one file
            from specsurgery.workflow.build import write_fresh

            five = load_text(open(os.path.join(ROOT, "specs", "five.spec")).read(), "five.spec").model()
            ckpt = os.path.join(tmp, "five.safetensors")
            write_fresh(build_graph(five), ckpt)
            size = os.path.getsize(ckpt)
            five_next = os.path.join(ROOT, "specs", "five_next.spec")
            read_through(ckpt)
            copy1, out1, out_dir = os.path.join(tmp, "copy.safetensors"), os.path.join(tmp, "five_next.safetensors"), os.path.join(tmp, "five_next")
            warm1 = lambda: read_through(ckpt)  # noqa: E731
            cp1_times, apn1_times, peakn1, pairwise1 = paired_runs(
                lambda: ["cp", ckpt, copy1], rm(copy1),
                lambda: specsurgery + ["apply", ckpt, five_next, "-o", out1, "--no-fsync"], rm(out1),
                after_a_copy(ckpt, os.path.join(tmp, "scratch.safetensors")))
            t_cp1, t_apn1 = statistics.median(cp1_times), statistics.median(apn1_times)
            t_cp1s, cp1s_times, _ = median_runs(lambda: ["sh", "-c", f'cp "{ckpt}" "{copy1}" && sync "{copy1}"'], rm(copy1),
                                                before=warm1)
            t_ap1, ap1_times, peak1 = median_runs(lambda: specsurgery + ["apply", ckpt, five_next, "-o", out1], rm(out1),
                                                  sample=True, before=warm1)
            t_at1, at1_times, _ = median_runs(lambda: with_torch(["apply", ckpt, five_next, "-o", out1]), rm(out1),
                                              before=warm1)
            t_ap2, ap2_times, peak2 = median_runs(
                lambda: specsurgery + ["apply", ckpt, five_next, "-o", out_dir, "--max-shard-size", "100MB"] + job_args,
                rm(out_dir), sample=True, before=lambda: read_through(ckpt))
            print(f"five.spec -> five_next.spec, one {size / MB:.0f} MB file:")
            print(f"  cp:        median {t_cp1:.2f} s [{fmt(cp1_times)}]; cp + sync {t_cp1s:.2f} s [{fmt(cp1s_times)}]")
            print(f"  apply --no-fsync: median {t_apn1:.2f} s [{fmt(apn1_times)}] (one process, one file), "
                  f"peak {peakn1[0]:.0f} MB")
            print(f"  apply:     median {t_ap1:.2f} s [{fmt(ap1_times)}] (durable), peak {peak1[0]:.0f} MB")
            print(f"  apply with torch imported first: median {t_at1:.2f} s [{fmt(at1_times)}]; "
                  f"apply without torch saves {t_at1 - t_ap1:.2f} s")
            print(f"  apply into 100 MB shards, parallel: median {t_ap2:.2f} s [{fmt(ap2_times)}], peak {peak2[0]:.0f} MB")
            print(f"RATIO one-file apply --no-fsync / cp = {t_apn1 / t_cp1:.2f} x (requirement: at most 2x; "
                  f"{PAIRED} runs of each by turns, median over median; the median of the pairs' ratios {pairwise1[0]:.2f} x, "
                  f"fastest over fastest {pairwise1[1]:.2f} x); "
                  f"apply (durable) / (cp + sync) = {t_ap1 / t_cp1s:.2f} x; apply (durable) / cp = {t_ap1 / t_cp1:.2f} x; "
                  f"sharded-output apply / cp = {t_ap2 / t_cp1:.2f} x")
            print(f"RATIO by CPU time: one-file apply --no-fsync / cp = {cpu(apn1_times) / cpu(cp1_times):.2f} x; "
                  f"apply (durable) / (cp + sync) = {cpu(ap1_times) / cpu(cp1s_times):.2f} x")
        print(f"load average now {' '.join(f'{x:.2f}' for x in os.getloadavg())}: wall times are inflated by other processes")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"removed {tmp}" if not os.path.exists(tmp) else f"WARNING: could not remove {tmp}")


if __name__ == "__main__":
    main()
