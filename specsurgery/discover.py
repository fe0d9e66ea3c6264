"""Finding spec files and the models they define."""
from __future__ import annotations

import os

from .errors import Diagnostic, SpecError, UserError
from .spec.load import Loaded, Reader, load, read_disk


def spec_files(paths: list[str]) -> list[str]:
    """Files named, and every *.spec below folders named, in a stable order."""
    out: list[str] = []
    for path in paths:
        if os.path.isdir(path):
            for root, dirs, files in os.walk(path):
                dirs.sort()
                out.extend(os.path.join(root, f) for f in sorted(files) if f.endswith(".spec"))
        elif os.path.exists(path) or path.startswith("git:"):
            out.append(path)
        else:
            raise UserError(f"{path}: error: no such file or folder")
    return out


def load_each(files: list[str], reader: Reader = read_disk) -> dict[str, tuple[Loaded, str]]:
    """Load every file on its own (with what it uses); model name -> (loaded, file).

    Models are what a file defines itself; two files defining one model name is
    an error, since both would write the same checkpoint.
    """
    models: dict[str, tuple[Loaded, str]] = {}
    diagnostics: list[Diagnostic] = []
    for path in files:
        try:
            loaded = load([path], reader)
        except SpecError as e:
            diagnostics.extend(e.diagnostics)
            continue
        for name, spec in loaded.models.items():
            if os.path.normpath(loaded.model_files[name]) != os.path.normpath(path):
                continue  # defined by a file it uses
            if name in models and models[name][1] != path:
                diagnostics.append(Diagnostic(
                    f"model {name!r} is also defined in {models[name][1]}; each model needs one home", spec.model.span))
                continue
            models[name] = (loaded, path)
    if diagnostics:
        raise SpecError(diagnostics)
    return models
