"""Distributed checkpoints: save_dcp / load_dcp, read in one process with
nothing unpickled, carried through surgery; a 2-process gloo job on CPU,
FSDP (fully_shard per statement) and DDP, against a one-process run."""
from __future__ import annotations

import json
import os
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
from specsurgery.dcp import SPEC_FILE, read_dcp_optimizer
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
