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
from specsurgery.dcp import SPEC_FILE

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
STEPS, LR, BATCH = 3, 0.1, 8


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
# two ranks on gloo


def data(spec_text: str):
    gen = torch.Generator().manual_seed(7)
    width = 3 if "z: float" in spec_text else 2
    return torch.randn(BATCH, width, generator=gen), torch.randn(BATCH, 2, generator=gen)


def train(model, x, y, steps: int = STEPS):
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model({"g": x})["q"], y)
        loss.backward()
        opt.step()


def rank_main(rank: int, world: int, port: int, phase: str, mode: str, folder: str, spec_path: str, out: str):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        text = open(spec_path).read()
        model = ss.compile(spec_path, seed=0)
        if mode == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (world,))
            for child in model.children():  # one FSDP unit per statement
                fully_shard(child, mesh=mesh)
            fully_shard(model, mesh=mesh)
            wrapped = model
        else:
            wrapped = torch.nn.parallel.DistributedDataParallel(model)
        if phase == "resume":
            load_dcp(folder, wrapped)
        x, y = data(text)
        per = BATCH // world
        train(wrapped, x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per])
        save_dcp(wrapped, out)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_job(*args, timeout: float = 240) -> None:
    import torch.multiprocessing as mp

    context = mp.start_processes(rank_main, args=(2, free_port(), *args), nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail(f"the 2-process job did not finish in {timeout} s")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fsdp", "ddp"])
def test_two_ranks_train_save_surgery_load_train_equal_one_process(tmp_path, mode):
    (tmp_path / "old.spec").write_text(OLD)
    (tmp_path / "new.spec").write_text(NEW)
    # one process: train, save, surgery, load, train
    ref = ss.compile(str(tmp_path / "old.spec"), seed=0)
    train(ref, *data(OLD))
    ref.save(str(tmp_path / "ref.safetensors"))
    new_spec = ss.compile(str(tmp_path / "new.spec"))._ss_graph.spec
    apply_plan(make_plan(read_spec(tmp_path / "ref.safetensors"), new_spec), str(tmp_path / "ref.safetensors"), new_spec,
               str(tmp_path / "ref-new.safetensors"))
    ref_new = ss.load(str(tmp_path / "ref-new.safetensors"))
    train(ref_new, *data(NEW))
    # two ranks: train sharded, save_dcp; surgery on the folder; load into 2 ranks, train on
    run_job("start", mode, "", str(tmp_path / "old.spec"), str(tmp_path / "a"))
    assert equal_states_close(ss.load(str(tmp_path / "a")), ref)
    result = subprocess.run([sys.executable, "-m", "specsurgery", "apply", str(tmp_path / "a"), str(tmp_path / "new.spec"),
                             "-o", str(tmp_path / "b"), "--jobs", "2"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    run_job("resume", mode, str(tmp_path / "b"), str(tmp_path / "new.spec"), str(tmp_path / "c"))
    final = ss.load(str(tmp_path / "c"))
    assert equal_states_close(final, ref_new)
    x, _ = data(NEW)
    assert torch.allclose(final({"g": x})["q"], ref_new({"g": x})["q"], atol=1e-6)


def equal_states_close(a, b) -> bool:
    a, b = a.state_dict(), b.state_dict()
    return list(a) == list(b) and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
