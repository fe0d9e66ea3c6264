"""The real pre-commit framework runs this repository's `specsurgery-check` hook.

pre-commit clones a hook repository at a revision, so the working tree under
test (perhaps uncommitted) is copied - tracked plus untracked-not-ignored files,
as `git ls-files -co --exclude-standard` lists them - into a temporary git
repository and committed there; `.pre-commit-config.yaml` of a temporary user
project points at that copy, `rev:` its commit.

No network while pre-commit runs: it installs the hook repository with pip into
its own virtualenv, and pip is told to use nothing but a wheelhouse of the core
dependencies and the build backend (PIP_NO_INDEX, PIP_FIND_LINKS, no pip config
files, and proxies that lead nowhere). The wheelhouse is downloaded once, into
$SPECSURGERY_WHEELHOUSE (default ~/.cache/specsurgery/wheelhouse), and reused.
torch is an optional extra: the hook's virtualenv must not contain it.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import time
import tomllib
from pathlib import Path

import pytest

from gitrepo_helpers import REPO, base_env, git, head, make_repo, tracked_and_untracked, write

pytestmark = pytest.mark.slow

HOOK_ID = "specsurgery-check"
DEAD_PROXY = "http://127.0.0.1:9"  # the discard port: any attempt to reach an index fails at once

OLD = textwrap.dedent("""\
    schema s {
      vocab heroes = [axe, bane]
      group hero {
        health: float
        mana: float
        hero_id: category(heroes)
      }
    }

    model p(obs: s) {
      he = embed(obs.hero.hero_id, 4)
      h = relu(linear(concat(obs.hero, he), 8))
      core = lstm(h, 16)
      out a = linear(core, 3)
    }
""")
ADD = OLD.replace("    mana: float\n", "    mana: float\n    level: int\n")
REMOVE = OLD.replace("    mana: float\n", "")
MANA_REMOVED = ("git:HEAD:specs/x.spec:5:5: feature hero.mana was removed, but h.linear read it: "
                "the function changes wherever it was non-zero")
PYPROJECT = '[project]\nname = "user-project"\nversion = "0"\n'


def core_requirements() -> list[str]:
    """What installing the hook needs: the build backend and the core dependencies (no extras)."""
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    return list(data["build-system"]["requires"]) + list(data["project"]["dependencies"])


def precommit_cmd() -> list[str]:
    try:
        import pre_commit  # noqa: F401
    except ImportError:
        pytest.fail(f"pre-commit is not installed for {sys.executable}: pip install 'specsurgery[test]'")
    return [sys.executable, "-m", "pre_commit"]


@pytest.fixture(scope="session")
def wheelhouse() -> Path:
    """Wheels of the core dependencies and hatchling, downloaded once (this is the only network use)."""
    folder = Path(os.environ.get("SPECSURGERY_WHEELHOUSE") or "~/.cache/specsurgery/wheelhouse").expanduser()
    requirements = core_requirements()
    stamp = folder / f".complete-{sys.implementation.cache_tag}-{sysconfig.get_platform()}.json"
    want = {"python": sys.implementation.cache_tag, "platform": sysconfig.get_platform(),
            "requirements": sorted(requirements)}
    if stamp.exists():
        try:
            if json.loads(stamp.read_text()) == want:
                return folder
        except json.JSONDecodeError:
            pass
    folder.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "-q",
                             "-d", str(folder), *requirements],
                            capture_output=True, text=True, timeout=1200)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
        pytest.fail(f"could not download the wheelhouse for the offline pre-commit test into {folder} "
                    f"(the package registry must be reachable once; set SPECSURGERY_WHEELHOUSE to a folder "
                    f"that already holds wheels of: {' '.join(requirements)}):\n{tail}", pytrace=False)
    names = {p.name.split("-")[0].lower().replace("_", "-") for p in folder.glob("*.whl")}
    missing = {"hatchling", "lark", "pydantic", "jsonschema", "safetensors", "numpy"} - names
    assert not missing, f"the wheelhouse {folder} lacks {missing}"
    stamp.write_text(json.dumps(want))
    print(f"wheelhouse downloaded in {time.monotonic() - started:.1f}s: {folder}")
    return folder


@pytest.fixture(scope="session")
def hook_repo(tmp_path_factory) -> tuple[Path, str]:
    """A committed copy of the working tree under test: (path, commit sha)."""
    dest = tmp_path_factory.mktemp("hook") / "specsurgery"
    dest.mkdir()
    copied = 0
    for rel in tracked_and_untracked(REPO):
        src = REPO / rel
        if not src.exists() and not src.is_symlink():
            continue  # tracked but deleted in the working tree
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            os.symlink(os.readlink(src), target)
        else:
            shutil.copy2(src, target)
        copied += 1
    assert (dest / ".pre-commit-hooks.yaml").exists() and (dest / "pyproject.toml").exists()
    git("-c", "init.defaultBranch=main", "init", "-q", cwd=dest)
    git("add", "-A", "-f", cwd=dest)  # exactly the files copied, whatever the copy's .gitignore says
    git("commit", "-q", "-m", f"snapshot of {REPO} ({copied} files)", cwd=dest)
    return dest, head(dest)


def offline_env(home: Path, wheelhouse: Path) -> dict[str, str]:
    env = {k: v for k, v in base_env().items()
           if not k.startswith(("PIP_", "VIRTUALENV_", "PRE_COMMIT")) and k.lower() not in
           ("http_proxy", "https_proxy", "all_proxy", "no_proxy")}
    env.update({
        "PRE_COMMIT_HOME": str(home),
        "PRE_COMMIT_COLOR": "never",
        "PIP_NO_INDEX": "1",
        "PIP_FIND_LINKS": str(wheelhouse),
        "PIP_CONFIG_FILE": os.devnull,  # no index URLs, find-links or constraints from pip.conf
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "PIP_NO_CACHE_DIR": "1",
        "VIRTUALENV_NO_PERIODIC_UPDATE": "1",
        "http_proxy": DEAD_PROXY, "https_proxy": DEAD_PROXY, "HTTP_PROXY": DEAD_PROXY, "HTTPS_PROXY": DEAD_PROXY,
        "all_proxy": DEAD_PROXY, "ALL_PROXY": DEAD_PROXY,
    })
    return env


def user_repo(root: Path, hook: tuple[Path, str], pyproject: str = PYPROJECT) -> Path:
    path, sha = hook
    config = textwrap.dedent(f"""\
        repos:
          - repo: {path}
            rev: {sha}
            hooks:
              - id: {HOOK_ID}
        """)
    return make_repo(root, {".pre-commit-config.yaml": config, "pyproject.toml": pyproject, "specs/x.spec": OLD,
                            "README.md": "a project that keeps its model specs in git\n"})


def precommit(*args: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(precommit_cmd() + list(args), cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=1200)


@pytest.fixture(scope="module")
def installed(tmp_path_factory, wheelhouse, hook_repo):
    """pre-commit's home with the hook's environment installed, offline: (home, env)."""
    home = tmp_path_factory.mktemp("pre-commit-home")
    env = offline_env(home, wheelhouse)
    root = user_repo(tmp_path_factory.mktemp("installer") / "proj", hook_repo)
    started = time.monotonic()
    result = precommit("install-hooks", cwd=root, env=env)
    took = time.monotonic() - started
    assert result.returncode == 0, (f"offline install of the hook failed ({took:.0f}s):\n"
                                    f"{result.stdout}\n{result.stderr}")
    log = home / "pre-commit.log"
    assert not log.exists(), log.read_text()
    print(f"hook environment installed offline in {took:.1f}s")
    return home, env


def hook_env_dirs(home: Path) -> list[Path]:
    return sorted(home.glob("repo*/py_env-*"))


def test_hook_environment_has_the_core_dependencies_and_no_torch(installed, hook_repo):
    home, env = installed
    (venv,) = hook_env_dirs(home)
    (site,) = venv.glob("lib/python*/site-packages")
    names = {p.name.lower() for p in site.iterdir()}
    for needed in ("specsurgery", "lark", "pydantic", "jsonschema", "safetensors", "numpy"):
        assert needed in names, f"{needed} is not in the hook environment: {sorted(names)}"
    assert not any(n == "torch" or n.startswith("torch-") for n in names), "torch was installed into the hook env"
    assert not any(n.startswith(("nvidia", "triton", "matplotlib", "hypothesis")) for n in names), sorted(names)
    python = venv / "bin" / "python"
    result = subprocess.run([str(python), "-c", "import torch"], capture_output=True, text=True, env=env, cwd=home)
    assert result.returncode != 0 and "No module named 'torch'" in result.stderr
    # the hook runs the copy of this working tree, installed into its own environment
    result = subprocess.run([str(python), "-c", "import specsurgery; print(specsurgery.__file__)"],
                            capture_output=True, text=True, env=env, check=True, cwd=home)
    assert Path(result.stdout.strip()).is_relative_to(site), result.stdout
    installed_check = (site / "specsurgery" / "workflow" / "check.py").read_text()
    assert installed_check == (REPO / "specsurgery" / "workflow" / "check.py").read_text()


def test_pre_commit_run_rejects_a_removed_feature_and_accepts_an_added_one(installed, hook_repo, tmp_path):
    home, env = installed
    root = user_repo(tmp_path / "proj", hook_repo)

    write(root, {"specs/x.spec": REMOVE})
    git("add", "specs/x.spec", cwd=root)
    started = time.monotonic()
    result = precommit("run", "--files", "specs/x.spec", cwd=root, env=env)
    took = time.monotonic() - started
    out = result.stdout + result.stderr
    assert result.returncode != 0, out
    assert "specsurgery check" in out and "Failed" in out and f"- hook id: {HOOK_ID}" in out, out
    lines = [line.strip() for line in out.splitlines()]
    assert "specs/x.spec:9:7: model p: 99.55% transferred (1,771 of 1,779), 0 zeroed, 0 fresh, " \
           "function NOT preserved" in lines, out
    assert MANA_REMOVED in lines, out
    assert any(line.startswith("specs/x.spec:9:7: error: model p: the change does not preserve the function")
               for line in lines), out
    assert took < 120, f"the hook took {took:.0f}s (is torch being imported?)"

    write(root, {"specs/x.spec": ADD})
    git("add", "specs/x.spec", cwd=root)
    result = precommit("run", "--files", "specs/x.spec", cwd=root, env=env)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "specsurgery check" in out and "Passed" in out, out
    # the hook is verbose: a passing change shows its summary too, not only "Passed"
    lines = [line.strip() for line in out.splitlines()]
    assert "specs/x.spec:11:7: model p: 100.00% transferred (1,779 of 1,779), 8 zeroed, 0 fresh, " \
           "function preserved" in lines, out

    # without --files: the staged files
    result = precommit("run", cwd=root, env=env)
    assert result.returncode == 0 and "Passed" in result.stdout, result.stdout + result.stderr
    # nothing .spec staged: the hook is skipped
    write(root, {"README.md": "changed\n"})
    git("add", "-A", cwd=root)
    git("reset", "-q", "specs/x.spec", cwd=root)
    result = precommit("run", cwd=root, env=env)
    assert result.returncode == 0 and "Skipped" in result.stdout, result.stdout + result.stderr


def test_git_commit_with_the_installed_hook(installed, hook_repo, tmp_path):
    home, env = installed
    root = user_repo(tmp_path / "proj", hook_repo)

    def commit(message: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "commit", "-m", message], cwd=root, env=env, capture_output=True, text=True,
                              timeout=1200)

    result = precommit("install", cwd=root, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (root / ".git" / "hooks" / "pre-commit").exists()
    first = head(root)

    write(root, {"specs/x.spec": REMOVE})
    git("add", "specs/x.spec", cwd=root)
    result = commit("drop mana")
    out = result.stdout + result.stderr
    assert result.returncode != 0, out
    assert head(root) == first, "the commit went through"
    assert MANA_REMOVED in [line.strip() for line in out.splitlines()], out
    assert "does not preserve the function" in out

    # a change that is lossy on purpose, committed past the hook (the README says how)
    result = subprocess.run(["git", "commit", "-m", "drop mana, on purpose"], cwd=root,
                            env={**env, "SKIP": HOOK_ID}, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout + result.stderr
    assert "specsurgery check" in out and "Skipped" in out, out
    assert git("show", "HEAD:specs/x.spec", cwd=root).stdout == REMOVE
    git("reset", "-q", "--soft", first, cwd=root)

    write(root, {"specs/x.spec": ADD})
    git("add", "specs/x.spec", cwd=root)
    result = commit("add level")
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "Passed" in out
    assert head(root) != first
    assert git("show", "HEAD:specs/x.spec", cwd=root).stdout == ADD

    # the project's policy allows lossy changes: the same removal is committed (the hook reads pyproject.toml)
    write(root, {"pyproject.toml": PYPROJECT + "\n[tool.specsurgery]\nallow_lossy = true\n",
                 "specs/x.spec": ADD.replace("    mana: float\n", "")})
    git("add", "-A", cwd=root)
    second = head(root)
    result = commit("drop mana, allowed")
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "function NOT preserved" in out or "Passed" in out
    assert head(root) != second
