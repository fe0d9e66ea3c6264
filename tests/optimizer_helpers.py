"""Comparing two optimizers over two models of one spec, state for state."""
from __future__ import annotations

import torch


def waiting(optimizer, model) -> dict:
    """The masks of elements whose second moments wait for their first gradient, by parameter name."""
    masks = getattr(optimizer, "_ss_awaiting_gradient", {})
    return {n: masks[p] for n, p in model.named_parameters() if p in masks}


def same_optimizer_state(a, model_a, b, model_b) -> None:
    """Equal groups (hyperparameters and members), state and waiting masks, exactly."""
    sa, sb = a.state_dict(), b.state_dict()
    assert type(a) is type(b)
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for k, entries in sa["state"].items():
        assert entries.keys() == sb["state"][k].keys(), k
        for key, value in entries.items():
            assert torch.equal(value, sb["state"][k][key]), (k, key)
    wa, wb = waiting(a, model_a), waiting(b, model_b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[n], wb[n]) for n in wa)
