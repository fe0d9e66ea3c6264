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

With an optimizer, its state goes into `optimizer/` the same way: chunk files
of tensors named `<parameter>/<state key>` (get_optimizer_state_dict's
fully-qualified names), its class and param groups in
`specsurgery.optimizer.json`, read back by the checks a one-file optimizer
file gets (optimizer_state.read_stored) and set by set_optimizer_state_dict.

A folder holding a pickle (DCP's `.metadata`, `.distcp` or torch.save files),
an index, or a link out of itself is refused before anything is read.

`apply` carries a DCP folder into a DCP folder (apply_dcp): the weights as
shard_apply writes them, whole tensors, which DCP's reader reshards onto any
ranks at load; the optimizer state carried by optimizer_state.carry. A sharded
folder in the Hugging Face layout is also a folder DCP's reader loads.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import warnings
from dataclasses import dataclass

from .checkpoint import META_MODEL, META_SPEC, META_VERSION, EmbeddedSpec, Header, TensorInfo, package_version, read_header
from .errors import UserError

SPEC_FILE = "specsurgery.dcp.json"
FORMAT = "specsurgery-dcp/1"
SHARDING_KEY = "DCP_SHARDING_INFO"  # torch.distributed.checkpoint._hf_utils.CUSTOM_METADATA_KEY
OPTIMIZER_DIR = "optimizer"  # the optimizer's state: chunk files as the model's, named <parameter>/<state key>
OPTIMIZER_FILE = "specsurgery.optimizer.json"  # its class, param groups and spec hash
OPTIMIZER_FORMAT = "specsurgery-dcp-optimizer/1"
_PICKLED = (".distcp", ".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")  # torch.save / pickle files
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


def has_optimizer(folder: str) -> bool:
    return os.path.isdir(os.path.join(folder, OPTIMIZER_DIR))


def _bad(folder: str):
    def bad(why: str) -> UserError:
        return UserError(f"{folder}: error: not a valid distributed checkpoint: {why}")

    return bad


def _read_table(path: str, name: str, form: str, bad) -> dict[str, str]:
    """The `metadata` table of the JSON file `path` (SPEC_FILE, OPTIMIZER_FILE): strings only."""
    try:
        if os.path.getsize(path) > _MAX_SPEC_FILE:
            raise bad(f"{name} is larger than 100 MB")
        with open(path, "rb") as f:
            data = json.loads(f.read())
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise bad(f"{name} is not JSON") from None
    except FileNotFoundError:
        raise bad(f"{name} is missing") from None
    except OSError as e:
        raise UserError(f"{path}: error: cannot read: {e.strerror or e}") from None
    metadata = data.get("metadata") if isinstance(data, dict) else None
    if not isinstance(data, dict) or data.get("format") != form or not isinstance(metadata, dict) \
            or not all(isinstance(v, str) for v in metadata.values()):
        raise bad(f"{name} is not a {form} table of strings")
    return metadata


def _check_entries(folder: str, bad) -> None:
    """What a folder from elsewhere may hold: chunk files and JSON inside it,
    nothing pickled, no index or link that reaches outside."""
    real = os.path.realpath(folder)
    for entry in sorted(os.listdir(folder)):
        path = os.path.join(folder, entry)
        if entry == ".metadata" or entry.endswith(_PICKLED):
            raise bad(f"it holds {entry}, a pickle (DCP's default format pickles its plan in .metadata and "
                      "torch.save()s its tensors); specsurgery never unpickles: save with ss.save_dcp, "
                      "which writes safetensors and JSON")
        if entry.endswith(".index.json"):
            raise bad(f"it holds {entry}, an index of files; a DCP folder's files are its own chunk files, "
                      "listed by nothing (a folder is a DCP checkpoint or a sharded one, not both)")
        if entry.endswith(".safetensors") or entry == OPTIMIZER_DIR:
            kind = os.path.isfile if entry != OPTIMIZER_DIR else os.path.isdir
            if os.path.islink(path) or os.path.dirname(os.path.realpath(path)) != real or not kind(path):
                raise bad(f"{entry} is a link to outside the folder, or not a "
                          + ("file" if entry != OPTIMIZER_DIR else "folder"))


def _read_chunks(folder: str, bad) -> tuple[dict[str, list[Chunk]], dict[str, TensorInfo]]:
    """Every chunk of every tensor in the folder's safetensors files, and the
    whole tensors they tile (each file's header checked; no torch)."""
    _check_entries(folder, bad)
    chunks: dict[str, list[Chunk]] = {}
    dtypes: dict[str, str] = {}
    for file in sorted(os.listdir(folder)):
        if not file.endswith(".safetensors"):
            continue
        header = read_header(os.path.join(folder, file), embedded_spec=False)
        info = header.metadata.get(SHARDING_KEY)
        try:
            sharding = json.loads(info) if info is not None else None
        except json.JSONDecodeError:
            raise bad(f"{file}: its {SHARDING_KEY} is not JSON") from None
        if sharding is not None and not isinstance(sharding, dict):
            raise bad(f"{file}: its {SHARDING_KEY} is not a table")
        for name, t in header.tensors.items():
            entry = {"saved_offsets": [0] * len(t.shape)} if sharding is None else sharding.get(name)
            offsets = entry.get("saved_offsets") if isinstance(entry, dict) else None
            if not isinstance(offsets, list) or len(offsets) != len(t.shape) \
                    or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets):
                raise bad(f"{file}: tensor {name!r} has " + ("no" if entry is None else "malformed")
                          + " saved_offsets")
            if dtypes.setdefault(name, t.dtype) != t.dtype:
                raise bad(f"tensor {name!r} is saved in chunks of different dtypes")
            chunks.setdefault(name, []).append(Chunk(header, tuple(offsets), t.shape))
    return chunks, {name: _whole(name, parts, dtypes[name], bad) for name, parts in chunks.items()}


def read_dcp(folder: str) -> DcpHeader:
    bad = _bad(folder)
    metadata = _read_table(os.path.join(folder, SPEC_FILE), SPEC_FILE, FORMAT, bad)
    if META_SPEC not in metadata or META_MODEL not in metadata:
        raise bad(f"{SPEC_FILE} is not a {FORMAT} table with the spec in its metadata")
    chunks, tensors = _read_chunks(folder, bad)
    if not chunks:
        raise bad("it holds no .safetensors files")
    return DcpHeader(folder, tensors, dict(metadata), chunks)


def read_optimizer_dir(folder: str) -> DcpHeader:
    """The optimizer state in `folder`/optimizer: its chunks, and (as metadata)
    what optimizer_state.stored_metadata wrote: class, groups, spec hash."""
    where = os.path.join(folder, OPTIMIZER_DIR)
    bad = _bad(folder)
    _check_entries(folder, bad)  # the optimizer folder itself is no link out
    metadata = _read_table(os.path.join(where, OPTIMIZER_FILE), f"{OPTIMIZER_DIR}/{OPTIMIZER_FILE}",
                           OPTIMIZER_FORMAT, bad)
    chunks, tensors = _read_chunks(where, bad)
    return DcpHeader(where, tensors, dict(metadata), chunks)


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


def _quiet(call, *args, **kwargs):
    """dcp.save / dcp.load, without the warning each gives in one process (told so by no_dist)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        return call(*args, **kwargs)


def _staging_beside(target: str) -> str:
    """A staging folder beside `target`, named by rank 0 for every rank. It
    starts as shards.staged_folder's do (with rank 0's pid), so a later writer
    of `target` removes it once the process that made it is gone."""
    import torch.distributed as dist

    from .shards import _stage_prefix

    name = [f"{_stage_prefix(target)}{os.getpid()}-dcp-{secrets.token_hex(6)}"]
    if _distributed():
        dist.broadcast_object_list(name, src=0)  # in memory, between the job's own ranks
    return os.path.join(os.path.dirname(target), name[0])


def _write_spec_file(folder: str, metadata: dict[str, str], durable: bool = True) -> None:
    from .checkpoint import atomic_file

    with atomic_file(os.path.join(folder, SPEC_FILE), "w", durable=durable) as f:
        json.dump({"format": FORMAT, "metadata": metadata}, f, indent=1)


def _save_optimizer(folder: str, named, spec_text: str) -> None:
    """`named` (optimizer_state.NamedState; DTensors under fully_shard) into
    the folder `folder` through DCP's safetensors storage, on every rank (or
    in one process); its groups as JSON by rank 0. The folder exists."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageWriter

    from .optimizer_state import stored_metadata, stored_tensors

    tensors, empty = stored_tensors(named)
    if tensors:  # none before the first step: every rank alike
        _quiet(dcp.save, tensors, storage_writer=HuggingFaceStorageWriter(folder, save_distributed=True),
               no_dist=not _distributed())
    if _rank() == 0:
        _write_optimizer_table(folder, stored_metadata(named, spec_text, empty))


def _write_whole_optimizer(folder: str, named, spec_text: str, durable: bool = True) -> None:
    """`named` in one process, whole tensors, as _save_optimizer lays it out:
    one chunk file (no sharding info: every chunk at offset zero, as DCP's
    reader takes it) and the JSON; no torch.distributed to import."""
    from .checkpoint import write_checkpoint
    from .model import dtype_name
    from .optimizer_state import stored_metadata, stored_tensors

    os.makedirs(folder)
    tensors, empty = stored_tensors(named)
    if tensors:
        write_checkpoint(os.path.join(folder, "model-00001-of-00001.safetensors"), None, None,
                         {k: tuple(t.shape) for k, t in tensors.items()}, tensors.items(),
                         dtypes={k: dtype_name(t.dtype, f"optimizer state {k}") for k, t in tensors.items()},
                         durable=durable)
    _write_optimizer_table(folder, stored_metadata(named, spec_text, empty), durable)


def _write_optimizer_table(folder: str, metadata: dict[str, str], durable: bool = True) -> None:
    from .checkpoint import atomic_file

    with atomic_file(os.path.join(folder, OPTIMIZER_FILE), "w", durable=durable) as f:
        json.dump({"format": OPTIMIZER_FORMAT, "metadata": metadata}, f, indent=1)


def save_dcp(model, folder: str, *, optimizer=None) -> str:
    """Write `model` (an ss.Model, plain, DDP-wrapped or under fully_shard) to
    `folder` as a DCP checkpoint, with `optimizer`'s state in `folder`/optimizer
    (keyed by parameter name): call it on every rank of the job, or in one
    process. The folder is staged beside the target and swapped into place by
    rank 0 once every rank's chunks are on disk."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageWriter

    from .shards import commit_folder

    inner = getattr(model, "module", model)  # DDP keeps the model in .module
    named = None
    if optimizer is not None:  # refused (an unsupported class, say) before anything is written
        from .optimizer_state import named_from_state_dict

        named = named_from_state_dict(optimizer, inner)
    target = os.path.abspath(folder)
    staged = _staging_beside(target)
    if _rank() == 0:
        os.makedirs(os.path.join(staged, OPTIMIZER_DIR) if named is not None else staged)
    _barrier()
    try:
        _quiet(dcp.save, inner.state_dict(), storage_writer=HuggingFaceStorageWriter(staged, save_distributed=True),
               no_dist=not _distributed())
        if named is not None:
            _save_optimizer(os.path.join(staged, OPTIMIZER_DIR), named, inner.spec)
        _barrier()  # every rank's chunks are on disk
        if _rank() == 0:
            _write_spec_file(staged, {META_SPEC: inner.spec, META_MODEL: inner.name, META_VERSION: package_version()})
            commit_folder(staged, target)
    except BaseException:
        if _rank() == 0:
            shutil.rmtree(staged, ignore_errors=True)
        raise
    _barrier()
    return folder


def load_dcp(folder: str, model, *, optimizer=None) -> None:
    """Load a DCP folder (or a sharded folder apply wrote) into `model` on every
    rank, in place, sharded or replicated as the model is: DCP reshards. The
    folder must hold this model's spec. With `optimizer` (built over the model's
    parameters, in the saved param groups), its state and hyperparameters are
    set from `folder`/optimizer."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader

    from .checkpoint import check_shapes

    inner = getattr(model, "module", model)
    header = read_header(folder)
    if header.spec_text != inner.spec:
        raise UserError(f"{folder}: error: this checkpoint was saved from another spec than the model's "
                        f"(model {header.model_name}); carry it over with `specsurgery apply` first")
    if optimizer is not None and not (is_dcp(folder) and has_optimizer(folder)):
        from .checkpoint import optimizer_path

        beside = os.path.exists(optimizer_path(folder))
        raise UserError(f"{folder}: error: no optimizer state in this checkpoint " + (
            f"(model.save put it beside it: ss.load_optimizer({folder!r}, model) reads it in one process)" if beside
            else "(ss.save_dcp(model, folder, optimizer=...) saves it)"))
    state = inner.state_dict()
    check_shapes(header, {k: tuple(v.shape) for k, v in state.items()})  # global shapes, also of DTensors
    if optimizer is not None:  # checked whole and read (into tensors like the parameters) before the model is
        named = _load_optimizer(folder, inner)
    _quiet(dcp.load, state, storage_reader=HuggingFaceStorageReader(header.path), no_dist=not _distributed())
    inner.load_state_dict(state)
    if optimizer is not None:
        from .optimizer_state import set_from_named

        set_from_named(optimizer, inner, named, folder)


def _load_optimizer(folder: str, model):
    """The optimizer state of `folder` (optimizer_state.NamedState), checked
    against `model` (each tensor's name, shape and dtype, the spec, the
    hyperparameters), then read on every rank: DCP reshards each moment onto
    its parameter's placement."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader

    from .optimizer_state import SCALAR_KEYS, read_stored

    stored = read_optimizer_dir(folder)
    params = dict(model.named_parameters())
    dtypes = {"F32": torch.float32, "F64": torch.float64, "F16": torch.float16, "BF16": torch.bfloat16}

    def load_all(names: list[str]) -> dict:
        like = {}
        for full in names:  # each in the shape and placement it takes in the model
            name, _, key = full.rpartition("/")
            dtype = dtypes[stored.tensors[full].dtype]
            like[full] = (torch.zeros((), dtype=dtype) if key in SCALAR_KEYS
                          else torch.zeros_like(params[name], dtype=dtype))  # a DTensor under fully_shard
        if like:
            _quiet(dcp.load, like, storage_reader=HuggingFaceStorageReader(stored.path), no_dist=not _distributed())
        return like

    shapes = {n: tuple(p.shape) for n, p in params.items()}
    return read_stored(stored.path, stored.metadata, stored.tensors, model.spec, shapes, load_all)


def read_dcp_optimizer(folder: str, spec_text: str, shapes: dict[str, tuple[int, ...]]):
    """The optimizer state of a DCP folder in one process, whole tensors
    (optimizer_state.NamedState), checked as one file's is."""
    from .optimizer_state import read_stored

    stored = read_optimizer_dir(folder)
    tensors = DcpTensors(stored)
    return read_stored(stored.path, stored.metadata, stored.tensors, spec_text, shapes,
                       lambda names: {n: tensors.get_tensor(n) for n in names})


# ---------------------------------------------------------------------------
# through surgery, in one process


def _old_shapes(plan) -> dict[str, tuple[int, ...]]:
    shapes = {p.source: tuple(p.old_shape) for p in plan.params if p.source is not None}
    shapes.update({d.name: tuple(d.shape) for d in plan.dropped})
    return shapes


def apply_dcp(plan, checkpoint: str, new_spec, out: str, *, max_shard_size=None, jobs=None, seed: int = 0,
              checked: bool = False, durable: bool = True) -> dict:
    """Carry the DCP folder `checkpoint` over by `plan` into the DCP folder
    `out`: the weights as shard_apply writes them (whole tensors, which DCP's
    reader reshards onto any ranks at load), the optimizer state carried by the
    plan (optimizer_state.carry) into `out`/optimizer. Staged beside `out`: a
    failure leaves nothing in its place."""
    from .checkpoint import user_metadata
    from .shard_apply import apply_sharded

    old = read_dcp(checkpoint)
    named = carried_optimizer(plan, checkpoint)

    def finish(staged: str) -> None:  # in place of the index of a sharded folder
        _write_spec_file(staged, {**user_metadata(old), META_SPEC: plan.new_spec, META_MODEL: plan.new_model,
                                  META_VERSION: package_version()}, durable)
        if named is not None:
            _write_whole_optimizer(os.path.join(staged, OPTIMIZER_DIR), named, plan.new_spec, durable)

    written = apply_sharded(plan, checkpoint, new_spec, out, max_shard_size=max_shard_size, jobs=jobs, seed=seed,
                            checked=checked, finish=finish, durable=durable)
    written["optimizer"] = os.path.join(out, OPTIMIZER_DIR) if named is not None else None
    return written


def carried_optimizer(plan, checkpoint: str):
    """The optimizer state of the DCP folder `checkpoint` carried by `plan`
    (optimizer_state.carry, the rules ss.surgery uses), or None when it holds
    none: read and checked before anything is written."""
    if not has_optimizer(checkpoint):
        return None
    from .optimizer_state import carry

    return carry(read_dcp_optimizer(checkpoint, plan.old_spec, _old_shapes(plan)), plan)
