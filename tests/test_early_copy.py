"""apply copies old tensors into the new checkpoint while it plans (early_copy.py):
the result is the plain apply's, byte for byte, whatever the plan says of
the tensors copied early, and a failure or a refused plan leaves nothing."""
from __future__ import annotations

import errno
import os

import pytest

import specsurgery as ss
from specsurgery import early_copy
from specsurgery.checkpoint import Layout, StoredTensor
from specsurgery.errors import UserError
from specsurgery.shard_apply import apply_sharded
from specsurgery.surgery.apply import apply_plan
from specsurgery.surgery.diff import make_plan

from surgery_helpers import edit, load_model
from test_shards import NEW, OLD, _files, old_checkpoints  # noqa: F401  (the fixture)

# h.linear.weight keeps its name and shape, but its columns are permuted: an
# early copy of it is made in vain
REORDERED = edit(OLD, ("concat(obs.g, e)", "concat(e, obs.g)"))


class _Seen(list):
    pass


@pytest.fixture
def adopted(monkeypatch):
    """What each EarlyOutput.adopt returned (None: the early files were dropped),
    with every early copy finished first when asked (`adopted.all_copied_first`)."""
    seen = _Seen()
    real = early_copy.EarlyOutput.adopt

    def adopt(self, layouts, kept):
        if adopt.all_copied_first:
            self.copies._thread.join()  # no plan yet: it copies every candidate
        got = real(self, layouts, kept)
        seen.append(got)
        return got

    adopt.all_copied_first = False
    monkeypatch.setattr(early_copy.EarlyOutput, "adopt", adopt)
    seen.all_copied_first = lambda: setattr(adopt, "all_copied_first", True)
    return seen


def _plain(checkpoint: str, new_text: str, out: str, sharded: bool) -> dict:
    """The output written with no early copies, as apply wrote it before."""
    new = load_model(new_text, "new.spec")
    old = load_model(OLD, "old.spec")
    plan = make_plan(old, new)
    if sharded:
        apply_sharded(plan, checkpoint, new, out, max_shard_size="2MB", jobs=1, checked=True)
    else:
        apply_plan(plan, checkpoint, new, out, checked=True)
    return _files_of(out)


def _files_of(path: str) -> dict:
    from pathlib import Path

    return _files(Path(path))


@pytest.mark.parametrize("sharded", [False, True])
@pytest.mark.parametrize("new_text, in_vain", [(NEW, set()), (REORDERED, {"h.linear.weight"})])
def test_the_early_copies_give_the_plain_applys_bytes(old_checkpoints, tmp_path, adopted, monkeypatch, sharded,
                                                      new_text, in_vain):
    tmp, spec, weights, single, folder = old_checkpoints
    cleared = []
    real_clear = Layout.clear
    monkeypatch.setattr(Layout, "clear", lambda self, fd, name: (cleared.append(name), real_clear(self, fd, name)))
    adopted.all_copied_first()
    out = str(tmp_path / ("new" if sharded else "new.safetensors"))
    ss.apply(folder if sharded else single, new_text, out, max_shard_size="2MB" if sharded else None, jobs=1)
    plan = make_plan(spec, load_model(new_text, "new.spec"))
    unchanged = {p.name for p in plan.params if p.action == "copied"}
    assert len(adopted) == 1 and adopted[0] == unchanged  # every tensor left as it was, copied early
    assert set(cleared) == in_vain  # copied before the plan said otherwise, then made zeros again
    assert _files_of(out) == _plain(folder if sharded else single, new_text, str(tmp_path / "plain"), sharded)


@pytest.mark.parametrize("sharded", [False, True])
def test_a_wrong_dtype_guess_drops_the_early_files(old_checkpoints, tmp_path, adopted, monkeypatch, sharded):
    tmp, spec, weights, single, folder = old_checkpoints
    real_guess = early_copy.guessed_dtypes
    monkeypatch.setattr(early_copy, "guessed_dtypes",
                        lambda header, shapes: {**real_guess(header, shapes), "h2.linear.bias": "F64"})
    target = tmp_path / "out"
    target.mkdir()
    out = str(target / ("new" if sharded else "new.safetensors"))
    ss.apply(folder if sharded else single, NEW, out, max_shard_size="2MB" if sharded else None, jobs=1)
    assert adopted == [None]
    assert os.listdir(target) == [os.path.basename(out)]  # the early files gone
    assert _files_of(out) == _plain(folder if sharded else single, NEW, str(tmp_path / "plain"), sharded)


@pytest.mark.parametrize("sharded", [False, True])
def test_a_refused_plan_leaves_nothing_of_the_early_copies(old_checkpoints, tmp_path, sharded):
    tmp, spec, weights, single, folder = old_checkpoints
    lossy = edit(OLD, ("    y: float\n", ""))  # a feature removed: its weights are lost
    target = tmp_path / "out"
    target.mkdir()
    out = str(target / ("new" if sharded else "new.safetensors"))
    with pytest.raises(UserError, match="lossy"):
        ss.apply(folder if sharded else single, lossy, out, max_shard_size="2MB" if sharded else None)
    assert os.listdir(target) == []


@pytest.mark.parametrize("sharded", [False, True])
def test_a_full_disk_met_by_an_early_copy_leaves_nothing(old_checkpoints, tmp_path, monkeypatch, sharded):
    tmp, spec, weights, single, folder = old_checkpoints
    calls = []

    def full(*args, **kwargs):
        calls.append(1)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(early_copy, "copy_range", full)
    target = tmp_path / "out"
    target.mkdir()
    out = str(target / ("new" if sharded else "new.safetensors"))
    with pytest.raises(UserError, match=f"{out}: error: cannot write: No space left on device; nothing was changed"):
        ss.apply(folder if sharded else single, NEW, out, max_shard_size="2MB" if sharded else None, jobs=1)
    assert calls and os.listdir(target) == []


# ---------------------------------------------------------------------------
# the copier itself: runs of tensors end to end, told mid-way what the plan keeps


@pytest.fixture
def gated_copier(tmp_path, monkeypatch):
    """EarlyCopies over four 100-byte tensors: a, b, c end to end on both sides
    (one run) and d apart; every copy waits for `gate` to be set."""
    import threading

    old = tmp_path / "old.bin"
    old.write_bytes(bytes(range(100)) * 4)
    fd = os.open(tmp_path / "new.bin", os.O_RDWR | os.O_CREAT)
    os.ftruncate(fd, 1000)
    started, gate = threading.Event(), threading.Event()
    real = early_copy.copy_range

    def gated(*args, **kwargs):
        started.set()
        assert gate.wait(10)
        return real(*args, **kwargs)

    monkeypatch.setattr(early_copy, "copy_range", gated)
    tensor = lambda k: StoredTensor(str(old), 100 * k, 100, (25,))  # noqa: E731
    copies = [("a", tensor(0), fd, 0), ("b", tensor(1), fd, 100), ("c", tensor(2), fd, 200), ("d", tensor(3), fd, 600)]
    yield copies, started, gate, fd
    gate.set()
    os.close(fd)


def test_the_copier_waits_out_a_run_under_way_that_holds_a_tensor_the_plan_changes(gated_copier):
    import threading

    copies, started, gate, fd = gated_copier
    copier = early_copy.EarlyCopies(copies)
    assert started.wait(10)  # a, b, c: one copy, under way
    settled = []
    settling = threading.Thread(target=lambda: settled.append(copier.settle({"a", "c", "d"})))
    settling.start()
    settling.join(0.2)
    assert settling.is_alive()  # b is not kept: settle waits for the run to end
    gate.set()
    settling.join(10)
    assert settled == [({"a", "c", "d"}, {"b"})]  # b was copied in vain
    copier.wait()
    assert os.pread(fd, 100, 600) == bytes(range(100))  # d copied after


def test_the_copier_leaves_alone_a_run_not_begun_that_holds_a_tensor_the_plan_changes(gated_copier):
    copies, started, gate, fd = gated_copier
    copier = early_copy.EarlyCopies(copies[3:] + copies[:3])  # d first: a, b, c wait their turn
    assert started.wait(10)
    assert copier.settle({"a", "c", "d"}) == ({"d"}, set())  # a and c are the writer's to write
    gate.set()
    copier.wait()
    assert os.pread(fd, 300, 0) == bytes(300)  # a, b, c never copied
    assert os.pread(fd, 100, 600) == bytes(range(100))


def test_a_writer_done_with_its_own_tensors_copies_the_runs_left(tmp_path, monkeypatch):
    """help(): the runs the early thread has not reached are copied by the
    caller, each once, while the early thread is still in its first."""
    import threading

    old = tmp_path / "old.bin"
    old.write_bytes(bytes(range(100)) * 3)
    fd = os.open(tmp_path / "new.bin", os.O_RDWR | os.O_CREAT)
    os.ftruncate(fd, 1000)
    first, gate, copied = threading.Event(), threading.Event(), []
    real = early_copy.copy_range

    def gated(src, dst, offset, nbytes, at):
        copied.append((threading.current_thread().name, at))
        if at == 0:  # the first run holds the early thread until the others are done
            first.set()
            assert gate.wait(10)
        return real(src, dst, offset, nbytes, at=at)

    monkeypatch.setattr(early_copy, "copy_range", gated)
    tensor = lambda k: StoredTensor(str(old), 100 * k, 100, (25,))  # noqa: E731
    copier = early_copy.EarlyCopies([("a", tensor(0), fd, 0), ("b", tensor(1), fd, 300), ("c", tensor(2), fd, 600)])
    assert first.wait(10)
    assert copier.settle({"a", "b", "c"}) == ({"a", "b", "c"}, set())
    copier.help()  # b and c: runs of their own (not end to end with a in the new file)
    assert [at for name, at in copied if name == threading.current_thread().name] == [300, 600]
    gate.set()
    copier.wait()
    assert sorted(at for _, at in copied) == [0, 300, 600]  # each copied once
    assert os.pread(fd, 100, 600) == bytes(range(100))
    os.close(fd)
