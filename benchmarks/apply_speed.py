"""Benchmark: applying a surgery plan to a five.spec checkpoint, against copying the file.

    python benchmarks/apply_speed.py
    BENCH_TMP=/some/disk python benchmarks/apply_speed.py   # where the ~650 MB files go (default: the system temp dir)

Steps (all in one temporary folder, removed at the end):
 1. write_fresh(five) builds a fresh checkpoint of specs/five.spec (~632 MB of float32).
 2. The floor: shutil.copyfile of that checkpoint, median of 3, after a warm-up
    read so the source is in the page cache for the copy and for apply alike.
    apply writes through atomic_file, which fsyncs the new file; copyfile does
    not, so copyfile + fsync is timed as well (median of 3) and shown as a
    second floor. os.sync() runs (untimed) before every timed step so one
    step's dirty pages are not flushed on another's clock.
 3. make_plan(five, five_next): median of 3 (load_text + build_graph timed apart).
 4. apply_plan(plan, checkpoint, five_next, out) in a CHILD process (subprocess,
    fresh interpreter), median of 3 runs; the plan goes to the child as JSON,
    as with `specsurgery apply --plan`. Peak memory = VmHWM from
    /proc/self/status in the child. A baseline child does everything but the
    apply_plan call (imports: no torch for this change, loads the spec, reads the plan); the
    apply child also resets its high-water mark just before apply_plan
    (writing 5 to /proc/self/clear_refs) so apply's own peak is reported too.

Timings use time.perf_counter; nothing is asserted.
"""
from __future__ import annotations

from measure import vm_status  # noqa: E402  (benchmarks/ is the script folder)
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

FIVE = os.path.join(ROOT, "specs", "five.spec")
FIVE_NEXT = os.path.join(ROOT, "specs", "five_next.spec")
REPS = 3
MB = 1024 * 1024




def load_model(path: str):
    """The single model a spec file defines (five_next.spec may call it five or five_next)."""
    from specsurgery.spec.load import load_text

    with open(path, encoding="utf-8") as f:
        text = f.read()
    models = load_text(text, path).models
    if len(models) != 1:
        raise SystemExit(f"{path}: expected one model, found {list(models)}")
    return next(iter(models.values()))


def read_through(path: str) -> None:
    with open(path, "rb") as f:
        while f.read(16 * MB):
            pass


def fmt(times: list[float]) -> str:
    return ", ".join(f"{t:.3f}" for t in times)


def join(rows: list[dict], key: str, spec: str) -> str:
    return ", ".join(format(r[key], spec) for r in rows)


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


# ---------------------------------------------------------------------------
# the child


def child(mode: str, checkpoint: str, plan_path: str, out: str) -> None:
    t0 = time.perf_counter()
    from specsurgery.surgery.apply import apply_plan
    from specsurgery.surgery.plan import Plan

    t1 = time.perf_counter()
    new_spec = load_model(FIVE_NEXT)
    with open(plan_path, encoding="utf-8") as f:
        plan = Plan.model_validate_json(f.read())
    t2 = time.perf_counter()
    result = {"mode": mode, "import_s": t1 - t0, "setup_s": t2 - t1, "hwm_before_mb": vm_status()["VmHWM"],
              "rss_before_mb": vm_status()["VmRSS"]}
    if mode.startswith("apply"):
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            result["hwm_reset"] = True
        except OSError:
            result["hwm_reset"] = False
        t3, c3 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        info = apply_plan(plan, checkpoint, new_spec, out, durable=(mode == "apply"))
        result["apply_s"] = time.perf_counter() - t3
        c4 = resource.getrusage(resource.RUSAGE_SELF)
        result["apply_cpu_s"] = (c4.ru_utime - c3.ru_utime) + (c4.ru_stime - c3.ru_stime)
        result["bytes"] = info["bytes"]
        result["apply_hwm_mb"] = vm_status()["VmHWM"] if result["hwm_reset"] else None
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result.update({"hwm_mb": max(vm_status()["VmHWM"], result["hwm_before_mb"]), "ru_maxrss_mb": usage.ru_maxrss / 1024.0,
                   "user_s": usage.ru_utime, "sys_s": usage.ru_stime})
    print(json.dumps(result))


def run_child(mode: str, checkpoint: str, plan_path: str, out: str) -> dict:
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", mode, checkpoint, plan_path, out],
                       capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"child {mode} failed:\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------


def main() -> None:
    from specsurgery.ir import build_graph
    from specsurgery.surgery.diff import make_plan
    from specsurgery.workflow.build import write_fresh

    print(f"apply_speed: five.spec -> five_next.spec (load average {load_average()})")
    tmp = tempfile.mkdtemp(prefix="specsurgery-apply-bench-", dir=os.environ.get("BENCH_TMP") or None)
    try:
        old_ckpt = os.path.join(tmp, "five.safetensors")
        copy_dst = os.path.join(tmp, "copy.safetensors")
        out = os.path.join(tmp, "five_next.safetensors")
        plan_path = os.path.join(tmp, "plan.json")

        # 1. a fresh checkpoint
        five = load_model(FIVE)
        graph = build_graph(five)
        t = time.perf_counter()
        size = write_fresh(graph, old_ckpt)
        t_fresh = time.perf_counter() - t
        file_size = os.path.getsize(old_ckpt)
        print(f"temp folder {tmp}")
        print(f"write_fresh(five): {graph.parameter_count():,} parameters, {file_size / MB:.1f} MB file "
              f"({size / MB:.1f} MB of tensors) in {t_fresh:.2f} s (not a requirement)")

        # 2. the floor
        read_through(old_ckpt)  # warm-up: the source is in the page cache from here on
        read_through(old_ckpt)
        copy_times, copy_sync_times, copy_cpu = [], [], []
        for _ in range(REPS):
            os.sync()
            t, c = time.perf_counter(), time.process_time()
            shutil.copyfile(old_ckpt, copy_dst)
            copy_times.append(time.perf_counter() - t)
            copy_cpu.append(time.process_time() - c)
            os.sync()
            os.remove(copy_dst)
        for _ in range(REPS):
            os.sync()
            t = time.perf_counter()
            shutil.copyfile(old_ckpt, copy_dst)
            fd = os.open(copy_dst, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            copy_sync_times.append(time.perf_counter() - t)
            os.remove(copy_dst)
        t_copy = statistics.median(copy_times)
        t_copy_sync = statistics.median(copy_sync_times)
        print(f"shutil.copyfile (hot cache): median {t_copy:.3f} s of {REPS} [{fmt(copy_times)}] "
              f"= {file_size / MB / t_copy:.0f} MB/s; cpu (user+sys) median {statistics.median(copy_cpu):.3f} s")
        print(f"shutil.copyfile + fsync:     median {t_copy_sync:.3f} s of {REPS} [{fmt(copy_sync_times)}]")

        # 3. the plan
        load_times = []
        for _ in range(REPS):
            t = time.perf_counter()
            old_spec, new_spec = load_model(FIVE), load_model(FIVE_NEXT)
            load_times.append(time.perf_counter() - t)
        plan_times, plan_cpu, plan = [], [], None
        for _ in range(REPS):
            t, c = time.perf_counter(), time.process_time()
            plan = make_plan(old_spec, new_spec)
            plan_times.append(time.perf_counter() - t)
            plan_cpu.append(time.process_time() - c)
        t_plan = statistics.median(plan_times)
        s = plan.summary
        print(f"load_text x2 (five, five_next; includes their build_graph checks): median "
              f"{statistics.median(load_times):.3f} s [{fmt(load_times)}]")
        print(f"make_plan(five, five_next): median {t_plan:.3f} s of {REPS} [{fmt(plan_times)}] "
              f"(requirement: < 1 s); cpu median {statistics.median(plan_cpu):.3f} s; models {plan.old_model} -> {plan.new_model}, "
              f"transferred {s.transferred:,} of {s.new_params:,} new parameters "
              f"({s.transferred / s.new_params:.2%}), function preserving: {s.function_preserving}")
        with open(plan_path, "w", encoding="utf-8") as f:
            f.write(plan.model_dump_json())

        # 4. apply, in children
        base = [run_child("baseline", old_ckpt, plan_path, out) for _ in range(REPS)]
        runs = []
        for _ in range(REPS):
            read_through(old_ckpt)  # the source stays hot, as for the copies
            os.sync()
            runs.append(run_child("apply", old_ckpt, plan_path, out))
            expected = 4 * s.new_params
            if runs[-1]["bytes"] != expected:
                print(f"  WARNING: apply wrote {runs[-1]['bytes']:,} tensor bytes, expected {expected:,}")
            os.sync()
            os.remove(out)
        # Like for like with plain copyfile: the same apply without its fsyncs.
        quick = []
        for _ in range(REPS):
            read_through(old_ckpt)
            os.sync()
            quick.append(run_child("apply-nosync", old_ckpt, plan_path, out))
            os.sync()
            os.remove(out)
        t_quick = statistics.median(r["apply_s"] for r in quick)
        t_apply = statistics.median(r["apply_s"] for r in runs)
        base_hwm = max(r["hwm_mb"] for r in base)
        cpu = "; ".join(f"{r['user_s']:.1f}/{r['sys_s']:.1f} s" for r in runs)
        hwm = max(r["hwm_mb"] for r in runs)
        print(f"baseline child (import apply, load five_next, read plan JSON): peak RSS {base_hwm:.0f} MB "
              f"(runs: {join(base, 'hwm_mb', '.0f')})")
        t_apply_cpu = statistics.median(r["apply_cpu_s"] for r in runs)
        print(f"apply child: apply_plan median {t_apply:.3f} s of {REPS} [{join(runs, 'apply_s', '.3f')}]; "
              f"cpu (user+sys) of apply_plan median {t_apply_cpu:.3f} s [{join(runs, 'apply_cpu_s', '.3f')}]; "
              f"cpu user/sys of the whole child: {cpu}")
        print(f"  peak RSS (VmHWM, whole child): {hwm:.0f} MB (runs: {join(runs, 'hwm_mb', '.0f')}); "
              f"above the baseline child: {hwm - base_hwm:+.0f} MB")
        if all(r["hwm_reset"] for r in runs):
            own = max(r["apply_hwm_mb"] for r in runs)
            before = max(r["rss_before_mb"] for r in runs)
            print(f"  peak RSS during apply_plan alone (VmHWM reset just before the call): {own:.0f} MB, "
                  f"RSS just before the call {before:.0f} MB, so apply_plan added {own - before:+.0f} MB")
        else:
            print("  (could not reset VmHWM via /proc/self/clear_refs; whole-child peak only)")
        print(f"make_plan: {t_plan:.3f} s (requirement: < 1 s)")
        print(f"load average now {load_average()} on {os.cpu_count()} cpus: wall times above this figure are "
              f"inflated by other processes; the cpu figures are not")
        print(f"apply: {t_apply:.3f} s, copyfile: {t_copy:.3f} s, peak RSS {hwm:.0f} MB "
              f"(requirement: apply within 3x of copyfile, peak < 1.2 GB)")
        print(f"like for like: apply without fsync {t_quick:.3f} s / copyfile {t_copy:.3f} s = {t_quick / t_copy:.2f} x; "
              f"apply (durable, fsync) {t_apply:.3f} s / (copyfile + fsync) {t_copy_sync:.3f} s = {t_apply / t_copy_sync:.2f} x "
              f"(requirement: within 3x)")
        print(f"RATIO apply/copyfile = {t_apply / t_copy:.2f} x   "
              f"(apply/(copyfile+fsync) = {t_apply / t_copy_sync:.2f} x, apply fsyncs its output and copyfile "
              f"does not; cpu time apply/copyfile = {t_apply_cpu / statistics.median(copy_cpu):.2f} x)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"removed {tmp}" if not os.path.exists(tmp) else f"WARNING: could not remove {tmp}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(*sys.argv[2:6])
    else:
        main()
