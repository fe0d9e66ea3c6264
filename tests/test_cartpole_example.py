"""The CartPole example, run short: the agent gains an observation midway,
surgery in memory keeps what it computes and carries its Adam, training goes on
(the full run is the benchmark: `python examples/cartpole_surgery.py --plot ...`)."""
from __future__ import annotations

import sys
from pathlib import Path


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_cartpole_agent_trains_through_surgery(one_thread):
    sys.path.insert(0, str(EXAMPLES))
    try:
        import cartpole_surgery
    finally:
        sys.path.remove(str(EXAMPLES))
    result = cartpole_surgery.run(updates=4, seed=0)
    assert result["preserved"] == 0.0  # the new agent computes what the old one did
    assert result["optimizer"] == "Adam"
    s = result["plan"].summary
    assert s.function_preserving and s.transferred == s.old_params and s.zeroed == 64  # x_dot's column of h1
    runs = result["runs"]
    assert set(runs) == {"surgery, optimizer carried", "surgery, fresh Adam", "new spec from scratch"}
    carried, fresh = runs["surgery, optimizer carried"], runs["surgery, fresh Adam"]
    before = [point for point in carried if point[0] <= result["change_at"]]
    assert before and fresh[:len(before)] == before  # both continue the same run
    assert carried[-1][0] == fresh[-1][0] == runs["new spec from scratch"][-1][0] == 2 * result["change_at"]
