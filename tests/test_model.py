"""ss.Model as a standard torch.nn.Module: one submodule per statement, the
checkpoint's keys as state_dict keys, and the module tools that rely on that
(load_state_dict strict, get_parameter, functional_call, deepcopy, .to,
torch.compile, DDP); checkpoints in every float dtype; save and metadata."""
from __future__ import annotations

import copy
import random
from pathlib import Path

import pytest
import torch

import specsurgery as ss
from specsurgery.checkpoint import read_header, write_checkpoint
from specsurgery.features import random_record
from specsurgery.names import MODULE_ATTRIBUTES

REPO = Path(__file__).resolve().parents[1]

FF = """schema s {
  vocab kinds = [a, b, c]
  group g {
    x: float
    k: category(kinds)
    n: int
  }
  group items[4] {
    w: float
    kind: category(kinds)
  }
}

model ff(obs: s) {
  e = embed(obs.g.k, 3)
  h = relu(linear(concat(obs.g, e), 8))
  pooled = maxpool(tanh(linear(concat(obs.items, onehot(obs.items.kind)), 5)))
  both = concat(h, pooled)
  out score = linear(layernorm(both), 2)
  out value = linear(both, 1, bias=false) as head
}
"""


def records(model, n: int, seed: int = 0) -> list:
    rng = random.Random(seed)
    from specsurgery.spec.load import load_text

    schema = load_text(model.spec).model().schema
    return [random_record(schema, rng) for _ in range(n)]


@pytest.fixture(scope="module")
def ff():
    return ss.compile(FF, seed=3)


def test_one_submodule_per_statement_and_checkpoint_keys(ff, tmp_path):
    assert [name for name, _ in ff.named_children()] == ["e", "h", "pooled", "both", "score", "value"]
    assert isinstance(ff.h, torch.nn.Module) and isinstance(ff.h.linear, torch.nn.Module)
    assert ff.get_parameter("h.linear.weight").shape == (8, 5)
    assert ff.get_submodule("value.head").weight.shape == (1, 13)
    path = tmp_path / "ff.safetensors"
    ff.save(str(path))
    assert list(ff.state_dict()) == list(read_header(str(path)).tensors) == [
        "e.embed.weight", "h.linear.weight", "h.linear.bias", "pooled.linear.weight", "pooled.linear.bias",
        "score.layernorm.weight", "score.layernorm.bias", "score.linear.weight", "score.linear.bias",
        "value.head.weight"]
    assert ff.name == "ff" and ff.heads == ["score", "value"]
    assert ff.features == ["g.x", "g.k=a", "g.k=b", "g.k=c", "g.n", "items.w", "items.kind=a", "items.kind=b",
                           "items.kind=c"]
    assert ss.compile(ff.spec).spec == ff.spec  # canonical text round trips


def test_strict_state_dict_round_trip_and_module_tools(ff):
    other = ss.compile(FF, seed=4)
    inputs = ff.featurise(records(ff, 6))
    before = ff(inputs)
    assert not torch.equal(other(inputs)["score"], before["score"])
    other.load_state_dict(ff.state_dict(), strict=True)
    for head in ff.heads:
        assert torch.equal(other(inputs)[head], before[head])
    # functional_call with the parameters of another model gives that model's outputs
    fresh = ss.compile(FF, seed=5)
    called = torch.func.functional_call(ff, dict(fresh.named_parameters()), (inputs,))
    for head in ff.heads:
        assert torch.equal(called[head], fresh(inputs)[head])
        assert torch.equal(ff(inputs)[head], before[head])  # ff itself untouched
    twin = copy.deepcopy(ff)
    with torch.no_grad():
        twin.h.linear.weight.add_(1.0)
    assert torch.equal(ff(inputs)["score"], before["score"])
    assert not torch.equal(twin(inputs)["score"], before["score"])
    wide = copy.deepcopy(ff).to(torch.float64)
    assert wide.h.linear.weight.dtype == torch.float64
    assert wide.featurise(records(ff, 6))["g"].dtype == torch.float64
    assert torch.allclose(wide(wide.featurise(records(ff, 6)))["score"].float(), before["score"], atol=1e-5)


def test_gradients_reach_every_parameter(ff):
    model = copy.deepcopy(ff)
    out = model(model.featurise(records(model, 8)))
    sum(o.sum() for o in out.values()).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_torch_compile_gives_equal_outputs(ff, one_thread):
    inputs = ff.featurise(records(ff, 5))
    compiled = torch.compile(ff, backend="aot_eager")
    eager = ff(inputs)
    out = compiled(inputs)
    for head in ff.heads:
        assert torch.allclose(out[head], eager[head], atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_save_and_load_keep_the_dtype(ff, tmp_path, dtype):
    model = copy.deepcopy(ff).to(dtype)
    path = str(tmp_path / "m.safetensors")
    model.save(path)
    header = read_header(path)
    assert {info.dtype for info in header.tensors.values()} == {
        {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64"}[dtype]}
    loaded = ss.load(path)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert b.dtype == dtype and torch.equal(a, b), name
    as_f32 = ss.load(path, dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in as_f32.parameters())
    assert ss.load(path, device="cpu").h.linear.weight.device.type == "cpu"


def test_metadata_is_kept_and_checked(ff, tmp_path):
    path = str(tmp_path / "m.safetensors")
    ff.save(path, metadata={"run": "7", "step": "100"})
    loaded = ss.load(path)
    assert loaded.metadata == {"run": "7", "step": "100"}
    again = str(tmp_path / "again.safetensors")
    loaded.save(again, metadata={"step": "200"})
    assert ss.load(again).metadata == {"run": "7", "step": "200"}
    with pytest.raises(ss.UserError, match="metadata key 'specsurgery.spec' is specsurgery's own"):
        ff.save(path, metadata={"specsurgery.spec": "x"})
    with pytest.raises(ss.UserError, match="metadata must map strings to strings"):
        ff.save(path, metadata={"step": 3})


def test_save_is_atomic(ff, tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    ff.save(str(path))
    before = path.read_bytes()
    import specsurgery.checkpoint as checkpoint

    def broken(tensor, dtype):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "tensor_bytes", broken)
    with pytest.raises(ss.UserError, match="No space left on device; nothing was changed"):  # a full disk
        ss.compile(FF, seed=9).save(str(path))
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_checkpoints_of_0_1_0_still_load(tmp_path):
    """0.1.0 wrote float32 tensors and specsurgery.* metadata only."""
    model = ss.compile(FF, seed=1)
    state = model.state_dict()
    path = str(tmp_path / "old.safetensors")
    write_checkpoint(path, model.spec, "ff", {k: tuple(v.shape) for k, v in state.items()}, state.items())
    loaded = ss.load(path)
    assert loaded.metadata == {}
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, state[k])


def test_compile_sources_and_errors(tmp_path):
    assert ss.compile(str(REPO / "specs" / "policy.spec")).name == "policy"
    two = FF + FF.split("\n\n", 1)[1].replace("model ff", "model gg")
    with pytest.raises(ss.UserError) as e:
        ss.compile(two)
    assert str(e.value) == "<string>: error: 2 models in this spec; choose one with model= (models: ff, gg)"
    assert ss.compile(two, "gg").name == "gg"
    with pytest.raises(ss.UserError, match=r"no model 'hh' \(models: ff, gg\)"):
        ss.compile(two, "hh")
    with pytest.raises(ss.UserError, match="nope.spec: error: no such file"):
        ss.compile(str(tmp_path / "nope.spec"))
    with pytest.raises(ss.UserError, match="this is a checkpoint, not a spec: load it with ss.load"):
        ss.compile(str(tmp_path / "m.safetensors"))
    with pytest.raises(ss.UserError, match="no such file"):
        ss.load(str(tmp_path / "m.safetensors"))
    with pytest.raises(ss.SpecError) as e:
        ss.compile(FF.replace("x: float", "x: flaot"))
    assert e.value.diagnostics[0].span.line == 4


@pytest.mark.parametrize("body, line, column, message", [
    ("  out forward = linear(obs.g, 1)", 7, 7, "statement name 'forward' is taken: the model already has an attribute forward"),
    ("  out features = linear(obs.g, 1)", 7, 7, "statement name 'features' is taken"),
    ("  out h = linear(obs.g, 1) as training", 7, 11, "op name 'training' is taken: a module already has an attribute training"),
])
def test_statement_named_like_a_module_attribute_is_a_spec_error(body, line, column, message, tmp_path):
    text = "schema s {\n  group g {\n    x: float\n  }\n}\nmodel m(obs: s) {\n" + body + "\n}\n"
    with pytest.raises(ss.SpecError) as e:
        ss.compile(text)
    d = e.value.diagnostics[0]
    assert (d.span.line, d.span.column) == (line, column) and d.message.startswith(message)
    # the command says the same
    spec = tmp_path / "m.spec"
    spec.write_text(text)
    from specsurgery.cli import main

    assert main(["build", str(spec), "--out", str(tmp_path / "models")]) == 1


def test_reserved_names_are_the_module_attributes():
    """names.py is written out for the check (no torch there); it must list
    exactly what an ss.Model and a statement module have."""
    from specsurgery.model import StatementModule

    model = ss.compile("schema s {\n  group g {\n    x: float\n  }\n}\nmodel m(obs: s) {\n  out h = obs.g\n}\n")
    live = (set(dir(model)) | set(dir(StatementModule([])))) - {"h"}
    assert live <= MODULE_ATTRIBUTES
    assert MODULE_ATTRIBUTES - live <= {"___needs_generation_tag_patch"}  # set once torch.compile has run


def _ddp_worker(rank: int, world: int, port: int, spec: str, batches: list, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    model = ss.compile(spec, seed=0)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    grads = []
    for batch in batches:
        mine = batch[rank::world]
        heads = ddp(model.featurise(mine))
        loss = sum(o.pow(2).sum() for o in heads.values()) / len(batch) * world
        opt.zero_grad()
        loss.backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
        opt.step()
    if rank == 0:  # safetensors, not torch.save: nothing in this project is pickled
        from safetensors.torch import save_file

        save_file({f"{step}/{k}": g for step, gs in enumerate(grads) for k, g in gs.items()}, out)
    dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_on_two_processes_matches_one(tmp_path):
    import socket

    import torch.multiprocessing as mp

    model = ss.compile(FF, seed=0)
    batches = [records(model, 8, seed=s) for s in range(3)]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "grads.safetensors")
    mp.start_processes(_ddp_worker, args=(2, port, FF, batches, out), nprocs=2, start_method="spawn")
    from safetensors.torch import load_file

    ddp_grads = load_file(out)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step, batch in enumerate(batches):
        out_ = model(model.featurise(batch))
        loss = sum(o.pow(2).sum() for o in out_.values()) / len(batch)
        opt.zero_grad()
        loss.backward()
        for k, p in model.named_parameters():
            assert torch.allclose(ddp_grads[f"{step}/{k}"], p.grad, atol=1e-6), (step, k)
        opt.step()
