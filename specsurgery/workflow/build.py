"""`specsurgery build`: every model of the spec files, to a checkpoint each.

A model with no checkpoint yet is built fresh (seeded init). A checkpoint
built from the same spec is left alone. A checkpoint built from another spec
is carried over by surgery: plan, apply, verify; the previous checkpoint is
kept in `DIR/history/`, named by its spec's content hash.
"""
from __future__ import annotations

import os
from typing import Optional

from ..checkpoint import read_header, write_checkpoint
from ..discover import load_each, spec_files
from ..errors import UserError
from ..ir import build_graph
from ..spec.canonical import canonical
from ..render import table
from .policy import load_policy


def write_fresh(graph, path: str, seed: int = 0, progress=None) -> int:
    from ..model import Model

    state = Model(graph, seed=seed).state_dict()
    shapes = {name: tuple(t.shape) for name, t in state.items()}
    return write_checkpoint(path, canonical(graph.spec), graph.model.name, shapes, state.items(), progress=progress)


def build(paths: Optional[list[str]] = None, out: Optional[str] = None, dry_run: bool = False,
          allow_lossy: Optional[bool] = None, seed: int = 0, progress: bool = True) -> dict:
    policy = load_policy().override(allow_lossy=allow_lossy)
    files = spec_files(paths or [policy.path(policy.specs)])
    out_dir = out or policy.path(policy.models)
    models = load_each(files)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):  # say so before building anything
        raise UserError(f"{out_dir}: error: cannot write checkpoints here: it is a file, not a folder")
    rows = []
    for name, (loaded, file) in models.items():
        spec = loaded.models[name]
        graph = build_graph(spec)
        target = os.path.join(out_dir, f"{name}.safetensors")
        text = canonical(spec)
        row = {"model": name, "spec": file, "parameters": graph.parameter_count(), "file": target}
        if os.path.exists(target) and read_header(target).spec_text == text:
            row["action"] = "unchanged"
        elif os.path.exists(target):
            from .surgery_step import surgery_step

            row.update(surgery_step(target, spec, policy, seed=seed, dry_run=dry_run, progress=progress))
        elif dry_run:
            row["action"] = "would build"
        else:
            write_fresh(graph, target, seed=seed)
            row["action"] = "built"
        rows.append(row)
    return {"models": rows, "exit": 1 if any(r.get("refused") for r in rows) else 0, "text": _text(rows)}


def _text(rows: list[dict]) -> str:
    if not rows:
        return "no models found"
    body = table([[r["model"], f"{r['parameters']:,}", r["action"], r["file"]] for r in rows],
                 ["model", "parameters", "action", "file"], right=(1,))
    notes = [r["detail"] for r in rows if r.get("detail")]
    return "\n".join([body] + notes)
