"""Frozen nodes with named fields: what the typed spec (and a span) is made of.

Plain classes rather than pydantic models: the spec is read in every process
(apply reads two), and pydantic's import and class building were most of a
process's start, and its construction most of reading a large vocabulary.
The nodes keep the part of pydantic's interface the code uses: keyword
construction with defaults, equality and hashing by value, `model_copy`,
`model_dump`, and a JSON form read back with every field checked against its
declared type (`model_validate_json`, for the parse cache)."""
from __future__ import annotations

import json
import typing
from typing import Any, Union

_REQUIRED = object()


class Node:
    """A frozen node. Fields are the class's annotations (a base's first), each
    with its default where the class gives one."""

    _fields: dict = {}  # name -> default (_REQUIRED: none)
    _aliases: dict = {}  # a keyword the constructor also takes -> the field's name
    _types: Union[dict, None] = None  # name -> type, resolved when JSON is first read

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        fields = dict(cls._fields)
        for name in cls.__annotations__:  # the class's own (a base's are in its _fields)
            if name.startswith("_"):
                continue
            fields[name] = cls.__dict__.get(name, fields.get(name, _REQUIRED))
            if name in cls.__dict__:
                delattr(cls, name)  # the default lives in _fields, the value in each node
        cls._fields, cls._types = fields, None

    def __init__(self, **values):
        fields = self._fields
        for alias, name in self._aliases.items():
            if alias in values:
                values[name] = values.pop(alias)
        unknown = values.keys() - fields.keys()
        if unknown:
            raise TypeError(f"{type(self).__name__} has no field {sorted(unknown)[0]!r}")
        state = {}
        for name, default in fields.items():
            value = values.get(name, default)
            if value is _REQUIRED:
                raise TypeError(f"{type(self).__name__} needs {name!r}")
            state[name] = tuple(value) if type(value) is list else value
        object.__setattr__(self, "__dict__", state)

    def __setattr__(self, name, value):
        raise AttributeError(f"{type(self).__name__} is frozen: make a changed copy with model_copy(update=...)")

    def __delattr__(self, name):
        raise AttributeError(f"{type(self).__name__} is frozen")

    def __eq__(self, other):
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self.__dict__ == other.__dict__

    def __hash__(self):
        return hash((self.__class__, tuple(self.__dict__.values())))

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.__dict__.items())})"

    def __reduce__(self):  # copy, deepcopy and pickle rebuild it field by field
        return _rebuild, (self.__class__, self.__dict__)

    def model_copy(self, update: Union[dict, None] = None) -> "Node":
        """A copy with some fields replaced (not checked: give each its type)."""
        state = dict(self.__dict__)
        if update:
            unknown = update.keys() - state.keys()
            if unknown:
                raise TypeError(f"{type(self).__name__} has no field {sorted(unknown)[0]!r}")
            state.update(update)
        return _rebuild(self.__class__, state)

    def model_dump(self) -> dict:
        """The fields as plain data: nodes as dicts, tuples kept."""
        return {k: _dump(v) for k, v in self.__dict__.items()}

    def model_dump_json(self) -> str:
        return json.dumps(self.model_dump(), separators=(",", ":"))

    @classmethod
    def model_validate_json(cls, text: Union[str, bytes]) -> "Node":
        """The node a JSON text gives; ValueError unless every field has its declared type."""
        return _load(cls, json.loads(text), "")


def built(cls, **fields):
    """A node of `cls` from every one of its fields, in order and each already of
    its type (the parser's values): nothing checked, nothing filled in."""
    node = object.__new__(cls)
    object.__setattr__(node, "__dict__", fields)
    return node


def _rebuild(cls, state: dict):
    node = object.__new__(cls)
    object.__setattr__(node, "__dict__", dict(state))
    return node


def _dump(value):
    if isinstance(value, Node):
        return value.model_dump()
    if type(value) is tuple:
        return tuple(_dump(v) for v in value)
    return value


# ---- reading JSON back, every field checked ---------------------------------


def _types(cls) -> dict:
    if cls._types is None:
        hints = typing.get_type_hints(cls)
        cls._types = {name: hints[name] for name in cls._fields}
    return cls._types


def _load(cls, data: Any, where: str) -> Node:
    if not isinstance(data, dict):
        raise ValueError(f"{where or cls.__name__}: expected an object")
    data = {cls._aliases.get(k, k): v for k, v in data.items()}
    unknown = data.keys() - cls._fields.keys()
    if unknown:
        raise ValueError(f"{where or cls.__name__}: unknown field {sorted(unknown)[0]!r}")
    state = {}
    for name, kind in _types(cls).items():
        at = f"{where}.{name}" if where else name
        if name in data:
            state[name] = _value(kind, data[name], at)
        elif cls._fields[name] is _REQUIRED:
            raise ValueError(f"{at}: missing")
        else:
            state[name] = cls._fields[name]
    return _rebuild(cls, state)


def _value(kind, data: Any, where: str):
    origin = typing.get_origin(kind)
    if origin is Union:
        choices = typing.get_args(kind)
        if data is None and type(None) in choices:
            return None
        nodes = [c for c in choices if isinstance(c, type) and issubclass(c, Node)]
        if nodes and isinstance(data, dict):  # told apart by their `kind`
            for choice in nodes:
                if choice._fields.get("kind") == data.get("kind", _REQUIRED):
                    return _load(choice, data, where)
            if len(nodes) > 1:
                raise ValueError(f"{where}: no node of kind {data.get('kind')!r}")
        for choice in choices:
            if choice is not type(None):
                try:
                    return _value(choice, data, where)
                except ValueError:
                    continue
        raise ValueError(f"{where}: not a {kind}")
    if origin is typing.Literal:
        if data not in typing.get_args(kind) or type(data) is bool:
            raise ValueError(f"{where}: not one of {typing.get_args(kind)}")
        return data
    if origin is tuple:
        element, *rest = typing.get_args(kind)
        if not isinstance(data, list):
            raise ValueError(f"{where}: expected a list")
        if rest == [Ellipsis]:
            return tuple(_value(element, v, f"{where}[{k}]") for k, v in enumerate(data))
        raise TypeError(f"{where}: tuple of fixed length")  # no node declares one
    if isinstance(kind, type) and issubclass(kind, Node):
        return _load(kind, data, where)
    if kind is bool:
        ok = type(data) is bool
    elif kind is int:
        ok = type(data) is int
    elif kind is float:
        ok = type(data) in (int, float)
        data = float(data) if ok else data
    elif kind is str:
        ok = type(data) is str
    else:
        raise TypeError(f"{where}: no reader of {kind}")
    if not ok:
        raise ValueError(f"{where}: not a {kind.__name__}")
    return data
