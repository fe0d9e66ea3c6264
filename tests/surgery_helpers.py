"""Helpers for the surgery scenario tests: a trained-looking old checkpoint,
plan, apply, verify, and the assertions every scenario makes.

`run_surgery(old_text, new_text, folder)` writes the old model's checkpoint with
training-like weights (every element drawn from a seeded normal with std 0.5:
biases non-zero, layernorm weights far from 1, nothing like the init), plans
the surgery from the old spec to the new one, applies it and, on demand,
verifies the result on random states. Results are cached per (old, new) pair,
so a scenario that several tests look at is carried out once.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Optional

import torch
from safetensors.torch import load_file

from specsurgery.checkpoint import write_checkpoint
from specsurgery.ir import build_graph
from specsurgery.spec import model as m
from specsurgery.spec.canonical import canonical
from specsurgery.spec.load import load_text
from specsurgery.surgery.apply import apply_plan
from specsurgery.surgery.diff import make_plan
from specsurgery.surgery.plan import Plan
from specsurgery.surgery.verify import verify

OLD_FILE, NEW_FILE = "old.spec", "new.spec"
TOL = 1e-5


def load_model(text: str, path: str) -> m.ModelSpec:
    return load_text(text, path).model()


def edit(text: str, *changes: tuple[str, str]) -> str:
    """Apply (before, after) replacements, each of which must match exactly once."""
    for before, after in changes:
        count = text.count(before)
        assert count == 1, f"edit: {before!r} occurs {count} times"
        text = text.replace(before, after)
    return text


def line_of(text: str, needle: str) -> int:
    """The 1-based line of the one line containing `needle`."""
    hits = [i for i, line in enumerate(text.splitlines(), 1) if needle in line]
    assert len(hits) == 1, f"{needle!r} is on lines {hits}"
    return hits[0]


def trained_weights(spec: m.ModelSpec, seed: int = 1234, std: float = 0.5) -> dict[str, torch.Tensor]:
    """Every parameter ~ N(0, std²), seeded: what a trained model looks like to surgery."""
    graph = build_graph(spec)
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name, (node, local) in graph.parameters().items():
        shape = tuple(node.params[local].shape)
        out[name] = torch.randn(shape, generator=generator) * std
    return out


def write_trained(spec: m.ModelSpec, path: str, seed: int = 1234) -> dict[str, torch.Tensor]:
    tensors = trained_weights(spec, seed)
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    write_checkpoint(path, canonical(spec), spec.model.name, shapes, tensors.items())
    return tensors


@dataclass
class Outcome:
    old_text: str
    new_text: str
    old_spec: m.ModelSpec
    new_spec: m.ModelSpec
    plan: Plan
    old_ckpt: str
    new_ckpt: str
    states: int = 1000

    @functools.cached_property
    def report(self) -> dict:
        return verify(self.old_ckpt, self.new_ckpt, states=self.states)

    @functools.cached_property
    def old(self) -> dict[str, torch.Tensor]:
        return load_file(self.old_ckpt)

    @functools.cached_property
    def new(self) -> dict[str, torch.Tensor]:
        return load_file(self.new_ckpt)

    def param(self, name: str):
        return next(p for p in self.plan.params if p.name == name)


_CACHE: dict[tuple[str, str], Outcome] = {}


def run_surgery(old_text: str, new_text: str, folder: str) -> Outcome:
    key = (old_text, new_text)
    if key in _CACHE:
        return _CACHE[key]
    os.makedirs(folder, exist_ok=True)
    n = len(_CACHE)
    old_spec = load_model(old_text, OLD_FILE)
    new_spec = load_model(new_text, NEW_FILE)
    old_ckpt = os.path.join(folder, f"s{n}-old.safetensors")
    new_ckpt = os.path.join(folder, f"s{n}-new.safetensors")
    write_trained(old_spec, old_ckpt)
    plan = make_plan(old_spec, new_spec)
    apply_plan(plan, old_ckpt, new_spec, new_ckpt)
    out = _CACHE[key] = Outcome(old_text, new_text, old_spec, new_spec, plan, old_ckpt, new_ckpt)
    return out


def check(o: Outcome, *, old_params: int, new_params: int, transferred: int, zeroed: int, fresh: int,
          dropped: int, preserving: bool, reasons: Optional[list[tuple[str, str, int]]] = None,
          verify_states: bool = True) -> None:
    """The exact summary of the plan, and the function check proven on data.

    `reasons`: (exact message, file, line) for each reason, in order.
    """
    s = o.plan.summary
    got = dict(old_params=s.old_params, new_params=s.new_params, transferred=s.transferred, zeroed=s.zeroed,
               fresh=s.fresh, dropped=s.dropped, preserving=s.function_preserving)
    want = dict(old_params=old_params, new_params=new_params, transferred=transferred, zeroed=zeroed,
                fresh=fresh, dropped=dropped, preserving=preserving)
    assert got == want, "\n" + "\n".join(r.render() for r in s.reasons)
    # The books balance: every new element is copied, zeroed or fresh; every old one copied or dropped.
    assert s.transferred + s.zeroed + s.fresh + s.identity == s.new_params
    assert s.transferred + s.dropped == s.old_params
    if preserving:
        assert s.reasons == ()
    else:
        assert reasons is not None, [(r.message, r.file, r.line) for r in s.reasons]
        assert len(s.reasons) == len(reasons), [r.render() for r in s.reasons]
        for r, (message, file, line) in zip(s.reasons, reasons):
            assert r.message == message, (message, r.message)
            assert (r.file, r.line) == (file, line), (r.render(), file, line)
    if verify_states:
        worst = o.report["max"]
        if preserving:
            assert worst < TOL, o.report
        else:
            assert worst > TOL, o.report


def stepwise_report(old_ckpt: str, new_ckpt: str, states: int = 1000) -> dict:
    """A feed-forward old model against a recurrent new one (an lstm was added):
    verify() runs the old model on each step alone, the new one over the steps."""
    report = verify(old_ckpt, new_ckpt, states=states)
    assert report["steps"] > 1, report
    return report
