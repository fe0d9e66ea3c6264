"""Fuzz: mutated specs, corrupt checkpoints and doctored plans, through the commands.

For every input, whatever it is:
  * the exit status is 0, 1 or 2 (never 70, an internal error);
  * no traceback, and a failure says one message whose first line names the
    file (`x.spec:LINE:COL: error:` for a spec's own lines);
  * a failing command writes nothing and changes nothing;
  * it ends: each run is guarded by an alarm (a hang guard, far above the
    milliseconds a run takes).

The commands run in this process through cli.main (the console script's own
code), which is what lets hypothesis try hundreds of inputs in seconds. The
slow variants draw many more. Every run draws the same inputs (conftest.py);
SPECSURGERY_EXPLORE=1 draws fresh ones (with --hypothesis-seed=N, run N's).
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import re
import signal
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from test_hostile import SMALL, small_checkpoint

FAST = settings(max_examples=40, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
SLOW = settings(max_examples=600, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
HANG_GUARD_S = 60

NEW = SMALL.replace("    y: float\n", "    y: float\n    z: float\n")


def run_main(args: list[str], cwd: Path) -> tuple[int, str, str]:
    from specsurgery.cli import main

    def hung(signum, frame):
        raise AssertionError(f"specsurgery {' '.join(args)} still running after {HANG_GUARD_S} s")

    out, err = io.StringIO(), io.StringIO()
    old = os.getcwd()
    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(HANG_GUARD_S)
    try:
        os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(args)
            except SystemExit as e:  # argparse
                code = e.code
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        os.chdir(old)
    return code, out.getvalue(), err.getvalue()


def listing(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def check_run(args: list[str], cwd: Path, names: tuple[str, ...], writes: str | None = None) -> int:
    """Run; assert the promises; return the exit status."""
    before = listing(cwd)
    code, out, err = run_main(args, cwd)
    assert code in (0, 1, 2), f"exit {code}: {err}"
    assert "Traceback" not in err and "internal error" not in err, err
    if code == 0:
        return code
    lines = err.splitlines()
    assert lines, f"exit {code} with no message"
    assert out == "", f"a failure printed on stdout: {out!r}"
    if code == 1:
        assert lines[0].startswith(tuple(f"{n}:" for n in names)), lines[0]
        for i, line in enumerate(lines):  # a source line and its caret: the message above has line and column
            if re.fullmatch(r"\s*\^+", line):
                assert re.match(r"^\S+:\d+:\d+: error: ", lines[i - 2]), f"no line and column: {lines[i - 2]}"
    after = listing(cwd)
    assert after == before, f"a failing command changed the folder: {set(after) ^ set(before) or 'contents'}"
    return code


# ---------------------------------------------------------------------------
# mutated specs

PIECES = ["{", "}", "(", ")", "[", "]", ",", ":", "=", ".", '"', "#", "\n", "\t", "\r\n", "\r", "\x00", "\x0c",
          "\x1b[31m", "\ufeff", "\u202e", "é", "-", "1" * 30, "9" * 5000, "use", "was", "as", "out", "model",
          "schema", "group", "vocab", "linear(", "relu(" * 150, "embed(", "concat(", "float", "int", "bool",
          "category(", "lstm(", "maxpool(", "add(", "obs.g", "obs.g.x", "2147483648", "0", "-1", "1048577",
          "bias=false", "bias=3", "x", "y", " ", "\n" * 500, 'use "/dev/zero"\n', 'use "a.spec"\n',
          'use "../../../../etc/passwd"\n', "[1000000]"]


@st.composite
def mutated_text(draw, base: str) -> str:
    text = base
    for _ in range(draw(st.integers(1, 6))):
        pos = draw(st.integers(0, len(text)))
        kind = draw(st.sampled_from(["insert", "delete", "replace", "duplicate", "swap"]))
        if kind == "insert":
            text = text[:pos] + draw(st.sampled_from(PIECES)) + text[pos:]
        elif kind == "delete":
            text = text[:pos] + text[pos + draw(st.integers(1, 12)):]
        elif kind == "replace":
            text = text[:pos] + draw(st.sampled_from(PIECES)) + text[pos + draw(st.integers(1, 6)):]
        else:
            lines = text.split("\n")
            i, j = draw(st.integers(0, len(lines) - 1)), draw(st.integers(0, len(lines) - 1))
            if kind == "duplicate":
                lines.insert(j, lines[i])
            else:
                lines[i], lines[j] = lines[j], lines[i]
            text = "\n".join(lines)
    return text


@st.composite
def spec_bytes(draw) -> bytes:
    data = draw(mutated_text(draw(st.sampled_from([SMALL, NEW])))).encode("utf-8", "surrogatepass")
    if draw(st.booleans()) and data:  # a byte that is not UTF-8
        pos = draw(st.integers(0, len(data)))
        data = data[:pos] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80"])) + data[pos:]
    return data


@pytest.fixture()
def folder(tmp_path):
    (tmp_path / "a.spec").write_text(SMALL)
    return tmp_path


def spec_case(folder: Path, data: bytes) -> None:
    (folder / "x.spec").write_bytes(data)
    for args in (["schema", "x.spec"], ["map", "x.spec"], ["plan", "a.spec", "x.spec"], ["plan", "x.spec", "a.spec"]):
        check_run(args, folder, ("x.spec", "a.spec"))


@FAST
@given(data=spec_bytes())
def test_mutated_specs(folder, data):
    spec_case(folder, data)


@pytest.mark.slow
@SLOW
@given(data=spec_bytes())
def test_mutated_specs_long(folder, data):
    spec_case(folder, data)


# ---------------------------------------------------------------------------
# corrupt checkpoints


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("fuzz") / "c.safetensors"
    small_checkpoint(path)
    return path.read_bytes()


def _values(tree, path=()):
    yield path, tree
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _values(v, path + (k,))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from _values(v, path + (i,))


ODD_VALUES = [None, True, -1, 0, 1, 3, 2 ** 31, 2 ** 64, 10 ** 400, 1e308, float("inf"), "", "F32", "F16", "I64",
              "x" * 300, [], [1], [[[[]]]], {}, {"a": 1}, "m", "\x1b[2J", "use \"/etc/passwd\"\n"]


@st.composite
def doctored_json(draw, tree):
    """`tree` with a few values replaced, keys dropped, list entries repeated or dropped."""
    tree = json.loads(json.dumps(tree))
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p, _ in _values(tree) if p]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = tree
        for key in path[:-1]:
            parent = parent[key]
        key = path[-1]
        kind = draw(st.sampled_from(["value", "value", "drop", "repeat", "spec"]))
        if kind == "value":
            parent[key] = copy.deepcopy(draw(st.sampled_from(ODD_VALUES)))  # never the shared object
        elif kind == "drop":
            del parent[key]
        elif kind == "repeat" and isinstance(parent, list):
            parent.insert(key, json.loads(json.dumps(parent[key])))
        elif isinstance(parent[key], str) and "\n" in parent[key]:  # an embedded spec: mutate its text
            parent[key] = draw(mutated_text(parent[key]))
    return tree


@st.composite
def checkpoint_bytes(draw, original: bytes) -> bytes:
    (n,) = struct.unpack("<Q", original[:8])
    header, data = json.loads(original[8:8 + n]), original[8 + n:]
    kind = draw(st.sampled_from(["header", "header", "header", "flip", "cut", "append", "length"]))
    if kind == "header":
        raw = json.dumps(draw(doctored_json(header))).encode()
        if draw(st.booleans()):
            raw = b"[" * draw(st.integers(1, 3000)) + raw
        return struct.pack("<Q", len(raw)) + raw + data
    if kind == "flip":
        pos = draw(st.integers(0, len(original) - 1))
        return original[:pos] + bytes([original[pos] ^ draw(st.integers(1, 255))]) + original[pos + 1:]
    if kind == "cut":
        return original[:draw(st.integers(0, len(original) - 1))]
    if kind == "append":
        return original + draw(st.binary(min_size=1, max_size=64))
    return struct.pack("<Q", draw(st.integers(0, 2 ** 64 - 1))) + original[8:]


def checkpoint_case(folder: Path, data: bytes) -> None:
    (folder / "c.safetensors").write_bytes(data)
    check_run(["inspect", "c.safetensors"], folder, ("c.safetensors",))
    check_run(["plan", "c.safetensors", "a.spec"], folder, ("c.safetensors", "a.spec"))
    code = check_run(["apply", "c.safetensors", "a.spec", "-o", "out.safetensors"], folder, ("c.safetensors", "a.spec"))
    if code == 0:
        assert check_run(["inspect", "out.safetensors"], folder, ("out.safetensors",)) == 0
        os.unlink(folder / "out.safetensors")


@FAST
@given(data=st.data())
def test_corrupt_checkpoints(folder, checkpoint, one_thread, data):
    checkpoint_case(folder, data.draw(checkpoint_bytes(checkpoint)))


@pytest.mark.slow
@SLOW
@given(data=st.data())
def test_corrupt_checkpoints_long(folder, checkpoint, one_thread, data):
    checkpoint_case(folder, data.draw(checkpoint_bytes(checkpoint)))


# ---------------------------------------------------------------------------
# doctored plans


@pytest.fixture(scope="module")
def plan_json(tmp_path_factory, checkpoint) -> dict:
    folder = tmp_path_factory.mktemp("plan")
    (folder / "a.spec").write_text(SMALL)
    (folder / "b.spec").write_text(NEW)
    assert run_main(["plan", "a.spec", "b.spec", "-o", "p.json"], folder)[0] == 0
    return json.loads((folder / "p.json").read_text())


def plan_case(folder: Path, checkpoint: bytes, plan: dict | bytes) -> None:
    (folder / "c.safetensors").write_bytes(checkpoint)
    (folder / "b.spec").write_text(NEW)
    (folder / "p.json").write_bytes(plan if isinstance(plan, bytes) else json.dumps(plan).encode())
    code = check_run(["apply", "c.safetensors", "b.spec", "--plan", "p.json", "-o", "out.safetensors"], folder,
                     ("p.json", "c.safetensors", "b.spec", "out.safetensors"))
    if code == 0:
        assert check_run(["inspect", "out.safetensors"], folder, ("out.safetensors",)) == 0
        os.unlink(folder / "out.safetensors")


@st.composite
def plans(draw, plan: dict):
    if draw(st.integers(0, 9)) == 0:  # not even JSON, or nested past any parser's stack
        return draw(st.sampled_from([b"", b"{", b"\xff\xfe", b"[" * 5_000 + b"]" * 5_000, b"null", b"1e400"]))
    return draw(doctored_json(plan))


@FAST
@given(data=st.data())
def test_doctored_plans(folder, checkpoint, plan_json, one_thread, data):
    plan_case(folder, checkpoint, data.draw(plans(plan_json)))


@pytest.mark.slow
@SLOW
@given(data=st.data())
def test_doctored_plans_long(folder, checkpoint, plan_json, one_thread, data):
    plan_case(folder, checkpoint, data.draw(plans(plan_json)))
