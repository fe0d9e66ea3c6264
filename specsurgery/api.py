"""The public functions of `import specsurgery as ss`: models from specs and
checkpoints (compile, load). Every mistake a user can make raises ss.SpecError
or ss.UserError, whose str() is what the command prints."""
from __future__ import annotations

import os
from typing import Optional

from .errors import UserError
from .spec import model as m


def read_spec(source: str, model: Optional[str] = None) -> m.ModelSpec:
    """The ModelSpec of `source`: a .spec path, spec text, or git:REV:path."""
    from .spec.load import load, load_text

    if not isinstance(source, (str, os.PathLike)):
        raise UserError(f"error: a spec is a .spec path, spec text or git:REV:path, got {type(source).__name__}")
    source = os.fspath(source)
    where = source
    if source.startswith("git:"):
        from .workflow.git import reader_at, split_git_path

        rev, path = split_git_path(source)
        loaded = load([source], reader=reader_at(rev))
    elif "\n" in source or "{" in source:
        where = "<string>"
        loaded = load_text(source, where)
    elif source.endswith(".safetensors"):
        raise UserError(f"{source}: error: this is a checkpoint, not a spec: load it with ss.load")
    elif not os.path.exists(source):
        raise UserError(f"{source}: error: no such file")
    else:
        loaded = load([source])
    names = ", ".join(loaded.models) or "none"
    if model is None:
        if len(loaded.models) != 1:
            raise UserError(f"{where}: error: {len(loaded.models)} models in this spec; choose one with model= "
                            f"(models: {names})")
        return next(iter(loaded.models.values()))
    if model not in loaded.models:
        raise UserError(f"{where}: error: no model {model!r} (models: {names})")
    return loaded.models[model]


def compile(source: str, model: Optional[str] = None, *, seed: int = 0):
    """A fresh ss.Model of a spec, parameters at each op's seeded init."""
    from .ir import build_graph
    from .model import Model

    if not isinstance(seed, int) or isinstance(seed, bool):
        raise UserError(f"error: seed must be a whole number, got {seed!r}")
    return Model(build_graph(read_spec(source, model)), seed=seed)


def load(path: str, *, device=None, dtype=None):
    """The ss.Model of a checkpoint; tensors keep the file's dtype unless `dtype` is given."""
    import torch

    from .checkpoint import check_against, load_spec, open_tensors, read_header, user_metadata
    from .ir import build_graph
    from .model import DTYPE_NAMES, Model

    if dtype is not None and dtype not in DTYPE_NAMES:
        raise UserError(f"error: dtype must be one of torch.float32, bfloat16, float16, float64, got {dtype!r}")
    try:
        device = torch.device(device) if device is not None else None
    except (RuntimeError, TypeError) as e:
        raise UserError(f"error: not a device: {device!r} ({e})") from None
    path = os.fspath(path)
    header = read_header(path)
    graph = build_graph(load_spec(header))
    check_against(header, graph)
    tensors = open_tensors(path)

    def tensor(name: str):
        t = tensors.get_tensor(name)
        return t.to(device=device, dtype=dtype) if device is not None or dtype is not None else t

    return Model(graph, tensors=tensor, metadata=user_metadata(header))
