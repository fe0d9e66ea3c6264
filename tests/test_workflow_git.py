"""The git workflow end to end: real repositories, the installed console script.

A user keeps `specs/x.spec` in git, runs `specsurgery build` to get
`models/p.safetensors`, edits the spec, stages it and lets `specsurgery check`
(the pre-commit hook) say whether the policy allows the change; `build` then
carries the checkpoint over, keeping the previous one in `models/history/`.

Four edits of one spec: (a) add a feature, (b) grow a vocabulary, (c) widen the
LSTM, (d) remove a feature; each under several policies (none, allow_lossy,
min_transfer, and the command-line flags). The `check` side needs no torch and is
fast; the `build` side is marked slow.

Parameter counts of OLD, by hand (linear: weight [units, in] + bias; embed:
weight [vocab, dim]; lstm: weight_ih [4u, in] + weight_hh [4u, u] + 2 biases [4u]):
  he   embed 2x4                                  =     8
  h    linear 8 x (2 numeric + 4 embed) + 8       =    56
  u    linear 8 x 2 + 8                           =    24
  core lstm 16 over 16: 64x16 + 64x16 + 64 + 64   = 2,176
  a    linear 3x16 + 3                            =    51
                                                    2,315
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

from gitrepo_helpers import (base_env, col_of, commit_all, git, head, line_of, make_repo, run, sha256, snapshot,
                             specsurgery_python, write)

OLD = textwrap.dedent("""\
    # the spec under test: one feature per line, so every line number is telling
    schema s {
      vocab heroes = [axe, bane]
      group hero {
        health: float
        mana: float
        hero_id: category(heroes)
      }
      group units[4] {
        x: float
        y: float
      }
    }

    model p(obs: s) {
      he = embed(obs.hero.hero_id, 4)
      h = relu(linear(concat(obs.hero, he), 8))
      u = maxpool(relu(linear(obs.units, 8)))
      core = lstm(concat(h, u), 16)
      out a = linear(core, 3)
    }
""")
OLD_PARAMS = 2315


def edit(text: str, before: str, after: str) -> str:
    assert text.count(before) == 1, before
    return text.replace(before, after)


ADD = edit(OLD, "    mana: float\n", "    mana: float\n    level: int\n")
VOCAB = edit(OLD, "[axe, bane]", "[axe, bane, drow]")
WIDEN = edit(OLD, "lstm(concat(h, u), 16)", "lstm(concat(h, u), 24)")
REMOVE = edit(OLD, "    mana: float\n", "")

MANA = (line_of(OLD, "mana: float"), col_of(OLD, "mana: float"))  # where the removed feature was, at HEAD


def model_at(text: str) -> str:
    return f"specs/x.spec:{line_of(text, 'model p(')}:{col_of(text, 'p(obs')}"


# name -> (new text, first line after `path:line:col: `, function preserved, share)
EDITS = {
    # h.linear gains one input column: 8 weights start at zero
    "add_feature": (ADD, "model p: 100.00% transferred (2,315 of 2,315), 8 zeroed, 0 fresh, function preserved", True, 1.0),
    # one new embedding row of 4: starts at zero
    "grow_vocab": (VOCAB, "model p: 100.00% transferred (2,315 of 2,315), 4 zeroed, 0 fresh, function preserved", True, 1.0),
    # lstm 16 -> 24: old rows x new columns of weight_hh 64x8 = 512 and a.linear 3x8 = 24 start at zero;
    # new rows of weight_ih 32x16 = 512, of weight_hh 32x24 = 768, new biases 2x32 = 64 start fresh
    "widen_lstm": (WIDEN, "model p: 100.00% transferred (2,315 of 2,315), 536 zeroed, 1,344 fresh, function preserved", True, 1.0),
    # h.linear loses the 8 weights of its mana column
    "remove_feature": (REMOVE, "model p: 99.65% transferred (2,307 of 2,315), 0 zeroed, 0 fresh, function NOT preserved", False, 2307 / 2315),
}

PYPROJECT_PLAIN = '[project]\nname = "demo"\nversion = "0"\n'
POLICIES = {
    # name -> (pyproject.toml, extra `check` flags, allow_lossy, min_transfer)
    "no_policy": (PYPROJECT_PLAIN, [], False, 0.9),  # the defaults
    "allow_lossy_in_pyproject": (PYPROJECT_PLAIN + "\n[tool.specsurgery]\nallow_lossy = true\n", [], True, 0.9),
    "allow_lossy_flag": (PYPROJECT_PLAIN, ["--allow-lossy"], True, 0.9),
    "min_transfer_in_pyproject": (PYPROJECT_PLAIN + "\n[tool.specsurgery]\nallow_lossy = true\nmin_transfer = 0.999\n",
                                  [], True, 0.999),
    "min_transfer_flag": (PYPROJECT_PLAIN, ["--allow-lossy", "--min-transfer", "0.999"], True, 0.999),
    "lenient_min_transfer": (PYPROJECT_PLAIN + "\n[tool.specsurgery]\nmin_transfer = 0.9\n", [], False, 0.9),
}

NOT_PRESERVED = ("error: model p: the change does not preserve the function "
                 "(allow it with --allow-lossy or allow_lossy = true)")
MANA_REMOVED = (f"git:HEAD:specs/x.spec:{MANA[0]}:{MANA[1]}: feature hero.mana was removed, but h.linear read it: "
                "the function changes wherever it was non-zero")


def new_repo(root: Path, spec: str = OLD, pyproject: str = PYPROJECT_PLAIN) -> Path:
    return make_repo(root, {"pyproject.toml": pyproject, "specs/x.spec": spec})


def stage(root: Path, files: dict[str, str]) -> None:
    write(root, files)
    git("add", "-A", cwd=root)


def first_line(result: subprocess.CompletedProcess) -> str:
    text = result.stdout if result.returncode == 0 else result.stderr
    lines = text.splitlines()
    assert lines, f"no output (exit {result.returncode}): stdout={result.stdout!r} stderr={result.stderr!r}"
    return lines[0]


# ---------------------------------------------------------------------------
# check: the four edits under each policy (no torch: fast)


@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("change", list(EDITS))
def test_check_follows_the_policy(tmp_path, change, policy):
    new_text, summary, preserved, share = EDITS[change]
    pyproject, flags, allow_lossy, min_transfer = POLICIES[policy]
    root = new_repo(tmp_path / "proj")
    write(root, {"pyproject.toml": pyproject})  # the policy is read from the working tree
    stage(root, {"specs/x.spec": new_text})

    result = run("check", *flags, cwd=root)
    should_pass = (preserved or allow_lossy) and share >= min_transfer
    out = result.stdout + result.stderr
    assert result.returncode == (0 if should_pass else 1), out
    where = model_at(new_text)
    assert first_line(result) == f"{where}: {summary}", out
    lines = out.splitlines()
    if not preserved:
        # the removed feature is named at its line in HEAD's version of the spec
        assert lines[1] == MANA_REMOVED, out
    else:
        assert "removed" not in out
    if not preserved and not allow_lossy:
        assert f"{where}: {NOT_PRESERVED}" in lines, out
    else:
        assert "does not preserve the function" not in out, out
    if share < min_transfer:
        assert (f"{where}: error: model p: only 99.65% of the old parameters carry over; "
                f"the policy asks for min_transfer = 0.999 (lower it in [tool.specsurgery] if that is meant)") in lines, out
    else:
        assert "min_transfer" not in out, out
    if should_pass:
        assert "error" not in out, out

    if policy != "no_policy":
        return
    # --json says the same
    data = json.loads(run("check", "--json", *flags, cwd=root).stdout)
    assert data["ok"] is should_pass and data["exit"] == result.returncode
    (row,) = data["results"]
    assert row["file"] == "specs/x.spec" and row["model"] == "p"
    assert row["summary"]["function_preserving"] is preserved
    assert row["summary"]["old_params"] == OLD_PARAMS


def test_check_without_changes_passes(tmp_path):
    root = new_repo(tmp_path / "proj")
    result = run("check", cwd=root)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "no spec changes to check"
    # an edit in the working tree that is not staged is not what would be committed: not checked
    write(root, {"specs/x.spec": REMOVE})
    result = run("check", cwd=root)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "no spec changes to check"


def test_check_reads_the_staged_text_not_the_working_tree(tmp_path):
    root = new_repo(tmp_path / "proj")
    stage(root, {"specs/x.spec": REMOVE})
    write(root, {"specs/x.spec": ADD})  # fixed in the working tree, but the bad version is staged
    result = run("check", cwd=root)
    assert result.returncode == 1, result.stdout
    assert MANA_REMOVED in result.stderr.splitlines()


def test_check_passes_the_file_names_pre_commit_gives(tmp_path):
    root = new_repo(tmp_path / "proj")
    stage(root, {"specs/x.spec": REMOVE})
    result = run("check", "specs/x.spec", cwd=root)
    assert result.returncode == 1
    assert first_line(result) == f"{model_at(REMOVE)}: {EDITS['remove_feature'][1]}"
    assert MANA_REMOVED in result.stderr.splitlines()
    # a non-spec file name is ignored
    result = run("check", "pyproject.toml", cwd=root)
    assert result.returncode == 0 and result.stdout.strip() == "no spec changes to check", result.stderr


# ---------------------------------------------------------------------------
# check: a spec that uses a changed spec, a new spec, a spec that does not parse

SCHEMA = textwrap.dedent("""\
    schema s {
      vocab heroes = [axe, bane]
      group hero {
        health: float
        mana: float
        hero_id: category(heroes)
      }
      group units[4] {
        x: float
        y: float
      }
    }
""")
USER = textwrap.dedent("""\
    use "schema.spec"

    model p(obs: s) {
      he = embed(obs.hero.hero_id, 4)
      h = relu(linear(concat(obs.hero, he), 8))
      u = maxpool(relu(linear(obs.units, 8)))
      core = lstm(concat(h, u), 16)
      out a = linear(core, 3)
    }
""")
SCHEMA_ADD = edit(SCHEMA, "    mana: float\n", "    mana: float\n    level: int\n")
SCHEMA_REMOVE = edit(SCHEMA, "    mana: float\n", "")
USER_AT = f"specs/x.spec:{line_of(USER, 'model p(')}:{col_of(USER, 'p(obs')}"


def use_repo(root: Path) -> Path:
    return make_repo(root, {"pyproject.toml": PYPROJECT_PLAIN, "specs/schema.spec": SCHEMA, "specs/x.spec": USER})


@pytest.mark.parametrize("names", [[], ["specs/schema.spec"]], ids=["staged", "file_names"])
def test_check_covers_specs_that_use_a_changed_spec(tmp_path, names):
    root = use_repo(tmp_path / "proj")
    stage(root, {"specs/schema.spec": SCHEMA_ADD})  # x.spec itself is untouched
    result = run("check", *names, cwd=root)
    assert result.returncode == 0, result.stderr
    assert first_line(result) == (f"{USER_AT}: model p: 100.00% transferred (2,315 of 2,315), 8 zeroed, 0 fresh, "
                                  "function preserved")

    stage(root, {"specs/schema.spec": SCHEMA_REMOVE})
    result = run("check", *names, cwd=root)
    assert result.returncode == 1, result.stdout
    lines = result.stderr.splitlines()
    assert lines[0] == f"{USER_AT}: {EDITS['remove_feature'][1]}"
    line, col = line_of(SCHEMA, "mana: float"), col_of(SCHEMA, "mana: float")
    assert lines[1] == (f"git:HEAD:specs/schema.spec:{line}:{col}: feature hero.mana was removed, but h.linear "
                        "read it: the function changes wherever it was non-zero")
    assert f"{USER_AT}: {NOT_PRESERVED}" in lines


def test_check_covers_indirect_users(tmp_path):
    """a.spec uses schema.spec, x.spec uses a.spec: changing schema.spec checks x.spec's model."""
    middle = 'use "schema.spec"\n'
    user = USER.replace('use "schema.spec"', 'use "middle.spec"')
    root = make_repo(tmp_path / "proj", {"pyproject.toml": PYPROJECT_PLAIN, "specs/schema.spec": SCHEMA,
                                         "specs/middle.spec": middle, "specs/x.spec": user})
    stage(root, {"specs/schema.spec": SCHEMA_REMOVE})
    result = run("check", cwd=root)
    assert result.returncode == 1, result.stdout
    assert result.stderr.splitlines()[0].startswith(f"{USER_AT}: model p: 99.65% transferred")


def test_check_new_spec_passes(tmp_path):
    root = new_repo(tmp_path / "proj")
    other = OLD.replace("model p(", "model q(")
    stage(root, {"specs/y.spec": other})
    result = run("check", cwd=root)
    assert result.returncode == 0, result.stderr
    assert first_line(result) == f"specs/y.spec:{line_of(other, 'model q(')}:7: model q: new, nothing to carry over"


def test_check_first_commit_everything_is_new(tmp_path):
    """No HEAD yet (the repository's first commit): every spec is new."""
    root = make_repo(tmp_path / "proj", {"pyproject.toml": PYPROJECT_PLAIN, "specs/x.spec": OLD}, commit=False)
    git("add", "-A", cwd=root)
    result = run("check", cwd=root)
    assert result.returncode == 0, result.stderr
    assert first_line(result) == f"{model_at(OLD)}: model p: new, nothing to carry over"


@pytest.mark.parametrize("how", ["staged", "user_of_changed_spec"])
def test_check_spec_with_non_ascii_name(tmp_path, how):
    name = "specs/modèle.spec"
    if how == "staged":
        root = make_repo(tmp_path / "proj", {"pyproject.toml": PYPROJECT_PLAIN, name: OLD})
        stage(root, {name: REMOVE})
        result = run("check", cwd=root)
    else:
        root = make_repo(tmp_path / "proj", {"pyproject.toml": PYPROJECT_PLAIN, "specs/schema.spec": SCHEMA,
                                             name: USER})
        stage(root, {"specs/schema.spec": SCHEMA_REMOVE})
        result = run("check", "specs/schema.spec", cwd=root)  # as pre-commit calls it
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.startswith(f"{name}:") and "hero.mana was removed" in result.stderr, result.stderr


def test_check_follows_a_renamed_spec(tmp_path):
    root = new_repo(tmp_path / "proj")
    git("mv", "specs/x.spec", "specs/policy.spec", cwd=root)
    stage(root, {"specs/policy.spec": REMOVE})
    result = run("check", cwd=root)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "hero.mana was removed" in result.stderr


@pytest.mark.parametrize("broken, needle", [
    (edit(OLD, "    mana: float\n", "    mana float\n"), "mana float"),          # syntax
    (edit(OLD, "linear(obs.units, 8)", "linear(obs.nounits, 8)"), "obs.nounits"),  # no such group
])
def test_check_spec_that_does_not_load_fails(tmp_path, broken, needle):
    root = new_repo(tmp_path / "proj")
    stage(root, {"specs/x.spec": broken})
    result = run("check", cwd=root)
    assert result.returncode == 1, result.stdout
    match = re.match(r"specs/x\.spec:(\d+):(\d+): error: ", result.stderr)
    assert match, result.stderr
    assert int(match.group(1)) == line_of(broken, needle), result.stderr


def test_check_does_not_import_torch(tmp_path):
    root = new_repo(tmp_path / "proj")
    stage(root, {"specs/x.spec": ADD})
    code = ("import sys; from specsurgery.cli import main; sys.argv=['specsurgery','check']; rc=main(); "
            "assert rc == 0, rc; assert 'torch' not in sys.modules, 'check imported torch'")
    result = subprocess.run([specsurgery_python(), "-c", code], cwd=root, env=base_env(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "100.00% transferred" in result.stdout


# ---------------------------------------------------------------------------
# plan git:REV:path


def test_plan_from_head(tmp_path):
    root = new_repo(tmp_path / "proj")
    write(root, {"specs/x.spec": ADD})  # not even staged
    result = run("plan", "git:HEAD:specs/x.spec", "specs/x.spec", cwd=root)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == ("surgery p -> p: 2,315 of 2,315 old parameters transferred (100.00%), "
                                             "8 start at zero, 0 start fresh, 0 dropped")
    # from a subfolder, git:REV:path is relative to where the command runs, like any path
    result = run("plan", "git:HEAD:x.spec", "x.spec", cwd=root / "specs")
    assert result.returncode == 0, result.stderr
    assert "8 start at zero" in result.stdout.splitlines()[0]


def test_plan_from_head_resolves_use_at_that_revision(tmp_path):
    root = use_repo(tmp_path / "proj")
    first = head(root)
    write(root, {"specs/schema.spec": SCHEMA_ADD})  # only the used file changed, only in the working tree
    for old in ("git:HEAD:specs/x.spec", f"git:{first}:specs/x.spec"):
        result = run("plan", old, "specs/x.spec", "--json", cwd=root)
        assert result.returncode == 0, result.stderr
        plan = json.loads(result.stdout)
        assert "level" not in plan["old_spec"] and "mana" in plan["old_spec"]
        assert "level" in plan["new_spec"]
        assert plan["summary"]["zeroed"] == 8 and plan["summary"]["function_preserving"] is True
    # the same revision on both sides: nothing to do
    result = run("plan", "git:HEAD:specs/x.spec", "git:HEAD:specs/x.spec", "--json", cwd=root)
    assert json.loads(result.stdout)["summary"]["zeroed"] == 0

    # committed: HEAD~1 still sees the old schema, HEAD the new one
    commit_all(root, "schema grows level")
    write(root, {"specs/schema.spec": edit(SCHEMA_ADD, "    mana: float\n", "")})
    result = run("plan", "git:HEAD~1:specs/x.spec", "git:HEAD:specs/x.spec", cwd=root)
    assert result.returncode == 0, result.stderr
    assert "8 start at zero" in result.stdout.splitlines()[0]
    result = run("plan", "git:HEAD:specs/x.spec", "specs/x.spec", "--json", cwd=root)
    summary = json.loads(result.stdout)["summary"]
    assert summary["function_preserving"] is False
    (reason,) = [r for r in summary["reasons"] if "mana" in r["message"]]
    assert reason["file"] == "git:HEAD:specs/schema.spec"  # the reason points into the revision
    assert reason["line"] == line_of(SCHEMA_ADD, "mana: float")


# ---------------------------------------------------------------------------
# build: surgery, history, verify (torch: slow)


def inspect_json(root: Path, checkpoint: str) -> dict:
    result = run("inspect", "--json", checkpoint, cwd=root)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def canonical_of(text: str) -> str:
    from specsurgery.spec.canonical import canonical
    from specsurgery.spec.load import load_text

    return canonical(load_text(text, "x.spec").model("p"))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A committed project with `specs/x.spec` (OLD), built once; tests get a copy."""
    root = new_repo(tmp_path_factory.mktemp("built") / "proj")
    result = run("build", cwd=root)
    assert result.returncode == 0, result.stderr
    row = result.stdout.splitlines()[2].split()
    assert row[:3] == ["p", f"{OLD_PARAMS:,}", "built"], result.stdout
    info = inspect_json(root, "models/p.safetensors")
    assert info["spec"] == canonical_of(OLD) and info["total"] == OLD_PARAMS
    return root


@pytest.fixture
def project(built, tmp_path) -> Path:
    root = tmp_path / "proj"
    shutil.copytree(built, root, symlinks=True)
    return root


def history_name(spec_text: str) -> str:
    return f"p-{hashlib.sha256(spec_text.encode()).hexdigest()[:12]}.safetensors"


def assert_history_holds_old(root: Path, before_sha: str) -> Path:
    old_canonical = canonical_of(OLD)
    kept = root / "models" / "history" / history_name(old_canonical)
    assert [p.name for p in kept.parent.iterdir()] == [kept.name]
    assert sha256(kept) == before_sha, "history does not hold the old checkpoint's bytes"
    assert inspect_json(root, str(kept.relative_to(root)))["spec"] == old_canonical
    return kept


@pytest.mark.slow
@pytest.mark.parametrize("change", ["add_feature", "grow_vocab", "widen_lstm"])
def test_build_carries_function_preserving_edits_over(project, change):
    root = project
    new_text = EDITS[change][0]
    before_sha = sha256(root / "models/p.safetensors")
    old_info = inspect_json(root, "models/p.safetensors")
    stage(root, {"specs/x.spec": new_text})
    assert run("check", cwd=root).returncode == 0

    result = run("build", cwd=root)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[2].split()[0] == "p" and lines[2].split()[2] == "operated", result.stdout
    assert "surgery: 2,315 of 2,315 old parameters transferred (100.00%)" in result.stdout
    assert "verified on 1,000 random states" in result.stdout

    kept = assert_history_holds_old(root, before_sha)
    assert inspect_json(root, str(kept.relative_to(root)))["spec"] == old_info["spec"]
    assert f"previous kept as {kept}" in result.stdout or f"previous kept as models/history/{kept.name}" in result.stdout
    new_info = inspect_json(root, "models/p.safetensors")
    assert new_info["spec"] == canonical_of(new_text)

    result = run("verify", f"models/history/{kept.name}", "models/p.safetensors", cwd=root)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "DIFFERS" not in result.stdout

    # built again: nothing to do
    snap = snapshot(root / "models")
    result = run("build", cwd=root)
    assert result.returncode == 0 and result.stdout.splitlines()[2].split()[2] == "unchanged", result.stdout
    assert snapshot(root / "models") == snap


@pytest.mark.slow
def test_build_refuses_a_removed_feature_until_allowed(project):
    root = project
    before = snapshot(root / "models")
    before_sha = sha256(root / "models/p.safetensors")
    stage(root, {"specs/x.spec": REMOVE})

    result = run("build", cwd=root)
    assert result.returncode == 1, result.stdout
    assert result.stdout.splitlines()[2].split()[2] == "refused"
    assert "refused surgery for model p" in result.stderr  # errors go to stderr, the table to stdout
    assert "the change does not preserve the function" in result.stderr
    assert "feature hero.mana was removed" in result.stderr
    assert "refused surgery" not in result.stdout
    assert snapshot(root / "models") == before, "a refused build wrote something"

    # min_transfer above the share refuses even with allow_lossy
    write(root, {"pyproject.toml": POLICIES["min_transfer_in_pyproject"][0]})
    result = run("build", cwd=root)
    assert result.returncode == 1, result.stdout
    assert "only 99.65% of the old parameters carry over; the policy asks for min_transfer = 0.999" in result.stderr
    assert snapshot(root / "models") == before

    write(root, {"pyproject.toml": PYPROJECT_PLAIN})
    result = run("build", "--allow-lossy", cwd=root)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[2].split()[2] == "operated"
    assert "2,307 of 2,315 old parameters transferred (99.65%)" in result.stdout
    assert "lossy (allowed)" in result.stdout and "hero.mana was removed" in result.stdout
    kept = assert_history_holds_old(root, before_sha)
    assert inspect_json(root, "models/p.safetensors")["spec"] == canonical_of(REMOVE)
    # the function did change: verify says so
    result = run("verify", f"models/history/{kept.name}", "models/p.safetensors", cwd=root)
    assert result.returncode == 3 and "DIFFERS" in result.stdout, result.stdout + result.stderr  # 3: they differ


@pytest.mark.slow
def test_build_allow_lossy_in_pyproject(project):
    root = project
    before_sha = sha256(root / "models/p.safetensors")
    write(root, {"pyproject.toml": POLICIES["allow_lossy_in_pyproject"][0], "specs/x.spec": REMOVE})
    result = run("build", cwd=root)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[2].split()[2] == "operated"
    assert_history_holds_old(root, before_sha)


def test_build_unchanged_rewrites_nothing(project):
    root = project
    before = snapshot(root / "models")
    result = run("build", cwd=root)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[2].split()[:3] == ["p", "2,315", "unchanged"]
    assert snapshot(root / "models") == before
    assert not (root / "models" / "history").exists()
    # a comment or layout change does not change the canonical spec: still unchanged
    write(root, {"specs/x.spec": "# reformatted\n" + OLD.replace("  he = ", "  he   =   ")})
    result = run("build", cwd=root)
    assert result.returncode == 0 and result.stdout.splitlines()[2].split()[2] == "unchanged", result.stdout
    assert snapshot(root / "models") == before


def test_build_dry_run_writes_nothing(project):
    root = project
    write(root, {"specs/x.spec": ADD})
    before = snapshot(root / "models")
    result = run("build", "--dry-run", cwd=root)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[2].split()[:3] == ["p", "2,323", "would"] and "would operate" in lines[2]
    assert ("surgery p -> p: 2,315 of 2,315 old parameters transferred (100.00%), 8 start at zero, "
            "0 start fresh, 0 dropped") in lines
    assert any(line.lstrip().startswith("~ h.linear.weight [8x7] grown") for line in lines), result.stdout
    assert "function preserved: the new model computes what the old one did" in lines
    assert snapshot(root / "models") == before

    # a refused change: dry-run says so (exit 1) and writes nothing either
    write(root, {"specs/x.spec": REMOVE})
    result = run("build", "--dry-run", cwd=root)
    assert result.returncode == 1 and "refused" in result.stdout, result.stdout
    assert snapshot(root / "models") == before


def test_build_dry_run_fresh_and_policy_folders(tmp_path):
    pyproject = PYPROJECT_PLAIN + '\n[tool.specsurgery]\nspecs = "model_specs"\nmodels = "ckpt"\n'
    root = make_repo(tmp_path / "proj", {"pyproject.toml": pyproject, "model_specs/x.spec": OLD})
    result = run("build", "--dry-run", cwd=root)
    assert result.returncode == 0, result.stderr
    row = result.stdout.splitlines()[2]
    assert row.split()[:4] == ["p", "2,315", "would", "build"], result.stdout
    assert row.rstrip().endswith(str(root / "ckpt" / "p.safetensors")), row
    assert sorted(p.name for p in root.iterdir()) == [".git", "model_specs", "pyproject.toml"]


@pytest.mark.slow
def test_build_never_loses_the_checkpoint_it_replaces(project):
    """spec A (built) -> B -> back to A -> train -> B again: the trained weights must survive."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    root = project
    target = root / "models/p.safetensors"
    write(root, {"specs/x.spec": ADD})
    assert run("build", cwd=root).returncode == 0
    write(root, {"specs/x.spec": OLD})
    assert run("build", "--allow-lossy", cwd=root).returncode == 0
    assert inspect_json(root, "models/p.safetensors")["spec"] == canonical_of(OLD)

    # "training": same spec, new weights (written as a trainer would: a new file renamed into place)
    from specsurgery.checkpoint import read_header

    metadata = read_header(str(target)).metadata
    trained = {k: (v * 0 + np.float32(7.0)).astype(np.float32) for k, v in load_file(str(target)).items()}
    save_file(trained, str(target) + ".new", metadata=metadata)
    Path(str(target) + ".new").replace(target)
    trained_sha = sha256(target)

    write(root, {"specs/x.spec": ADD})
    result = run("build", cwd=root)
    assert result.returncode == 0, result.stdout + result.stderr
    kept = [p for p in (root / "models/history").iterdir() if sha256(p) == trained_sha]
    assert kept, "the trained checkpoint is not in history/"
    assert np.all(load_file(str(target))["a.linear.bias"] == 7.0), "the surgery did not start from the trained weights"
