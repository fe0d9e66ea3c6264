"""Golden error texts: every wrong spec in tests/corpus/errors/ and exactly what the user sees.

Each `NN_name.spec` holds one mistake (a few hold several, to show that all are
reported); `NN_name.expected` beside it is the exact stderr of
`specsurgery build tests/corpus/errors/NN_name.spec` run from the repository
root: `file:line:col: error: message`, the source line, a caret line, a hint.
Files under support/ are only reached through `use`, never loaded on their own.

To refresh an expected text after a deliberate wording change, run the loader
on the file and read the new text before saving it: the point of these files
is that a person has judged every message.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from specsurgery.errors import SpecError
from specsurgery.spec.load import load

ROOT = Path(__file__).resolve().parents[1]
CORPUS = Path("tests/corpus/errors")  # relative: spans, and so the messages, carry this path
CASES = sorted(p.stem for p in (ROOT / CORPUS).glob("*.spec"))  # top level only: support/ is used, not loaded


def expected_text(case: str) -> str:
    return (ROOT / CORPUS / f"{case}.expected").read_text(encoding="utf-8")


def spec_path(case: str) -> str:
    return (CORPUS / f"{case}.spec").as_posix()


@pytest.fixture(autouse=True)
def _at_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # the corpus is loaded by relative path, as a user at the root would


def test_corpus_is_complete():
    assert len(CASES) >= 30
    assert sorted(p.stem for p in (ROOT / CORPUS).glob("*.expected")) == CASES
    numbers = [case.split("_", 1)[0] for case in CASES]
    assert len(set(numbers)) == len(numbers), "two corpus files share a number"


@pytest.mark.parametrize("case", CASES)
def test_error_text(case):
    with pytest.raises(SpecError) as raised:
        load([spec_path(case)])
    assert raised.value.render() + "\n" == expected_text(case)


@pytest.mark.parametrize("case", CASES)
def test_every_diagnostic_points_into_a_file(case):
    with pytest.raises(SpecError) as raised:
        load([spec_path(case)])
    for diagnostic in raised.value.diagnostics:
        span = diagnostic.span
        assert span is not None and span.line >= 1 and span.column >= 1, diagnostic
        assert span.file.startswith(CORPUS.as_posix()), diagnostic


def _build(paths: list[str], out: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "SPECSURGERY_DEBUG"}
    return subprocess.run([sys.executable, "-m", "specsurgery", "build", *paths, "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)


# A few cases through the real CLI, one process each (a syntax error, several
# model errors, a cycle across two files); the whole corpus goes through one
# process below.
CLI_CASES = [c for c in CASES if c.split("_", 1)[0] in ("06", "50", "53")]


@pytest.mark.parametrize("case", CLI_CASES)
def test_cli_build_reports_the_error(case, tmp_path):
    out = tmp_path / "models"
    result = _build([spec_path(case)], out)
    assert result.returncode == 1
    assert result.stderr == expected_text(case)
    assert "Traceback" not in result.stdout + result.stderr
    assert not out.exists() or not any(out.iterdir())


def test_cli_build_reports_every_file(tmp_path):
    """Several broken files in one build: each file's errors, in order, nothing written."""
    out = tmp_path / "models"
    result = _build([spec_path(case) for case in CASES], out)
    assert result.returncode == 1
    assert result.stderr == "".join(expected_text(case) for case in CASES)
    assert "Traceback" not in result.stdout + result.stderr
    assert not out.exists() or not any(out.iterdir())
