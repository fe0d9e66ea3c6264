"""`build` says what it is about to write (models, parameters, bytes) before it writes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from specsurgery.workflow.build import build

from small_specs import ADD_LEVEL, HERO_AGENT

REPO = Path(__file__).resolve().parents[1]



class Stop(Exception):
    pass


def test_the_first_build_of_specs_announces_its_gigabyte_before_writing(tmp_path):
    said = []

    def announce(text):
        said.append(text)
        raise Stop  # nothing may have been written yet

    out = tmp_path / "models"
    with pytest.raises(Stop):
        build([str(REPO / "specs")], out=str(out), announce=announce)
    assert not out.exists()
    assert said == [
        f"writing 4 checkpoints to {out}, about 1.28 GB:\n"
        "model       parameters     size  checkpoint\n"
        "---------  -----------  -------  ----------\n"
        "agent          182,567   735 kB  new\n"
        "five       157,906,450   632 MB  new\n"
        "five_next  160,005,266   640 MB  new\n"
        "policy       1,586,538  6.35 MB  new"]


def specsurgery(*args, cwd):
    return subprocess.run([sys.executable, "-m", "specsurgery", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def test_build_announces_on_stderr_and_the_sizes_hold(tmp_path):
    (tmp_path / "a.spec").write_text(HERO_AGENT)
    first = specsurgery("build", "a.spec", "--out", "models", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert first.stderr.splitlines()[:4] == [
        "writing 1 checkpoint to models, about 1.02 kB:",
        "model  parameters     size  checkpoint",
        "-----  ----------  -------  ----------",
        "agent          91  1.02 kB  new",
    ]
    written = os.path.getsize(tmp_path / "models" / "agent.safetensors")
    report = json.loads(specsurgery("build", "a.spec", "--out", "models", "--json", cwd=tmp_path).stdout)
    (row,) = report["models"]
    assert row["action"] == "unchanged"
    assert abs(row["bytes"] - written) <= 0.1 * written, (row["bytes"], written)

    again = specsurgery("build", "a.spec", "--out", "models", cwd=tmp_path)
    assert again.returncode == 0 and again.stderr == ""  # nothing to write, nothing said

    (tmp_path / "a.spec").write_text(ADD_LEVEL)
    dry = specsurgery("build", "a.spec", "--out", "models", "--dry-run", cwd=tmp_path)
    assert dry.returncode == 0 and "writing" not in dry.stderr
    surgery = specsurgery("build", "a.spec", "--out", "models", cwd=tmp_path)
    assert surgery.returncode == 0, surgery.stderr
    assert surgery.stderr.splitlines()[3] == "agent          99  1.06 kB  surgery (the previous one kept in history/)"
