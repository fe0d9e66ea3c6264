"""Where a spec can come from: a .spec file, a checkpoint, or git:REV:path."""
from __future__ import annotations

import os
from typing import Optional

from .errors import UserError
from .spec import model as m
from .spec.load import load


def is_checkpoint(arg: str) -> bool:
    """A safetensors file, or a sharded checkpoint (its folder or its index), or a DCP folder."""
    from .dcp import SPEC_FILE
    from .shards import INDEX

    return arg.endswith((".safetensors", ".index.json")) or any(
        os.path.isfile(os.path.join(arg, name)) for name in (INDEX, SPEC_FILE))


def resolve_spec(arg: str, model: Optional[str] = None) -> m.ModelSpec:
    """The model a command argument names (with --model when a file has several)."""
    if is_checkpoint(arg):
        from .checkpoint import load_spec, read_header

        return load_spec(read_header(arg))  # a checkpoint holds one model; --model is for spec files
    from .workflow.git import reader_at, split_git_path

    git = split_git_path(arg)
    if git is not None:
        rev, path = git
        loaded = load([f"git:{rev}:{path}"], reader=reader_at(rev))
    else:
        if not os.path.exists(arg):
            raise UserError(f"{arg}: error: no such file")
        loaded = load([arg])
    return loaded.model(model, where=arg)

