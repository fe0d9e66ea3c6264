"""`specsurgery check` on a Five-sized change, as a whole process.

    python benchmarks/check_speed.py [--repeat 5]

A temporary git repository commits specs/five.spec, then stages the change of
specs/five_next.spec (12 per-hero features added) as the same file and model,
and runs the pre-commit hook's command. Requirement: within 1 s. Baselines
measured in the same run: the bare interpreter (`python -c pass`) and
`python -c "import torch"`, the import the hook must never pay for.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from specsurgery.spec.load import ParseCache  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def wall(cmd: list[str], cwd: str, repeat: int) -> tuple[float, subprocess.CompletedProcess]:
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    script = shutil.which("specsurgery") or os.path.join(os.path.dirname(sys.executable), "specsurgery")
    with tempfile.TemporaryDirectory() as repo:
        git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@example.com"]
        os.makedirs(os.path.join(repo, "specs"))
        shutil.copy(os.path.join(ROOT, "specs", "five.spec"), os.path.join(repo, "specs", "five.spec"))
        subprocess.run(git + ["init", "-q"], cwd=repo, check=True)
        subprocess.run(git + ["add", "."], cwd=repo, check=True)
        subprocess.run(git + ["commit", "-qm", "five"], cwd=repo, check=True)
        # five.spec went in through the hook too: its parse is in the hook's cache.
        subprocess.run([script, "check", "specs/five.spec"], cwd=repo, capture_output=True)
        with open(os.path.join(ROOT, "specs", "five_next.spec"), encoding="utf-8") as f:
            changed = f.read().replace("model five_next(obs: five)", "model five(obs: five)")
        with open(os.path.join(repo, "specs", "five.spec"), "w", encoding="utf-8") as f:
            f.write(changed)
        subprocess.run(git + ["add", "specs/five.spec"], cwd=repo, check=True)
        cache = os.path.join(repo, ".git", "specsurgery", "parsed")
        staged_entry = ParseCache(cache)._path(changed)

        def forget_staged():  # the change is new to the hook: parsed from text
            if os.path.exists(staged_entry):
                os.unlink(staged_entry)

        def forget_all():  # a clone whose hook never ran: both versions parsed from text
            shutil.rmtree(cache, ignore_errors=True)

        def timed(prepare) -> tuple[float, subprocess.CompletedProcess]:
            times, result = [], None
            for _ in range(args.repeat):
                prepare()
                start = time.perf_counter()
                result = subprocess.run([script, "check"], cwd=repo, capture_output=True, text=True)
                times.append(time.perf_counter() - start)
            return statistics.median(times), result

        wall([script, "check"], repo, 1)  # warm the page cache and lark's grammar cache
        check_s, result = timed(forget_staged)
        cold_s, _ = timed(forget_all)
        bare_s, _ = wall([sys.executable, "-c", "pass"], repo, args.repeat)
        torch_s, _ = wall([sys.executable, "-c", "import torch"], repo, max(1, args.repeat // 2))
    print(result.stdout.strip() or result.stderr.strip())
    print(f"specsurgery check (five.spec -> five_next change, whole process): {check_s:.2f} s "
          f"(median of {args.repeat}; the staged text parsed, HEAD's read from the hook's cache as after "
          f"any commit made through the hook; requirement: within 1 s)")
    print(f"  with no cache at all (both versions parsed): {cold_s:.2f} s")
    print(f"baselines in the same run: bare python {bare_s:.2f} s ({check_s / bare_s:.1f}x), "
          f"python -c 'import torch' {torch_s:.2f} s (check / import torch = {check_s / torch_s:.2f})")


if __name__ == "__main__":
    main()
