"""Distributed checkpoints: save_dcp / load_dcp, read in one process with
nothing unpickled, carried through surgery; a 2-process gloo job on CPU,
FSDP (fully_shard per statement) and DDP, against a one-process run."""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as save_numpy

import specsurgery as ss
from specsurgery.checkpoint import read_header
from optimizer_helpers import same_optimizer_state
from specsurgery.dcp import OPTIMIZER_DIR, OPTIMIZER_FILE, SPEC_FILE, read_dcp_optimizer
from specsurgery.optimizer_state import named_state

save_dcp, load_dcp = ss.save_dcp, ss.load_dcp  # the public names
from specsurgery.errors import UserError
from specsurgery.surgery.apply import apply_plan
from specsurgery.surgery.diff import make_plan

REPO = Path(__file__).resolve().parents[1]
OLD = """schema s {
  group g {
    x: float
    y: float
  }
}

model m(obs: s) {
  h = relu(linear(obs.g, 8))
  h2 = tanh(linear(h, 6))
  out q = linear(h2, 2)
}
"""
NEW = OLD.replace("    x: float\n", "    x: float\n    z: float\n").replace("linear(obs.g, 8)", "linear(obs.g, 11)")
STEPS, LR, BATCH = 3, 0.05, 8


def equal_states(a, b) -> bool:
    a, b = a.state_dict(), b.state_dict()
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_save_dcp_in_one_process_reads_back_without_pickle(tmp_path):
    (tmp_path / "old.spec").write_text(OLD)
    model = ss.compile(str(tmp_path / "old.spec"), seed=4)
    save_dcp(model, str(tmp_path / "ck"))
    files = sorted(os.listdir(tmp_path / "ck"))
    assert files == ["shard-00001-model-00001-of-00001.safetensors", SPEC_FILE]  # no pickled .metadata
    assert not [f for f in os.listdir(tmp_path) if f != "ck" and f != "old.spec"]  # no staging left
    assert equal_states(ss.load(str(tmp_path / "ck")), model)
    other = ss.compile(str(tmp_path / "old.spec"), seed=5)
    load_dcp(str(tmp_path / "ck"), other)
    assert equal_states(other, model)
    (tmp_path / "new.spec").write_text(NEW)
    with pytest.raises(UserError, match="saved from another spec than the model's"):
        load_dcp(str(tmp_path / "ck"), ss.compile(str(tmp_path / "new.spec")))


def chunked_dcp(folder: Path, spec_text: str, rows_b=(4, 4)) -> np.ndarray:
    """A DCP folder as two ranks lay it out: h.linear.weight split by rows."""
    folder.mkdir()
    rng = np.random.default_rng(1)
    whole = rng.standard_normal((8, 2), dtype=np.float32)
    rest = {"h.linear.bias": np.zeros(8, np.float32), "h2.linear.weight": np.zeros((6, 8), np.float32),
            "h2.linear.bias": np.zeros(6, np.float32), "q.linear.weight": np.zeros((2, 6), np.float32),
            "q.linear.bias": np.zeros(2, np.float32)}
    a, b = rows_b
    info0 = {"h.linear.weight": {"saved_offsets": [0, 0]}, **{k: {"saved_offsets": [0] * v.ndim} for k, v in rest.items()}}
    save_numpy({"h.linear.weight": whole[:a], **rest}, str(folder / "shard-00001-model-00001-of-00001.safetensors"),
               metadata={"DCP_SHARDING_INFO": json.dumps(info0)})
    save_numpy({"h.linear.weight": np.ascontiguousarray(whole[8 - b:])}, str(folder / "shard-00002-model-00001-of-00001.safetensors"),
               metadata={"DCP_SHARDING_INFO": json.dumps({"h.linear.weight": {"saved_offsets": [8 - b, 0]}})})
    (folder / SPEC_FILE).write_text(json.dumps({"format": "specsurgery-dcp/1", "metadata": {
        "specsurgery.spec": spec_text, "specsurgery.model": "m"}}))
    return whole


def test_chunks_are_assembled_and_must_tile_each_tensor(tmp_path):
    spec = read_header_spec(tmp_path)
    whole = chunked_dcp(tmp_path / "ok", spec)
    model = ss.load(str(tmp_path / "ok"))
    assert np.array_equal(model.state_dict()["h.linear.weight"].numpy(), whole)
    chunked_dcp(tmp_path / "gap", spec, rows_b=(3, 4))
    with pytest.raises(UserError, match="the chunks of tensor 'h.linear.weight' do not cover it exactly"):
        read_header(str(tmp_path / "gap"))
    # rows 0-3, 3-5 and 7: as many elements as the tensor, but row 3 twice and row 6 never
    chunked_dcp(tmp_path / "overlap", spec, rows_b=(4, 3))
    second = tmp_path / "overlap" / "shard-00002-model-00001-of-00001.safetensors"
    save_numpy({"h.linear.weight": np.zeros((3, 2), np.float32)}, str(second),
               metadata={"DCP_SHARDING_INFO": json.dumps({"h.linear.weight": {"saved_offsets": [3, 0]}})})
    save_numpy({"h.linear.weight": np.zeros((1, 2), np.float32)}, str(tmp_path / "overlap" / "shard-00003-model-00001-of-00001.safetensors"),
               metadata={"DCP_SHARDING_INFO": json.dumps({"h.linear.weight": {"saved_offsets": [7, 0]}})})
    with pytest.raises(UserError, match="two chunks of tensor 'h.linear.weight' overlap"):
        read_header(str(tmp_path / "overlap"))


def read_header_spec(tmp_path) -> str:
    (tmp_path / "old.spec").write_text(OLD)
    return ss.compile(str(tmp_path / "old.spec")).spec


def test_apply_carries_a_chunked_dcp_folder_through_surgery(tmp_path):
    spec = read_header_spec(tmp_path)
    chunked_dcp(tmp_path / "ck", spec)
    (tmp_path / "new.spec").write_text(NEW)
    result = subprocess.run([sys.executable, "-m", "specsurgery", "apply", str(tmp_path / "ck"), str(tmp_path / "new.spec"),
                             "-o", str(tmp_path / "out"), "--jobs", "1"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(tmp_path / "out")) == ["model-00001-of-00001.safetensors", SPEC_FILE]  # a DCP folder
    one = ss.load(str(tmp_path / "ck"))
    one.save(str(tmp_path / "one.safetensors"))
    plan = make_plan(read_spec(tmp_path / "one.safetensors"), ss.compile(str(tmp_path / "new.spec"))._ss_graph.spec)
    apply_plan(plan, str(tmp_path / "one.safetensors"), ss.compile(str(tmp_path / "new.spec"))._ss_graph.spec,
               str(tmp_path / "one-new.safetensors"))
    assert equal_states(ss.load(str(tmp_path / "out")), ss.load(str(tmp_path / "one-new.safetensors")))
    loaded = ss.compile(str(tmp_path / "new.spec"), seed=9)
    load_dcp(str(tmp_path / "out"), loaded)  # what apply writes, DCP's reader loads
    assert equal_states(loaded, ss.load(str(tmp_path / "out")))


def read_spec(path):
    from specsurgery.checkpoint import load_spec

    return load_spec(read_header(str(path)))


# ---------------------------------------------------------------------------
# the optimizer, in one process


def adam_in_two_groups(model, lr: float = LR):
    """h's parameters at lr, the others at twice it: groups and hyperparameters must come back."""
    named = dict(model.named_parameters())
    return torch.optim.Adam([{"params": [p for n, p in named.items() if n.startswith("h.")], "lr": lr},
                             {"params": [p for n, p in named.items() if not n.startswith("h.")], "lr": 2 * lr}])


def trained_with_optimizer(tmp_path, steps: int = STEPS):
    (tmp_path / "old.spec").write_text(OLD)
    (tmp_path / "new.spec").write_text(NEW)
    model = ss.compile(str(tmp_path / "old.spec"), seed=4)
    optimizer = adam_in_two_groups(model)
    train(model, optimizer, *data(OLD), steps=steps)
    return model, optimizer


def test_save_dcp_with_the_optimizer_loads_back_equal_in_one_process(tmp_path):
    model, optimizer = trained_with_optimizer(tmp_path)
    save_dcp(model, str(tmp_path / "ck"), optimizer=optimizer)
    assert sorted(os.listdir(tmp_path / "ck")) == [OPTIMIZER_DIR, "shard-00001-model-00001-of-00001.safetensors", SPEC_FILE]
    assert sorted(os.listdir(tmp_path / "ck" / OPTIMIZER_DIR)) == ["shard-00001-model-00001-of-00001.safetensors",
                                                                   OPTIMIZER_FILE]
    other = ss.compile(str(tmp_path / "old.spec"), seed=5)
    again = adam_in_two_groups(other, lr=1.0)  # lr comes from the checkpoint
    load_dcp(str(tmp_path / "ck"), other, optimizer=again)
    assert equal_states(other, model)
    same_optimizer_state(optimizer, model, again, other)
    train(model, optimizer, *data(OLD), steps=1)
    train(other, again, *data(OLD), steps=1)
    assert equal_states(other, model)


def test_load_dcp_refuses_an_optimizer_that_is_not_the_saved_one(tmp_path):
    model, optimizer = trained_with_optimizer(tmp_path, steps=1)
    save_dcp(model, str(tmp_path / "ck"), optimizer=optimizer)
    save_dcp(model, str(tmp_path / "bare"))
    other = ss.compile(str(tmp_path / "old.spec"))
    with pytest.raises(UserError, match=r"holds the state of torch.optim.Adam; the optimizer given is a torch.optim.SGD"):
        load_dcp(str(tmp_path / "ck"), other, optimizer=torch.optim.SGD(other.parameters(), lr=0.1))
    with pytest.raises(UserError, match=r"the optimizer's param groups are not the checkpoint's: it has group 0: "
                                        r"h.linear.bias, h.linear.weight, h2.linear.bias"):
        load_dcp(str(tmp_path / "ck"), other, optimizer=torch.optim.Adam(other.parameters()))
    with pytest.raises(UserError, match=r"bare: error: no optimizer state in this checkpoint"):
        load_dcp(str(tmp_path / "bare"), other, optimizer=torch.optim.Adam(other.parameters()))
    with pytest.raises(UserError, match="cannot carry the state of optimizer torch.optim.lbfgs.LBFGS"):
        save_dcp(model, str(tmp_path / "lbfgs"), optimizer=torch.optim.LBFGS(model.parameters()))
    assert not os.path.exists(tmp_path / "lbfgs")


def test_an_optimizer_saved_before_its_first_step_starts_as_a_fresh_one(tmp_path):
    (tmp_path / "old.spec").write_text(OLD)
    model = ss.compile(str(tmp_path / "old.spec"))
    save_dcp(model, str(tmp_path / "ck"), optimizer=adam_in_two_groups(model))
    assert os.listdir(tmp_path / "ck" / OPTIMIZER_DIR) == [OPTIMIZER_FILE]  # no state yet: no chunks
    fresh, loaded = ss.compile(str(tmp_path / "old.spec")), ss.compile(str(tmp_path / "old.spec"), seed=1)
    fresh_optimizer, optimizer = adam_in_two_groups(fresh), adam_in_two_groups(loaded, lr=1.0)
    load_dcp(str(tmp_path / "ck"), loaded, optimizer=optimizer)
    train(fresh, fresh_optimizer, *data(OLD))
    train(loaded, optimizer, *data(OLD))
    same_optimizer_state(fresh_optimizer, fresh, optimizer, loaded)  # step counts from 0, not 1


def test_apply_carries_a_dcp_folder_into_a_dcp_folder_with_its_optimizer(tmp_path):
    model, optimizer = trained_with_optimizer(tmp_path)
    save_dcp(model, str(tmp_path / "ck"), optimizer=optimizer)
    for _ in range(2):  # the second replaces the first folder whole
        ss.apply(str(tmp_path / "ck"), str(tmp_path / "new.spec"), str(tmp_path / "out"), jobs=1)
    assert sorted(os.listdir(tmp_path / "out")) == ["model-00001-of-00001.safetensors", OPTIMIZER_DIR, SPEC_FILE]
    assert not [f for f in os.listdir(tmp_path) if ".staged-" in f]
    ref = ss.surgery(model, str(tmp_path / "new.spec"), optimizer=optimizer)
    loaded = ss.compile(str(tmp_path / "new.spec"), seed=9)
    carried = adam_in_two_groups(loaded, lr=1.0)
    load_dcp(str(tmp_path / "out"), loaded, optimizer=carried)
    assert equal_states(loaded, ref.model)
    same_optimizer_state(ref.optimizer, ref.model, carried, loaded)
    train(ref.model, ref.optimizer, *data(NEW))
    train(loaded, carried, *data(NEW))
    assert equal_states(loaded, ref.model)
    # into one file: the optimizer state goes beside it
    ss.apply(str(tmp_path / "ck"), str(tmp_path / "new.spec"), str(tmp_path / "one.safetensors"))
    one = ss.load(str(tmp_path / "one.safetensors"))
    back = ss.load(str(tmp_path / "ck"))
    back_optimizer = adam_in_two_groups(back)
    load_dcp(str(tmp_path / "ck"), back, optimizer=back_optimizer)
    ref = ss.surgery(back, str(tmp_path / "new.spec"), optimizer=back_optimizer)
    same_optimizer_state(ref.optimizer, ref.model, ss.load_optimizer(str(tmp_path / "one.safetensors"), one), one)


def test_a_failed_apply_leaves_nothing_in_place_of_the_output(tmp_path, monkeypatch):
    import specsurgery.optimizer_state

    model, optimizer = trained_with_optimizer(tmp_path, steps=1)
    save_dcp(model, str(tmp_path / "ck"), optimizer=optimizer)

    def broken(named, plan):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(specsurgery.optimizer_state, "carry", broken)
    with pytest.raises(OSError):
        ss.apply(str(tmp_path / "ck"), str(tmp_path / "new.spec"), str(tmp_path / "out"), jobs=1)
    assert not os.path.exists(tmp_path / "out")
    monkeypatch.undo()
    ss.apply(str(tmp_path / "ck"), str(tmp_path / "new.spec"), str(tmp_path / "out"), jobs=1)
    before = {f: (tmp_path / "out" / f).read_bytes() for f in os.listdir(tmp_path / "out") if f != OPTIMIZER_DIR}
    monkeypatch.setattr(specsurgery.optimizer_state, "carry", broken)
    with pytest.raises(OSError):
        ss.apply(str(tmp_path / "ck"), str(tmp_path / "new.spec"), str(tmp_path / "out"), jobs=1)
    assert {f: (tmp_path / "out" / f).read_bytes() for f in os.listdir(tmp_path / "out") if f != OPTIMIZER_DIR} == before
    assert not [f for f in os.listdir(tmp_path) if ".staged-" in f]


@pytest.fixture(scope="module")
def saved_with_optimizer(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("dcp")
    model, optimizer = trained_with_optimizer(tmp_path, steps=1)
    save_dcp(model, str(tmp_path / "ck"), optimizer=optimizer)
    return tmp_path


def hostile_copy(saved: Path, tmp_path: Path, change) -> str:
    folder = tmp_path / "hostile"
    shutil.copytree(saved / "ck", folder)
    change(folder)
    return str(folder)


def pickled(path: Path) -> None:
    import pickle

    path.write_bytes(pickle.dumps({"storage_data": "../../elsewhere"}))  # what DCP's .metadata holds


def linked_out(path: Path) -> None:
    outside = path.parent.parent / ("outside-" + path.name)
    shutil.move(str(path), str(outside))
    path.symlink_to(outside)


HOSTILE = {
    "pickled plan": (lambda f: pickled(f / ".metadata"), "it holds .metadata, a pickle"),
    "torch.save tensors": (lambda f: pickled(f / OPTIMIZER_DIR / "__0_0.distcp"), "it holds __0_0.distcp, a pickle"),
    "index out of the folder": (lambda f: (f / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"h.linear.weight": "../../outside.safetensors"}})),
        "it holds model.safetensors.index.json, an index of files"),
    "chunk linked out": (lambda f: linked_out(f / "shard-00001-model-00001-of-00001.safetensors"),
                         "shard-00001-model-00001-of-00001.safetensors is a link to outside the folder"),
    "optimizer linked out": (lambda f: linked_out(f / OPTIMIZER_DIR), "optimizer is a link to outside the folder"),
    "pickle named safetensors": (lambda f: pickled(f / OPTIMIZER_DIR / "shard-00001-model-00001-of-00001.safetensors"),
                                 "shard-00001-model-00001-of-00001.safetensors: error: not a valid checkpoint"),
    "stranger's parameter": (lambda f: rewrite_groups(f, "h.linear.weight", "../h.linear.weight"),
                             "the optimizer state names parameter '../h.linear.weight', which the model has not"),
}


def rewrite_groups(folder: Path, old: str, new: str) -> None:
    path = folder / OPTIMIZER_DIR / OPTIMIZER_FILE
    table = json.loads(path.read_text())
    table["metadata"]["specsurgery.optimizer.param_groups"] = \
        table["metadata"]["specsurgery.optimizer.param_groups"].replace(f'"{old}"', f'"{new}"')
    path.write_text(json.dumps(table))


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_hostile_dcp_folder_is_refused_with_one_message(case, saved_with_optimizer, tmp_path):
    change, message = HOSTILE[case]
    folder = hostile_copy(saved_with_optimizer, tmp_path, change)
    model = ss.compile(str(saved_with_optimizer / "old.spec"))
    with pytest.raises(UserError, match=re.escape(message)):
        load_dcp(folder, model, optimizer=adam_in_two_groups(model))
    for out in ("out", "out.safetensors"):  # apply reads the optimizer before it writes anything
        with pytest.raises(UserError, match=re.escape(message)):
            ss.apply(folder, str(saved_with_optimizer / "new.spec"), str(tmp_path / out), jobs=1)
    left = set(os.listdir(tmp_path))
    assert not left & {"out", "out.safetensors", "out.optimizer.safetensors"} and not [f for f in left if ".out" in f]


def test_the_command_line_names_a_hostile_dcp_folder_in_one_line(saved_with_optimizer, tmp_path):
    folder = hostile_copy(saved_with_optimizer, tmp_path, HOSTILE["pickled plan"][0])
    result = subprocess.run([sys.executable, "-m", "specsurgery", "apply", folder, str(saved_with_optimizer / "new.spec"),
                             "-o", str(tmp_path / "out")], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith(f"{folder}: error: not a valid distributed checkpoint: it holds .metadata, a pickle")
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


# ---------------------------------------------------------------------------
# two ranks on gloo: one job trains sharded (fully_shard per statement) and
# replicated (DDP), saves with the optimizer, carries both folders through
# surgery, loads them back into 2 ranks and trains on


MODES = ("fsdp", "ddp")
# where the old elements of each grown parameter lie in the new one: z is a new
# column 1 of h's input, h grows from 8 to 11 units (rows 8-10, then h2's columns 8-10)
OLD_ELEMENTS = {"h.linear.weight": (slice(0, 8), [0, 2]), "h.linear.bias": (slice(0, 8),),
                "h2.linear.weight": (slice(None), slice(0, 8))}


def data(spec_text: str):
    gen = torch.Generator().manual_seed(7)
    width = 3 if "z: float" in spec_text else 2
    return torch.randn(BATCH, width, generator=gen), torch.randn(BATCH, 2, generator=gen)


def train(model, optimizer, x, y, steps: int = STEPS):
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model({"g": x})["q"], y).backward()
        optimizer.step()


def distributed(model, mode: str, world: int):
    if mode == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for child in model.children():  # one FSDP unit per statement
        fully_shard(child, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def rank_main(rank: int, world: int, port: int, tmp: str):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        per = BATCH // world

        def run(spec: str, mode: str, start, out: str, seed: int):
            model = distributed(ss.compile(spec, seed=seed), mode, world)
            optimizer = torch.optim.Adam(model.parameters(), lr=LR * 10)  # lr and moments come from `start`
            if start is not None:
                load_dcp(start, model, optimizer=optimizer)
            else:
                optimizer.param_groups[0]["lr"] = LR
            x, y = data(open(spec).read())
            train(model, optimizer, x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per])
            save_dcp(model, out, optimizer=optimizer)

        for mode in MODES:
            run(f"{tmp}/old.spec", mode, None, f"{tmp}/a-{mode}", 0)
        if rank == 0:  # surgery in one process, DCP folder to DCP folder
            for mode in MODES:
                ss.apply(f"{tmp}/a-{mode}", f"{tmp}/new.spec", f"{tmp}/b-{mode}", jobs=1)
        dist.barrier()
        for mode in MODES:
            run(f"{tmp}/new.spec", mode, f"{tmp}/b-{mode}", f"{tmp}/c-{mode}", 9)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_job(tmp: str, timeout: float = 240) -> None:
    import torch.multiprocessing as mp

    context = mp.start_processes(rank_main, args=(2, free_port(), tmp), nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail(f"the 2-process job did not finish in {timeout} s")


def stored_optimizer(folder: Path):
    """The weights and the optimizer state of a DCP folder, read in one process."""
    model = ss.load(str(folder))
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    return model.state_dict(), read_dcp_optimizer(str(folder), model.spec, shapes)


def one_process_reference(tmp_path: Path):
    """The same steps in one process: train, save with the optimizer, apply, load, train."""
    model = ss.compile(str(tmp_path / "old.spec"), seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    train(model, optimizer, *data(OLD))
    model.save(str(tmp_path / "ref.safetensors"), optimizer=optimizer)
    ss.apply(str(tmp_path / "ref.safetensors"), str(tmp_path / "new.spec"), str(tmp_path / "ref-new.safetensors"))
    model = ss.load(str(tmp_path / "ref-new.safetensors"))
    optimizer = ss.load_optimizer(str(tmp_path / "ref-new.safetensors"), model)
    train(model, optimizer, *data(NEW))
    return model, optimizer


@pytest.mark.slow  # one 2-process job: ~20 s of CPU
def test_two_ranks_train_save_surgery_load_train_equal_one_process(tmp_path):
    (tmp_path / "old.spec").write_text(OLD)
    (tmp_path / "new.spec").write_text(NEW)
    run_job(str(tmp_path))
    ref, ref_optimizer = one_process_reference(tmp_path)
    ref_state = named_state(ref_optimizer, ref)
    x, _ = data(NEW)
    for mode in MODES:
        # surgery carried each moment exactly where its weight moved; new elements start by Adam's rule
        weights_a, opt_a = stored_optimizer(tmp_path / f"a-{mode}")
        weights_b, opt_b = stored_optimizer(tmp_path / f"b-{mode}")
        for name, new in weights_b.items():
            kept = torch.zeros(new.shape, dtype=torch.bool)
            kept[OLD_ELEMENTS.get(name, (slice(None),))] = True
            assert torch.equal(new[kept], weights_a[name].flatten()), name
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(opt_b.state[name][key][kept], opt_a.state[name][key].flatten()), (name, key)
            assert not opt_b.state[name]["exp_avg"][~kept].any(), name  # no history: zero
            assert torch.equal(opt_b.state[name]["step"], opt_a.state[name]["step"])
            if not kept.all():  # second moments wait for their first gradient
                assert torch.equal(opt_b.pending[name], ~kept), name
        assert opt_b.groups == opt_a.groups and opt_a.groups[0][0]["lr"] == LR
        # resumed on 2 ranks and trained on: what one process computes
        weights_c, opt_c = stored_optimizer(tmp_path / f"c-{mode}")
        assert equal_states_close(ss.load(str(tmp_path / f"c-{mode}")), ref), mode
        for name, entries in ref_state.state.items():
            for key, value in entries.items():
                assert torch.allclose(opt_c.state[name][key], value, atol=1e-6), (mode, name, key)
        assert torch.allclose(ss.load(str(tmp_path / f"c-{mode}"))({"g": x})["q"], ref({"g": x})["q"], atol=1e-6)
    # the 2 ranks' chunks load into one process, the optimizer's too
    one = ss.compile(str(tmp_path / "new.spec"), seed=5)
    optimizer = torch.optim.Adam(one.parameters(), lr=1.0)
    load_dcp(str(tmp_path / "c-fsdp"), one, optimizer=optimizer)
    assert equal_states_close(one, ref) and optimizer.param_groups[0]["lr"] == LR
    train(one, optimizer, *data(NEW), steps=1)
    train(ref, ref_optimizer, *data(NEW), steps=1)
    assert equal_states_close(one, ref)


def equal_states_close(a, b) -> bool:
    a, b = a.state_dict(), b.state_dict()
    return list(a) == list(b) and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_many_folders_are_each_carried_into_a_folder_of_their_kind(tmp_path):
    """ss.apply of a list: a DCP folder comes out a DCP folder with its optimizer
    state, a sharded folder a sharded folder, file for file what a separate apply
    writes (they came out as one-file checkpoints named like the folder, the
    optimizer state left behind)."""
    model, optimizer = trained_with_optimizer(tmp_path)
    save_dcp(model, str(tmp_path / "run_a"), optimizer=optimizer)
    model.save(str(tmp_path / "run_b"), max_shard_size=300)  # h, h2 and q in shards of their own
    new = str(tmp_path / "new.spec")
    ss.apply([str(tmp_path / "run_a"), str(tmp_path / "run_b")], new, str(tmp_path / "many"), jobs=1)
    for name in ("run_a", "run_b"):
        ss.apply(str(tmp_path / name), new, str(tmp_path / "one" / name), jobs=1)
        one, many = tmp_path / "one" / name, tmp_path / "many" / name
        files = sorted(str(p.relative_to(one)) for p in one.rglob("*") if p.is_file())
        assert files == sorted(str(p.relative_to(many)) for p in many.rglob("*") if p.is_file())
        for f in files:
            assert (one / f).read_bytes() == (many / f).read_bytes(), f"{name}/{f} differs from its separate apply"
    assert os.path.isdir(tmp_path / "many" / "run_a" / OPTIMIZER_DIR)
    assert len([f for f in os.listdir(tmp_path / "many" / "run_b") if f.endswith(".safetensors")]) == 3
    loaded = ss.compile(new, seed=9)
    carried = adam_in_two_groups(loaded, lr=1.0)
    load_dcp(str(tmp_path / "many" / "run_a"), loaded, optimizer=carried)
    ref = ss.surgery(model, new, optimizer=optimizer)
    assert equal_states(loaded, ref.model)
    same_optimizer_state(ref.optimizer, ref.model, carried, loaded)
