"""Distributed checkpoints: torch.distributed.checkpoint (DCP) folders that
nothing needs to unpickle.

DCP's default FileSystemWriter keeps its plan in a pickled `.metadata` file and
torch.save()s every tensor: loading that runs pickle on a file from elsewhere.
DCP's own Hugging Face storage (torch.distributed.checkpoint.hf_storage)
writes safetensors files instead, one per rank
(`shard-0000R-model-00001-of-00001.safetensors`), whose metadata says as JSON
where each chunk lies in the whole tensor (`DCP_SHARDING_INFO`:
`saved_offsets`), and reads its plan back from those headers. save_dcp writes
that, plus `specsurgery.dcp.json` (the spec, as JSON data). One process reads
the folder as one checkpoint (DcpHeader: every file's header checked, the
chunks must tile each tensor exactly, with no gap or overlap); load_dcp leaves
the resharding onto ranks to DCP. Reading the headers needs no torch.

A sharded folder in the Hugging Face layout (what `apply` writes) is also a
folder DCP's reader loads: its tensors are whole chunks at offset zero.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
from dataclasses import dataclass

from .checkpoint import META_MODEL, META_SPEC, META_VERSION, EmbeddedSpec, Header, TensorInfo, package_version, read_header
from .errors import UserError

SPEC_FILE = "specsurgery.dcp.json"
FORMAT = "specsurgery-dcp/1"
SHARDING_KEY = "DCP_SHARDING_INFO"  # torch.distributed.checkpoint._hf_utils.CUSTOM_METADATA_KEY
_MAX_SPEC_FILE = 100 * 1024 * 1024


@dataclass(frozen=True)
class Chunk:
    header: Header  # the file it lies in
    offsets: tuple[int, ...]  # where it starts in the whole tensor
    shape: tuple[int, ...]


@dataclass(frozen=True)
class DcpHeader(EmbeddedSpec):
    """A DCP folder read as one checkpoint: what Header is for a single file."""

    path: str
    tensors: dict[str, TensorInfo]  # whole tensors (start/end: 0 and their byte size)
    metadata: dict[str, str]
    chunks: dict[str, list[Chunk]]

    def whole(self, name: str) -> bool:
        """True when the tensor lies in one chunk, so its bytes can be copied as they are."""
        c = self.chunks[name]
        return len(c) == 1 and c[0].shape == self.tensors[name].shape

    def header_of(self, name: str) -> Header:
        if not self.whole(name):
            raise UserError(f"{self.path}: error: tensor {name!r} is saved in {len(self.chunks[name])} chunks; "
                            "read it with get_tensor (DcpTensors)")
        return self.chunks[name][0].header

    def open(self) -> "DcpTensors":
        return DcpTensors(self)


def is_dcp(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, SPEC_FILE))


def read_dcp(folder: str) -> DcpHeader:
    spec_path = os.path.join(folder, SPEC_FILE)

    def bad(why: str) -> UserError:
        return UserError(f"{folder}: error: not a valid distributed checkpoint: {why}")

    try:
        if os.path.getsize(spec_path) > _MAX_SPEC_FILE:
            raise bad(f"{SPEC_FILE} is larger than 100 MB")
        with open(spec_path, "rb") as f:
            data = json.loads(f.read())
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise bad(f"{SPEC_FILE} is not JSON") from None
    except OSError as e:
        raise UserError(f"{spec_path}: error: cannot read: {e.strerror or e}") from None
    metadata = data.get("metadata") if isinstance(data, dict) else None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(metadata, dict) \
            or not all(isinstance(v, str) for v in metadata.values()) \
            or META_SPEC not in metadata or META_MODEL not in metadata:
        raise bad(f"{SPEC_FILE} is not a {FORMAT} table with the spec in its metadata")

    real = os.path.realpath(folder)
    chunks: dict[str, list[Chunk]] = {}
    dtypes: dict[str, str] = {}
    for file in sorted(os.listdir(folder)):
        if not file.endswith(".safetensors"):
            continue
        path = os.path.join(folder, file)
        if os.path.dirname(os.path.realpath(path)) != real or not os.path.isfile(path):
            raise bad(f"{file} is a link to a file outside the folder, or not a file")
        header = read_header(path, embedded_spec=False)
        info = header.metadata.get(SHARDING_KEY)
        try:
            sharding = json.loads(info) if info is not None else {}
        except json.JSONDecodeError:
            raise bad(f"{file}: its {SHARDING_KEY} is not JSON") from None
        if not isinstance(sharding, dict):
            raise bad(f"{file}: its {SHARDING_KEY} is not a table")
        for name, t in header.tensors.items():
            entry = sharding.get(name, {"saved_offsets": [0] * len(t.shape)})
            offsets = entry.get("saved_offsets") if isinstance(entry, dict) else None
            if not isinstance(offsets, list) or len(offsets) != len(t.shape) \
                    or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets):
                raise bad(f"{file}: tensor {name!r} has malformed saved_offsets")
            if dtypes.setdefault(name, t.dtype) != t.dtype:
                raise bad(f"tensor {name!r} is saved in chunks of different dtypes")
            chunks.setdefault(name, []).append(Chunk(header, tuple(offsets), t.shape))
    if not chunks:
        raise bad("it holds no .safetensors files")
    tensors = {name: _whole(name, parts, dtypes[name], bad) for name, parts in chunks.items()}
    return DcpHeader(folder, tensors, dict(metadata), chunks)


def _whole(name: str, parts: list[Chunk], dtype: str, bad) -> TensorInfo:
    """The whole tensor's entry, once its chunks are shown to tile it exactly."""
    from .checkpoint import _DTYPES

    rank = len(parts[0].shape)
    if any(len(c.shape) != rank for c in parts):
        raise bad(f"tensor {name!r} is saved in chunks of different ranks")
    shape = tuple(max(c.offsets[d] + c.shape[d] for c in parts) for d in range(rank))
    total = _count(shape)
    if sum(_count(c.shape) for c in parts) != total:
        raise bad(f"the chunks of tensor {name!r} do not cover it exactly (a rank's file is missing, or extra)")
    for i, a in enumerate(parts):  # equal volume and no overlap: the chunks tile the tensor
        for b in parts[i + 1:]:
            if all(a.offsets[d] < b.offsets[d] + b.shape[d] and b.offsets[d] < a.offsets[d] + a.shape[d]
                   for d in range(rank)) and _count(a.shape) and _count(b.shape):
                raise bad(f"two chunks of tensor {name!r} overlap")
    return TensorInfo(dtype, shape, 0, total * _DTYPES[dtype])


def _count(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


class DcpTensors:
    """Whole tensors of a DCP folder, assembled from their chunks (safetensors reads)."""

    def __init__(self, header: DcpHeader):
        self.header = header
        self._open: dict[str, object] = {}

    def keys(self) -> list[str]:
        return list(self.header.tensors)

    def _file(self, path: str):
        from .checkpoint import open_tensors

        if path not in self._open:
            self._open[path] = open_tensors(path)
        return self._open[path]

    def get_tensor(self, name: str):
        parts = self.header.chunks[name]
        if self.header.whole(name):
            return self._file(parts[0].header.path).get_tensor(name)
        import torch

        first = self._file(parts[0].header.path).get_tensor(name)
        out = torch.empty(self.header.tensors[name].shape, dtype=first.dtype)
        for c in parts:
            piece = first if c is parts[0] else self._file(c.header.path).get_tensor(name)
            region = out
            for d, (o, n) in enumerate(zip(c.offsets, c.shape)):
                region = region.narrow(d, o, n)
            region.copy_(piece)
        return out


# ---------------------------------------------------------------------------
# in a torch.distributed job (or one process)


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if _distributed() else 0


def _barrier() -> None:
    import torch.distributed as dist

    if _distributed():
        dist.barrier()


def _shared_token() -> str:
    """One random name for the staging folder, the same on every rank."""
    import torch.distributed as dist

    token = [secrets.token_hex(6)]
    if _distributed():
        dist.broadcast_object_list(token, src=0)  # in memory, between the job's own ranks
    return token[0]


def save_dcp(model, folder: str, *, optimizer=None) -> str:
    """Write `model` (an ss.Model, plain, DDP-wrapped or under fully_shard) to
    `folder` as a DCP checkpoint: call it on every rank of the job, or in one
    process. The folder is staged beside the target and swapped into place by
    rank 0 once every rank's chunks are on disk."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageWriter

    from .checkpoint import atomic_file
    from .shards import commit_folder

    if optimizer is not None:
        raise UserError("error: save_dcp does not save optimizer state yet (pass optimizer=None)")
    inner = getattr(model, "module", model)  # DDP keeps the model in .module
    target = os.path.abspath(folder)
    staged = os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.staged-dcp-{_shared_token()}")
    if _rank() == 0:
        os.makedirs(staged)
    _barrier()
    try:
        state = inner.state_dict()
        dcp.save(state, storage_writer=HuggingFaceStorageWriter(staged, save_distributed=True), no_dist=not _distributed())
        if _rank() == 0:
            metadata = {META_SPEC: inner.spec, META_MODEL: inner.name, META_VERSION: package_version()}
            with atomic_file(os.path.join(staged, SPEC_FILE), "w") as f:
                json.dump({"format": FORMAT, "metadata": metadata}, f, indent=1)
            commit_folder(staged, target)
    except BaseException:
        if _rank() == 0:
            shutil.rmtree(staged, ignore_errors=True)
        raise
    _barrier()
    return folder


def load_dcp(folder: str, model) -> None:
    """Load a DCP folder (or a sharded folder apply wrote) into `model` on every
    rank, in place, sharded or replicated as the model is: DCP reshards. The
    folder must hold this model's spec."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader

    from .checkpoint import check_shapes

    inner = getattr(model, "module", model)
    header = read_header(folder)
    if header.spec_text != inner.spec:
        raise UserError(f"{folder}: error: this checkpoint was saved from another spec than the model's "
                        f"(model {header.model_name}); carry it over with `specsurgery apply` first")
    state = inner.state_dict()
    check_shapes(header, {k: tuple(v.shape) for k, v in state.items()})  # global shapes, also of DTensors
    dcp.load(state, storage_reader=HuggingFaceStorageReader(header.path), no_dist=not _distributed())
    inner.load_state_dict(state)
