"""The property tests draw the same inputs on every run (conftest.py): what
they draw depends on neither the modules loaded before them nor the clock."""
from __future__ import annotations

import importlib.util
import os
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st


def _draws() -> list[int]:
    seen = []

    @settings(max_examples=300)
    @given(st.integers(0, 10**7))
    def draw(x):
        seen.append(x)

    draw()
    return seen


@pytest.mark.skipif(os.environ.get("SPECSURGERY_EXPLORE") == "1", reason="exploring: fresh inputs on purpose")
def test_draws_do_not_depend_on_the_modules_loaded(tmp_path):
    """A module loaded between two runs (as another test in the worker may load
    one) holds constants hypothesis could draw; the two runs draw alike."""
    assert settings.default.derandomize and settings.default.database is None
    before = _draws()
    source = tmp_path / "holds_constants.py"
    source.write_text("WIDTHS = (4321, 65432, 1234567, 7654321)\n")
    spec = importlib.util.spec_from_file_location("holds_constants", source)
    module = importlib.util.module_from_spec(spec)
    sys.modules["holds_constants"] = module
    try:
        spec.loader.exec_module(module)
        after = _draws()
    finally:
        del sys.modules["holds_constants"]
    assert after == before
    assert len(set(before)) > 100  # a real stream of draws, not one value
