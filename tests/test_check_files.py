"""`specsurgery check` on what a commit can hold besides an edited spec: a file
that does not exist, a spec removed with `git rm`, a spec pulled in with `use`
from another folder. Real repositories, the installed console script; no torch."""
from __future__ import annotations

import textwrap
from pathlib import Path

from gitrepo_helpers import col_of, git, line_of, make_repo, run, write

PYPROJECT = '[project]\nname = "demo"\nversion = "0"\n'
SCHEMA = textwrap.dedent("""\
    schema s {
      group hero {
        health: float
        mana: float
      }
    }
""")
USER = textwrap.dedent("""\
    use "../common/schema.spec"

    model p(obs: s) {
      h = relu(linear(obs.hero, 8))
      out a = linear(h, 3)
    }
""")


def repo(root: Path) -> Path:
    return make_repo(root, {"pyproject.toml": PYPROJECT, "common/schema.spec": SCHEMA, "specs/x.spec": USER})


def test_check_of_a_file_that_does_not_exist(tmp_path):
    root = repo(tmp_path / "proj")
    result = run("check", "nosuch.spec", cwd=root)
    assert result.returncode == 1
    assert result.stderr.strip() == "nosuch.spec: error: no such file"
    assert result.stdout == "" and "Traceback" not in result.stderr


def test_check_after_git_rm_of_a_spec(tmp_path):
    root = repo(tmp_path / "proj")
    git("rm", "-q", "specs/x.spec", cwd=root)
    result = run("check", cwd=root)
    assert result.returncode == 0, result.stderr
    at = f"git:HEAD:specs/x.spec:{line_of(USER, 'model p(')}:{col_of(USER, 'p(obs')}"
    assert result.stdout.splitlines() == [
        f"{at}: model p: removed with its spec: nothing is carried over, its checkpoint is no longer built"]


def test_check_after_git_rm_of_a_used_spec_fails_its_users(tmp_path):
    root = repo(tmp_path / "proj")
    git("rm", "-q", "common/schema.spec", cwd=root)
    result = run("check", cwd=root)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert lines[0] == "common/schema.spec: deleted (it defined no model)"
    assert lines[1].startswith("specs/x.spec:1:5: error: cannot use "), lines[1]


def test_a_used_spec_removed_feature_is_reported_at_its_own_file_and_line(tmp_path):
    root = repo(tmp_path / "proj")
    # Lines above the schema move it down in the working file; the feature's line is HEAD's.
    write(root, {"common/schema.spec": "# one\n# two\n\n" + SCHEMA.replace("    mana: float\n", "")})
    git("add", "-A", cwd=root)
    result = run("check", "--allow-lossy", "--min-transfer", "0", cwd=root)
    assert result.returncode == 0, result.stderr
    line, col = line_of(SCHEMA, "mana: float"), col_of(SCHEMA, "mana: float")
    assert result.stdout.splitlines()[1] == (
        f"git:HEAD:common/schema.spec:{line}:{col}: feature hero.mana was removed, but h.linear read it: "
        "the function changes wherever it was non-zero")
