"""`specsurgery apply` carries the optimizer file beside a checkpoint; with
several checkpoints it makes one plan and writes each into OUT_DIR in worker
processes, equal to separate applies, a broken one named and the others whole;
`build` carries the optimizer too and keeps the old one in history/."""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

import specsurgery as ss
from specsurgery.cli import main

from test_optimizer_state import NEW, OLD, batch, step


def checkpoint(path, seed: int, optimizer: bool = True) -> str:
    model = ss.compile(OLD, seed=seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    step(model, opt, batch(seed, wind=False))
    model.save(str(path), optimizer=opt if optimizer else None)
    return str(path)


@pytest.fixture
def specs(tmp_path):
    (tmp_path / "new.spec").write_text(NEW)
    return str(tmp_path / "new.spec")


def test_apply_carries_the_optimizer_file(tmp_path, specs, capsys, one_thread):
    old = checkpoint(tmp_path / "a.safetensors", 1)
    out = str(tmp_path / "out" / "a2.safetensors")
    assert main(["apply", old, specs, "-o", out]) == 0
    assert os.path.exists(tmp_path / "out" / "a2.optimizer.safetensors")
    model = ss.load(out)
    opt = ss.load_optimizer(out, model)
    assert type(opt) is torch.optim.Adam and len(opt.state) == len(list(model.parameters()))


def test_many_checkpoints_equal_separate_applies(tmp_path, specs, capsys, one_thread):
    olds = [checkpoint(tmp_path / f"c{k}.safetensors", k, optimizer=k != 2) for k in range(4)]
    assert main(["apply", *olds, specs, "-o", str(tmp_path / "many"), "--jobs", "2"]) == 0
    printed = capsys.readouterr().out
    assert "4 of 4 checkpoints carried over" in printed
    for k, old in enumerate(olds):
        one = str(tmp_path / f"one{k}.safetensors")
        assert main(["apply", old, specs, "-o", one]) == 0
        many = str(tmp_path / "many" / f"c{k}.safetensors")
        with open(one, "rb") as a, open(many, "rb") as b:
            assert a.read() == b.read(), f"checkpoint {k} differs from its separate apply"
        if k == 2:
            assert not os.path.exists(tmp_path / "many" / "c2.optimizer.safetensors")
            continue
        a, b = load_file(str(tmp_path / f"one{k}.optimizer.safetensors")), \
            load_file(str(tmp_path / "many" / f"c{k}.optimizer.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_a_broken_checkpoint_is_named_and_the_others_are_whole(tmp_path, specs, capsys, one_thread):
    olds = [checkpoint(tmp_path / f"c{k}.safetensors", k) for k in range(3)]
    data = open(olds[1], "rb").read()
    open(olds[1], "wb").write(data[:-100])  # truncated
    assert main(["apply", *olds, specs, "-o", str(tmp_path / "many"), "--jobs", "2"]) == 1
    captured = capsys.readouterr()
    assert f"{olds[1]}: error: not a valid checkpoint" in captured.err
    assert "2 of 3 checkpoints carried over" in captured.out
    assert sorted(os.listdir(tmp_path / "many")) == ["c0.optimizer.safetensors", "c0.safetensors",
                                                     "c2.optimizer.safetensors", "c2.safetensors"]
    for k in (0, 2):
        ss.load(str(tmp_path / "many" / f"c{k}.safetensors"))


def test_two_checkpoints_of_one_name_are_refused(tmp_path, specs, capsys, one_thread):
    os.makedirs(tmp_path / "x")
    a = checkpoint(tmp_path / "c.safetensors", 0)
    b = checkpoint(tmp_path / "x" / "c.safetensors", 1)
    assert main(["apply", a, b, specs, "-o", str(tmp_path / "many")]) == 1
    assert "has the same name" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "many")


def test_build_carries_the_optimizer_and_keeps_the_old_in_history(tmp_path, capsys, one_thread):
    (tmp_path / "specs").mkdir()
    (tmp_path / "models").mkdir()
    spec = tmp_path / "specs" / "m.spec"
    spec.write_text(OLD)
    target = checkpoint(tmp_path / "models" / "m.safetensors", 0)
    old_opt = open(tmp_path / "models" / "m.optimizer.safetensors", "rb").read()
    spec.write_text(NEW)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert main(["build", "specs", "--out", "models"]) == 0
    finally:
        os.chdir(cwd)
    history = sorted(os.listdir(tmp_path / "models" / "history"))
    assert len(history) == 2 and history[0].endswith(".optimizer.safetensors")
    assert open(tmp_path / "models" / "history" / history[0], "rb").read() == old_opt
    model = ss.load(target)
    opt = ss.load_optimizer(target, model)
    assert opt.state[model.get_parameter("h.linear.weight")]["exp_avg"].shape == (10, 6)


def test_ss_apply_over_a_list(tmp_path, one_thread):
    olds = [checkpoint(tmp_path / f"c{k}.safetensors", k) for k in range(2)]
    plan = ss.apply(olds, NEW, str(tmp_path / "many"), jobs=1)
    assert plan.function_preserving
    for k in range(2):
        model = ss.load(str(tmp_path / "many" / f"c{k}.safetensors"))
        assert type(ss.load_optimizer(str(tmp_path / "many" / f"c{k}.safetensors"), model)) is torch.optim.Adam
    open(olds[1], "wb").write(b"junk")
    with pytest.raises(ss.UserError, match=r"c1.safetensors: error: .*\n1 of 2 checkpoints carried over"):
        ss.apply(olds, NEW, str(tmp_path / "again"), jobs=1)
    ss.load(str(tmp_path / "again" / "c0.safetensors"))
