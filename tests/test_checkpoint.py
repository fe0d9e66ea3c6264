"""Checkpoints: round trip through safetensors, atomic writes, a torch-free header reader."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import specsurgery
from specsurgery import checkpoint as ck
from specsurgery.checkpoint import check_against, load_spec, read_header, write_checkpoint
from specsurgery.errors import UserError

REPO = Path(__file__).resolve().parents[1]
SPEC = "schema s {\n  group g {\n    x: float\n  }\n}\n\nmodel m(obs: s) {\n  out y = linear(obs.g, 2)\n}\n"


def tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "y.linear.weight": torch.randn(2, 1, generator=gen),
        "y.linear.bias": torch.randn(2, generator=gen),
        "big": torch.randn(3, 4, 5, generator=gen),
        "scalar_like": torch.randn(1, generator=gen),
    }


def shapes_of(ts: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in ts.items()}


def test_round_trip_through_safetensors(tmp_path):
    ts = tensors()
    path = tmp_path / "m.safetensors"
    seen = []
    written = write_checkpoint(str(path), SPEC, "m", shapes_of(ts), ts.items(),
                               progress=lambda name, n: seen.append((name, n)),
                               extra_metadata={"note": "hello"})
    assert written == sum(t.numel() * 4 for t in ts.values())
    assert seen == [(name, t.numel() * 4) for name, t in ts.items()]
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == set(ts)
        for name, t in ts.items():
            got = f.get_tensor(name)
            assert got.dtype == torch.float32
            assert torch.equal(got, t)
        meta = f.metadata()
    assert meta["specsurgery.spec"] == SPEC
    assert meta["specsurgery.model"] == "m"
    assert meta["specsurgery.version"] == specsurgery.__version__
    assert meta["note"] == "hello"
    assert meta["format"] == "pt"

    header = read_header(str(path))
    assert header.spec_text == SPEC and header.model_name == "m"
    assert list(header.tensors) == list(ts)  # the order of `shapes`
    assert {n: i.shape for n, i in header.tensors.items()} == shapes_of(ts)
    assert all(i.dtype == "F32" for i in header.tensors.values())
    assert header.data_start % 8 == 0  # the header is padded to 8 bytes
    assert os.path.getsize(path) == header.data_start + written
    # the safetensors reference reader agrees too
    from safetensors.torch import load_file

    assert {n: t.tolist() for n, t in load_file(str(path)).items()} == {n: t.tolist() for n, t in ts.items()}


def test_other_dtypes_are_stored_as_float32(tmp_path):
    path = tmp_path / "m.safetensors"
    ts = {"a": torch.arange(6, dtype=torch.float64).reshape(2, 3), "b": torch.tensor([1, 2, 3])}
    write_checkpoint(str(path), SPEC, "m", shapes_of(ts), ts.items())
    with safe_open(str(path), framework="pt") as f:
        assert f.get_tensor("a").dtype == torch.float32
        assert f.get_tensor("a").tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
        assert f.get_tensor("b").tolist() == [1.0, 2.0, 3.0]


def test_embedded_spec_loads_and_matches(tmp_path):
    from specsurgery.ir import build_graph

    path = tmp_path / "m.safetensors"
    ts = {"y.linear.weight": torch.ones(2, 1), "y.linear.bias": torch.zeros(2)}
    write_checkpoint(str(path), SPEC, "m", shapes_of(ts), ts.items())
    header = read_header(str(path))
    spec = load_spec(header)
    assert spec.model.name == "m"
    check_against(header, build_graph(spec))  # no complaint


def test_check_against_lists_the_problems(tmp_path):
    from specsurgery.ir import build_graph

    path = tmp_path / "m.safetensors"
    ts = {"y.linear.weight": torch.ones(2, 3), "extra": torch.zeros(1)}
    write_checkpoint(str(path), SPEC, "m", shapes_of(ts), ts.items())
    header = read_header(str(path))
    with pytest.raises(UserError) as e:
        check_against(header, build_graph(load_spec(header)))
    assert str(e.value) == (f"{path}: error: the tensors do not match the embedded spec: "
                            "y.linear.weight has shape [2, 3], the spec says [2, 1]; "
                            "y.linear.bias is missing; extra is not in the spec")


# ---------------------------------------------------------------------------
# atomic writes


class Boom(RuntimeError):
    pass


def failing_after_first(ts: dict[str, torch.Tensor], exc: BaseException):
    items = iter(ts.items())
    yield next(items)
    raise exc


@pytest.mark.parametrize("exc", [Boom("disk on fire"), KeyboardInterrupt()], ids=["error", "interrupt"])
def test_failure_mid_stream_leaves_the_old_file(tmp_path, exc):
    path = tmp_path / "m.safetensors"
    old = b"the previous checkpoint, byte for byte"
    path.write_bytes(old)
    before = path.stat()
    ts = tensors()
    with pytest.raises(type(exc)):
        write_checkpoint(str(path), SPEC, "m", shapes_of(ts), failing_after_first(ts, exc))
    assert path.read_bytes() == old
    assert path.stat().st_ino == before.st_ino
    assert os.listdir(tmp_path) == ["m.safetensors"]  # no temp file left behind


def test_failure_mid_stream_without_a_previous_file(tmp_path):
    path = tmp_path / "sub" / "m.safetensors"
    ts = tensors()
    with pytest.raises(Boom):
        write_checkpoint(str(path), SPEC, "m", shapes_of(ts), failing_after_first(ts, Boom("x")))
    assert not path.exists()
    assert os.listdir(tmp_path / "sub") == []


@pytest.mark.parametrize("case", ["too few", "too many", "wrong shape", "wrong order"])
def test_a_stream_that_does_not_match_its_shapes_is_never_renamed_into_place(tmp_path, case):
    ts = tensors()
    shapes = shapes_of(ts)
    items = list(ts.items())
    if case == "too few":
        items = items[:-1]
    elif case == "too many":
        items = items + [("more", torch.zeros(2))]
    elif case == "wrong shape":
        items[1] = (items[1][0], torch.zeros(7))
    else:
        items[0], items[1] = items[1], items[0]
    path = tmp_path / "m.safetensors"
    with pytest.raises(AssertionError, match="^writer expected"):
        write_checkpoint(str(path), SPEC, "m", shapes, items)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_written_file_mode_follows_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        path = tmp_path / "m.safetensors"
        ts = tensors()
        write_checkpoint(str(path), SPEC, "m", shapes_of(ts), ts.items())
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_writing_below_a_file_is_a_user_error(tmp_path):
    (tmp_path / "afile").write_text("x")
    ts = tensors()
    for target in (tmp_path / "afile" / "m.safetensors", tmp_path / "afile" / "deeper" / "m.safetensors"):
        with pytest.raises(UserError) as e:
            write_checkpoint(str(target), SPEC, "m", shapes_of(ts), ts.items())
        assert str(e.value) == f"{target}: error: cannot write: {tmp_path / 'afile'} is a file, not a folder"
    assert os.listdir(tmp_path) == ["afile"]


# ---------------------------------------------------------------------------
# read_header


def test_read_header_never_imports_torch(tmp_path):
    path = tmp_path / "m.safetensors"
    ts = tensors()
    write_checkpoint(str(path), SPEC, "m", shapes_of(ts), ts.items())
    code = ("import sys\n"
            "from specsurgery.checkpoint import read_header\n"
            f"h = read_header({str(path)!r})\n"
            "assert h.model_name == 'm', h\n"
            "assert 'torch' not in sys.modules, 'read_header imported torch'\n"
            "assert 'safetensors' not in sys.modules, 'read_header imported safetensors'\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def write_raw(path: Path, header, data: bytes = b"") -> None:
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


META = {"specsurgery.spec": SPEC, "specsurgery.model": "m"}
MALFORMED = {
    "metadata not strings": ({"__metadata__": {"specsurgery.spec": 3, "specsurgery.model": "m"}}, b"",
                             "the __metadata__ entry is not a table of strings"),
    "metadata not a table": ({"__metadata__": "specsurgery.spec specsurgery.model"}, b"",
                             "the __metadata__ entry is not a table of strings"),
    "shape of strings": ({"__metadata__": META, "a": {"dtype": "F32", "shape": "ab", "data_offsets": [0, 8]}}, b"\0" * 8,
                         "tensor 'a' has a malformed entry"),
    "negative dimension": ({"__metadata__": META, "a": {"dtype": "F32", "shape": [-1, -2], "data_offsets": [0, 8]}}, b"\0" * 8,
                           "tensor 'a' has a malformed entry"),
    "float dimension": ({"__metadata__": META, "a": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}, b"\0" * 8,
                        "tensor 'a' has a malformed entry"),
    "offsets not numbers": ({"__metadata__": META, "a": {"dtype": "F32", "shape": [2], "data_offsets": ["0", "8"]}}, b"\0" * 8,
                            "tensor 'a' has a malformed entry"),
    "offsets not a pair": ({"__metadata__": META, "a": {"dtype": "F32", "shape": [2], "data_offsets": 8}}, b"\0" * 8,
                           "tensor 'a' has a malformed entry"),
    "dtype a list": ({"__metadata__": META, "a": {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8,
                     "tensor 'a' has a malformed entry"),
    "entry not an object": ({"__metadata__": META, "a": 5}, b"", "tensor 'a' has a malformed entry"),
    "unknown dtype": ({"__metadata__": META, "a": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8,
                      "tensor 'a' does not fit the file (truncated or corrupt)"),
    "offsets past the end": ({"__metadata__": META, "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4,
                             "tensor 'a' does not fit the file (truncated or corrupt)"),
    "header not JSON": (b"\xff\xfe{", b"", "the header is not JSON"),
    "header a list": ([1, 2], b"", "the header is not a JSON object"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_read_header_rejects_malformed_headers(tmp_path, case):
    header, data, why = MALFORMED[case]
    path = tmp_path / "bad.safetensors"
    write_raw(path, header, data)
    with pytest.raises(UserError) as e:
        read_header(str(path))
    assert str(e.value) == f"{path}: error: not a valid checkpoint: {why}"


def test_read_header_unreadable_file_is_a_user_error(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    write_raw(path, {"__metadata__": META})

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(ck.os, "open", denied)  # what a chmod 000 file gives (tests may run as root)
    with pytest.raises(UserError) as e:
        read_header(str(path))
    assert str(e.value) == f"{path}: error: cannot read: Permission denied"
