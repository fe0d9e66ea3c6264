"""Sharded checkpoints in the Hugging Face layout: reading (strictly), writing
(atomically), and surgery shard by shard in worker processes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file

from specsurgery.checkpoint import load_spec, open_tensors, read_header, write_checkpoint
from specsurgery.errors import UserError
from specsurgery.shard_apply import apply_sharded
from specsurgery.shards import INDEX, parse_size, plan_shards, read_sharded, write_sharded
from specsurgery.spec.canonical import canonical
from specsurgery.surgery.apply import apply_plan
from specsurgery.surgery.diff import make_plan

from surgery_helpers import edit, load_model, trained_weights

REPO = Path(__file__).resolve().parents[1]

OLD = """schema s {
  vocab v = [a, b, c]
  group g {
    x: float
    y: float
    k: category(v)
  }
}

model m(obs: s) {
  e = embed(obs.g.k, 4)
  h = relu(linear(concat(obs.g, e), 1100))
  h2 = relu(linear(h, 1000))
  out q = linear(h2, 3)
}
"""
# a feature inserted mid-group, a vocabulary grown mid-list, one layer widened
NEW = edit(OLD, ("    x: float\n", "    x: float\n    z: float\n"), ("[a, b, c]", "[a, ab, b, c]"),
           ("1100)", "1164)"))


def read_all(path: str) -> dict[str, torch.Tensor]:
    tensors = open_tensors(path)
    return {name: tensors.get_tensor(name) for name in read_header(path).tensors}


@pytest.fixture(scope="module")
def old_checkpoints(tmp_path_factory):
    """The same trained weights as one file and as a folder of 2 MB shards."""
    tmp = tmp_path_factory.mktemp("shards")
    spec = load_model(OLD, "old.spec")
    weights = trained_weights(spec)
    shapes = {n: tuple(t.shape) for n, t in weights.items()}
    single = str(tmp / "old.safetensors")
    write_checkpoint(single, canonical(spec), "m", shapes, weights.items())
    folder = str(tmp / "old")
    write_sharded(folder, canonical(spec), "m", shapes, weights.items(), max_shard_size="2MB")
    return tmp, spec, weights, single, folder


# ---------------------------------------------------------------------------
# sizes and shard plans, as Hugging Face reads them


@pytest.mark.parametrize("text,expected", [
    (1000, 1000), ("2GB", 2 * 10**9), ("400MB", 400 * 10**6), ("400MiB", 400 * 2**20), ("5KB", 5000),
    ("1GiB", 2**30), ("8Gb", 10**9), ("123", 123), ("1.5GB", 1_500_000_000)])
def test_sizes(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["2 gigs", "GB", "-5MB", "0", 0])
def test_bad_sizes(text):
    with pytest.raises(UserError):
        parse_size(text)


def test_shard_plan_fills_each_shard_and_gives_a_big_tensor_its_own():
    sizes = {"a": 40, "b": 50, "c": 20, "big": 300, "d": 10}
    assert plan_shards(sizes, 100) == [["a", "b"], ["c"], ["big"], ["d"]]
    assert plan_shards(sizes, 1000) == [["a", "b", "c", "big", "d"]]
    assert plan_shards({}, 100) == [[]]


# ---------------------------------------------------------------------------
# reading: a folder laid out by hand in the Hugging Face convention


def hand_laid(folder: Path, spec_text: str, weight_map=None, metadata=None) -> dict[str, np.ndarray]:
    """Two shards written by safetensors itself, an index written by hand."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    a = {"q.linear.weight": rng.standard_normal((2, 3), dtype=np.float32)}
    b = {"q.linear.bias": rng.standard_normal(2, dtype=np.float32)}
    save_numpy(a, str(folder / "model-00001-of-00002.safetensors"), metadata={"format": "pt"})
    save_numpy(b, str(folder / "model-00002-of-00002.safetensors"), metadata={"format": "pt"})
    index = {"metadata": metadata if metadata is not None else
             {"total_size": 32, "specsurgery.spec": spec_text, "specsurgery.model": "m"},
             "weight_map": weight_map if weight_map is not None else
             {"q.linear.weight": "model-00001-of-00002.safetensors", "q.linear.bias": "model-00002-of-00002.safetensors"}}
    (folder / INDEX).write_text(json.dumps(index))
    return {**a, **b}


SMALL = "schema s {\n  group g {\n    x: float\n    y: float\n    w: float\n  }\n}\n\nmodel m(obs: s) {\n  out q = linear(obs.g, 2)\n}\n"


def test_reads_a_hand_laid_hugging_face_folder_as_one_checkpoint(tmp_path):
    arrays = hand_laid(tmp_path / "hf", SMALL)
    for path in (tmp_path / "hf", tmp_path / "hf" / INDEX):
        header = read_header(str(path))
        assert header.model_name == "m" and header.spec_text == SMALL
        assert {n: i.shape for n, i in header.tensors.items()} == {"q.linear.weight": (2, 3), "q.linear.bias": (2,)}
        assert load_spec(header).model.name == "m"
        got = read_all(str(path))
        for name, array in arrays.items():
            assert np.array_equal(got[name].numpy(), array)
    result = subprocess.run([sys.executable, "-m", "specsurgery", "inspect", str(tmp_path / "hf"), "--json"],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "q.linear.weight" in result.stdout


BAD_INDEXES = {
    "a shard name with ..": (
        {"q.linear.weight": "../model-00001-of-00002.safetensors", "q.linear.bias": "model-00002-of-00002.safetensors"},
        "shard '../model-00001-of-00002.safetensors' is not a .safetensors file name inside the folder"),
    "an absolute shard path": (
        {"q.linear.weight": "/etc/passwd.safetensors", "q.linear.bias": "model-00002-of-00002.safetensors"},
        "shard '/etc/passwd.safetensors' is not a .safetensors file name inside the folder"),
    "a tensor the index places in the wrong shard": (
        {"q.linear.weight": "model-00002-of-00002.safetensors", "q.linear.bias": "model-00002-of-00002.safetensors"},
        "tensor 'q.linear.weight' is not in its shard model-00002-of-00002.safetensors"),
    "a shard holding a tensor the index does not list": (
        {"q.linear.bias": "model-00002-of-00002.safetensors", "q.linear.weight": "model-00001-of-00002.safetensors",
         "extra": "model-00001-of-00002.safetensors"},
        "tensor 'extra' is not in its shard model-00001-of-00002.safetensors"),
    "a missing shard": (
        {"q.linear.weight": "model-00001-of-00002.safetensors", "q.linear.bias": "model-00003-of-00002.safetensors"},
        "shard 'model-00003-of-00002.safetensors' is missing"),
}


@pytest.mark.parametrize("case", sorted(BAD_INDEXES))
def test_hostile_indexes_are_refused_with_one_message(tmp_path, case):
    weight_map, message = BAD_INDEXES[case]
    hand_laid(tmp_path / "hf", SMALL, weight_map=weight_map)
    with pytest.raises(UserError) as e:
        read_header(str(tmp_path / "hf"))
    assert str(e.value) == f"{tmp_path / 'hf' / INDEX}: error: not a valid checkpoint index: {message}"


def test_a_tensor_in_two_shards_is_refused(tmp_path):
    hand_laid(tmp_path / "hf", SMALL)
    save_numpy({"q.linear.bias": np.zeros(2, np.float32), "q.linear.weight": np.zeros((2, 3), np.float32)},
               str(tmp_path / "hf" / "model-00002-of-00002.safetensors"))
    with pytest.raises(UserError, match="shard model-00002-of-00002.safetensors holds 'q.linear.weight', "
                                        "which the index places in model-00001-of-00002.safetensors"):
        read_header(str(tmp_path / "hf"))


def test_a_symlink_out_of_the_folder_is_refused(tmp_path):
    hand_laid(tmp_path / "hf", SMALL)
    outside = tmp_path / "elsewhere.safetensors"
    os.replace(tmp_path / "hf" / "model-00002-of-00002.safetensors", outside)
    os.symlink(outside, tmp_path / "hf" / "model-00002-of-00002.safetensors")
    with pytest.raises(UserError, match="shard 'model-00002-of-00002.safetensors' is a link to a file outside the folder"):
        read_header(str(tmp_path / "hf"))


def test_a_listed_twice_tensor_no_spec_and_garbage_are_refused(tmp_path):
    hand_laid(tmp_path / "hf", SMALL)
    index = tmp_path / "hf" / INDEX
    text = index.read_text()
    index.write_text(text.replace('"weight_map": {', '"weight_map": {"q.linear.bias": "model-00002-of-00002.safetensors", '))
    with pytest.raises(UserError, match="'q.linear.bias' is listed twice"):
        read_header(str(tmp_path / "hf"))
    hand_laid(tmp_path / "hf", SMALL, metadata={"total_size": 32})
    with pytest.raises(UserError, match="this index has no embedded spec in its metadata"):
        read_header(str(tmp_path / "hf"))
    index.write_text("{not json")
    with pytest.raises(UserError, match="not a valid checkpoint index: not JSON"):
        read_header(str(tmp_path / "hf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="is a folder, not a checkpoint"):
        read_header(str(tmp_path / "empty"))


# ---------------------------------------------------------------------------
# writing


def test_sharded_round_trip(old_checkpoints):
    tmp, spec, weights, single, folder = old_checkpoints
    header = read_sharded(folder)
    assert len(header.shards) > 2
    assert sorted(os.listdir(folder)) == sorted([INDEX] + [f"model-{k:05d}-of-{len(header.shards):05d}.safetensors"
                                                           for k in range(1, len(header.shards) + 1)])
    assert all(sum(i.end - i.start for i in h.tensors.values()) <= 2 * 10**6 or len(h.tensors) == 1
               for h in header.shards)
    index = json.loads(Path(folder, INDEX).read_text())
    assert index["metadata"]["specsurgery.spec"] == canonical(spec)
    assert index["metadata"]["total_size"] == sum(4 * t.numel() for t in weights.values())
    got = read_all(folder)
    assert list(got) == list(weights)
    assert all(torch.equal(got[n], t) for n, t in weights.items())


def test_rewriting_a_folder_swaps_it_whole(tmp_path):
    spec = load_model(SMALL, "small.spec")
    shapes = {"q.linear.weight": (2, 3), "q.linear.bias": (2,)}
    target = str(tmp_path / "out")
    for value in (1.0, 2.0):
        write_sharded(target, SMALL, "m", shapes, [(n, torch.full(s, value)) for n, s in shapes.items()], 16)
        assert all(torch.equal(t, torch.full(t.shape, value)) for t in read_all(target).values())
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no staging folder left behind
    assert load_spec(read_header(target)).model.name == spec.model.name
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="it is a file, not a folder"):
        write_sharded(str(tmp_path / "file"), SMALL, "m", shapes, [], 16)


# ---------------------------------------------------------------------------
# surgery shard by shard


@pytest.fixture(scope="module")
def one_file_result(old_checkpoints):
    tmp, spec, weights, single, folder = old_checkpoints
    new_spec = load_model(NEW, "new.spec")
    plan = make_plan(spec, new_spec)
    out = str(tmp / "new-one.safetensors")
    apply_plan(plan, single, new_spec, out)
    return plan, new_spec, load_file(out)


@pytest.mark.parametrize("source,jobs", [("folder", 2), ("single", 1)])
def test_sharded_apply_equals_one_file_apply(old_checkpoints, one_file_result, source, jobs):
    tmp, spec, weights, single, folder = old_checkpoints
    plan, new_spec, expected = one_file_result
    assert {p.action for p in plan.params} >= {"copied", "grown"}
    out = str(tmp / f"new-{source}-{jobs}")
    result = apply_sharded(plan, folder if source == "folder" else single, new_spec, out,
                           max_shard_size="2MB", jobs=jobs)
    assert result["shards"] == len(read_sharded(out).shards) > 2
    got = read_all(out)
    assert list(got) == list(expected)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
    assert read_header(out).spec_text == plan.new_spec


def test_one_file_apply_reads_a_sharded_checkpoint(old_checkpoints, one_file_result):
    tmp, spec, weights, single, folder = old_checkpoints
    plan, new_spec, expected = one_file_result
    out = str(tmp / "from-folder.safetensors")
    apply_plan(plan, folder, new_spec, out)
    got = load_file(out)
    assert all(torch.equal(got[n], t) for n, t in expected.items())



def test_one_file_apply_in_threads_writes_the_same_bytes_in_the_same_order(old_checkpoints, one_file_result, tmp_path):
    tmp, spec, weights, single, folder = old_checkpoints
    plan, new_spec, _ = one_file_result
    files, seen = {}, {}
    for threads in (1, 3):
        out = tmp_path / f"threads-{threads}.safetensors"
        seen[threads] = []
        apply_plan(plan, single, new_spec, str(out), threads=threads, durable=False,
                   progress=lambda name, nbytes, got=seen[threads]: got.append((name, nbytes)))
        files[threads] = out.read_bytes()
    assert files[1] == files[3]
    assert seen[1] == seen[3] and [name for name, _ in seen[1]] == [p.name for p in plan.params]


def test_a_full_disk_in_a_writing_thread_leaves_nothing(old_checkpoints, one_file_result, tmp_path, monkeypatch):
    import errno

    import specsurgery.checkpoint

    tmp, spec, weights, single, folder = old_checkpoints
    plan, new_spec, _ = one_file_result
    calls = []

    def full(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    real = specsurgery.checkpoint.copy_range
    monkeypatch.setattr(specsurgery.checkpoint, "copy_range", full)
    out = tmp_path / "new.safetensors"
    with pytest.raises(UserError, match="cannot write: No space left on device; nothing was changed"):
        apply_plan(plan, single, new_spec, str(out), threads=2)
    assert os.listdir(tmp_path) == []

def test_sharded_apply_refuses_another_checkpoint_and_its_own_folder(old_checkpoints, one_file_result, tmp_path):
    tmp, spec, weights, single, folder = old_checkpoints
    plan, new_spec, _ = one_file_result
    with pytest.raises(UserError, match="would replace the checkpoint being read"):
        apply_sharded(plan, folder, new_spec, folder, jobs=1)
    other = make_plan(new_spec, spec)
    with pytest.raises(UserError, match="the plan was made for another old spec"):
        apply_sharded(other, folder, spec, str(tmp_path / "x"), jobs=1)
    assert not (tmp_path / "x").exists()


KILL_SCRIPT = """
import sys
import specsurgery as ss
old, new_text, out, seed = sys.argv[1:5]
# as users apply: the files laid out and copied into before the plan is made (early_copy.py)
ss.apply(old, new_text, out, max_shard_size="1MB", jobs=2, seed=int(seed))
"""


@pytest.mark.slow
def test_parallel_apply_survives_sigkill_at_random_moments(old_checkpoints, tmp_path):
    """Killed (the whole process group) at random moments while replacing an
    earlier output: the old folder stays whole, and the output is always one
    complete version (the earlier or the new), never a torn one."""
    import random
    import signal
    import time

    tmp, spec, weights, single, folder = old_checkpoints
    out = str(tmp_path / "out")

    def run(seed: int, kill_after=None):
        proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, folder, NEW, out, str(seed)], cwd=REPO,
                                start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if kill_after is None:
            _, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err.decode()
            return
        time.sleep(kill_after)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)

    run(1)
    earlier = read_all(out)
    t = time.perf_counter()
    run(0)
    duration = time.perf_counter() - t
    finished = read_all(out)
    run(1)
    rng = random.Random(15)
    outcomes = set()
    for _ in range(8):
        run(0, kill_after=rng.uniform(0.2, duration))
        old = read_all(folder)
        assert all(torch.equal(old[n], t) for n, t in weights.items())
        got = read_all(out)  # read_header checks every shard against the index
        same_as = [name for name, version in (("earlier", earlier), ("new", finished))
                   if list(got) == list(version) and all(torch.equal(got[n], version[n]) for n in version)]
        assert len(same_as) == 1
        outcomes.add(same_as[0])
        if same_as == ["new"]:
            run(1)
    leftovers = [e for e in os.listdir(tmp_path) if e != "out"]
    run(0)  # the next run sweeps what killed runs left
    assert [e for e in os.listdir(tmp_path) if e != "out"] == [], leftovers
    assert outcomes  # which of the two happened depends on timing; both are whole


def test_apply_command_carries_a_folder_into_a_folder_with_jobs(old_checkpoints, one_file_result, tmp_path):
    tmp, spec, weights, single, folder = old_checkpoints
    plan, new_spec, expected = one_file_result
    (tmp_path / "new.spec").write_text(NEW)
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "specsurgery", "apply", folder, str(tmp_path / "new.spec"),
                             "-o", str(out), "--jobs", "2", "--json"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["jobs"] == 2 and report["shards"] == len(read_sharded(str(out)).shards)
    got = read_all(str(out))
    assert all(torch.equal(got[n], t) for n, t in expected.items())
    # the folder's index names the same checkpoint for every command
    result = subprocess.run([sys.executable, "-m", "specsurgery", "plan", str(out / INDEX), str(tmp_path / "new.spec"),
                             "--json"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert all(p["source"] == p["name"] for p in json.loads(result.stdout)["params"])
    result = subprocess.run([sys.executable, "-m", "specsurgery", "apply", folder, str(tmp_path / "new.spec"),
                             "-o", str(tmp_path / "x.safetensors"), "--max-shard-size", "1MB"],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 1
    assert result.stderr.strip() == f"{tmp_path / 'x.safetensors'}: error: a sharded checkpoint is a folder; name it without .safetensors"


def test_model_save_sharded_and_load_back(tmp_path):
    import specsurgery as ss

    (tmp_path / "old.spec").write_text(OLD)
    model = ss.compile(str(tmp_path / "old.spec"), seed=3).to(torch.bfloat16)
    path = model.save(str(tmp_path / "m"), max_shard_size="1MB", metadata={"step": "7"})
    assert len(read_sharded(path).shards) > 2
    loaded = ss.load(path)
    assert loaded.metadata == {"step": "7"}
    mine, theirs = model.state_dict(), loaded.state_dict()
    assert list(theirs) == list(mine)
    assert all(theirs[k].dtype == torch.bfloat16 and torch.equal(theirs[k], mine[k]) for k in mine)
    assert ss.load(os.path.join(path, INDEX)).state_dict().keys() == mine.keys()


def test_build_writes_sharded_folders_and_carries_them_through_surgery(tmp_path):
    specs = tmp_path / "specs"
    specs.mkdir()
    (specs / "m.spec").write_text(OLD)
    cmd = [sys.executable, "-m", "specsurgery", "build", str(specs), "--out", str(tmp_path / "models"), "--json"]
    result = subprocess.run(cmd + ["--max-shard-size", "2MB"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    folder = tmp_path / "models" / "m"
    first = read_all(str(folder))
    assert len(read_sharded(str(folder)).shards) > 2
    (specs / "m.spec").write_text(NEW)
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)  # the folder stays a folder
    assert result.returncode == 0, result.stderr
    row = json.loads(result.stdout)["models"][0]
    assert row["action"] == "operated" and row["max_difference"] <= 1e-5 and row["verdict"] == "same function"
    assert read_header(str(folder)).spec_text == canonical(load_model(NEW, "new.spec"))
    kept = row["history"]
    assert os.path.isdir(kept) and all(torch.equal(read_all(kept)[n], t) for n, t in first.items())
    assert sorted(os.listdir(tmp_path / "models")) == ["history", "m"]


# ---------------------------------------------------------------------------
# --no-fsync: the same bytes, no fsync, still nothing half-written


def _files(path: Path) -> dict[str, bytes]:
    if path.is_file():
        return {"": path.read_bytes()}
    return {f.name: f.read_bytes() for f in sorted(path.iterdir())}


@pytest.mark.parametrize("sharded", [False, True])
def test_apply_no_fsync_writes_the_same_bytes_and_never_fsyncs(old_checkpoints, tmp_path, monkeypatch, sharded):
    from specsurgery.cli import main

    tmp, spec, weights, single, folder = old_checkpoints
    (tmp_path / "new.spec").write_text(NEW)
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    outputs = {}
    for flags in ([], ["--no-fsync"]):
        out = tmp_path / ("out" + "".join(flags) + ("" if sharded else ".safetensors"))
        shard_flags = ["--max-shard-size", "2MB", "--jobs", "1"] if sharded else []
        synced.clear()
        assert main(["apply", folder if sharded else single, str(tmp_path / "new.spec"), "-o", str(out),
                     *shard_flags, *flags]) == 0
        outputs[tuple(flags)] = _files(out)
        if flags:
            assert synced == []
        else:  # every shard, the index and the folders around the rename
            assert len(synced) >= (len(outputs[()]) + 2 if sharded else 2)
    assert outputs[()] == outputs[("--no-fsync",)]
    if not sharded:  # the public API's keyword, as the command passes it
        import specsurgery as ss

        synced.clear()
        ss.apply(single, NEW, str(tmp_path / "api.safetensors"), fsync=False)
        assert synced == [] and _files(tmp_path / "api.safetensors") == outputs[()]
    assert len(outputs[()]) == (len(read_sharded(str(tmp_path / "out")).shards) + 1 if sharded else 1)


NO_FSYNC_KILLED = """
import os, signal, sys
import specsurgery.files, specsurgery.shards
from specsurgery.cli import main

def killed(*args, **kwargs):  # the moment before the finished file or folder is renamed into place
    os.kill(os.getpid(), signal.SIGKILL)

os.replace = os.rename = killed
specsurgery.shards._exchange = killed
main(sys.argv[1:])
"""


@pytest.mark.parametrize("sharded", [False, True])
def test_an_apply_killed_with_no_fsync_leaves_the_output_as_it_was(old_checkpoints, tmp_path, sharded):
    """Killed the moment before the rename: the earlier output stays whole (fresh values of another seed)."""
    tmp, spec, weights, single, folder = old_checkpoints
    (tmp_path / "new.spec").write_text(NEW)
    out = tmp_path / ("out" if sharded else "out.safetensors")
    shard_flags = ["--max-shard-size", "2MB", "--jobs", "1"] if sharded else []
    # an earlier output in place: killed, the apply leaves it as it was
    from specsurgery.cli import main

    assert main(["apply", single, str(tmp_path / "new.spec"), "-o", str(out), "--no-fsync", "--seed", "1",
                 *shard_flags]) == 0
    before = _files(out)
    proc = subprocess.run([sys.executable, "-c", NO_FSYNC_KILLED, "apply", single, str(tmp_path / "new.spec"), "-o",
                           str(out), "--no-fsync", *shard_flags], cwd=REPO, capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()
    assert _files(out) == before
    assert read_header(str(out)).spec_text == canonical(load_model(NEW, "new.spec"))
