"""The docs are executable: the README's set-up is CI's, and every example in
docs/ and the README parses, checks or runs.

How a fenced block is run depends on its info string:
  spec [file=NAME]        a whole file: it loads (parses, checks, types every model)
  spec error [file=NAME]  it is refused, and the next block shows exactly the errors
  spec v2                 uses version-2 ops: it loads once they are registered and,
                          until then, is refused for an unknown op only
  console                 each `$ specsurgery ...` line (torch-free commands) prints
                          exactly the lines under it and exits 0, or with N where
                          the last of them is `(exit N)`
  python                  it runs, in a fresh interpreter
  toml                    it is valid TOML
Spec blocks with `file=` are written, in page order, into a scratch folder the
console and python blocks run in, so later examples can `use` and plan them.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from specsurgery.errors import SpecError
from specsurgery.ops import LANGUAGE_OPS
from specsurgery.spec.load import load

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
TORCH_FREE = {"plan", "check", "schema", "map"}


@dataclass
class Block:
    page: Path
    line: int  # of the opening fence
    info: list[str]
    body: str

    @property
    def kind(self) -> str:
        return self.info[0] if self.info else ""

    @property
    def file(self) -> str:
        named = [w.split("=", 1)[1] for w in self.info if w.startswith("file=")]
        return named[0] if named else f"example_{self.line}.spec"

    def __str__(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


def fenced_blocks(page: Path) -> list[Block]:
    blocks, lines, i = [], page.read_text().splitlines(), 0
    while i < len(lines):
        opening = re.match(r"^```(.*)$", lines[i])
        if opening:
            start, body = i + 1, []
            i += 1
            while not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            blocks.append(Block(page, start, opening.group(1).split(), "\n".join(body) + "\n"))
        i += 1
    return blocks


def write_spec_files(blocks: list[Block], folder: Path) -> None:
    for block in blocks:
        if block.kind == "spec":
            (folder / block.file).write_text(block.body)


def load_in(folder: Path, block: Block):
    cwd = os.getcwd()
    os.chdir(folder)  # spans (and so messages) name the file as a user would type it
    try:
        return load([block.file])
    finally:
        os.chdir(cwd)


def all_blocks(kind: str) -> list:
    return [pytest.param(page, b, id=str(b)) for page in PAGES for b in fenced_blocks(page) if b.kind == kind]


@pytest.fixture
def scratch(tmp_path, request) -> Path:
    page = request.node.callspec.params["page"]
    write_spec_files(fenced_blocks(page), tmp_path)
    return tmp_path


def test_every_page_has_runnable_examples():
    for page in PAGES:
        kinds = {b.kind for b in fenced_blocks(page)}
        assert kinds & {"spec", "python", "console"}, f"{page} has no example a test runs"
    assert (REPO / "docs" / "language.md") in PAGES


@pytest.mark.parametrize("page,block", all_blocks("spec"))
def test_spec_example_loads(page, block, scratch):
    if "error" in block.info:
        blocks = fenced_blocks(page)
        shown = blocks[blocks.index(block) + 1]
        with pytest.raises(SpecError) as refused:
            load_in(scratch, block)
        assert refused.value.render() + "\n" == shown.body
    elif "v2" in block.info:
        called = set(re.findall(r"(?<!model )\b([a-z_]+)\(", block.body)) - {"category"}
        missing = called - set(LANGUAGE_OPS)
        if missing:
            with pytest.raises(SpecError) as refused:
                load_in(scratch, block)
            for d in refused.value.diagnostics:
                assert d.message.startswith("unknown op "), d.message
            pytest.skip(f"version-2 ops not registered yet: {', '.join(sorted(missing))}")
        load_in(scratch, block)
    else:
        loaded = load_in(scratch, block)
        assert loaded.schemas or loaded.models


@pytest.mark.parametrize("page,block", all_blocks("console"))
def test_console_example_prints_what_it_shows(page, block, scratch):
    runs = re.split(r"^\$ ", block.body, flags=re.M)[1:]
    assert runs, f"{block}: no command"
    for run in runs:
        command, _, shown = run.partition("\n")
        argv = shlex.split(command)
        assert argv[0] == "specsurgery" and argv[1] in TORCH_FREE, f"{block}: {command}"
        status = re.search(r"^\(exit (\d+)\)\n\Z", shown, flags=re.M)
        if status:
            shown = shown[:status.start()]
        result = subprocess.run([sys.executable, "-m", "specsurgery", *argv[1:]], cwd=scratch,
                                capture_output=True, text=True, timeout=120)
        assert result.stdout + result.stderr == shown, f"{block}: $ {command}"
        assert result.returncode == (int(status.group(1)) if status else 0), f"{block}: $ {command}"


@pytest.mark.parametrize("page,block", all_blocks("python"))
def test_python_example_runs(page, block, scratch):
    result = subprocess.run([sys.executable, "-c", block.body], cwd=scratch, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, f"{block}:\n{result.stderr}"


@pytest.mark.parametrize("page,block", all_blocks("toml"))
def test_toml_example_is_valid(page, block):
    tomllib.loads(block.body)


def test_readme_links_the_language_reference():
    readme = (REPO / "README.md").read_text()
    links = re.findall(r"\]\(([^)#]+\.md)[^)]*\)", readme)
    assert "docs/language.md" in links
    for link in links:
        assert (REPO / link).is_file(), link


# ---------------------------------------------------------------------------
# set-up


def readme_command(after: str) -> str:
    text = (REPO / "README.md").read_text()
    return text[text.index(after):].split("```", 2)[1].split("\n", 1)[1].strip()


def test_ci_runs_the_readme_test_command_as_written():
    ci_lines = (REPO / ".ci" / "run").read_text().splitlines()
    assert readme_command("Run the tests:") in ci_lines


def test_readme_set_up_takes_torch_from_the_cpu_index():
    for after in ("Build the example specs", "Run the tests:"):
        command = readme_command(after)
        assert command.startswith("pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu && ")


def test_readme_pre_commit_config_names_the_hook_this_repository_ships():
    yaml = pytest.importorskip("yaml")  # pre-commit's own dependency
    (block,) = [b for b in fenced_blocks(REPO / "README.md") if b.kind == "yaml"]
    config = yaml.safe_load(block.body)
    (repo,) = config["repos"]
    assert len(str(repo["rev"])) == 40  # a full commit SHA: the repository has no tags yet
    shipped = yaml.safe_load((REPO / ".pre-commit-hooks.yaml").read_text())
    assert [h["id"] for h in repo["hooks"]] == [h["id"] for h in shipped]
    assert all(h["verbose"] is True for h in shipped)  # the summary shows on success too
