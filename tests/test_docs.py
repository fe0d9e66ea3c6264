"""The docs are executable: the README's commands are CI's, and every example
in docs/ and the README parses, checks or runs."""
from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def fenced_blocks(path: Path) -> list[tuple[str, str, int]]:
    """(info string, body, line of the opening fence) of each ``` block."""
    blocks, lines, i = [], path.read_text().splitlines(), 0
    while i < len(lines):
        opening = re.match(r"^```(.*)$", lines[i])
        if opening:
            start, body = i + 1, []
            i += 1
            while not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            blocks.append((opening.group(1).strip(), "\n".join(body) + "\n", start))
        i += 1
    return blocks


def readme_command(after: str) -> str:
    text = (REPO / "README.md").read_text()
    block = text[text.index(after):]
    return block.split("```\n", 2)[1].strip()


def test_ci_runs_the_readme_test_command_as_written():
    ci_lines = (REPO / ".ci" / "run").read_text().splitlines()
    assert readme_command("Run the tests:") in ci_lines


def test_readme_set_up_takes_torch_from_the_cpu_index():
    for after in ("Build the example specs", "Run the tests:"):
        command = readme_command(after)
        assert command.startswith("pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu && ")
