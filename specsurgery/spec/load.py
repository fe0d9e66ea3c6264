"""Reading spec files: `use` resolution, checks, and the models they define.

A `Reader` turns a path into text, so the same loader reads the working tree
and a git revision (where `use` resolves at that same revision).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import stat
from dataclasses import dataclass, field
from typing import Callable, Optional

from ..errors import SOURCES, Diagnostic, SpecError, UserError
from . import model as m
from .check import check_model_names, check_schema
from .parse import parse_text

Reader = Callable[[str], str]


def read_disk(path: str, what: str = ".spec file") -> str:
    try:
        # O_NONBLOCK: a FIFO must not hang the open; only regular files are read
        # (not /dev/zero, not a pipe)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise UserError(f"{path}: error: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{path}: error: is a folder, not a {what}") from None
    except OSError as e:
        raise UserError(f"{path}: error: cannot read ({e.strerror})") from None
    except ValueError:  # a NUL byte in the path
        raise UserError(f"{path}: error: not a valid path (it holds a NUL byte)") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        if stat.S_ISDIR(mode):
            raise UserError(f"{path}: error: is a folder, not a {what}")
        raise UserError(f"{path}: error: not a regular file")
    with os.fdopen(fd, "rb") as f:
        try:
            data = f.read()
        except OSError as e:
            raise UserError(f"{path}: error: cannot read ({e.strerror})") from None
    return decode_text(data, path)


def decode_text(data: bytes, path: str) -> str:
    """UTF-8 text (a leading byte-order mark dropped); an invalid byte is reported at its line and column."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line_start = data.rfind(b"\n", 0, e.start) + 1
        line = data.count(b"\n", 0, e.start) + 1
        column = len(data[line_start:e.start].decode("utf-8", "replace")) + 1
        raise UserError(f"{path}:{line}:{column}: error: not UTF-8 text "
                        f"(byte 0x{data[e.start]:02x}: {e.reason})") from None


@dataclass
class Loaded:
    """Every schema and model visible from the files that were loaded."""

    files: dict[str, m.SpecFile] = field(default_factory=dict)
    schemas: dict[str, m.Schema] = field(default_factory=dict)
    models: dict[str, m.ModelSpec] = field(default_factory=dict)
    model_files: dict[str, str] = field(default_factory=dict)  # model -> the file that defines it
    graphs: dict = field(default_factory=dict)  # model -> its IR graph (ir.Graph), built once here

    def model(self, name: Optional[str] = None, where: str = "") -> m.ModelSpec:
        """The model `name`, or the only one; `where` (a path) starts the messages."""
        head = f"{where}: error:" if where else "error:"
        names = ", ".join(self.models) or "none"
        if not self.models:
            raise UserError(f"{head} no model in this file (it defines {_count(len(self.schemas), 'schema')} "
                            "and no `model NAME(obs: SCHEMA) { ... }`)")
        if name is None:
            if len(self.models) != 1:
                raise UserError(f"{head} choose a model with --model (models: {names})")
            return next(iter(self.models.values()))
        if name not in self.models:
            raise UserError(f"{head} no model {name!r} (models: {names})")
        return self.models[name]


def _count(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _first_of_each(kind: str, items: list, diagnostics: list[Diagnostic]) -> dict:
    """Name -> the first definition; each later one is reported as defined twice."""
    first: dict = {}
    for item in items:
        if item.name in first:
            where = _where(first[item.name].span, item.span)
            diagnostics.append(Diagnostic(f"{kind} {item.name!r} is defined twice (first {where})", item.span))
        else:
            first[item.name] = item
    return first


class ParseCache:
    """Parsed files as JSON, keyed by a hash of their text.

    The pre-commit hook parses the staged and the HEAD version of each spec on
    every commit; HEAD's text was staged, and so parsed, the commit before
    (under another name: spans are renamed on the way out). Reading the typed
    spec back from JSON is several times faster than parsing."""

    def __init__(self, folder: str):
        self.folder = folder

    def _path(self, text: str) -> str:
        return os.path.join(self.folder, hashlib.sha256(text.encode()).hexdigest() + ".json")

    def get(self, path: str, text: str) -> Optional[m.SpecFile]:
        try:
            with open(self._path(text), encoding="utf-8") as f:
                stored, data = f.read().split("\n", 1)
            if stored != path:  # the same text read under another name
                old, new = json.dumps(stored), json.dumps(path)
                data = data.replace(f'"file":{old}', f'"file":{new}').replace(f'"path":{old}', f'"path":{new}')
            return m.SpecFile.model_validate_json(data)
        except (OSError, ValueError, RecursionError):  # absent, unreadable or doctored: parse again
            return None

    def put(self, path: str, text: str, spec_file: m.SpecFile) -> None:
        from ..files import atomic_file

        try:
            with atomic_file(self._path(text), "w", durable=False) as f:
                f.write(path.replace("\n", " ") + "\n" + spec_file.model_dump_json())
        except (OSError, UserError):
            pass  # a cache that cannot be written is only slower


def load(paths: list[str], reader: Reader = read_disk, cache: Optional[ParseCache] = None) -> Loaded:
    """Parse and check `paths` and what they `use`; raise SpecError with every error."""
    loaded = Loaded()
    diagnostics: list[Diagnostic] = []
    own: dict[str, tuple[list[m.Schema], list[m.Model]]] = {}
    broken_use = False  # a `use` that failed hides what it would have defined

    def visit(path: str, stack: tuple[str, ...], use_span: Optional[m.Span]) -> None:
        nonlocal broken_use
        key = os.path.normpath(path)
        if key in stack:
            cycle = " -> ".join(list(stack[stack.index(key):]) + [key])
            diagnostics.append(Diagnostic(f"cyclic use: {cycle}", use_span))
            return
        if key in loaded.files:
            return
        try:
            text = reader(path)
        except UserError as e:
            if use_span is None:
                raise
            diagnostics.append(Diagnostic(f"cannot use {path!r}: {str(e).split('error: ', 1)[-1]}", use_span))
            broken_use = True
            return
        SOURCES[path] = text
        spec_file = cache.get(path, text) if cache else None
        if spec_file is None:
            spec_file = parse_text(text, path)  # a syntax error stops here, as it should
            if cache:
                cache.put(path, text, spec_file)
        loaded.files[key] = spec_file
        for use in spec_file.uses:
            visit(os.path.join(os.path.dirname(path), use.path), stack + (key,), use.span)
        own[key] = (list(spec_file.schemas), list(spec_file.models))

    for path in paths:
        visit(path, (), None)

    schema_where = _first_of_each("schema", [s for schemas, _ in own.values() for s in schemas], diagnostics)
    bad_schemas: set[str] = set()
    for schema in schema_where.values():
        errors = check_schema(schema)
        if errors:
            bad_schemas.add(schema.name)
        diagnostics.extend(errors)
    home = {id(model): key for key, (_, models) in own.items() for model in models}
    model_where = _first_of_each("model", [mo for _, models in own.values() for mo in models], diagnostics)
    for model in model_where.values():
        diagnostics.extend(check_model_names(model))
        schema = schema_where.get(model.schema_name)
        if schema is None:
            if broken_use:
                continue  # most likely defined by the file that could not be used; that error says it
            known = ", ".join(schema_where) or "none"
            diagnostics.append(Diagnostic(f"model {model.name} reads unknown schema {model.schema_name!r} (schemas: {known})", model.schema_span))
            continue
        loaded.models[model.name] = m.ModelSpec(schema=schema, model=model)
        loaded.model_files[model.name] = home[id(model)]
    loaded.schemas = schema_where
    # Shapes and names inside models: every model whose schema is sound is typed,
    # so one run reports the errors of schemas and models together.
    from ..ir import build_graph

    for name, spec in loaded.models.items():
        if spec.schema.name in bad_schemas:
            continue
        try:
            loaded.graphs[name] = build_graph(spec)
            too_big = _too_big(loaded.graphs[name])
        except SpecError as e:
            diagnostics.extend(e.diagnostics)
        else:
            diagnostics.extend(too_big)
    if diagnostics:
        raise SpecError(diagnostics)
    return loaded


# The most parameters a model may have: 2^32 float32 values are 16 GiB, more
# than a build, an apply or a verify can hold in memory on most machines.
MAX_PARAMETERS = 1 << 32


def _too_big(graph) -> list[Diagnostic]:
    total = graph.parameter_count()
    if total <= MAX_PARAMETERS:
        return []
    count = {node.index: 0 for node in graph.nodes}
    for node in graph.nodes:
        for spec in node.params.values():
            count[node.index] += math.prod(spec.shape)
    biggest = max(graph.nodes, key=lambda node: count[node.index])
    return [Diagnostic(f"model {graph.model.name} has {total:,} parameters, more than the {MAX_PARAMETERS:,} "
                       f"a model may have (16 GiB as float32); this op alone makes {count[biggest.index]:,}",
                       biggest.span)]


def _where(first: m.Span, again: m.Span) -> str:
    return f"on line {first.line}" if first.file == again.file else f"at {first}"


def load_text(text: str, path: str = "<string>") -> Loaded:
    return load([path], reader=lambda p: text if p == path else read_disk(p))
