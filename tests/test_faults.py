"""Faults and blowups: nothing is lost, nothing hangs, every failure is one clear message.

Lost data: links at a checkpoint's path, non-UTF-8 staged specs, two builds at
once, leftovers of killed builds, history after a failed surgery. Blowups:
widths and nesting beyond the documented limits, a backtracking pattern.
Internal errors: NUL bytes, deep JSON, full and read-only disks, folders named
as output files, seeds torch cannot take, a pyproject.toml that is not UTF-8.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import struct
import subprocess
import textwrap
from pathlib import Path

import pytest

from gitrepo_helpers import base_env, git, make_repo, specsurgery_cmd
from test_hostile import SMALL, run, run_many, small_checkpoint

WIDER = SMALL.replace("linear(obs.g, 2)", "linear(obs.g, 3)")


def project(root: Path, spec: str = SMALL) -> Path:
    (root / "specs").mkdir(parents=True)
    (root / "specs" / "m.spec").write_text(spec)
    (root / "pyproject.toml").write_text('[project]\nname = "demo"\nversion = "0"\n')
    return root


def files_under(root: Path) -> dict[str, bytes | str]:
    """Every entry below root: a file's bytes, a link's target."""
    out: dict[str, bytes | str] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, root)
            if os.path.islink(path):
                out[rel] = "-> " + os.readlink(path)
            elif os.path.isfile(path):
                out[rel] = Path(path).read_bytes()
            else:
                out[rel + "/"] = b""
    return out


def spec_error(text: str, path: str = "x.spec") -> str:
    from specsurgery.errors import SpecError
    from specsurgery.spec.load import load_text

    with pytest.raises(SpecError) as e:
        load_text(text, path)
    return e.value.render()


# ---------------------------------------------------------------------------
# lost data


@pytest.mark.parametrize("kind", ["dangling", "looping"])
def test_a_broken_link_at_the_checkpoint_path_is_not_replaced(tmp_path, kind):
    root = project(tmp_path)
    (root / "models").mkdir()
    link = root / "models" / "m.safetensors"
    if kind == "dangling":
        os.symlink("/nowhere/trained.safetensors", link)
    else:
        os.symlink("m.safetensors", link)
    before = files_under(root)
    result = run(["build"], root)
    assert result.returncode == 1
    why = "points to nothing ('/nowhere/trained.safetensors')" if kind == "dangling" else "loops ('m.safetensors')"
    assert result.stderr == f"{root}/models/m.safetensors: error: a symbolic link that {why}; fix it or remove it\n"
    assert files_under(root) == before


def test_a_link_at_the_checkpoint_path_is_followed_and_kept(tmp_path):
    root = project(tmp_path / "proj")
    (tmp_path / "store").mkdir()
    small_checkpoint(tmp_path / "store" / "trained.safetensors")
    (root / "models").mkdir()
    os.symlink(tmp_path / "store" / "trained.safetensors", root / "models" / "m.safetensors")
    (root / "specs" / "m.spec").write_text(WIDER)
    result = run(["build"], root)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[2].split()[2] == "operated"
    assert os.readlink(root / "models" / "m.safetensors") == str(tmp_path / "store" / "trained.safetensors")
    from specsurgery.checkpoint import read_header

    assert read_header(str(tmp_path / "store" / "trained.safetensors")).tensors["h.linear.weight"].shape == (3, 2)
    assert len(os.listdir(tmp_path / "store" / "history")) == 1  # the old one, beside the file it was


def test_check_refuses_a_staged_spec_that_is_not_utf8(tmp_path):
    repo = make_repo(tmp_path / "repo", {"specs/m.spec": SMALL})
    (repo / "specs" / "m.spec").write_bytes(SMALL.replace("y: float", "y\xe9: float").encode("latin-1"))
    git("add", "specs/m.spec", cwd=repo)
    result = run(["check"], repo)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == "specs/m.spec:4:6: error: not UTF-8 text (byte 0xe9: invalid continuation byte)\n"


def test_a_build_says_so_when_another_build_holds_the_folder(tmp_path):
    root = project(tmp_path)
    (root / "models").mkdir()
    small_checkpoint(root / "models" / "m.safetensors")
    (root / "specs" / "m.spec").write_text(WIDER)
    before = files_under(root)
    fd = os.open(root / "models", os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        result = run(["build"], root)
    finally:
        os.close(fd)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == (f"{root}/models: error: another specsurgery build is writing to this folder; "
                             "nothing was changed; run build again when it has finished\n")
    assert files_under(root) == before


def test_two_builds_at_once_one_operates_the_other_waits_its_turn_or_is_told(tmp_path):
    """Both start together on one folder: the checkpoint ends up carried over once,
    history holds the old one once, and the other build either found the work
    done (unchanged) or was told another build holds the folder."""
    root = project(tmp_path)
    (root / "models").mkdir()
    small_checkpoint(root / "models" / "m.safetensors")
    old = (root / "models" / "m.safetensors").read_bytes()
    (root / "specs" / "m.spec").write_text(WIDER)
    procs = [subprocess.Popen(specsurgery_cmd() + ["build"], cwd=root, env=base_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    actions = sorted(out.splitlines()[2].split()[2] if code == 0 else err for code, out, err in results)
    assert actions[0] == "operated" or actions[1] == "operated", results
    other = actions[1] if actions[0] == "operated" else actions[0]
    assert other in ("unchanged", f"{root}/models: error: another specsurgery build is writing to this folder; "
                     "nothing was changed; run build again when it has finished\n"), results
    assert all("Traceback" not in err for _, _, err in results)
    (kept,) = os.listdir(root / "models" / "history")
    assert (root / "models" / "history" / kept).read_bytes() == old
    assert sorted(os.listdir(root / "models")) == ["history", "m.safetensors"]


LEFTOVERS = [".m.safetensors.staged", "..m.safetensors.staged.k2j4d.tmp", ".m.safetensors.u81qz.tmp",
             ".m.safetensors.staged.optimizer.safetensors", "..m.safetensors.staged.optimizer.safetensors.x1.tmp",
             "history/m-0123456789ab.safetensors.tmp", "history/.m-0123456789ab.safetensors.a8x0p.tmp"]
NOT_OURS = ["notes.txt", ".other.safetensors.staged", "history/other-0123456789ab.safetensors.tmp"]


def test_build_sweeps_what_killed_builds_left_and_nothing_else(tmp_path):
    root = project(tmp_path)
    (root / "models" / "history").mkdir(parents=True)
    small_checkpoint(root / "models" / "m.safetensors")
    for name in LEFTOVERS + NOT_OURS:
        (root / "models" / name).write_bytes(b"half")
    result = run(["build"], root)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[2].split()[2] == "unchanged"
    left = {os.path.relpath(os.path.join(f, n), root / "models") for f, _, ns in os.walk(root / "models") for n in ns}
    assert left == {"m.safetensors", *NOT_OURS}


def test_a_failed_surgery_leaves_nothing_in_history(tmp_path, checkpoint_of_other_shape):
    root = project(tmp_path)
    (root / "models").mkdir()
    shutil.copy(checkpoint_of_other_shape, root / "models" / "m.safetensors")
    (root / "specs" / "m.spec").write_text(WIDER)
    before = files_under(root)
    result = run(["build"], root)
    assert result.returncode == 1
    assert result.stderr == (f"{root}/models/m.safetensors: error: the tensors do not match the embedded spec: "
                             "h.linear.weight has shape [5, 2], the spec says [2, 2]\n")
    assert files_under(root) == before


@pytest.fixture()
def checkpoint_of_other_shape(tmp_path):
    import torch

    from specsurgery.checkpoint import write_checkpoint
    from specsurgery.spec.canonical import canonical
    from specsurgery.spec.load import load_text

    path = tmp_path / "odd.safetensors"
    shapes = {"h.linear.weight": (5, 2), "h.linear.bias": (2,)}
    write_checkpoint(str(path), canonical(load_text(SMALL, "s.spec").model("m")), "m", shapes,
                     ((n, torch.zeros(s)) for n, s in shapes.items()))
    return path


def test_an_embedded_spec_with_crlf_line_endings_is_the_same_spec(tmp_path):
    from specsurgery.spec.canonical import canonical
    from specsurgery.spec.load import load_text

    root = project(tmp_path)
    (root / "models").mkdir()
    text = canonical(load_text(SMALL, "s.spec").model("m"))
    small_checkpoint(root / "models" / "m.safetensors", text.replace("\n", "\r\n"))
    before = files_under(root)
    result = run(["build"], root)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[2].split()[2] == "unchanged"
    assert files_under(root) == before


# ---------------------------------------------------------------------------
# hangs and blowups: limits refused at their line


def test_whole_numbers_beyond_the_limit_are_refused_at_their_line():
    rendered = spec_error(SMALL.replace("linear(obs.g, 2)", "linear(obs.g, 1048577)"))
    assert rendered.splitlines()[0] == "x.spec:9:25: error: 1048577 is too large: whole numbers in a spec are at most 1,048,576"
    rendered = spec_error(SMALL.replace("linear(obs.g, 2)", f"linear(obs.g, {2 ** 63})"))
    assert rendered.splitlines()[0] == (
        "x.spec:9:25: error: 9223372036854775808 is too large: whole numbers in a spec are at most 1,048,576")
    rendered = spec_error(SMALL.replace("linear(obs.g, 2)", "linear(obs.g, " + "9" * 5000 + ")").replace(
        "group g {", "group g[" + "8" * 4400 + "] {"))
    assert rendered.splitlines()[0] == (
        "x.spec:2:11: error: 888888888888... (4,400 digits) is too large: whole numbers in a spec are at most 1,048,576")
    assert rendered.count("error:") == 2
    assert "x.spec:9:25: error: 999999999999... (5,000 digits) is too large" in rendered
    # the limit itself is a width like any other
    from specsurgery.spec.load import load_text

    load_text(SMALL.replace("linear(obs.g, 2)", "linear(obs.g, 1048576)"), "x.spec")


def test_a_model_too_big_for_memory_is_refused_at_its_largest_op():
    spec = textwrap.dedent("""\
        schema s {
          vocab v = [a, b]
          group g {
            x: float
            k: category(v)
          }
        }

        model m(obs: s) {
          e = linear(obs.g, 1048576)
          out h = linear(e, 8192)
        }
        """)
    rendered = spec_error(spec)
    assert rendered.splitlines()[0] == (
        "x.spec:11:11: error: model m has 8,592,039,936 parameters, more than the 4,294,967,296 a model may have "
        "(16 GiB as float32); this op alone makes 8,589,942,784")


def test_a_huge_width_fails_fast_with_exit_1_in_every_command(tmp_path):
    (tmp_path / "big.spec").write_text(SMALL.replace("linear(obs.g, 2)", "linear(obs.g, 1000000000)"))
    (tmp_path / "small.spec").write_text(SMALL)
    results = run_many({
        "map": (["map", "big.spec"], tmp_path),
        "plan": (["plan", "small.spec", "big.spec"], tmp_path),
        "schema": (["schema", "big.spec"], tmp_path),
        "build": (["build", "big.spec"], tmp_path),
    }, timeout=120)
    for name, result in results.items():
        assert result.returncode == 1, (name, result.stderr)
        assert result.stderr.splitlines()[0] == (
            "big.spec:9:25: error: 1000000000 is too large: whole numbers in a spec are at most 1,048,576"), name
    assert sorted(os.listdir(tmp_path)) == ["big.spec", "small.spec"]


def nested(depth: int) -> str:
    return SMALL.replace("linear(obs.g, 2)", "relu(" * (depth - 1) + "linear(obs.g, 2)" + ")" * (depth - 1))


def test_nesting_beyond_the_limit_is_refused_at_the_call_and_the_limit_works_everywhere(tmp_path):
    rendered = spec_error(nested(487))
    assert rendered.splitlines()[0] == "x.spec:9:511: error: calls nest more than 100 deep"
    assert rendered.splitlines()[-1] == "  name the inner values in statements of their own"
    # 100 deep: loaded, planned by the hook, and read back from its parse cache
    repo = make_repo(tmp_path / "repo", {"specs/m.spec": nested(100)})
    (repo / "specs" / "m.spec").write_text(nested(100).replace("y: float", "y: float\n    z: float"))
    git("add", "-A", cwd=repo)
    results = [run(["check"], repo) for _ in range(2)]  # the second reads both versions from the cache
    for result in results:
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("specs/m.spec:9:7: model m: 100.00% transferred"), result.stdout
    assert results[0].stdout == results[1].stdout
    (repo / "deep.spec").write_text(nested(400))
    result = run(["map", "deep.spec"], repo)
    assert result.returncode == 1
    assert result.stderr.splitlines()[0] == "deep.spec:9:511: error: calls nest more than 100 deep"


def test_the_use_pattern_of_check_does_not_backtrack_on_blank_lines():
    from specsurgery.workflow.check import _USE

    text = "\n" * 300_000 + '  use "a.spec"\n' + " \n" * 100_000 + "schema s {}\n"

    def too_slow(signum, frame):
        raise AssertionError("the pattern backtracks (still scanning after 20 s)")

    signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(20)  # a hang guard: the pattern takes milliseconds, the quadratic one took minutes
    try:
        assert _USE.findall(text) == ["a.spec"]
    finally:
        signal.alarm(0)


# ---------------------------------------------------------------------------
# internal errors that are user errors


def test_a_nul_byte_in_a_use_path():
    rendered = spec_error('use "a\0b.spec"\n' + SMALL)
    assert rendered.splitlines()[0] == "x.spec:1:5: error: cannot use 'a\\x00b.spec': not a valid path (it holds a NUL byte)"


def header_file(path: Path, header: bytes, data: bytes = b"") -> None:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)


def entry(start: int, end: int) -> dict:
    return {"dtype": "F32", "shape": [(end - start) // 4], "data_offsets": [start, end]}


META = {"specsurgery.spec": "x", "specsurgery.model": "m"}


@pytest.mark.parametrize("case, header, data, why", [
    ("deep", b"[" * 100_000 + b"]" * 100_000, b"", "the header is nested too deeply to be a tensor table"),
    ("overlap", json.dumps({"__metadata__": META, "a": entry(0, 8), "b": entry(4, 12)}).encode(), b"\0" * 12,
     "tensor 'b' overlaps tensor 'a'"),
    ("trailing", json.dumps({"__metadata__": META, "a": entry(0, 8)}).encode(), b"\0" * 12,
     "4 bytes after the last tensor belong to no tensor"),
    ("gap", json.dumps({"__metadata__": META, "a": entry(0, 4), "b": entry(8, 12)}).encode(), b"\0" * 12,
     "4 bytes before tensor 'b' belong to no tensor"),
])
def test_corrupt_headers_are_refused_by_the_header_check(tmp_path, case, header, data, why):
    from specsurgery.checkpoint import read_header
    from specsurgery.errors import UserError

    path = tmp_path / f"{case}.safetensors"
    header_file(path, header, data)
    with pytest.raises(UserError) as e:
        read_header(str(path))
    assert str(e.value) == f"{path}: error: not a valid checkpoint: {why}"


def test_writes_that_cannot_happen_are_user_errors(tmp_path):
    (tmp_path / "small.spec").write_text(SMALL)
    (tmp_path / "afolder").mkdir()
    (tmp_path / "pyproject.toml").write_bytes(b'[project]\nname = "d\xff"\n')
    results = run_many({
        "plan -o folder": (["plan", "small.spec", "small.spec", "-o", "afolder"], tmp_path),
        "seed": (["build", "small.spec", "--seed", str(10 ** 23)], tmp_path),
        "pyproject": (["build", "small.spec"], tmp_path),
    })
    assert results["plan -o folder"].returncode == 1
    assert results["plan -o folder"].stderr == "afolder: error: cannot write: it is a folder; name a file\n"
    assert results["seed"].returncode == 2
    assert results["seed"].stderr.splitlines()[-1] == (
        "specsurgery build: error: argument --seed: 100000000000000000000000 is not a seed: "
        "seeds run from 0 to 9223372036854775807")
    assert results["pyproject"].returncode == 1
    assert results["pyproject"].stderr == (
        f"{tmp_path}/pyproject.toml:2:10: error: not UTF-8 text (byte 0xff: invalid start byte)\n")
    assert sorted(os.listdir(tmp_path)) == ["afolder", "pyproject.toml", "small.spec"]
    assert os.listdir(tmp_path / "afolder") == []


def test_map_on_a_spec_without_a_model(tmp_path):
    (tmp_path / "s.spec").write_text("schema s {\n  group g {\n    x: float\n  }\n}\n")
    result = run(["map", "s.spec"], tmp_path)
    assert result.returncode == 1
    assert result.stderr == "s.spec: error: no model in this file (it defines 1 schema and no `model NAME(obs: SCHEMA) { ... }`)\n"


# ---------------------------------------------------------------------------
# text: byte-order marks, invalid UTF-8, tabs


def test_a_byte_order_mark_is_accepted(tmp_path):
    (tmp_path / "bom.spec").write_bytes(b"\xef\xbb\xbf" + SMALL.encode())
    result = run(["schema", "bom.spec"], tmp_path)
    assert result.returncode == 0, result.stderr


def test_invalid_utf8_is_reported_at_its_line_and_column(tmp_path):
    (tmp_path / "bad.spec").write_bytes(SMALL.replace("x: float", "x: fl\xf6at").encode("latin-1"))
    result = run(["schema", "bad.spec"], tmp_path)
    assert result.returncode == 1
    assert result.stderr == "bad.spec:3:10: error: not UTF-8 text (byte 0xf6: invalid start byte)\n"


def test_the_caret_stands_under_the_column_when_the_line_has_tabs():
    rendered = spec_error(SMALL.replace("    x: float", "\tx:\tflot"))
    assert rendered.splitlines() == [
        "x.spec:3:5: error: unknown type 'flot' for feature g.x",
        "          x:      flot",
        "                  ^^^^",
        "  types: float, int, bool, category(VOCAB)",
    ]


# ---------------------------------------------------------------------------
# a full disk and a read-only one (a small tmpfs; mounting needs root, as here and in CI)


@pytest.fixture()
def small_disk(tmp_path):
    """A 512 kB file system of its own, unmounted afterwards."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k,mode=0755", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {made.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


BIG = SMALL.replace("linear(obs.g, 2)", "linear(obs.g, 100000)")  # 300,000 parameters: 1.2 MB


def test_a_full_disk_leaves_nothing_behind(small_disk):
    root = project(small_disk, BIG)
    before = files_under(root)
    result = run(["build"], root)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.splitlines()[-1] == (
        f"{root}/models/m.safetensors: error: cannot write: No space left on device; nothing was changed")
    assert files_under(root) == before  # no half-written file, not even the models folder


def test_a_full_disk_during_a_surgery_leaves_the_old_checkpoint_and_no_history(small_disk):
    root = project(small_disk, SMALL.replace("linear(obs.g, 2)", "linear(obs.g, 25000)"))  # 300 kB
    result = run(["build"], root)
    assert result.returncode == 0, result.stderr
    (root / "specs" / "m.spec").write_text(SMALL.replace("linear(obs.g, 2)", "linear(obs.g, 25000)").replace(
        "    y: float\n", "    y: float\n    z: float\n"))  # 400 kB more do not fit beside it
    before = files_under(root)
    result = run(["build"], root)
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1].endswith("error: cannot write: No space left on device; nothing was changed")
    assert files_under(root) == before


def test_a_read_only_models_folder(small_disk):
    root = project(small_disk)
    assert run(["build"], root).returncode == 0
    (root / "specs" / "m.spec").write_text(WIDER)
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    try:
        before = files_under(root)
        result = run(["build"], root)
        assert result.returncode == 1
        assert result.stderr.splitlines()[-1].endswith("error: cannot write: Read-only file system"), result.stderr
        assert files_under(root) == before
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)


def test_a_plan_with_a_whole_number_beyond_any_axis_is_a_user_error(tmp_path):
    """Found by the fuzz test: JSON Schema takes 1e308 as a whole number, the plan's model does not."""
    (tmp_path / "a.spec").write_text(SMALL)
    (tmp_path / "b.spec").write_text(WIDER)
    small_checkpoint(tmp_path / "c.safetensors")
    assert run(["plan", "a.spec", "b.spec", "-o", "p.json"], tmp_path).returncode == 0
    plan = json.loads((tmp_path / "p.json").read_text())
    plan["params"][0]["axes"][0]["runs"][0]["new"] = 1e308
    (tmp_path / "p.json").write_text(json.dumps(plan))
    result = run(["apply", "c.safetensors", "b.spec", "--plan", "p.json", "-o", "out.safetensors"], tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith("p.json: error: not a valid plan: params.0.axes.0.runs.0.new: "), result.stderr
    assert not (tmp_path / "out.safetensors").exists()
