"""Shared fixtures, and the hypothesis settings every property test inherits.

Reproducible by default: `python -m pytest -q` (CI's command) draws the same
inputs on every run, on every machine, whatever ran before in the worker
(profile "reproducible": derandomized, no example database, no deadline).
To explore with fresh random inputs instead, set SPECSURGERY_EXPLORE=1 (profile
"explore"): each run draws new ones, and with `--hypothesis-seed=N` run N's
again; a failure prints the `@reproduce_failure(...)` line that replays it.
"""
from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

# Time never decides anything: no deadline, and a slow generator is no failure.
_COMMON = dict(database=None, deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("reproducible", derandomize=True, **_COMMON)
settings.register_profile("explore", derandomize=False, **_COMMON)
settings.load_profile("explore" if os.environ.get("SPECSURGERY_EXPLORE") == "1" else "reproducible")


def _draw_no_source_constants() -> None:
    """Hypothesis (6.131 on) sometimes draws a literal constant found in the source
    of the non-test modules loaded so far. Which modules those are depends on
    which tests ran before in the same xdist worker (cartpole_surgery, the
    product modules a test happens to import), and any constant edited in the
    product changes the inputs of every property: a derandomized test then
    draws other inputs in CI than locally. Drawn from an empty pool, the inputs
    depend on the test's seed and hypothesis's version only."""
    try:
        from hypothesis.internal.conjecture import providers
    except ImportError:  # pragma: no cover - another hypothesis layout
        return
    if hasattr(providers, "_get_local_constants"):
        empty = providers.Constants()
        providers._get_local_constants = lambda: empty


_draw_no_source_constants()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one torch thread is several times faster than many fighting."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
