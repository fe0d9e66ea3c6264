"""The defaults a user gets with no pyproject.toml are the ones the README shows."""
from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path

from gitrepo_helpers import git, make_repo, run, write
from specsurgery.workflow.policy import Policy

REPO = Path(__file__).resolve().parents[1]

# 127 parameters; dropping group b with its encoder `hb` (3x4 + 3) and the 4x3
# columns of `act` that read it leaves 100 of 127: 78.74% carried over.
OLD = """\
schema s {
  group a {
    x: float
    y: float
    z: float
  }
  group b {
    p: float
    q: float
    r: float
    s: float
  }
}

model m(obs: s) {
  ha = relu(linear(obs.a, 12))
  hb = relu(linear(obs.b, 3))
  out act = linear(concat(ha, hb), 4)
}
"""
NEW = """\
schema s {
  group a {
    x: float
    y: float
    z: float
  }
}

model m(obs: s) {
  ha = relu(linear(obs.a, 12))
  out act = linear(ha, 4)
}
"""


def test_readme_policy_block_is_the_defaults():
    readme = (REPO / "README.md").read_text()
    block = re.search(r"```toml\n(\[tool\.specsurgery\]\n.*?)```", readme, re.S).group(1)
    shown = tomllib.loads(block)["tool"]["specsurgery"]
    defaults = {f.name: f.default for f in dataclasses.fields(Policy) if f.name != "root"}
    assert shown == defaults


def test_check_allow_lossy_without_pyproject_refuses_a_78_percent_transfer(tmp_path):
    root = make_repo(tmp_path / "proj", {"specs/m.spec": OLD})
    assert not (root / "pyproject.toml").exists()
    write(root, {"specs/m.spec": NEW})
    git("add", "-A", cwd=root)

    refused = run("check", "--allow-lossy", cwd=root)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert ("specs/m.spec:9:7: error: model m: only 78.74% of the old parameters carry over; the policy asks for "
            "min_transfer = 0.9 (lower it in [tool.specsurgery] if that is meant)") in refused.stderr.splitlines()

    write(root, {"pyproject.toml": "[tool.specsurgery]\nmin_transfer = 0.75\n"})
    allowed = run("check", "--allow-lossy", cwd=root)
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
    assert allowed.stdout.startswith("specs/m.spec:9:7: model m: 78.74% transferred (100 of 127)"), allowed.stdout
