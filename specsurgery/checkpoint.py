"""Checkpoints: safetensors files that carry the spec their weights were built from.

The header's `__metadata__` holds the canonical text of the model and its
schema (enough to rebuild it with no .spec file at hand), the model's name and
the package version. Files are written tensor by tensor into a temporary file
beside the target and renamed into place, so a reader never sees half a file.
Reading the header needs no torch; nothing is ever unpickled.
"""
from __future__ import annotations

import json
import os
import stat
import struct
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

from .errors import SpecError, UserError
from .files import atomic_file, copy_range, write_all, wrote

META_SPEC = "specsurgery.spec"
META_MODEL = "specsurgery.model"
META_VERSION = "specsurgery.version"
_DTYPES = {"F32": 4, "F64": 8, "F16": 2, "BF16": 2, "I64": 8, "I32": 4}
# The dtypes a model's parameters may be stored in; each is read, applied and
# written in its own dtype, never converted on the way.
FLOAT_DTYPES = ("F32", "BF16", "F16", "F64")
_MAX_HEADER = 100 * 1024 * 1024


def package_version() -> str:
    from . import __version__

    return __version__


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


class EmbeddedSpec:
    """The spec in a checkpoint's `metadata`: of one file, a sharded folder's
    index (shards.ShardedHeader) or a DCP folder's spec file (dcp.DcpHeader)."""

    metadata: dict[str, str]

    @property
    def spec_text(self) -> str:
        return self.metadata[META_SPEC]

    @property
    def model_name(self) -> str:
        return self.metadata[META_MODEL]


@dataclass(frozen=True)
class Header(EmbeddedSpec):
    path: str
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int

    def header_of(self, name: str) -> "Header":
        """The file that holds tensor `name` (a sharded checkpoint has one per shard)."""
        return self


def read_header(path: str, embedded_spec: bool = True):
    """The tensor table and metadata of a checkpoint, checked for sanity.

    A folder or an index file is a sharded checkpoint (shards.read_sharded);
    `embedded_spec=False` reads one shard, whose spec is in the index."""
    if not path.endswith(".safetensors"):
        from .shards import is_folder_checkpoint, read_folder

        if is_folder_checkpoint(path):
            return read_folder(path)

    def bad(why: str) -> UserError:
        if path.endswith(".spec"):  # the likeliest mix-up of all: say it, not what the bytes look like
            return UserError(f"{path}: error: this is a spec, not a checkpoint "
                             f"(`specsurgery build {path}` makes its checkpoint)")
        return UserError(f"{path}: error: not a valid checkpoint: {why}")

    try:
        # O_NONBLOCK and a regular file only: a FIFO or a device would hang or never end
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        mode, size = os.fstat(fd).st_mode, os.fstat(fd).st_size
        if not stat.S_ISREG(mode):
            os.close(fd)
            if stat.S_ISDIR(mode):
                raise IsADirectoryError
            raise UserError(f"{path}: error: not a regular file")
        with os.fdopen(fd, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise bad("the file is shorter than a safetensors header")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, _MAX_HEADER):
                raise bad("the header length runs past the end of the file")
            text = f.read(n)
    except FileNotFoundError:
        raise UserError(f"{path}: error: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{path}: error: is a folder, not a checkpoint") from None
    except ValueError:  # a NUL byte in the path
        raise UserError(f"{path}: error: not a valid path (it holds a NUL byte)") from None
    except OSError as e:  # permission denied, I/O error, ...
        raise UserError(f"{path}: error: cannot read: {e.strerror or e}") from None
    try:
        table = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise bad("the header is not JSON") from None
    except RecursionError:
        raise bad("the header is nested too deeply to be a tensor table") from None
    if not isinstance(table, dict):
        raise bad("the header is not a JSON object")
    metadata = table.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise bad("the __metadata__ entry is not a table of strings")
    tensors: dict[str, TensorInfo] = {}
    data = size - 8 - n
    for name, info in table.items():
        try:
            dtype, shape, (start, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise bad(f"tensor {name!r} has a malformed entry") from None
        if not isinstance(dtype, str) or not all(_is_count(v) for v in (*shape, start, end)):
            raise bad(f"tensor {name!r} has a malformed entry")
        count = 1
        for d in shape:
            count *= d
        if dtype not in _DTYPES or end - start != count * _DTYPES[dtype] or not 0 <= start <= end <= data:
            raise bad(f"tensor {name!r} does not fit the file (truncated or corrupt)")
        tensors[name] = TensorInfo(dtype, shape, start, end)
    _check_layout(tensors, data, bad)
    if embedded_spec and (META_SPEC not in metadata or META_MODEL not in metadata):
        raise UserError(f"{path}: error: this safetensors file has no embedded spec; it was not written by specsurgery")
    return Header(path, tensors, metadata, 8 + n)


def optimizer_path(checkpoint: str) -> str:
    """The optimizer file beside a checkpoint (optimizer_state.py): `models/a.safetensors` ->
    `models/a.optimizer.safetensors`; a sharded folder `models/a` -> `models/a.optimizer.safetensors`."""
    return os.fspath(checkpoint).rstrip("/").removesuffix(".safetensors") + ".optimizer.safetensors"


def user_metadata(header: Header) -> dict[str, str]:
    """The metadata a user put in (model.save(metadata=...)): everything but specsurgery's own."""
    return {k: v for k, v in header.metadata.items() if not k.startswith("specsurgery.") and k != "format"}


def _check_layout(tensors: dict[str, TensorInfo], data: int, bad) -> None:
    """The tensors' bytes tile the data exactly, as safetensors requires: no
    overlaps (one write would change two tensors), no gaps, no trailing bytes."""
    at, previous = 0, None
    for name, info in sorted(tensors.items(), key=lambda item: (item[1].start, item[1].end)):
        if info.start < at:
            raise bad(f"tensor {name!r} overlaps tensor {previous!r}")
        if info.start > at:
            raise bad(f"{info.start - at:,} bytes before tensor {name!r} belong to no tensor")
        at, previous = info.end, name
    if at != data:
        raise bad(f"{data - at:,} bytes after the last tensor belong to no tensor")


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def load_spec(header: Header):
    """The ModelSpec embedded in a checkpoint.

    The text is self-contained (canonical() inlines the schema); a `use` in it
    would make data from elsewhere read, and print, any local file: refused."""
    return _load_embedded(header).model(header.model_name)


def load_graph(header: Header):
    """The checked IR graph of the spec embedded in a checkpoint (load_spec's), as loading built it."""
    loaded = _load_embedded(header)
    return loaded.graphs[loaded.model(header.model_name).model.name]


def _load_embedded(header: Header):
    from .errors import SOURCES
    from .spec.load import load

    name = f"{header.path}#spec"
    SOURCES[name] = header.spec_text

    def read(path: str) -> str:
        if path != name:
            raise UserError(f"{path}: error: a checkpoint's embedded spec may not use other files")
        return header.spec_text

    try:
        loaded = load([name], reader=read)
        loaded.model(header.model_name)
        return loaded
    except (SpecError, UserError) as e:
        raise UserError(f"{header.path}: error: the embedded spec does not load:\n{e}") from None


def check_against(header: Header, graph) -> None:
    """Refuse a checkpoint whose tensors do not match its spec."""
    check_shapes(header, {name: tuple(node.params[local].shape) for name, (node, local) in graph.parameters().items()})


def check_shapes(header: Header, expected: dict[str, tuple[int, ...]]) -> None:
    """Refuse a checkpoint whose tensors are not exactly `expected` (name -> shape),
    each in a floating dtype (FLOAT_DTYPES)."""
    found = {name: info.shape for name, info in header.tensors.items()}
    problems = []
    for name, shape in expected.items():
        if name not in found:
            problems.append(f"{name} is missing")
        elif found[name] != shape:
            problems.append(f"{name} has shape {list(found[name])}, the spec says {list(shape)}")
        elif header.tensors[name].dtype not in FLOAT_DTYPES:
            problems.append(f"{name} is {header.tensors[name].dtype}, expected one of {', '.join(FLOAT_DTYPES)}")
    problems += [f"{name} is not in the spec" for name in found if name not in expected]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise UserError(f"{header.path}: error: the tensors do not match the embedded spec: {shown}")


@dataclass(frozen=True)
class StoredTensor:
    """A tensor exactly as it lies in another checkpoint (in its own dtype):
    written by copying its bytes file to file, never loaded."""

    path: str
    offset: int  # from the start of the file
    nbytes: int
    shape: tuple[int, ...]
    dtype: str = "F32"

    @classmethod
    def of(cls, header: Header, name: str) -> "StoredTensor":
        header = header.header_of(name)
        info = header.tensors[name]
        return cls(header.path, header.data_start + info.start, info.end - info.start, info.shape, info.dtype)

    def write_at(self, fd: int, at: int) -> int:
        """Copy the bytes to offset `at` of `fd` (by the kernel where it can)."""
        with open(self.path, "rb") as src:
            copy_range(src.fileno(), fd, self.offset, self.nbytes, at=at)
        return self.nbytes


class Layout:
    """Where every tensor of a checkpoint file goes: the header's bytes, and
    each tensor's dtype, shape and byte range, in the order of `shapes`. A file
    is started (header written, extended to its full size: what no tensor
    writes reads as zeros) and then filled tensor by tensor, at their own
    offsets, by any thread or process, in any order."""

    def __init__(self, spec_text: Optional[str], model_name: Optional[str], shapes: dict[str, tuple[int, ...]],
                 dtypes: Optional[dict[str, str]] = None, extra_metadata: Optional[dict[str, str]] = None):
        self.table: dict = {}
        offset = 0
        dtypes = dtypes or {}
        for name, shape in shapes.items():
            count = 1
            for d in shape:
                count *= d
            dtype = dtypes.get(name, "F32")
            size = count * _DTYPES[dtype]
            self.table[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        metadata = {META_SPEC: spec_text, META_MODEL: model_name, META_VERSION: package_version(), "format": "pt"}
        if spec_text is None:  # not a model (an optimizer's state): no spec, only the caller's metadata
            metadata = {"format": "pt"}
        metadata.update(extra_metadata or {})
        header = json.dumps({"__metadata__": metadata, **self.table}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned
        self.header = struct.pack("<Q", len(header)) + header
        self.data_bytes = offset

    def __eq__(self, other) -> bool:
        return isinstance(other, Layout) and self.header == other.header

    def start(self, fd: int) -> None:
        """Write the header at the start of `fd` and extend it to its full size."""
        write_all(fd, memoryview(self.header), 0)
        os.ftruncate(fd, len(self.header) + self.data_bytes)

    def at(self, name: str) -> int:
        """The offset of tensor `name` from the start of the file."""
        return len(self.header) + self.table[name]["data_offsets"][0]

    def nbytes(self, name: str) -> int:
        start, end = self.table[name]["data_offsets"]
        return end - start

    def put(self, fd: int, name: str, tensor) -> int:
        """Write `tensor` (see write_checkpoint) as tensor `name`; returns its bytes."""
        entry = self.table.get(name)
        if entry is None or tuple(tensor.shape) != tuple(entry["shape"]):
            raise AssertionError(f"writer expected {name} {entry and entry['shape']}, got {tuple(tensor.shape)}")
        nbytes = _write_tensor(fd, tensor, entry["dtype"], self.at(name))
        if nbytes != self.nbytes(name):
            raise AssertionError(f"writer expected {self.nbytes(name)} bytes of {name}, got {nbytes}")
        return nbytes

    def clear(self, fd: int, name: str) -> None:
        """Make tensor `name`'s bytes read as zeros again (it was written by
        mistake, before what it should hold was known)."""
        zeros = memoryview(bytes(min(self.nbytes(name), 8 << 20)))
        at, left = self.at(name), self.nbytes(name)
        while left:
            n = min(left, len(zeros))
            write_all(fd, zeros[:n], at)
            at, left = at + n, left - n


def write_checkpoint(path: str, spec_text: str, model_name: str,
                     shapes: dict[str, tuple[int, ...]], tensors: Iterable, progress=None,
                     extra_metadata: Optional[dict[str, str]] = None, durable: bool = True,
                     dtypes: Optional[dict[str, str]] = None, threads: int = 1) -> int:
    """Stream `tensors` (name, tensor, or an object with `shape` and
    `write_at(fd, offset) -> bytes written` such as StoredTensor) in the order
    of `shapes`; returns bytes written. `threads` > 1 writes that many tensors at
    once (each at its own offset; kernel copies and numpy let go of the GIL).

    `spec_text` None writes a file with no embedded spec (an optimizer's state).
    `dtypes` (name -> F32, BF16, F16 or F64; F32 where absent) is each tensor's
    dtype in the file: a tensor is written in it, an object copying itself must
    already be in it.

    The header is laid out from `shapes` first (Layout), so tensors can be
    produced and written one at a time and dropped: memory holds one tensor
    (one per thread), not the model.
    """
    layout = Layout(spec_text, model_name, shapes, dtypes, extra_metadata)
    with atomic_file(path, durable=durable) as f:
        layout.start(f.fileno())
        return fill_checkpoint(f.fileno(), layout, shapes, tensors, progress=progress, threads=threads)


def fill_checkpoint(fd: int, layout: Layout, names: Iterable[str], tensors: Iterable, progress=None,
                    threads: int = 1) -> int:
    """Write `tensors` (as write_checkpoint takes them) into the started file
    `fd`, one for each of `names` in that order; returns bytes written."""
    written = 0
    with _Writers(threads) as writers:
        names = iter(names)
        for name, tensor in tensors:
            expected = next(names, None)
            if expected is None:
                raise AssertionError(f"writer expected no more tensors, got {name} {tuple(tensor.shape)}")
            if name != expected:
                raise AssertionError(f"writer expected {expected}, got {name} {tuple(tensor.shape)}")
            for done, nbytes in writers.put(name, layout.put, fd, name, tensor):
                written += _reported(done, nbytes, progress)
        missing = next(names, None)
        if missing is not None:  # never rename a short file into place
            raise AssertionError(f"writer expected {missing} {layout.table[missing]['shape']}, the tensors ran out")
        for done, nbytes in writers.drain():
            written += _reported(done, nbytes, progress)
    return written


def _write_tensor(fd: int, tensor, dtype: str, at: int) -> int:
    if hasattr(tensor, "write_at"):  # writes itself (a copy by the kernel, rows laid out)
        return tensor.write_at(fd, at)
    data = tensor_bytes(tensor, dtype)
    write_all(fd, data, at)
    wrote(fd, data.nbytes)
    return data.nbytes


def _reported(name: str, nbytes: int, progress) -> int:
    if progress is not None:
        progress(name, nbytes)
    return nbytes


class _Writers:
    """Tensors written `threads` at a time, in threads (in this one when 1),
    finished in the order they were put: put() and drain() yield (name, bytes
    written) of those done. On an error the others are waited for (no thread
    writes to the file once it is closed and removed)."""

    def __init__(self, threads: int):
        self.threads, self.pool, self.running = threads, None, []

    def __enter__(self) -> "_Writers":
        if self.threads > 1:
            from concurrent.futures import ThreadPoolExecutor

            self.pool = ThreadPoolExecutor(self.threads)
        return self

    def put(self, name: str, fn, *args) -> Iterator[tuple[str, int]]:
        if self.pool is None:
            yield name, fn(*args)
            return
        while len(self.running) >= self.threads:  # at most one tensor per thread in memory
            done, future = self.running.pop(0)
            yield done, future.result()
        self.running.append((name, self.pool.submit(fn, *args)))

    def drain(self) -> Iterator[tuple[str, int]]:
        while self.running:
            done, future = self.running.pop(0)
            yield done, future.result()

    def __exit__(self, *error) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


class _TorchDtypes(dict):
    """safetensors dtype name -> torch dtype, filled when first read (torch is imported late)."""

    def __missing__(self, key):
        import torch

        self.update({"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64})
        return dict.__getitem__(self, key)


TORCH_DTYPES = _TorchDtypes()


def tensor_bytes(tensor, dtype: str) -> memoryview:
    """A tensor's bytes in `dtype`, little-endian as safetensors lays them out
    (bfloat16 has no numpy type: its bytes are taken through a uint8 view)."""
    import torch

    wanted = TORCH_DTYPES[dtype]
    flat = tensor.detach().to(device="cpu", dtype=wanted).contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def read_tensor(header: Header, name: str, device=None):
    """One tensor of a single-file checkpoint, read with pread into its own
    buffer: no memory map, so loading a model holds the model once, not the
    model and the mapped file."""
    import torch

    info = header.tensors[name]
    tensor = torch.empty(info.shape, dtype=TORCH_DTYPES[info.dtype])
    view = memoryview(tensor.reshape(-1).view(torch.uint8).numpy()).cast("B")
    with open(header.path, "rb") as f:
        got = os.preadv(f.fileno(), [view], header.data_start + info.start) if view.nbytes else 0
    if got != info.end - info.start:
        raise UserError(f"{header.path}: error: not a valid checkpoint: it ended early")
    return tensor.to(device) if device is not None else tensor


def open_tensors(path: str):
    """Lazy, memory-mapped access to a checkpoint's tensors (no unpickling)."""
    from safetensors import safe_open

    if not path.endswith(".safetensors"):
        from .shards import is_folder_checkpoint, read_folder

        if is_folder_checkpoint(path):
            return read_folder(path).open()

    try:
        return safe_open(path, framework="pt")
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise UserError(f"{path}: error: not a valid checkpoint: {e}") from None
