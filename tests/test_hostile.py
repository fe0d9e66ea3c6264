"""Hostile input: nothing read from a file runs code, reaches outside itself or
drives the terminal.

* the parser's tables are shipped as JSON: nothing is ever unpickled, not even
  through lark's cache in the temp folder (which any local user can plant);
* `git:REV:path` never hands git an option (`--output=FILE` would write FILE);
* a checkpoint's embedded spec may not `use` any file (it would print the
  file, or hang on a FIFO, or read /dev/zero for ever);
* control characters read from files are printed escaped.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from gitrepo_helpers import base_env, make_repo, specsurgery_cmd, specsurgery_python

SMALL = textwrap.dedent("""\
    schema s {
      group g {
        x: float
        y: float
      }
    }

    model m(obs: s) {
      out h = linear(obs.g, 2)
    }
    """)

SECRET = "TOPSECRET-4f1d"


def run(args: list[str], cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    result = subprocess.run(specsurgery_cmd() + args, cwd=cwd, env=base_env(), capture_output=True, text=True,
                            timeout=timeout)
    assert "Traceback" not in result.stderr, result.stderr
    return result


def run_many(jobs: dict[str, tuple[list[str], Path]], timeout: int = 120) -> dict[str, subprocess.CompletedProcess]:
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {k: pool.submit(run, args, cwd, timeout) for k, (args, cwd) in jobs.items()}
        return {k: f.result() for k, f in futures.items()}


def small_checkpoint(path: Path, spec_text: str | None = None, **metadata: str) -> None:
    """A real checkpoint of SMALL, its embedded spec text and metadata replaced as given."""
    import torch

    from specsurgery.checkpoint import write_checkpoint
    from specsurgery.ir import build_graph
    from specsurgery.spec.canonical import canonical
    from specsurgery.spec.load import load_text

    spec = load_text(SMALL, "small.spec").model("m")
    graph = build_graph(spec)
    shapes = {name: tuple(node.params[local].shape) for name, (node, local) in graph.parameters().items()}
    write_checkpoint(str(path), canonical(spec) if spec_text is None else spec_text, "m", shapes,
                     ((name, torch.zeros(shape)) for name, shape in shapes.items()), extra_metadata=metadata)


# ---------------------------------------------------------------------------
# nothing is unpickled


NO_PICKLE = textwrap.dedent("""\
    import pickle, sys
    def refuse(*args, **kwargs):
        raise SystemExit("pickle was asked to load something")
    pickle.load = pickle.loads = refuse
    pickle.Unpickler = refuse
    from specsurgery.cli import main
    sys.exit(main(sys.argv[1:]))
    """)


def test_parsing_never_unpickles_and_leaves_no_cache_in_the_temp_folder(tmp_path):
    (tmp_path / "small.spec").write_text(SMALL)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = base_env(TMPDIR=str(tmp), TMP=str(tmp), TEMP=str(tmp))
    for _ in range(2):  # lark's cache was written by the first run and unpickled by the second
        result = subprocess.run([specsurgery_python(), "-c", NO_PICKLE, "schema", "small.spec"], cwd=tmp_path,
                                env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["properties"]["g"]["required"] == ["x", "y"]
    assert os.listdir(tmp) == []


def test_shipped_parser_tables_are_those_of_the_grammar():
    import lark

    from specsurgery.spec import parse

    stored = json.loads(parse.TABLES.read_text(encoding="utf-8"))
    assert stored["key"]["grammar_sha256"] == parse._grammar_key(parse.grammar_text())["grammar_sha256"], \
        "grammar/spec.lark changed: run `python -m specsurgery.spec.parse` to rebuild the tables"
    if stored["key"]["lark"] != lark.__version__:
        pytest.skip(f"tables made by lark {stored['key']['lark']}, this is lark {lark.__version__} (it builds its own)")
    shipped = parse._parser()
    built = lark.Lark(parse.grammar_text(), transformer=parse._BUILDER, **parse._OPTIONS)
    assert type(shipped.parser).__name__ == type(built.parser).__name__
    root = Path(__file__).resolve().parents[1]
    for name in ("policy.spec", "five.spec", "five_next.spec"):
        text = (root / "specs" / name).read_text()
        assert shipped.parse(text).model_dump() == built.parse(text).model_dump()  # spans too


# ---------------------------------------------------------------------------
# git:REV:path


def test_a_git_revision_is_never_an_option(tmp_path):
    repo = make_repo(tmp_path / "repo", {"x.spec": SMALL})
    jobs = {
        "output": (["plan", "git:--output=written.txt:x.spec", "x.spec"], repo),
        "dash": (["plan", "x.spec", "git:-p:x.spec"], repo),
        "newline": (["plan", "git:HEAD\n--output=w2.txt:x.spec", "x.spec"], repo),
        "apply": (["apply", "nope.safetensors", "git:--output=w3.txt:x.spec", "-o", "out.safetensors"], repo),
    }
    results = run_many(jobs)
    assert results["output"].returncode == 1
    assert results["output"].stderr == "git:--output=written.txt:x.spec: error: '--output=written.txt' is not a git revision\n"
    assert results["dash"].stderr == "git:-p:x.spec: error: '-p' is not a git revision\n"
    assert results["newline"].stderr == "git:HEAD\n--output=w2.txt:x.spec: error: 'HEAD\\n--output=w2.txt' is not a git revision\n"
    assert results["apply"].returncode == 1
    assert sorted(os.listdir(repo)) == [".git", "x.spec"]
    ok = run(["plan", "git:HEAD:x.spec", "x.spec"], repo)  # a real revision still works
    assert ok.returncode == 0, ok.stderr


# ---------------------------------------------------------------------------
# a checkpoint's spec may not use files


@pytest.fixture(scope="module")
def using_checkpoints(tmp_path_factory):
    """Checkpoints whose embedded spec `use`s a secret, the environment, /dev/zero and a FIFO."""
    from specsurgery.spec.canonical import canonical
    from specsurgery.spec.load import load_text

    root = tmp_path_factory.mktemp("use")
    (root / "secret.txt").write_text(f"schema {SECRET} {{\n")
    os.mkfifo(root / "fifo")
    (root / "small.spec").write_text(SMALL)
    text = canonical(load_text(SMALL, "small.spec").model("m"))
    targets = {"secret": "secret.txt", "environ": "/proc/self/environ", "zero": "/dev/zero", "fifo": "fifo"}
    for key, target in targets.items():
        small_checkpoint(root / f"{key}.safetensors", f'use "{target}"\n' + text)
    return root, targets


COMMANDS_READING_A_CHECKPOINT = {
    "inspect": lambda c: ["inspect", c],
    "plan": lambda c: ["plan", c, "small.spec"],
    "apply": lambda c: ["apply", c, "small.spec", "-o", "out.safetensors"],
    "verify": lambda c: ["verify", c, c, "--states", "2"],
}


@pytest.mark.parametrize("target", ["secret", "environ", "zero", "fifo"])
def test_an_embedded_spec_may_not_use_files(using_checkpoints, target):
    root, targets = using_checkpoints
    ckpt = f"{target}.safetensors"
    before = sorted(os.listdir(root))
    results = run_many({name: (args(ckpt), root) for name, args in COMMANDS_READING_A_CHECKPOINT.items()}, timeout=60)
    for name, result in results.items():
        assert result.returncode == 1, (name, result.stderr)
        assert result.stdout == ""
        lines = result.stderr.splitlines()
        assert lines[0] == f"{ckpt}: error: the embedded spec does not load:", (name, result.stderr)
        assert lines[1] == (f"{ckpt}#spec:1:5: error: cannot use {targets[target]!r}: "
                            "a checkpoint's embedded spec may not use other files"), (name, result.stderr)
        assert SECRET not in result.stderr and "PATH=" not in result.stderr
    assert sorted(os.listdir(root)) == before


def test_build_refuses_a_checkpoint_whose_spec_uses_a_file(using_checkpoints, tmp_path):
    root, _ = using_checkpoints
    (tmp_path / "specs").mkdir()
    (tmp_path / "specs" / "m.spec").write_text(SMALL.replace("linear(obs.g, 2)", "linear(obs.g, 3)"))
    (tmp_path / "models").mkdir()
    shutil.copy(root / "secret.txt", tmp_path / "models" / "secret.txt")
    shutil.copy(root / "secret.safetensors", tmp_path / "models" / "m.safetensors")
    result = run(["build"], tmp_path)
    assert result.returncode == 1
    assert SECRET not in result.stdout + result.stderr
    assert "a checkpoint's embedded spec may not use other files" in result.stderr
    assert sorted(os.listdir(tmp_path / "models")) == ["m.safetensors", "secret.txt"]


# ---------------------------------------------------------------------------
# terminal escapes


def test_control_characters_from_files_are_printed_escaped(tmp_path):
    from specsurgery.spec.canonical import canonical
    from specsurgery.spec.load import load_text

    text = canonical(load_text(SMALL, "small.spec").model("m"))
    small_checkpoint(tmp_path / "version.safetensors", **{"specsurgery.version": "1\x1b]0;owned\x07\x1b[2J"})
    # an error on a line whose comment holds escapes: the message shows the line
    small_checkpoint(tmp_path / "line.safetensors", text.replace("{", "{ \x1b[31m # \u202e\r", 1))
    (tmp_path / "small.spec").write_text(SMALL)
    results = run_many({
        "inspect": (["inspect", "version.safetensors"], tmp_path),
        "line": (["inspect", "line.safetensors"], tmp_path),
        "apply": (["apply", "line.safetensors", "small.spec", "-o", "out.safetensors"], tmp_path),
    })
    for result in results.values():
        for stream in (result.stdout, result.stderr):
            assert not any(c in stream for c in "\x1b\x07\r\u202e"), repr(stream)
    assert results["inspect"].returncode == 0
    assert results["inspect"].stdout.splitlines()[0] == (
        "# version.safetensors: model m, written by specsurgery 1\\x1b]0;owned\\x07\\x1b[2J")
    for key in ("line", "apply"):
        assert results[key].stderr.splitlines()[1:4] == [
            "line.safetensors#spec:1:12: error: unexpected character '\\x1b' after '{'",
            "  schema s { \\x1b[31m # \\u202e",  # a CRLF line ending is not shown
            "             ^"]
    assert not (tmp_path / "out.safetensors").exists()


# ---------------------------------------------------------------------------
# files that are not regular files


def test_a_fifo_or_a_device_is_refused_without_hanging(tmp_path):
    os.mkfifo(tmp_path / "fifo.safetensors")
    os.mkfifo(tmp_path / "fifo.spec")
    os.symlink("/dev/zero", tmp_path / "zero.spec")
    results = run_many({
        "inspect": (["inspect", "fifo.safetensors"], tmp_path),
        "plan": (["plan", "fifo.safetensors", "fifo.safetensors"], tmp_path),
        "spec": (["schema", "fifo.spec"], tmp_path),
        "zero": (["schema", "zero.spec"], tmp_path),
    }, timeout=30)
    assert results["inspect"].stderr == "fifo.safetensors: error: not a regular file\n"
    assert results["plan"].stderr == "fifo.safetensors: error: not a regular file\n"
    assert results["spec"].stderr == "fifo.spec: error: not a regular file\n"
    assert results["zero"].stderr == "zero.spec: error: not a regular file\n"
    assert all(r.returncode == 1 for r in results.values())
