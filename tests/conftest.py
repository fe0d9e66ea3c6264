"""Shared fixtures."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one torch thread is several times faster than many fighting."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
