"""Crash test: `specsurgery build` killed (SIGKILL) at random moments of a surgery.

The model has ~25M parameters (a 2048-unit LSTM: a ~100 MB checkpoint), so the
surgery's writes take a noticeable time. After one fresh build the spec gains a
feature, and build is started and killed again and again. After every kill
`models/big.safetensors` must be present and whole - byte for byte the old
checkpoint or the finished new one, `specsurgery inspect` accepts it, its
embedded spec is the old or the new canonical text, every tensor reads - and
`models/history/` never holds a torn file either. Leftover temporary files are
listed; the next build must tolerate them, and a final build completes and
verifies.

Kill moments (fixed seed): half the rounds at uniform(0, T) after the start,
T the measured duration of one whole surgery build; the other half at
uniform(0, T - t_w) after the build's first write to models/ (t_w measured), so
that the writing phase, not only start-up, is hit often.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from gitrepo_helpers import base_env, make_repo, run, sha256, specsurgery_cmd, write

pytestmark = pytest.mark.slow

SEED = 20240611
ROUNDS = int(os.environ.get("SPECSURGERY_CRASH_ROUNDS", "16"))

OLD = textwrap.dedent("""\
    schema s {
      vocab heroes = [axe, bane]
      group hero {
        health: float
        mana: float
        hero_id: category(heroes)
      }
    }

    model big(obs: s) {
      he = embed(obs.hero.hero_id, 16)
      h = relu(linear(concat(obs.hero, he), 1024))
      core = lstm(h, 2048)
      out a = linear(core, 8)
    }
""")
NEW = OLD.replace("    mana: float\n", "    mana: float\n    level: int\n")
# he 2x16 + h 1024x18+1024 + lstm 8192x1024 + 8192x2048 + 2x8192 + a 8x2048+8
OLD_PARAMS = 32 + 1024 * 18 + 1024 + 8192 * 1024 + 8192 * 2048 + 2 * 8192 + 8 * 2048 + 8
# verification on a few states keeps a round short; the point here is the writes
PYPROJECT = '[project]\nname = "crash"\nversion = "0"\n\n[tool.specsurgery]\nverify_states = 10\n'

TARGET = "big.safetensors"
LEFTOVER_PATTERNS = [  # what a killed build may leave behind (never at the final path)
    re.compile(r"\.big\.safetensors\.staged"),                    # staged, complete, not yet verified/renamed
    re.compile(r"\.big\.safetensors\.[^/]+\.tmp"),               # a fresh checkpoint, half written
    re.compile(r"\.\.big\.safetensors\.staged\.[^/]+\.tmp"),     # apply's atomic writer, half written
    re.compile(r"history/big-[0-9a-f]{12}\.safetensors\.tmp"),   # the history link before its rename
    re.compile(r"history/\.big-[0-9a-f]{12}\.safetensors\.[^/]+\.tmp"),  # history copied (no hard links)
]


def inspect_in_process(path: Path) -> dict:
    """`specsurgery inspect --json PATH`, run through the CLI's main() (same code as the console script)."""
    from specsurgery.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["inspect", "--json", str(path)])
    assert rc == 0, f"inspect failed on {path} (exit {rc}): {err.getvalue()}"
    return json.loads(out.getvalue())


def read_every_tensor(path: Path) -> int:
    """Read every tensor with safetensors; returns the number of elements read."""
    from safetensors import safe_open

    total = 0
    with safe_open(str(path), framework="numpy") as f:
        for name in f.keys():
            array = f.get_tensor(name)
            assert array.dtype.name == "float32", (name, array.dtype)
            total += array.size
    return total


_DIGESTS: dict[tuple, str] = {}


def digest(path: Path) -> str:
    """sha256 of a file, remembered by (inode, size, mtime): a file replaced by rename gets a new inode."""
    st = path.stat()
    key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = sha256(path)
    return _DIGESTS[key]


def listing(models: Path) -> set[str]:
    names = set()
    for folder in (models, models / "history"):
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(folder):
                names.add(os.path.relpath(entry.path, models))
    return names


def leftovers(models: Path) -> list[str]:
    return sorted(n for n in listing(models)
                  if n not in (TARGET, "history") and not re.fullmatch(r"history/big-[0-9a-f]{12}\.safetensors", n))


class Build:
    """`specsurgery build` as a child process that can be killed."""

    def __init__(self, root: Path, log: Path, args: tuple[str, ...] = ("build",)):
        self.log = open(log, "w")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(specsurgery_cmd() + list(args), cwd=root, env=base_env(), stdout=self.log,
                                     stderr=subprocess.STDOUT)

    def wait_first_write(self, models: Path, before: set[str]) -> float | None:
        """Seconds from the start to the first change under models/ (None: exited first)."""
        while self.proc.poll() is None:
            if listing(models) != before:
                return time.monotonic() - self.started
            time.sleep(0.002)
        return None

    def kill_at(self, moment: float) -> bool:
        """SIGKILL at `moment` seconds after the start; True when the kill is what
        ended it (a build that exits between the last look and the signal
        was not killed: the signal reaches a process already done)."""
        while self.proc.poll() is None and time.monotonic() - self.started < moment:
            time.sleep(min(0.005, max(0.0, moment - (time.monotonic() - self.started))))
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=120)
        self.log.close()
        return self.proc.returncode == -signal.SIGKILL


@pytest.fixture(scope="module")
def crash_project(tmp_path_factory):
    root = make_repo(tmp_path_factory.mktemp("crash") / "proj", {"pyproject.toml": PYPROJECT, "specs/big.spec": OLD})
    result = run("build", cwd=root)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[2].split()[:3] == ["big", f"{OLD_PARAMS:,}", "built"], result.stdout
    return root


def test_killed_builds_never_leave_a_torn_checkpoint(crash_project, tmp_path):
    root = crash_project
    models = root / "models"
    target = models / TARGET
    pristine = tmp_path / "old.safetensors"
    shutil.copyfile(target, pristine)
    old_sha = sha256(pristine)
    old_info = inspect_in_process(pristine)
    assert old_info["total"] == OLD_PARAMS
    assert target.stat().st_size > 90_000_000

    def restore_old() -> None:
        """Back to the state before the surgery: the old checkpoint, no history."""
        staging = models / ".restore.tmp"
        shutil.copyfile(pristine, staging)
        os.replace(staging, target)
        shutil.rmtree(models / "history", ignore_errors=True)

    write(root, {"specs/big.spec": NEW})

    # one whole surgery, measured
    before = listing(models)
    build = Build(root, tmp_path / "calibrate.log")
    first_write = build.wait_first_write(models, before)
    assert build.proc.wait(timeout=600) == 0, (tmp_path / "calibrate.log").read_text()
    duration = time.monotonic() - build.started
    build.log.close()
    output = (tmp_path / "calibrate.log").read_text()
    assert "operated" in output and "verified on 10 random states" in output, output
    assert first_write is not None and 0 < first_write < duration
    new_sha = sha256(target)
    new_info = inspect_in_process(target)
    assert new_info["spec"] != old_info["spec"]
    print(f"\none surgery build: {duration:.1f}s, first write to models/ after {first_write:.1f}s")
    restore_old()

    rng = random.Random(SEED)
    outcomes = []
    seen_leftovers: set[str] = set()
    for i in range(ROUNDS):
        log = tmp_path / f"round{i}.log"
        before = listing(models)
        build = Build(root, log)
        if i % 2 == 0:
            mode, moment = "any", rng.uniform(0, duration)
        else:
            at = build.wait_first_write(models, before)
            mode, moment = "writing", (at or 0.0) + rng.uniform(0, max(0.0, duration - first_write))
        killed = build.kill_at(moment)
        rc = build.proc.returncode
        assert rc == (-signal.SIGKILL if killed else 0), f"round {i}: exit {rc}\n{log.read_text()}"

        # the final path: present and whole, the old checkpoint or the finished new one
        assert target.exists(), f"round {i}: {target} is missing after a kill at {moment:.2f}s"
        info = inspect_in_process(target)
        assert info["spec"] in (old_info["spec"], new_info["spec"]), f"round {i}: unexpected embedded spec"
        assert read_every_tensor(target) == info["total"]
        state = "old" if info["spec"] == old_info["spec"] else "new"
        assert digest(target) == (old_sha if state == "old" else new_sha), f"round {i}: {state} spec but other bytes"
        # history never holds a torn file either
        for name in listing(models):
            if re.fullmatch(r"history/big-[0-9a-f]{12}\.safetensors", name):
                assert digest(models / name) == old_sha, f"round {i}: {name} is not the old checkpoint"
        left = leftovers(models)
        unknown = [n for n in left if not any(p.fullmatch(n) for p in LEFTOVER_PATTERNS)]
        assert not unknown, f"round {i}: unexpected files in models/: {unknown}"
        seen_leftovers.update(left)
        outcomes.append((mode, round(moment, 2), "killed" if killed else "finished", state, len(left)))
        if state == "new":
            restore_old()  # so the next round has a surgery to do

    print("rounds (mode, kill moment s, run, checkpoint after, leftovers):")
    for row in outcomes:
        print("  ", row)
    assert sum(1 for o in outcomes if o[2] == "killed") >= ROUNDS // 2, outcomes

    # whatever was left behind, the next build copes and completes the surgery
    left_before = leftovers(models)
    print(f"left before the final build: {left_before}")
    assert sha256(target) == old_sha
    result = run("build", cwd=root)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "operated" in result.stdout and "verified on 10 random states" in result.stdout, result.stdout
    assert sha256(target) == new_sha
    assert inspect_in_process(target)["spec"] == new_info["spec"]
    (kept,) = [n for n in listing(models) if re.fullmatch(r"history/big-[0-9a-f]{12}\.safetensors", n)]
    assert sha256(models / kept) == old_sha
    result = run("verify", "--states", "10", kept, TARGET, cwd=models)
    assert result.returncode == 0, result.stdout + result.stderr

    left_after = leftovers(models)
    print(f"left after the final build: {left_after} (seen during the rounds: {sorted(seen_leftovers)})")
    assert left_after == [], f"the final build did not sweep what killed builds left: {left_after}"
    result = run("build", cwd=root)
    assert result.returncode == 0 and result.stdout.splitlines()[2].split()[2] == "unchanged", result.stdout


def whole_or_absent(path: Path, spec: str) -> str:
    """'absent', or 'whole' after checking the file is a complete checkpoint of `spec`."""
    if not path.exists():
        return "absent"
    info = inspect_in_process(path)
    assert info["spec"] == spec, f"{path} holds another spec"
    assert read_every_tensor(path) == info["total"]
    return "whole"


def test_every_other_write_path_killed_leaves_old_or_new_and_the_sweep_cleans_up(tmp_path):
    """A fresh build, `apply -o`, `plan -o` and a build sweeping leftovers, each
    killed at random moments: the file each writes is absent or whole (never
    torn), nothing but the documented temporary files is left, and the next
    build sweeps every one of them."""
    root = make_repo(tmp_path / "proj", {"pyproject.toml": PYPROJECT, "specs/big.spec": OLD, "new.spec": NEW})
    models = root / "models"
    rng = random.Random(SEED + 1)

    # a fresh build, killed: models/big.safetensors is absent or whole
    log = tmp_path / "fresh.log"
    build = Build(root, log)
    assert build.proc.wait(timeout=600) == 0, log.read_text()
    duration = time.monotonic() - build.started
    build.log.close()
    old_spec = inspect_in_process(models / TARGET)["spec"]
    old_sha = sha256(models / TARGET)
    states = []
    for i in range(max(4, ROUNDS // 2)):
        (models / TARGET).unlink(missing_ok=True)
        build = Build(root, tmp_path / f"fresh{i}.log")
        killed = build.kill_at(rng.uniform(0, duration))
        state = whole_or_absent(models / TARGET, old_spec)
        if state == "whole":
            assert sha256(models / TARGET) == old_sha  # the seeded init: the same bytes every time
        left = leftovers(models)
        assert all(LEFTOVER_PATTERNS[1].fullmatch(n) for n in left), left
        states.append((killed, state, len(left)))
    print(f"fresh builds (killed, checkpoint, leftovers): {states}")
    result = run("build", cwd=root)
    assert result.returncode == 0, result.stdout + result.stderr
    assert sha256(models / TARGET) == old_sha and leftovers(models) == []

    # apply -o and plan -o, killed: the output is absent or whole
    for args, out in ((("apply", f"models/{TARGET}", "new.spec", "-o", "applied.safetensors"), "applied.safetensors"),
                      (("plan", f"models/{TARGET}", "new.spec", "-o", "plan.json"), "plan.json")):
        log = tmp_path / "calibrate.log"
        run_ = Build(root, log, args)
        assert run_.proc.wait(timeout=600) == 0, log.read_text()
        duration = time.monotonic() - run_.started
        run_.log.close()
        finished = (root / out).read_bytes() if out.endswith(".json") else sha256(root / out)
        for i in range(max(4, ROUNDS // 2)):
            (root / out).unlink(missing_ok=True)
            run_ = Build(root, tmp_path / f"{args[0]}{i}.log", args)
            run_.kill_at(rng.uniform(0, duration))
            if (root / out).exists():
                got = (root / out).read_bytes() if out.endswith(".json") else sha256(root / out)
                assert got == finished, f"{out} is torn"
            strays = [n for n in os.listdir(root) if n.startswith(f".{out}.")]
            assert all(re.fullmatch(rf"\.{re.escape(out)}\.[^/]+\.tmp", n) for n in strays), strays
            for n in strays:  # outside models/, no build sweeps them: they are what a kill leaves, named so
                os.unlink(root / n)
        (root / out).unlink(missing_ok=True)

    # the sweep itself, killed: whatever it had not removed yet, the next build removes
    for i in range(4):
        planted = [".big.safetensors.staged", "..big.safetensors.staged.ab12.tmp", ".big.safetensors.cd34.tmp",
                   "history/big-0123456789ab.safetensors.tmp", "history/.big-0123456789ab.safetensors.ef56.tmp"]
        (models / "history").mkdir(exist_ok=True)
        for name in planted:
            (models / name).write_bytes(os.urandom(1 << 16))
        build = Build(root, tmp_path / f"sweep{i}.log")
        build.kill_at(rng.uniform(0, 1.0))
        assert sha256(models / TARGET) == old_sha
        assert set(leftovers(models)) <= set(planted)
    result = run("build", cwd=root)
    assert result.returncode == 0, result.stdout + result.stderr
    assert leftovers(models) == [] and sha256(models / TARGET) == old_sha
