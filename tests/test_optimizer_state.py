"""Optimizer state through surgery: after a function-preserving surgery one more
step moves every copied parameter exactly as the same step moves it in the old
model and leaves the weights reading the new feature at zero (Adam, AdamW with
weight decay, SGD with momentum, RMSprop, Adagrad); new elements follow their
optimizer's rule; the state saved beside a checkpoint reads back equal, and
`apply` on disk carries it to the moments surgery in memory gives."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open

import specsurgery as ss
from specsurgery.api import read_spec
from specsurgery.optimizer_state import carry_optimizer, carry_optimizer_file, optimizer_path
from specsurgery.surgery.apply import apply_plan
from specsurgery.surgery.diff import make_plan

OLD = """schema s {
  vocab kinds = [a, b, c]
  group obs {
    x1: float
    x2: float
    k: category(kinds)
  }
}
model m(o: s) {
  e = embed(o.obs.k, 3)
  h = relu(linear(concat(o.obs, e), 8))
  out y = linear(h, 2)
}
"""
# `wind` in the middle of the group, and two more hidden units
NEW = OLD.replace("    x2: float\n", "    wind: float\n    x2: float\n").replace("8))", "10))")
WIND = 1  # its column in obs (and so in h.linear.weight)

OPTIMIZERS = {
    "Adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    "Adam-amsgrad": lambda ps: torch.optim.Adam(ps, lr=1e-2, amsgrad=True, weight_decay=1e-3),
    "AdamW": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
    "SGD": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, nesterov=True),
    "RMSprop": lambda ps: torch.optim.RMSprop(ps, lr=1e-3, momentum=0.5, centered=True),
    "Adagrad": lambda ps: torch.optim.Adagrad(ps, lr=1e-2),
}


def batch(seed: int, wind: bool, n: int = 16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g)
    if wind:  # the new feature, fed 0
        x = torch.cat([x[:, :WIND], torch.zeros(n, 1), x[:, WIND:]], dim=1)
    return {"obs": x, "obs.k": torch.randint(0, 3, (n,), generator=g)}


def step(model, optimizer, inputs) -> None:
    optimizer.zero_grad()
    (model(inputs)["y"] ** 2).sum().backward()
    optimizer.step()


def trained(make, tmp_path, steps: int = 5):
    """The old model after a few steps, and its surgered twin on disk, loaded."""
    torch.manual_seed(0)
    old = ss.compile(OLD, seed=3)
    optimizer = make(old.parameters())
    for i in range(steps):
        step(old, optimizer, batch(i, wind=False))
    plan = make_plan(read_spec(OLD), read_spec(NEW))
    old_path, new_path = str(tmp_path / "old.safetensors"), str(tmp_path / "new.safetensors")
    old.save(old_path, optimizer=optimizer)
    apply_plan(plan, old_path, read_spec(NEW), new_path)
    return old, optimizer, plan, ss.load(new_path), new_path


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_one_more_step_moves_copied_parameters_as_in_the_old_model(kind, tmp_path, one_thread):
    old, optimizer, plan, _, _ = trained(OPTIMIZERS[kind], tmp_path)
    result = ss.surgery(old, NEW, optimizer=optimizer)  # in memory
    new, carried = result.model, result.optimizer
    assert type(carried) is type(optimizer)
    assert [{k: v for k, v in g.items() if k != "params"} for g in carried.param_groups] == \
           [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    assert sum(len(g["params"]) for g in carried.param_groups) == len(list(new.parameters()))
    before = {n: p.detach().clone() for n, p in new.named_parameters()}
    assert before["h.linear.weight"][:8, WIND].abs().max() == 0
    # one step: after it the new units' outgoing weights are no longer zero, so the functions part
    step(old, optimizer, batch(100, wind=False))
    step(new, carried, batch(100, wind=True))
    olds = dict(old.named_parameters())
    news = dict(new.named_parameters())
    for entry in plan.params:
        if entry.source is None:
            continue
        got, want = news[entry.name].detach(), olds[entry.source].detach()
        if entry.name == "h.linear.weight":  # rows: 8 old units then 2 new; columns: wind is new
            got = torch.cat([got[:8, :WIND], got[:8, WIND + 1:]], dim=1)
        elif entry.name == "h.linear.bias":
            got = got[:8]
        elif entry.name == "y.linear.weight":
            got = got[:, :8]
        assert torch.equal(got, want), f"{kind}: {entry.name} moved otherwise than in the old model"
    assert news["h.linear.weight"][:8, WIND].abs().max() == 0, "a weight reading the new feature moved"


def test_new_elements_follow_the_rule_of_their_optimizer(tmp_path, one_thread):
    old, optimizer, plan, new, _ = trained(OPTIMIZERS["Adam"], tmp_path)
    carried = carry_optimizer(optimizer, old, new, plan)
    old_state = optimizer.state[old.get_parameter("h.linear.weight")]
    state = carried.state[new.get_parameter("h.linear.weight")]
    assert torch.equal(state["step"], old_state["step"])
    # first moments of the new column and the new rows: zero
    assert state["exp_avg"][:8, WIND].abs().max() == 0 and state["exp_avg"][8:].abs().max() == 0
    # second moments: the mean of the parameter's copied ones, so a new element's first update is bounded
    mean = old_state["exp_avg_sq"].double().mean().float()
    assert torch.allclose(state["exp_avg_sq"][:8, WIND], mean.expand(8))
    assert torch.allclose(state["exp_avg_sq"][8:], mean.expand(2, 6))
    assert torch.equal(state["exp_avg_sq"][:8, WIND + 1:], old_state["exp_avg_sq"][:, WIND:])


@pytest.mark.parametrize("kind", ["Adam", "AdamW", "RMSprop"])
def test_first_updates_of_new_elements_are_normal_sized(kind, tmp_path, one_thread):
    """The issue's finding: new second moments at zero with the old step count made the first
    updates of new elements 4.5 times a normal one. Here each new element's second moment
    starts at the square of its first gradient: its first update is at most lr (Adam: (1 - beta1)
    lr), as large as a settled element's can be."""
    old, optimizer, plan, new, _ = trained(OPTIMIZERS[kind], tmp_path, steps=30)
    carried = carry_optimizer(optimizer, old, new, plan)
    weight = new.get_parameter("h.linear.weight")
    lr = carried.param_groups[0]["lr"]
    # RMSprop (no first-moment average) divides each gradient by the RMS of those so far: a later
    # gradient larger than the first moves any element, old or new, by more than lr; its first is bounded
    for i in range(1 if kind == "RMSprop" else 3):
        before = weight.detach().clone()
        inputs = batch(200 + i, wind=True)
        inputs["obs"][:, WIND] = 3.0 * torch.randn(16, generator=torch.Generator().manual_seed(i))  # a strong new signal
        step(new, carried, inputs)
        moved = (weight.detach() - before)[:8, WIND].abs().max().item()
        assert 0 < moved <= lr * (1 + 1e-4), f"{kind}: a new element moved {moved / lr:.2f} lr at step {i + 1}"


def test_rmsprop_second_moment_of_new_elements_is_not_zero(tmp_path, one_thread):
    old, optimizer, plan, new, _ = trained(OPTIMIZERS["RMSprop"], tmp_path)
    carried = carry_optimizer(optimizer, old, new, plan)
    state = carried.state[new.get_parameter("y.linear.weight")]
    old_state = optimizer.state[old.get_parameter("y.linear.weight")]
    assert torch.allclose(state["square_avg"][:, 8:], old_state["square_avg"].double().mean().float().expand(2, 2))
    assert state["grad_avg"][:, 8:].abs().max() == 0 and state["momentum_buffer"][:, 8:].abs().max() == 0


def test_saved_state_reads_back_equal_keyed_by_name(tmp_path, one_thread):
    old, optimizer, _, _, _ = trained(OPTIMIZERS["AdamW"], tmp_path)
    path = str(tmp_path / "old.safetensors")
    with safe_open(optimizer_path(path), framework="pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
    assert "h.linear.weight/exp_avg" in keys and "h.linear.weight/step" in keys
    assert meta["specsurgery.optimizer.class"] == "AdamW"
    groups = json.loads(meta["specsurgery.optimizer.param_groups"])
    assert groups[0]["params"] == [n for n, _ in old.named_parameters()] and groups[0]["weight_decay"] == 0.1
    loaded = ss.load_optimizer(path, ss.load(path))
    assert type(loaded) is torch.optim.AdamW
    assert loaded.param_groups[0]["betas"] == (0.9, 0.999)
    original = optimizer.state_dict()
    again = loaded.state_dict()
    assert original["param_groups"] == again["param_groups"]
    for k, entries in original["state"].items():
        for key, value in entries.items():
            assert torch.equal(value, again["state"][k][key])


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_apply_on_disk_gives_the_moments_of_surgery_in_memory(kind, tmp_path, one_thread):
    old, optimizer, plan, _, _ = trained(OPTIMIZERS[kind], tmp_path)
    result = ss.surgery(old, NEW, optimizer=optimizer)
    new, carried = result.model, result.optimizer
    out = str(tmp_path / "applied.safetensors")
    ss.apply(str(tmp_path / "old.safetensors"), NEW, out)
    assert os.path.exists(tmp_path / "applied.optimizer.safetensors")
    loaded = ss.load(out)
    from_disk = ss.load_optimizer(out, loaded)
    a, b = carried.state_dict(), from_disk.state_dict()
    assert a["param_groups"] == b["param_groups"]
    waiting_a = {n: carried._ss_awaiting_gradient[p] for n, p in new.named_parameters()
                 if p in getattr(carried, "_ss_awaiting_gradient", {})}
    waiting_b = {n: from_disk._ss_awaiting_gradient[p] for n, p in loaded.named_parameters()
                 if p in getattr(from_disk, "_ss_awaiting_gradient", {})}
    if kind in ("Adam", "Adam-amsgrad", "AdamW", "RMSprop"):
        assert list(waiting_a) == ["h.linear.weight", "h.linear.bias", "y.linear.weight"]
    assert waiting_a.keys() == waiting_b.keys() and all(torch.equal(waiting_a[n], waiting_b[n]) for n in waiting_a)
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        for key in a["state"][k]:
            assert torch.equal(a["state"][k][key], b["state"][k][key]), (k, key)


def test_surgery_refuses_an_unsupported_optimizer_before_building(one_thread):
    model = ss.compile(OLD)
    with pytest.raises(ss.UserError, match=r"torch\.optim\.nadam\.NAdam"):
        ss.surgery(model, NEW, optimizer=torch.optim.NAdam(model.parameters()))


def test_unsupported_optimizer_is_named(tmp_path, one_thread):
    model = ss.compile(OLD)
    optimizer = torch.optim.NAdam(model.parameters())
    with pytest.raises(ss.UserError, match=r"cannot carry the state of optimizer torch\.optim\.nadam\.NAdam"):
        model.save(str(tmp_path / "m.safetensors"), optimizer=optimizer)
    assert not os.listdir(tmp_path)  # nothing written


def test_optimizer_file_of_another_spec_is_refused(tmp_path, one_thread):
    old, optimizer, _, new, new_path = trained(OPTIMIZERS["SGD"], tmp_path)
    os.replace(tmp_path / "old.optimizer.safetensors", tmp_path / "new.optimizer.safetensors")
    with pytest.raises(ss.UserError, match="saved for another spec"):
        ss.load_optimizer(new_path, new)
    with pytest.raises(ss.UserError, match="no such file"):
        ss.load_optimizer(str(tmp_path / "old.safetensors"), old)


def test_hostile_optimizer_file_is_one_clear_error(tmp_path, one_thread):
    trained(OPTIMIZERS["Adam"], tmp_path)  # old.safetensors, its optimizer beside it
    path = str(tmp_path / "old.safetensors")
    sidecar = optimizer_path(path)
    data = open(sidecar, "rb").read()
    open(sidecar, "wb").write(data[: len(data) // 2])
    with pytest.raises(ss.UserError, match="not a valid checkpoint|does not fit"):
        ss.load_optimizer(path, ss.load(path))
    open(sidecar, "wb").write(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(ss.UserError, match="no optimizer class"):
        ss.load_optimizer(path, ss.load(path))


def test_saved_hyperparameters_of_the_wrong_kind_are_refused(tmp_path, one_thread):
    trained(OPTIMIZERS["Adam"], tmp_path)
    path = str(tmp_path / "old.safetensors")
    sidecar = optimizer_path(path)
    with safe_open(sidecar, framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    groups = json.loads(meta["specsurgery.optimizer.param_groups"])
    groups[0]["lr"] = "fast"
    meta["specsurgery.optimizer.param_groups"] = json.dumps(groups)
    from safetensors.torch import save_file

    save_file(tensors, sidecar, metadata=meta)
    with pytest.raises(ss.UserError, match="param group 0 has lr = 'fast'; torch.optim.Adam takes a number"):
        ss.load_optimizer(path, ss.load(path))


class Killed(BaseException):
    """SIGKILL, for the code under test: nothing after it runs, no handler catches it."""


def test_a_build_killed_between_its_two_renames_is_finished_by_the_next(tmp_path, monkeypatch, one_thread):
    from specsurgery.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.spec").write_text(OLD)
    assert main(["build", "m.spec", "--out", "models"]) == 0
    ckpt = "models/m.safetensors"
    old = ss.load(ckpt)
    optimizer = torch.optim.Adam(old.parameters(), lr=1e-2)
    for i in range(3):
        step(old, optimizer, batch(i, wind=False))
    old.save(ckpt, optimizer=optimizer)
    old_optimizer = (tmp_path / "models/m.optimizer.safetensors").read_bytes()

    (tmp_path / "m.spec").write_text(NEW)
    staged = {}
    real_replace = os.replace

    def killed_after_the_checkpoint(source, target):
        if str(source).endswith(".staged.optimizer.safetensors"):
            staged["bytes"] = open(source, "rb").read()
            raise Killed
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", killed_after_the_checkpoint)
    with pytest.raises(Killed):
        main(["build", "m.spec", "--out", "models"])
    monkeypatch.setattr(os, "replace", real_replace)
    new = ss.load(ckpt)  # the new checkpoint is in place, beside the old optimizer state
    assert tuple(new.get_parameter("h.linear.weight").shape) == (10, 6)
    assert (tmp_path / "models/m.optimizer.safetensors").read_bytes() == old_optimizer
    with pytest.raises(ss.UserError, match="saved for another spec than the model's"):
        ss.load_optimizer(ckpt, new)

    assert main(["build", "m.spec", "--out", "models"]) == 0  # finishes the commit, then: unchanged
    assert (tmp_path / "models/m.optimizer.safetensors").read_bytes() == staged["bytes"]
    carried = ss.load_optimizer(ckpt, new)
    moment = carried.state[new.get_parameter("h.linear.weight")]["exp_avg"]
    old_moment = optimizer.state[old.get_parameter("h.linear.weight")]["exp_avg"]
    assert torch.equal(moment[:8, [0, 2, 3, 4, 5]], old_moment) and not moment[:, WIND].any()
    assert sorted(os.listdir("models")) == ["history", "m.optimizer.safetensors", "m.safetensors"]


@pytest.mark.parametrize("kind", ["Adam", "RMSprop"])
def test_apply_carries_the_optimizer_beside_a_sharded_checkpoint(kind, tmp_path, one_thread):
    from optimizer_helpers import same_optimizer_state

    old, optimizer, _, _, _ = trained(OPTIMIZERS[kind], tmp_path, steps=3)
    old.save(str(tmp_path / "old"), optimizer=optimizer, max_shard_size=200)  # a folder of several shards
    assert len([f for f in os.listdir(tmp_path / "old") if f.endswith(".safetensors")]) > 1
    ss.apply(str(tmp_path / "old"), NEW, str(tmp_path / "new"), jobs=1)
    assert os.path.exists(tmp_path / "new.optimizer.safetensors")  # beside the folder, as for one file
    loaded = ss.load(str(tmp_path / "new"))
    from_disk = ss.load_optimizer(str(tmp_path / "new"), loaded)
    result = ss.surgery(old, NEW, optimizer=optimizer)
    same_optimizer_state(result.optimizer, result.model, from_disk, loaded)
    for i in range(2):  # and they train on alike, new elements started at their first gradient
        step(result.model, result.optimizer, batch(10 + i, wind=True))
        step(loaded, from_disk, batch(10 + i, wind=True))
    assert all(torch.equal(p, q) for p, q in zip(result.model.parameters(), loaded.parameters()))


def test_a_bad_optimizer_file_beside_the_checkpoint_leaves_nothing_written(tmp_path, one_thread):
    trained(OPTIMIZERS["Adam"], tmp_path)  # old.safetensors, its optimizer beside it
    old_path, out = str(tmp_path / "old.safetensors"), str(tmp_path / "out.safetensors")
    other = ss.compile(NEW, seed=1)  # an optimizer file of another spec, in the old one's place
    other_optimizer = torch.optim.Adam(other.parameters())
    step(other, other_optimizer, batch(0, wind=True))
    other.save(str(tmp_path / "other.safetensors"), optimizer=other_optimizer)
    os.replace(tmp_path / "other.optimizer.safetensors", optimizer_path(old_path))
    with pytest.raises(ss.UserError, match="this optimizer state was saved for another spec than the model's"):
        ss.apply(old_path, NEW, out)
    assert not os.path.exists(out) and not os.path.exists(optimizer_path(out))
