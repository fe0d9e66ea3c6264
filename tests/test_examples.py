"""The example of the README runs: train, save, change the spec, surgery in memory, keep training."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_train_and_grow_runs_in_a_short_version(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "examples" / "train_and_grow.py"), "--steps", "3",
                             "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "function preserved" in out and "ok=True" in out
    before, after = re.search(r"held-out loss: ([\d.]+) before the surgery, ([\d.]+) right after", out).groups()
    assert before == after  # the surgery changed nothing the model computes
    assert "saved with metadata {'steps': '3'}" in out
    assert (tmp_path / "agent.safetensors").exists()
