"""apply without torch: fresh values drawn by numpy equal torch's to the bit, and
StreamedTensor (file to file, a row block at a time) writes exactly the bytes
of build_tensor (in memory, torch) for every kind of plan entry."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from specsurgery.checkpoint import StoredTensor, read_header, tensor_bytes, write_checkpoint
from specsurgery.surgery.apply import StreamedTensor, build_tensor, fresh_generator, fresh_values
from specsurgery.surgery.fresh import Draws, FreshValues, NeedsTorch, recorded
from specsurgery.surgery.plan import AxisMap, Fill, ParamPlan, Run

DTYPES = {"F32": torch.float32, "F64": torch.float64, "F16": torch.float16, "BF16": torch.bfloat16}


def uniform(bound):
    return lambda tensor, generator: tensor.uniform_(-bound, bound, generator=generator)


def normal(tensor, generator):
    tensor.normal_(0.0, 1.0, generator=generator)


@pytest.mark.parametrize("bound", [0.0, 1e-3, 1 / 92 ** 0.5, 0.5, 3.0])
@pytest.mark.parametrize("seed", [0, 1, 2**40 + 7, 2**64 - 1])
def test_numpy_uniform_is_torch_uniform_to_the_bit(seed, bound):
    g = torch.Generator().manual_seed(seed)
    first, second = torch.empty(1000, 7), torch.empty(33)
    first.uniform_(-bound, bound, generator=g)
    second.uniform_(0.0, 2.0, generator=g)  # the generator goes on where the first left it
    draws = Draws(seed)
    ours = FreshValues("uniform", (-bound, bound, draws), "F32")
    got = np.concatenate([ours.take(4000), ours.take(3000)]).reshape(1000, 7)
    assert np.array_equal(got.view(np.uint32), first.numpy().view(np.uint32))
    assert np.array_equal(FreshValues("uniform", (0.0, 2.0, draws), "F32").take(33), second.numpy())


@pytest.mark.parametrize("dtype", ["F32", "F64"])
@pytest.mark.parametrize("seed", [0, 7, 2**64 - 1])
def test_plain_python_values_are_numpys_and_torchs_to_the_bit(monkeypatch, seed, dtype):
    """A small region is drawn without numpy while numpy is not imported: the
    same bytes as numpy's arithmetic and as torch, the generator going on alike."""
    from specsurgery.surgery import fresh

    for low, high in [(-0.3, 0.3), (0.0, 2.0), (-1 / 92 ** 0.5, 1 / 92 ** 0.5), (0.25, 0.25), (-0.0, -0.0)]:
        g = torch.Generator().manual_seed(seed)
        first, second = torch.empty(1000), torch.empty(37)
        first.uniform_(low, high, generator=g)
        second.uniform_(low, high, generator=g)
        wanted = [t.to(DTYPES[dtype]).numpy().tobytes() for t in (first, second)]
        by_numpy = FreshValues("uniform", (low, high, Draws(seed)), dtype)
        assert [by_numpy.take_bytes(1000), by_numpy.take_bytes(37)] == wanted
        monkeypatch.setattr(fresh, "_numpy_at_hand", lambda n: False)
        plain = FreshValues("uniform", (low, high, Draws(seed)), dtype)
        assert [plain.take_bytes(400) + plain.take_bytes(600), plain.take_bytes(37)] == wanted
        monkeypatch.undo()
    constant = FreshValues("fill", (0.1,), dtype)
    monkeypatch.setattr(fresh, "_numpy_at_hand", lambda n: False)
    assert constant.take_bytes(5) == torch.full((5,), 0.1).to(DTYPES[dtype]).numpy().tobytes()


def test_a_new_unit_joining_mid_row_applies_with_neither_numpy_nor_torch(tmp_path):
    """Five's change in small: a new group's own layer (drawn whole, uniform)
    joins the concat mid-row (zero columns in the carried rows). A one-file
    apply of it needs neither numpy (a fifth of a second to import) nor torch,
    and writes the bits of the surgery in memory."""
    import specsurgery as ss
    from tests.small_specs import HERO_AGENT

    new = tmp_path / "new.spec"
    new.write_text(HERO_AGENT.replace("  group hero {", "  group extra {\n    a: float\n    b: int\n  }\n  group hero {")
                   .replace("  h = relu(linear(concat(obs.hero, he), 8))",
                            "  xh = relu(linear(obs.extra, 3))\n  h = relu(linear(concat(obs.hero, xh, he), 8))"))
    ckpt, out = str(tmp_path / "old.safetensors"), str(tmp_path / "new.safetensors")
    ss.compile(HERO_AGENT, seed=1).save(ckpt)
    code = ("import sys, specsurgery as ss; ss.apply(*sys.argv[1:]); "
            "print('numpy' in sys.modules, 'torch' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code, ckpt, str(new), out], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["False", "False"]
    done = ss.surgery(ss.load(ckpt), str(new))
    assert done.plan.summary.fresh and done.plan.summary.zeroed
    carried = ss.load(out).state_dict()
    assert set(carried) == set(done.model.state_dict())
    for name, value in done.model.state_dict().items():
        assert torch.equal(carried[name], value), name


def test_an_init_numpy_cannot_draw_to_the_bit_asks_for_torch():
    with pytest.raises(NeedsTorch):
        recorded(normal, 5, "F32", [10])  # torch vectorises normal_ with its own log/sin/cos
    with pytest.raises(NeedsTorch):
        recorded(uniform(0.1), 5, "BF16", [10])  # roundings to bfloat16 and float16 are torch's
    with pytest.raises(NeedsTorch):
        recorded(lambda t, g: t.shape, 5, "F32", [10])


def plan_entry(shape, old_shape=None, axes=(), fills=()):
    return ParamPlan(name="p.linear.weight", shape=shape, source="p.linear.weight" if old_shape else None,
                     old_shape=old_shape, axes=tuple(axes), fills=tuple(fills))


def axis(role, new, old, *runs):
    return AxisMap(role=role, new_size=new, old_size=old, runs=tuple(Run(new=n, old=o, length=k) for n, o, k in runs))


FILLS = {"fresh new rows, zero new columns": (Fill(value="fresh", where=("new", "all")),
                                              Fill(value="zero", where=("old", "new"))),
         "two fresh regions": (Fill(value="fresh", where=("new", "all")), Fill(value="fresh", where=("old", "new"))),
         "identity on new units": (Fill(value="identity", where=("new", "new")), Fill(value="zero", where=("new", "old")),
                                   Fill(value="zero", where=("old", "new")))}
GROWN = [  # (rows axis, columns axis): rows and columns inserted mid-way, moved, or only appended
    (axis("out", 9, 6, (0, 0, 3), (5, 3, 3)), axis("in", 7, 5, (0, 0, 2), (4, 2, 3))),
    (axis("out", 9, 6, (0, 3, 3), (4, 0, 3)), axis("in", 5, 5, (0, 0, 5))),  # rows moved, columns as they were
    (axis("out", 12, 9, (0, 0, 9)), axis("in", 9, 9, (0, 0, 9))),  # appended rows: whole rows copied by the kernel
    (axis("out", 8, 8, (0, 0, 8)), axis("in", 8, 6, (0, 0, 3), (5, 3, 3))),  # appended columns: new ones zero
]


def old_tensor(tmp_path, shape, dtype):
    values = torch.arange(int(np.prod(shape)), dtype=torch.float64).reshape(shape).mul(0.37).sin().to(DTYPES[dtype])
    path = str(tmp_path / f"old-{dtype}.safetensors")
    write_checkpoint(path, None, "m", {"p.linear.weight": tuple(shape)}, [("p.linear.weight", values)],
                     durable=False, dtypes={"p.linear.weight": dtype})
    return values, StoredTensor.of(read_header(path, embedded_spec=False), "p.linear.weight")


def streamed_bytes(tmp_path, entry, source, dtype, init, seed=3, block_rows=2, by_kernel=False, parts=1) -> bytes:
    """The tensor's bytes as StreamedTensor writes them, after 5 bytes already in
    the file (it writes at the file's position); `by_kernel`: every run of old
    columns copied by the kernel, however short (else gathered in a buffer);
    `parts` threads, each its share of the rows, where no fresh values are drawn."""
    streamed = StreamedTensor(entry, source, dtype, fresh_values(entry, init, seed, dtype))
    streamed.parts, streamed.parallel_bytes = parts, 0
    streamed.block_bytes = block_rows * max(entry.shape[-1], (entry.old_shape or (1,))[-1]) * 8  # several blocks
    streamed.kernel_piece_bytes = 0 if by_kernel else 1 << 30
    path = tmp_path / "streamed.bin"
    with open(path, "wb") as f:
        f.write(b"start")
        f.flush()
        assert streamed.copy_to(f) == int(np.prod(entry.shape)) * DTYPES[dtype].itemsize
        assert f.tell() == 5 + int(np.prod(entry.shape)) * DTYPES[dtype].itemsize
    data = path.read_bytes()
    assert data[:5] == b"start"
    return data[5:]


def built_bytes(entry, old, dtype, init, seed=3) -> bytes:
    g = fresh_generator(seed, entry.name)
    tensor = build_tensor(entry, lambda _: old, lambda t: init(t, g), dtype=DTYPES[dtype])
    return bytes(tensor_bytes(tensor, dtype))


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("fills", list(FILLS))
@pytest.mark.parametrize("grown", range(len(GROWN)))
def test_a_streamed_tensor_is_the_built_tensor_to_the_bit(tmp_path, grown, fills, dtype):
    rows, cols = GROWN[grown]
    entry = plan_entry((rows.new_size, cols.new_size), (rows.old_size, cols.old_size), (rows, cols), FILLS[fills])
    old, source = old_tensor(tmp_path, entry.old_shape, dtype)
    init = uniform(0.25)
    expected = built_bytes(entry, old, dtype, init)
    assert streamed_bytes(tmp_path, entry, source, dtype, init) == expected
    assert streamed_bytes(tmp_path, entry, source, dtype, init, by_kernel=True) == expected
    assert streamed_bytes(tmp_path, entry, source, dtype, init, parts=3) == expected


@pytest.mark.parametrize("dtype", ["F32", "BF16"])
@pytest.mark.parametrize("init", [uniform(0.1), normal], ids=["uniform", "normal"])
def test_vectors_and_tensors_from_nothing_stream_as_they_build(tmp_path, dtype, init):
    bias = plan_entry((10,), (6,), [axis("out", 10, 6, (0, 0, 2), (5, 2, 4))], [Fill(value="fresh", where=("new",))])
    old, source = old_tensor(tmp_path, (6,), dtype)
    assert streamed_bytes(tmp_path, bias, source, dtype, init) == built_bytes(bias, old, dtype, init)
    for fills in [(Fill(value="fresh", where=("all", "all")),), (Fill(value="identity", where=("all", "all")),),
                  (Fill(value="zero", where=("all", "all")),)]:
        fresh = plan_entry((40, 40), fills=fills)
        assert streamed_bytes(tmp_path, fresh, None, dtype, init) == built_bytes(fresh, None, dtype, init)


def test_a_change_that_draws_uniform_values_applies_without_torch(tmp_path):
    import specsurgery as ss
    from tests.small_specs import ADD_LEVEL, HERO_AGENT

    new = tmp_path / "new.spec"  # a feature more (zero columns), the layer widened (fresh uniform rows)
    new.write_text(ADD_LEVEL.replace("linear(concat(obs.hero, he), 8)", "linear(concat(obs.hero, he), 12)"))
    ckpt, out, folder = (str(tmp_path / name) for name in ("old.safetensors", "new.safetensors", "new"))
    ss.compile(HERO_AGENT, seed=1).save(ckpt)
    code = ("import sys, specsurgery as ss; old, new, out, folder = sys.argv[1:]; ss.apply(old, new, out); "
            "ss.apply(old, new, folder, max_shard_size=400, jobs=2); print('torch' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code, ckpt, str(new), out, folder], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "False"  # one file, and shards written in parallel
    done = ss.surgery(ss.load(ckpt), str(new))  # in memory, with torch: the same bits
    assert done.plan.summary.fresh and done.plan.summary.zeroed
    for written in (out, folder):
        carried = ss.load(written).state_dict()
        for name, value in done.model.state_dict().items():
            assert torch.equal(carried[name], value), (written, name)

