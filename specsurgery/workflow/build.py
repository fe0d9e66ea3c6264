"""`specsurgery build`: every model of the spec files, to a checkpoint each.

A model with no checkpoint yet is built fresh (seeded init). A checkpoint
built from the same spec is left alone. A checkpoint built from another spec
is carried over by surgery: plan, apply, verify; the previous checkpoint is
kept in `DIR/history/`, named by its spec's content hash.
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Optional

from ..checkpoint import read_header, write_checkpoint
from ..discover import load_each, spec_files
from ..errors import UserError
from ..ir import build_graph
from ..spec.canonical import canonical
from ..render import table
from .folder import build_lock, checkpoint_path, sweep_leftovers
from .policy import load_policy


def write_fresh(graph, path: str, seed: int = 0, progress=None, max_shard_size=None) -> int:
    from ..model import Model

    state = Model(graph, seed=seed).state_dict()
    shapes = {name: tuple(t.shape) for name, t in state.items()}
    if max_shard_size is not None:  # `path` is a folder in the Hugging Face sharded layout
        from ..shards import write_sharded

        return write_sharded(path, canonical(graph.spec), graph.model.name, shapes, state.items(), max_shard_size,
                             progress=progress)
    return write_checkpoint(path, canonical(graph.spec), graph.model.name, shapes, state.items(), progress=progress)


def build(paths: Optional[list[str]] = None, out: Optional[str] = None, dry_run: bool = False,
          allow_lossy: Optional[bool] = None, seed: int = 0, progress: bool = True,
          announce: Optional[Callable[[str], None]] = None, max_shard_size=None) -> dict:
    """Build every model; `announce` is told what will be written (models, sizes) before it is.

    With `max_shard_size` a model's checkpoint is the folder DIR/<model>/ in the
    Hugging Face sharded layout; a model that has such a folder keeps it."""
    from ..shards import parse_size

    if max_shard_size is not None:
        parse_size(max_shard_size)  # a bad size is said before anything is built
    policy = load_policy().override(allow_lossy=allow_lossy)
    files = spec_files(paths or [policy.path(policy.specs)])
    out_dir = out or policy.path(policy.models)
    models = load_each(files)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):  # say so before building anything
        raise UserError(f"{out_dir}: error: cannot write checkpoints here: it is a file, not a folder")
    # One build at a time writes a folder (a dry run writes nothing, so takes no lock).
    with build_lock(out_dir) if models and not dry_run else contextlib.nullcontext():
        rows = _build_all(models, out_dir, policy, seed, dry_run, progress, announce, max_shard_size)
    refusals = "\n".join(r["detail"] for r in rows if r.get("refused"))
    return {"models": rows, "exit": 1 if refusals else 0, "text": _text(rows), "errors": refusals}


def _build_all(models: dict, out_dir: str, policy, seed: int, dry_run: bool, progress: bool,
               announce: Optional[Callable[[str], None]], max_shard_size=None) -> list[dict]:
    from ..shards import INDEX

    pending = []  # (row, spec, graph, target): what is to be done, decided before anything is written
    for name, (loaded, file) in models.items():
        spec = loaded.models[name]
        graph = build_graph(spec)
        shown = os.path.join(out_dir, f"{name}.safetensors")
        if max_shard_size is not None or os.path.isfile(os.path.join(out_dir, name, INDEX)):
            shown = os.path.join(out_dir, name)  # sharded: the folder DIR/<model>/
        target = checkpoint_path(shown)  # a symbolic link: the file it reaches
        if not dry_run:
            sweep_leftovers(target)  # of a build killed mid-write
        row = {"model": name, "spec": file, "parameters": graph.parameter_count(), "file": shown,
               "bytes": checkpoint_bytes(graph)}
        if not os.path.exists(target):
            row["action"] = "would build" if dry_run else "build"
        else:
            row["action"] = "unchanged" if _built_from(target, canonical(spec)) else "surgery"
        pending.append((row, spec, graph, target))
    writes = [row for row, _, _, _ in pending if row["action"] in ("build", "surgery")]
    if writes and announce is not None and not dry_run:
        announce(_announcement(writes, out_dir))
    rows = []
    for row, spec, graph, target in pending:
        if row["action"] == "surgery":
            from .surgery_step import surgery_step

            row.update(surgery_step(target, spec, policy, seed=seed, dry_run=dry_run, progress=progress))
        elif row["action"] == "build":
            sharded = not target.endswith(".safetensors")
            write_fresh(graph, target, seed=seed, max_shard_size=(max_shard_size or "5GB") if sharded else None)
            row["action"] = "built"
        rows.append(row)
    return rows


def _built_from(target: str, text: str) -> bool:
    """Whether the checkpoint was built from this canonical text; refused when
    it does not load or its tensors do not fit its own spec (before a byte is
    written). Written with other line endings, it may be the same spec in other words."""
    from ..checkpoint import check_against, load_spec

    header = read_header(target)
    if header.spec_text == text:
        return True
    old = load_spec(header)
    check_against(header, build_graph(old))
    return canonical(old) == text


def checkpoint_bytes(graph) -> int:
    """What the model's checkpoint takes on disk, near enough: its float32
    tensors, and a header that holds the spec and a line per tensor."""
    return 4 * graph.parameter_count() + len(canonical(graph.spec).encode()) + 80 * len(graph.parameters())


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} B"


def _announcement(writes: list[dict], out_dir: str) -> str:
    """Said before the first byte is written: a first build of specs/ is over a gigabyte."""
    total = sum(r["bytes"] for r in writes)
    what = {"build": "new", "surgery": "surgery (the previous one kept in history/)"}
    body = table([[r["model"], f"{r['parameters']:,}", _size(r["bytes"]), what[r["action"]]] for r in writes],
                 ["model", "parameters", "size", "checkpoint"], right=(1, 2))
    plural = "s" if len(writes) > 1 else ""
    return f"writing {len(writes)} checkpoint{plural} to {out_dir}, about {_size(total)}:\n{body}"


def _text(rows: list[dict]) -> str:
    if not rows:
        return "no models found"
    body = table([[r["model"], f"{r['parameters']:,}", r["action"], r["file"]] for r in rows],
                 ["model", "parameters", "action", "file"], right=(1,))
    notes = [r["detail"] for r in rows if r.get("detail") and not r.get("refused")]  # refusals: "errors"
    return "\n".join([body] + notes)
