"""Every bad input: one clear message, a non-zero exit, no traceback, nothing half-written.

Each case runs the installed console script in a folder prepared for it, then
checks the exact first line of stderr, the exit code, that stdout is empty, and
that the folder holds exactly what it held before (no new, changed or temp files).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import struct
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional

import pytest

REPO = Path(__file__).resolve().parents[1]


def specsurgery_cmd() -> list[str]:
    exe = shutil.which("specsurgery", path=os.path.dirname(sys.executable)) or shutil.which("specsurgery")
    return [exe] if exe else [sys.executable, "-m", "specsurgery"]


def snapshot(root: Path) -> dict[str, str]:
    """Every file and folder below root (hidden ones too) with a hash of its content."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for d in dirs:
            out[os.path.relpath(os.path.join(folder, d), root) + "/"] = "dir"
        for f in files:
            path = os.path.join(folder, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "SPECSURGERY_DEBUG"}
    return subprocess.run(specsurgery_cmd() + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def run_untouched(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    before = snapshot(cwd)
    result = run(args, cwd)
    assert "Traceback" not in result.stderr, result.stderr
    assert snapshot(cwd) == before, "the command changed the folder"
    return result


def run_all(jobs: dict[str, tuple[list[str], Path]]) -> dict[str, subprocess.CompletedProcess]:
    """Run many cases at once (each in its own folder), checking each leaves its folder as it was."""
    with ThreadPoolExecutor(max_workers=min(8, 2 * (os.cpu_count() or 1))) as pool:
        futures = {key: pool.submit(_run_snapshotted, args, cwd) for key, (args, cwd) in jobs.items()}
        return {key: future.result() for key, future in futures.items()}


def _run_snapshotted(args: list[str], cwd: Path):
    before = snapshot(cwd)
    result = run(args, cwd)
    result.folder_unchanged = snapshot(cwd) == before
    return result


# ---------------------------------------------------------------------------
# fixtures: one real checkpoint (written in-process, it is faster than a build)


@pytest.fixture(scope="module")
def checkpoint_bytes(tmp_path_factory) -> bytes:
    from specsurgery.ir import build_graph
    from specsurgery.spec.load import load
    from specsurgery.workflow.build import write_fresh

    path = tmp_path_factory.mktemp("ckpt") / "policy.safetensors"
    write_fresh(build_graph(load([str(REPO / "specs" / "policy.spec")]).model("policy")), str(path))
    return path.read_bytes()


def make_project(root: Path) -> Path:
    (root / "specs").mkdir()
    shutil.copy(REPO / "specs" / "policy.spec", root / "specs" / "policy.spec")
    # no [tool.specsurgery]: the default folders; and no pyproject.toml above can leak in
    (root / "pyproject.toml").write_text('[project]\nname = "demo"\nversion = "0"\n')
    return root


@pytest.fixture()
def work(tmp_path) -> Path:
    return make_project(tmp_path)


def header_file(path: Path, header: dict, data: bytes = b"") -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def wrong_shape_checkpoint(path: Path, checkpoint_bytes: bytes) -> None:
    import torch

    from specsurgery.checkpoint import read_header, write_checkpoint

    real = path.parent / "real.safetensors"
    real.write_bytes(checkpoint_bytes)
    header = read_header(str(real))
    real.unlink()
    shapes = {name: info.shape for name, info in header.tensors.items()}
    shapes["hero_e.embed.weight"] = (5, 16)  # the spec's heroes vocab has 4 items
    write_checkpoint(str(path), header.spec_text, header.model_name, shapes,
                     ((name, torch.zeros(shape)) for name, shape in shapes.items()))


def safetensors_without_metadata(path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    save_file({"hero_e.embed.weight": torch.zeros(4, 16)}, str(path))


# name -> (setup(work, checkpoint_bytes), args, exit code, exact first line of stderr ({work} is the folder))
Setup = Optional[Callable[[Path, bytes], None]]
CASES: dict[str, tuple[Setup, list[str], int, str]] = {
    "build: missing spec file": (
        None, ["build", "specs/nope.spec"], 1,
        "specs/nope.spec: error: no such file or folder"),
    "build: spec with a syntax error": (
        lambda w, c: (w / "specs" / "policy.spec").write_text(
            "schema s {\n  group g { x: flot }\n}\n"),
        ["build"], 1,
        "{work}/specs/policy.spec:2:16: error: unknown type 'flot' for feature g.x"),
    "build: --out is a file": (
        lambda w, c: (w / "afile").write_text("not a folder\n"),
        ["build", "specs", "--out", "afile"], 1,
        "afile: error: cannot write checkpoints here: it is a file, not a folder"),
    "build: existing checkpoint is random bytes": (
        lambda w, c: ((w / "models").mkdir(), (w / "models" / "policy.safetensors").write_bytes(
            random.Random(1).randbytes(2048))),
        ["build"], 1,
        "{work}/models/policy.safetensors: error: not a valid checkpoint: the header length runs past the end of the file"),
    "inspect: missing checkpoint": (
        None, ["inspect", "nope.safetensors"], 1,
        "nope.safetensors: error: no such file"),
    "inspect --json: missing checkpoint": (
        None, ["inspect", "--json", "nope.safetensors"], 1,
        "nope.safetensors: error: no such file"),
    "inspect: truncated checkpoint (cut in half)": (
        lambda w, c: (w / "half.safetensors").write_bytes(c[: len(c) // 2]),
        ["inspect", "half.safetensors"], 1,
        "half.safetensors: error: not a valid checkpoint: tensor 'core.lstm.weight_hh' does not fit the file (truncated or corrupt)"),
    "inspect: checkpoint cut inside the length prefix": (
        lambda w, c: (w / "stub.safetensors").write_bytes(c[:5]),
        ["inspect", "stub.safetensors"], 1,
        "stub.safetensors: error: not a valid checkpoint: the file is shorter than a safetensors header"),
    "inspect: empty file": (
        lambda w, c: (w / "empty.safetensors").write_bytes(b""),
        ["inspect", "empty.safetensors"], 1,
        "empty.safetensors: error: not a valid checkpoint: the file is shorter than a safetensors header"),
    "inspect: random bytes": (
        lambda w, c: (w / "noise.bin").write_bytes(random.Random(0).randbytes(4096)),
        ["inspect", "noise.bin"], 1,
        "noise.bin: error: not a valid checkpoint: the header length runs past the end of the file"),
    "inspect: header is not JSON": (
        lambda w, c: (w / "garbled.safetensors").write_bytes(struct.pack("<Q", 16) + b"\xff{not json at all" + b"\0" * 8),
        ["inspect", "garbled.safetensors"], 1,
        "garbled.safetensors: error: not a valid checkpoint: the header is not JSON"),
    "inspect: safetensors file without specsurgery metadata": (
        lambda w, c: safetensors_without_metadata(w / "plain.safetensors"),
        ["inspect", "plain.safetensors"], 1,
        "plain.safetensors: error: this safetensors file has no embedded spec; it was not written by specsurgery"),
    "inspect: metadata values that are not strings": (
        lambda w, c: header_file(w / "meta.safetensors", {"__metadata__": {"specsurgery.spec": 3, "specsurgery.model": "policy"}}),
        ["inspect", "meta.safetensors"], 1,
        "meta.safetensors: error: not a valid checkpoint: the __metadata__ entry is not a table of strings"),
    "inspect: malformed tensor entry": (
        lambda w, c: header_file(w / "entry.safetensors", {"a": {"dtype": "F32", "shape": "ab", "data_offsets": [0, 8]}}, b"\0" * 8),
        ["inspect", "entry.safetensors"], 1,
        "entry.safetensors: error: not a valid checkpoint: tensor 'a' has a malformed entry"),
    "inspect: tensor shapes do not match the embedded spec": (
        lambda w, c: wrong_shape_checkpoint(w / "wrong.safetensors", c),
        ["inspect", "wrong.safetensors"], 1,
        "wrong.safetensors: error: the tensors do not match the embedded spec: "
        "hero_e.embed.weight has shape [5, 16], the spec says [4, 16]"),
    "inspect: a folder": (
        None, ["inspect", "specs"], 1,
        "specs: error: is a folder, not a checkpoint"),
    "schema: missing file": (
        None, ["schema", "nope.spec"], 1,
        "nope.spec: error: no such file"),
    "schema: a folder": (
        None, ["schema", "specs"], 1,
        "specs: error: is a folder, not a .spec file"),
    "schema: unknown --schema": (
        None, ["schema", "specs/policy.spec", "--schema", "nope"], 1,
        "specs/policy.spec: error: no schema 'nope' (schemas: dota)"),
}


# messages of more than one line (a spec error shows the line and a caret)
MULTILINE = {"build: spec with a syntax error"}
# `build` constructs the whole torch model before it finds it cannot write
SLOW = {"build: --out is a file"}


@pytest.fixture(scope="module")
def batch(tmp_path_factory, checkpoint_bytes) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """The fast cases of CASES and USAGE, run concurrently to keep the suite quick."""
    jobs, folders = {}, {}
    for key, (setup, args) in [*((c, (CASES[c][0], CASES[c][1])) for c in CASES if c not in SLOW),
                               *((f"usage: {c}", (None, USAGE[c][0])) for c in USAGE)]:
        folders[key] = make_project(tmp_path_factory.mktemp("case"))
        if setup is not None:
            setup(folders[key], checkpoint_bytes)
        jobs[key] = (args, folders[key])
    results = run_all(jobs)
    return {key: (results[key], folders[key]) for key in jobs}


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW else c for c in CASES])
def test_bad_input(case, request, checkpoint_bytes):
    setup, args, code, first_line = CASES[case]
    if case in SLOW:
        work = make_project(request.getfixturevalue("tmp_path"))
        if setup is not None:
            setup(work, checkpoint_bytes)
        result = run_untouched(args, work)
    else:
        result, work = request.getfixturevalue("batch")[case]
        assert "Traceback" not in result.stderr, result.stderr
        assert result.folder_unchanged, "the command changed the folder"
    assert result.returncode == code, result.stderr
    lines = result.stderr.splitlines()
    assert lines, "no message"
    assert lines[0] == first_line.format(work=work)
    if "--json" in args:  # the error as data on stdout too, with the same exit status
        data = json.loads(result.stdout)
        assert data["ok"] is False and data["exit"] == code
        file, _, message = first_line.format(work=work).partition(": error: ")
        assert data["errors"][0]["message"] == message and data["errors"][0]["file"] == file
    else:
        assert result.stdout == ""
    if case not in MULTILINE:  # a one-line message, said once
        assert len(lines) == 1, result.stderr


def test_schema_of_a_file_without_schemas(work):
    (work / "specs" / "empty.spec").write_text("# nothing here yet\n")
    result = run_untouched(["schema", "specs/empty.spec"], work)
    assert result.returncode == 1
    assert result.stderr.splitlines()[0] == "specs/empty.spec: error: no schema in this file"


def test_folder_without_specs_is_not_an_error(work):
    (work / "empty").mkdir()
    result = run_untouched(["build", "empty"], work)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "no models found\n"
    assert result.stderr == ""
    assert not (work / "models").exists()
    result = run_untouched(["build", "--json", "empty"], work)
    assert result.returncode == 0
    assert json.loads(result.stdout) == {"models": [], "exit": 0, "text": "no models found", "errors": ""}


# ---------------------------------------------------------------------------
# usage errors: argparse's usage line, then 'PROG: error: ...'; exit 2


USAGE: dict[str, tuple[list[str], str, str]] = {
    "unknown command": (
        ["frobnicate"], "usage: specsurgery [-h] [--version] COMMAND ...",
        "specsurgery: error: argument COMMAND: invalid choice: 'frobnicate' (choose from "),
    "no command": (
        [], "usage: specsurgery [-h] [--version] COMMAND ...",
        "specsurgery: error: the following arguments are required: COMMAND"),
    "inspect without a checkpoint": (
        ["inspect"], "usage: specsurgery inspect [-h] [--json] CHECKPOINT",
        "specsurgery inspect: error: the following arguments are required: CHECKPOINT"),
    "schema without a spec": (
        ["schema"], "usage: specsurgery schema [-h] [--json] [--schema NAME] SPEC",
        "specsurgery schema: error: the following arguments are required: SPEC"),
    "unknown option": (  # the command's own usage, not the top-level one
        ["inspect", "--frob", "x.safetensors"], "usage: specsurgery inspect [-h] [--json] CHECKPOINT",
        "specsurgery inspect: error: unrecognized arguments: --frob"),
    "plan without versions": (
        ["plan"], "usage: specsurgery plan [-h] [--json] [--model M] [-o plan.json] [--schema]",
        "specsurgery plan: error: plan needs OLD and NEW (or --schema)"),
    "bad option value": (
        ["build", "--seed", "x"], "usage: specsurgery build [-h] [--json] [--out DIR] [--dry-run] [--allow-lossy]",
        "specsurgery build: error: argument --seed: invalid seed value: 'x'"),
}


@pytest.mark.parametrize("case", list(USAGE))
def test_usage_error(case, batch):
    args, usage, message = USAGE[case]
    result, _ = batch[f"usage: {case}"]
    assert "Traceback" not in result.stderr, result.stderr
    assert result.folder_unchanged, "the command changed the folder"
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines[0] == usage
    assert lines[-1].startswith(message), lines[-1]
