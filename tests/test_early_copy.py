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
    real = StoredTensor.write_at
    calls = []

    def full(self, fd, at):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, fd, at)

    monkeypatch.setattr(StoredTensor, "write_at", full)
    target = tmp_path / "out"
    target.mkdir()
    out = str(target / ("new" if sharded else "new.safetensors"))
    with pytest.raises(UserError, match=f"{out}: error: cannot write: No space left on device; nothing was changed"):
        ss.apply(folder if sharded else single, NEW, out, max_shard_size="2MB" if sharded else None, jobs=1)
    assert os.listdir(target) == []
