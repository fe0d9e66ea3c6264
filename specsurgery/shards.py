"""Sharded checkpoints in the Hugging Face layout: one folder holding
`model.safetensors.index.json` and `model-0000K-of-0000N.safetensors`.

The index's `metadata` holds the spec under the same keys as a single file's
`__metadata__` (plus Hugging Face's `total_size`); its `weight_map` names the
shard of every tensor. Read, the folder is one logical checkpoint: a
ShardedHeader whose tensors each point into their own shard, checked as
strictly as a single file (a shard name may not leave the folder, every
tensor lies in exactly one shard). Written, the new folder is laid out beside
the target under a temporary name, every file fsynced, then swapped into
place: a crash leaves the old folder whole and no half-written one in its place.
Nothing here needs torch.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Union

from .checkpoint import _DTYPES, META_MODEL, META_SPEC, META_VERSION, EmbeddedSpec, Header, TensorInfo, package_version, read_header, write_checkpoint
from .errors import UserError

INDEX = "model.safetensors.index.json"
_MAX_INDEX = 100 * 1024 * 1024
_UNITS = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
          "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}


def parse_size(size: Union[int, str]) -> int:
    """Bytes from an int or a string such as "2GB" (10**9), "400MiB" (2**20), as
    Hugging Face reads max_shard_size (a lowercase "Gb" means bits)."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    elif isinstance(size, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", size, re.IGNORECASE)
        if m is None:
            raise UserError(f"error: {size!r} is not a size: write bytes, or a number and a unit such as 2GB or 400MiB")
        unit = (m.group(2) or "B")
        value = int(float(m.group(1)) * _UNITS[unit.upper()])
        if unit[-1] == "b" and unit.upper() != "B":
            value //= 8
    else:
        raise UserError(f"error: {size!r} is not a size")
    if value <= 0:
        raise UserError(f"error: a shard size must be positive, got {size!r}")
    return value


def shard_file(k: int, n: int) -> str:
    return f"model-{k:05d}-of-{n:05d}.safetensors"


def plan_shards(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """Tensor names per shard, in order, as Hugging Face splits a state dict: a
    tensor opens a new shard when it would take the current one past
    `max_bytes`; a tensor larger than that has a shard of its own."""
    shards: list[list[str]] = []
    current: list[str] = []
    used = 0
    for name, nbytes in sizes.items():
        if current and used + nbytes > max_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(name)
        used += nbytes
    if current or not shards:
        shards.append(current)
    return shards


@dataclass(frozen=True)
class ShardedHeader(EmbeddedSpec):
    """A sharded checkpoint read as one: what Header is for a single file."""

    path: str  # the folder
    index_path: str
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    shard_of: dict[str, Header]  # tensor name -> the header of its shard

    def header_of(self, name: str) -> Header:
        return self.shard_of[name]

    @property
    def shards(self) -> list[Header]:
        seen: dict[str, Header] = {}
        for h in self.shard_of.values():
            seen.setdefault(h.path, h)
        return list(seen.values())

    def open(self) -> "ShardedTensors":
        return ShardedTensors(self)

    def largest_shard(self) -> int:
        return max((sum(i.end - i.start for i in h.tensors.values()) for h in self.shards), default=0)


def is_folder_checkpoint(path: str) -> bool:
    """A folder, or an index file: not a single safetensors file."""
    return path.endswith(".index.json") or os.path.isdir(path)


def read_folder(path: str):
    """A folder checkpoint: a DCP folder (dcp.read_dcp) or a sharded one (read_sharded)."""
    from .dcp import is_dcp, read_dcp

    if os.path.isdir(path) and is_dcp(path):
        return read_dcp(path)
    return read_sharded(path)


def read_sharded(path: str) -> ShardedHeader:
    """The folder (or its index) as one checkpoint, every shard's header checked."""
    if path.endswith(".index.json"):
        folder, index_path = os.path.dirname(path) or ".", path
    else:
        folder, index_path = path, os.path.join(path, INDEX)
        if not os.path.exists(index_path):
            raise UserError(f"{path}: error: is a folder, not a checkpoint")  # no index in it

    def bad(why: str) -> UserError:
        return UserError(f"{index_path}: error: not a valid checkpoint index: {why}")

    try:
        if os.path.getsize(index_path) > _MAX_INDEX:
            raise bad("the file is larger than 100 MB")
        with open(index_path, "rb") as f:
            text = f.read()
    except FileNotFoundError:
        raise UserError(f"{index_path}: error: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{index_path}: error: is a folder, not a checkpoint index") from None
    except OSError as e:
        raise UserError(f"{index_path}: error: cannot read: {e.strerror or e}") from None

    def no_repeats(pairs):
        keys = [k for k, _ in pairs]
        repeated = sorted({k for k in keys if keys.count(k) > 1})
        if repeated:
            raise bad(f"{repeated[0]!r} is listed twice")
        return dict(pairs)

    try:
        index = json.loads(text, object_pairs_hook=no_repeats)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise bad("not JSON") from None
    if not isinstance(index, dict):
        raise bad("not a JSON object")
    weight_map, metadata = index.get("weight_map"), index.get("metadata")
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
        raise bad("no weight_map table of tensor name -> shard file")
    if not isinstance(metadata, dict):
        raise bad("no metadata table")
    spec_meta = {k: v for k, v in metadata.items() if k != "total_size"}
    if not all(isinstance(v, str) for v in spec_meta.values()):
        raise bad("the metadata entries other than total_size are not strings")
    if META_SPEC not in spec_meta or META_MODEL not in spec_meta:
        raise UserError(f"{index_path}: error: this index has no embedded spec in its metadata; "
                        "it was not written by specsurgery")

    real_folder = os.path.realpath(folder)
    headers: dict[str, Header] = {}
    for file in dict.fromkeys(weight_map.values()):
        if os.path.basename(file) != file or file in ("", ".", "..") or "\\" in file or not file.endswith(".safetensors"):
            raise bad(f"shard {file!r} is not a .safetensors file name inside the folder")
        shard = os.path.join(folder, file)
        if os.path.dirname(os.path.realpath(shard)) != real_folder:
            raise bad(f"shard {file!r} is a link to a file outside the folder")
        if not os.path.isfile(shard):
            raise bad(f"shard {file!r} is missing")
        headers[file] = read_header(shard, embedded_spec=False)

    tensors: dict[str, TensorInfo] = {}
    shard_of: dict[str, Header] = {}
    for name, file in weight_map.items():
        header = headers[file]
        if name not in header.tensors:
            raise bad(f"tensor {name!r} is not in its shard {file}")
        tensors[name], shard_of[name] = header.tensors[name], header
    for file, header in headers.items():
        stray = [n for n in header.tensors if weight_map.get(n) != file]
        if stray:
            raise bad(f"shard {file} holds {stray[0]!r}, which the index places "
                      + (f"in {weight_map[stray[0]]}" if stray[0] in weight_map else "nowhere"))
    return ShardedHeader(folder, index_path, tensors, spec_meta, shard_of)


class ShardedTensors:
    """Lazy access to a sharded checkpoint's tensors, one open shard at a time
    per tensor asked for (safetensors, memory-mapped; nothing unpickled)."""

    def __init__(self, header: ShardedHeader):
        self.header = header
        self._open: dict[str, object] = {}

    def keys(self) -> list[str]:
        return list(self.header.tensors)

    def get_tensor(self, name: str):
        from .checkpoint import open_tensors

        shard = self.header.header_of(name).path
        if shard not in self._open:
            self._open[shard] = open_tensors(shard)
        return self._open[shard].get_tensor(name)


# ---------------------------------------------------------------------------
# writing


def _fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _exchange(a: str, b: str) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    import ctypes  # here: only replacing a folder needs it, not every reader of one
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _stage_prefix(target: str) -> str:
    return f".{os.path.basename(target)}.staged-"


def _sweep_stale(target: str) -> None:
    """Remove staging folders of writers that died (their pid is gone)."""
    parent = os.path.dirname(os.path.abspath(target))
    prefix = _stage_prefix(target)
    with contextlib.suppress(OSError):
        for entry in os.listdir(parent):
            if not entry.startswith(prefix):
                continue
            pid = entry[len(prefix):].split("-", 1)[0]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def staged_folder(target: str, durable: bool = True) -> Iterator[str]:
    """A fresh folder beside `target` to write the new checkpoint into; on
    success it takes the target's place in one rename (or exchange), the old
    folder is removed after; on failure it is removed and the target untouched.
    `durable`: the folders are fsynced around the rename (atomic_file's)."""
    target = os.path.abspath(target)
    parent = os.path.dirname(target)
    if os.path.exists(target) and not os.path.isdir(target):
        raise UserError(f"{target}: error: cannot write a sharded checkpoint here: it is a file, not a folder")
    from .dcp import is_dcp

    if os.path.isdir(target) and os.listdir(target) and not os.path.exists(os.path.join(target, INDEX)) \
            and not is_dcp(target):  # a checkpoint folder is replaced whole; a folder of other files is not
        raise UserError(f"{target}: error: cannot write a sharded checkpoint here: the folder holds other files")
    try:
        os.makedirs(parent, exist_ok=True)
        _sweep_stale(target)
        tmp = tempfile.mkdtemp(prefix=f"{_stage_prefix(target)}{os.getpid()}-", dir=parent)
        umask = os.umask(0o022)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
    except (FileExistsError, NotADirectoryError):
        raise UserError(f"{target}: error: cannot write: a parent is a file, not a folder") from None
    except OSError as e:
        raise UserError(f"{target}: error: cannot write: {e.strerror or e}") from None
    try:
        yield tmp
        commit_folder(tmp, target, durable)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def commit_folder(tmp: str, target: str, durable: bool = True) -> None:
    """Put the finished folder `tmp` in the place of `target` (a sibling) in one
    step: a rename, or an exchange with the old folder, which is removed after."""
    parent = os.path.dirname(os.path.abspath(target))
    if durable:
        _fsync_dir(tmp)
    if not os.path.exists(target):
        os.rename(tmp, target)
    elif _exchange(tmp, target):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old folder
    else:  # no atomic exchange here: a crash between the renames leaves the old folder at `old`
        old = tempfile.mkdtemp(prefix=f"{_stage_prefix(target)}{os.getpid()}-old-", dir=parent)
        os.rename(target, os.path.join(old, "old"))
        os.rename(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    if durable:
        _fsync_dir(parent)


def keep_folder_in_history(target: str, path: str) -> tuple[str, bool]:
    """Keep the sharded folder `target` as `path` (or `path.N` when `path` holds
    other weights): its files hard-linked (the target's files are only ever
    replaced whole, so a link keeps the old bytes), copied where links fail.
    Returns the path and whether it was made now."""
    def same(a: str, b: str) -> bool:
        files = sorted(os.listdir(a))
        return files == sorted(os.listdir(b)) and all(os.path.samefile(os.path.join(a, f), os.path.join(b, f))
                                                      for f in files)

    base, n = path, 1
    while os.path.exists(path):
        if os.path.isdir(path) and same(path, target):
            return path, False
        n += 1
        path = f"{base}.{n}"
    with staged_folder(path) as tmp:
        for file in os.listdir(target):
            try:
                os.link(os.path.join(target, file), os.path.join(tmp, file))
            except OSError:
                shutil.copy2(os.path.join(target, file), os.path.join(tmp, file))
    return path, True


def index_json(spec_text: str, model_name: str, weight_map: dict[str, str], total_size: int,
               extra_metadata: Optional[dict[str, str]] = None) -> str:
    metadata = {"total_size": total_size, META_SPEC: spec_text, META_MODEL: model_name,
                META_VERSION: package_version(), **(extra_metadata or {})}
    return json.dumps({"metadata": metadata, "weight_map": weight_map}, indent=2) + "\n"


def write_index(folder: str, spec_text: str, model_name: str, shards: list[list[str]],
                shapes: dict[str, tuple[int, ...]], extra_metadata: Optional[dict[str, str]] = None,
                dtypes: Optional[dict[str, str]] = None, durable: bool = True) -> None:
    from .checkpoint import atomic_file

    n = len(shards)
    weight_map = {name: shard_file(k, n) for k, names in enumerate(shards, 1) for name in names}
    total = sum(tensor_bytes(shapes[name], (dtypes or {}).get(name, "F32")) for name in weight_map)
    with atomic_file(os.path.join(folder, INDEX), "w", durable=durable) as f:
        f.write(index_json(spec_text, model_name, weight_map, total, extra_metadata))


def tensor_bytes(shape: tuple[int, ...], dtype: str = "F32") -> int:
    count = _DTYPES[dtype]
    for d in shape:
        count *= d
    return count


def write_sharded(folder: str, spec_text: str, model_name: str, shapes: dict[str, tuple[int, ...]],
                  tensors: Iterable, max_shard_size: Union[int, str], progress=None,
                  extra_metadata: Optional[dict[str, str]] = None, dtypes: Optional[dict[str, str]] = None) -> int:
    """Stream `tensors` (as write_checkpoint takes them, in the order of `shapes`,
    `dtypes` likewise) into a sharded folder; returns tensor bytes written.
    `extra_metadata` goes into the index, beside the spec."""
    dtypes = dtypes or {}
    shards = plan_shards({n: tensor_bytes(s, dtypes.get(n, "F32")) for n, s in shapes.items()},
                         parse_size(max_shard_size))
    stream = iter(tensors)
    written = 0
    with staged_folder(folder) as tmp:
        for k, names in enumerate(shards, 1):
            part = {name: shapes[name] for name in names}
            items = (next(stream) for _ in names)
            written += write_checkpoint(os.path.join(tmp, shard_file(k, len(shards))), spec_text, model_name,
                                        part, items, progress=progress, dtypes={n: dtypes[n] for n in names if n in dtypes})
        if next(stream, None) is not None:
            raise AssertionError("writer got more tensors than shapes")
        write_index(tmp, spec_text, model_name, shards, shapes, extra_metadata, dtypes)
    return written
