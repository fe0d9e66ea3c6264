"""Help texts and messages a new user meets: each says what it should, and the
exit status says what happened (0 done, 1 user error or refusal, 2 usage)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from specsurgery.workflow.policy import Policy

from small_specs import ADD_LEVEL, HERO_AGENT

REPO = Path(__file__).resolve().parents[1]

OLD = HERO_AGENT
NO_MANA = OLD.replace("    mana: float\n", "")
WIDER = OLD.replace("he), 8)", "he), 12)")
BAD = OLD.replace("embed(obs.hero.hero_id, 4)", "linear(obs.hero.hero_id, 4)")


def specsurgery(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "400"}  # help on long lines: argparse breaks words at hyphens
    result = subprocess.run([sys.executable, "-m", "specsurgery", *args], cwd=cwd, capture_output=True, text=True,
                            timeout=600, env=env)
    assert "Traceback" not in result.stderr, result.stderr
    return result


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    for name, text in {"old.spec": OLD, "level.spec": ADD_LEVEL, "no_mana.spec": NO_MANA, "wider.spec": WIDER,
                       "bad.spec": BAD}.items():
        (tmp_path / name).write_text(text)
    return tmp_path


# ---------------------------------------------------------------------------
# help


def test_map_method_help_explains_each_gradient_method(folder):
    text = " ".join(specsurgery("map", "--help", cwd=folder).stdout.split())
    text = re.sub(r"(\w)- (\w)", r"\1-\2", text)  # argparse wraps lines at hyphens
    assert "(see README)" not in text
    assert "boolean: the shadow graph, exact and fast (default)" in text
    assert ("gradient: positive weights, max-pools read as average pools, tanh and sigmoid inputs normalised "
            "so none saturates (the paper's method)") in text
    assert "gradient-random: the model's own random init, pools as written" in text
    assert "gradient-positive: positive weights, max-pools kept" in text


def test_readme_explains_each_gradient_method():
    readme = " ".join((REPO / "README.md").read_text().split())
    for method, meaning in (("`gradient` is the paper's method", "max-pools read as average pools"),
                            ("`gradient-random` keeps the model's own signed random init", "ReLUs"),
                            ("`gradient-positive` has positive weights but keeps the max-pools", "pick one entity")):
        assert method in readme and meaning in readme[readme.index(method):][:300], method


def test_top_level_help_says_what_the_tool_does(folder):
    text = " ".join(specsurgery("--help", cwd=folder).stdout.split())
    assert "thin layer" not in text
    assert "Compile .spec files (an input feature schema and a model) to PyTorch checkpoints" in text


def test_verify_seed_has_help(folder):
    text = " ".join(specsurgery("verify", "--help", cwd=folder).stdout.split())
    assert "--seed SEED seed of the random states (default 0): the same seed gives the same states" in text


# ---------------------------------------------------------------------------
# usage errors: exit 2, the command's own usage


def test_plan_without_versions_is_a_usage_error(folder):
    result = specsurgery("plan", cwd=folder)
    assert result.returncode == 2
    assert result.stderr.startswith("usage: specsurgery plan ")
    assert result.stderr.splitlines()[-1] == "specsurgery plan: error: plan needs OLD and NEW (or --schema)"


def test_an_unknown_option_shows_the_commands_usage(folder):
    result = specsurgery("build", "--bogus", cwd=folder)
    assert result.returncode == 2
    assert result.stderr.startswith("usage: specsurgery build [-h] [--json] [--out DIR]")
    assert result.stderr.splitlines()[-1] == "specsurgery build: error: unrecognized arguments: --bogus"
    assert not (folder / "models").exists()


# ---------------------------------------------------------------------------
# --json errors


def test_build_json_prints_spec_errors_as_json_with_the_same_exit(folder):
    plain = specsurgery("build", "bad.spec", cwd=folder)
    result = specsurgery("build", "bad.spec", "--json", cwd=folder)
    assert plain.returncode == result.returncode == 1
    assert json.loads(result.stdout) == {"ok": False, "exit": 1, "errors": [{
        "message": "linear needs a numeric input, got category hero.hero_id",
        "file": "bad.spec", "line": 11, "column": 15, "hint": "read a category through embed or onehot"}]}
    assert result.stderr == plain.stderr  # the person watching still reads the caret


def test_json_user_errors_name_the_file(folder):
    result = specsurgery("schema", "nosuch.spec", "--json", cwd=folder)
    assert result.returncode == 1
    assert json.loads(result.stdout)["errors"] == [
        {"message": "no such file", "file": "nosuch.spec", "line": None, "column": None, "hint": None}]


# ---------------------------------------------------------------------------
# messages


def test_inspect_of_a_spec_says_it_is_a_spec(folder):
    result = specsurgery("inspect", "old.spec", cwd=folder)
    assert result.returncode == 1
    assert result.stderr == ("old.spec: error: this is a spec, not a checkpoint "
                             "(`specsurgery build old.spec` makes its checkpoint)\n")


def axis_lines(plan_text: str) -> list[tuple[int, int, dict[str, int]]]:
    """(old size, new size, counts) of every `axis K (role, OLD->NEW): ...` of a plan."""
    out = []
    for m in re.finditer(r"axis \d+ \((?:in|out), (\d+)->(\d+)\): ([^;]+)", plan_text):
        counts = {what: int(n) for n, what in re.findall(r"(\d+) (in place|moved|new|dropped)", m.group(3))}
        out.append((int(m.group(1)), int(m.group(2)), counts))
    return out


def test_plan_axis_lines_add_up(folder):
    added = specsurgery("plan", "old.spec", "level.spec", cwd=folder).stdout
    assert "~ h.linear.weight [8x7] grown: axis 1 (in, 6->7): 2 in place, 4 moved, 1 new; 48 copied, 8 zero" in added
    seen = 0
    for new in ("level.spec", "no_mana.spec", "wider.spec"):
        for old_size, new_size, c in axis_lines(specsurgery("plan", "old.spec", new, cwd=folder).stdout):
            kept = c.get("in place", 0) + c.get("moved", 0)
            assert kept + c.get("dropped", 0) == old_size, (new, old_size, c)
            assert kept + c.get("new", 0) == new_size, (new, new_size, c)
            seen += 1
    assert seen >= 4


# ---------------------------------------------------------------------------
# one rule for apply and build (torch)


def test_apply_refuses_a_lossy_change_unless_allowed_as_build_does(folder):
    assert specsurgery("build", "old.spec", "--out", "models", cwd=folder).returncode == 0
    old = os.path.join("models", "agent.safetensors")
    refused = specsurgery("apply", old, "no_mana.spec", "-o", "lossy.safetensors", cwd=folder)
    assert refused.returncode == 1
    assert refused.stderr.splitlines()[:2] == [
        f"{old}: error: refused surgery:",
        "  the change does not preserve the function (allow it with --allow-lossy or allow_lossy = true)"]
    assert "feature hero.mana was removed" in refused.stderr
    assert not (folder / "lossy.safetensors").exists()

    build = specsurgery("build", "no_mana.spec", "--out", "models", cwd=folder)  # the same model, same rule
    assert build.returncode == 1 and "does not preserve the function" in build.stderr

    allowed = specsurgery("apply", old, "no_mana.spec", "-o", "lossy.safetensors", "--allow-lossy", cwd=folder)
    assert allowed.returncode == 0, allowed.stderr
    assert allowed.stdout.startswith("wrote lossy.safetensors: 83 of 91 old parameters transferred (91.21%)")
    assert (folder / "lossy.safetensors").exists()


def test_apply_takes_the_model_of_a_file_with_several(folder):
    assert specsurgery("build", "old.spec", "--out", "models", cwd=folder).returncode == 0
    other = WIDER.replace("model agent(", "model other(")
    (folder / "two.spec").write_text(WIDER + "\n" + other[other.index("model other("):])
    old = os.path.join("models", "agent.safetensors")
    unsure = specsurgery("apply", old, "two.spec", "-o", "new.safetensors", cwd=folder)
    assert unsure.returncode == 1 and "2 models in this spec" in unsure.stderr
    done = specsurgery("apply", old, "two.spec", "--model", "agent", "-o", "new.safetensors", cwd=folder)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("wrote new.safetensors: 91 of 91 old parameters transferred")


def test_apply_keeps_the_policys_min_transfer_as_build_does(folder):
    (folder / "narrow.spec").write_text(OLD.replace("he), 8)", "he), 4)"))
    assert specsurgery("build", "old.spec", "--out", "models", cwd=folder).returncode == 0
    old = os.path.join("models", "agent.safetensors")
    refused = specsurgery("apply", old, "narrow.spec", "-o", "narrow.safetensors", "--allow-lossy", cwd=folder)
    assert refused.returncode == 1
    assert refused.stderr.splitlines()[:2] == [
        f"{old}: error: refused surgery:",
        "  only 56.04% of the old parameters carry over; the policy asks for min_transfer = 0.9 "
        "(lower it in [tool.specsurgery] if that is meant)"]
    assert not (folder / "narrow.safetensors").exists()
    build = specsurgery("build", "narrow.spec", "--out", "models", "--allow-lossy", cwd=folder)
    assert build.returncode == 1 and "only 56.04% of the old parameters carry over" in build.stderr

    (folder / "pyproject.toml").write_text("[tool.specsurgery]\nmin_transfer = 0.5\n")
    lowered = specsurgery("apply", old, "narrow.spec", "-o", "narrow.safetensors", "--allow-lossy", cwd=folder)
    assert lowered.returncode == 0, lowered.stderr
    flag = specsurgery("apply", old, "narrow.spec", "-o", "flag.safetensors", "--allow-lossy",
                       "--min-transfer", "0.6", cwd=folder)
    assert flag.returncode == 1 and "min_transfer = 0.6" in flag.stderr
    bad = specsurgery("apply", old, "narrow.spec", "-o", "x.safetensors", "--min-transfer", "2", cwd=folder)
    assert bad.returncode == 2
    assert bad.stderr.splitlines()[-1] == ("specsurgery apply: error: argument --min-transfer: "
                                           "'2' is not a share between 0 and 1")


def test_usage_and_internal_errors_answer_in_json_with_their_status(folder):
    for args, message in ((["plan", "--json"], "plan needs OLD and NEW (or --schema)"),
                          (["build", "--bogus", "--json"], "unrecognized arguments: --bogus"),
                          (["verify", "a", "b", "--states", "0", "--json"],
                           "argument --states: expected a whole number of at least 1, got '0'")):
        result = specsurgery(*args, cwd=folder)
        assert result.returncode == 2
        assert result.stderr.startswith(f"usage: specsurgery {args[0]} ")
        assert json.loads(result.stdout) == {"ok": False, "exit": 2, "errors": [
            {"message": message, "file": None, "line": None, "column": None, "hint": None}]}


def test_build_json_gives_a_verdict_beside_the_difference(folder):
    assert specsurgery("build", "old.spec", "--out", "models", cwd=folder).returncode == 0
    (folder / "old.spec").write_text(ADD_LEVEL)
    result = specsurgery("build", "old.spec", "--out", "models", "--json", cwd=folder)
    assert result.returncode == 0, result.stderr
    (row,) = json.loads(result.stdout)["models"]
    assert row["action"] == "operated"
    assert row["verdict"] == "same function" and row["max_difference"] == 0.0
    assert row["tolerance"] == Policy().tolerance and row["verified_states"] == Policy().verify_states
    assert "verified" not in row  # a difference is not a verdict
