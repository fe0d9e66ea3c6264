"""Frozen records for the surgery plan, with a pydantic model of each made
only when it is asked for.

Making a plan needs neither pydantic's checks nor its JSON Schema, and its
import and class building were most of planning Five (0.14 s of every
`specsurgery apply`). So the plan's classes are plain frozen nodes (as the
typed spec's, spec/node.py) whose fields also say what the JSON Schema says
of them (`field(..., ge=, description=)`); from those, one pydantic model per
class is built on the first `model_validate` (a plan read from a file, every
field checked, errors as pydantic gives them) or `model_json_schema` (the
published schema). One definition: the mirror is read off the record.
"""
from __future__ import annotations

import json
import typing
from typing import Any, Literal, Optional, Union

from ..spec.node import Node

_REQUIRED = object()


class _About:
    """A field's default, and its constraint and description for the schema."""

    __slots__ = ("default", "ge", "description")

    def __init__(self, default, ge, description):
        self.default, self.ge, self.description = default, ge, description


def field(default: Any = _REQUIRED, *, ge: Optional[int] = None, description: Optional[str] = None) -> Any:
    return _About(default, ge, description)


class Record(Node):
    """A frozen node of the plan (keyword construction, equality by value,
    `model_copy`, `model_dump`, `model_dump_json`, `model_validate_json`)."""

    _about: dict = {}  # field name -> _About, for a field without a default or with more to say

    def __init_subclass__(cls, **kwargs):
        about = dict(cls._about)
        for name in cls.__dict__.get("__annotations__", {}):
            if name.startswith("_"):
                continue
            value = cls.__dict__.get(name, _REQUIRED)
            if value is _REQUIRED:
                about[name] = _About(_REQUIRED, None, None)
            elif isinstance(value, _About):
                about[name] = value
                if value.default is _REQUIRED:
                    delattr(cls, name)
                else:
                    setattr(cls, name, value.default)
        cls._about = about
        super().__init_subclass__(**kwargs)

    def model_dump_json(self, indent: Optional[int] = None) -> str:
        """The JSON pydantic wrote: compact, or indented; text as it is (not \\u-escaped)."""
        if indent is None:
            return json.dumps(self.model_dump(), separators=(",", ":"), ensure_ascii=False)
        return json.dumps(self.model_dump(), indent=indent, ensure_ascii=False)

    @classmethod
    def model_validate(cls, data: Any) -> "Record":
        """The record plain data gives, every field checked by the pydantic model
        (pydantic.ValidationError where one does not fit)."""
        return _plain(_mirror(cls).model_validate(data))

    @classmethod
    def model_json_schema(cls) -> dict:
        return _mirror(cls).model_json_schema()


_MIRRORS: dict = {}  # record class -> its pydantic model
_RECORDS: dict = {}  # pydantic model -> its record class


def _mirror(cls: type) -> type:
    found = _MIRRORS.get(cls)
    if found is None:
        import pydantic

        hints = typing.get_type_hints(cls)
        fields = {}
        for name, default in cls._fields.items():
            about = cls._about.get(name)
            required = about.default is _REQUIRED if about else False
            extra = {k: getattr(about, k) for k in ("ge", "description") if about and getattr(about, k) is not None}
            fields[name] = (_mirrored(hints[name]), pydantic.Field(... if required else default, **extra))
        found = pydantic.create_model(cls.__name__, __config__=pydantic.ConfigDict(frozen=True, extra="forbid"),
                                      __doc__=cls.__doc__, __module__=cls.__module__, **fields)
        _MIRRORS[cls], _RECORDS[found] = found, cls
    return found


def _mirrored(kind):
    """A field's type with each record class in it replaced by its model."""
    if isinstance(kind, type) and issubclass(kind, Record):
        return _mirror(kind)
    args = typing.get_args(kind)
    origin = typing.get_origin(kind)
    if not args or origin is Literal:
        return kind
    if origin is Union:
        return Union[tuple(_mirrored(a) for a in args)]
    if origin is tuple:
        return tuple[tuple(a if a is Ellipsis else _mirrored(a) for a in args)]
    raise TypeError(f"no mirror of {kind}")


def _plain(value):
    record = _RECORDS.get(type(value))
    if record is not None:
        return record(**{k: _plain(v) for k, v in value.__dict__.items()})
    if type(value) is tuple:
        return tuple(_plain(v) for v in value)
    return value
