"""Build typed events from decoded maps, checking every field against its type hint.

The builder of each event class is compiled once from its dataclass fields (decoding is
on every consumer's hot path); a field that does not fit raises
:class:`~streamfuse.errors.InvalidEvent` with the field's path (``readings.image.payload``).

Pure logic: no Kafka, no clock.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import math
import types
import typing
from typing import Any, Union

from streamfuse.errors import InvalidEvent


class _Bad(Exception):
    """A field that does not fit its schema. The message says ``{where}``; each enclosing
    level adds its part of the path on the way out, so paths cost nothing on good input."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason, self.message, self.path = reason, message, []

    def invalid(self) -> InvalidEvent:
        where = "".join(reversed(self.path)).lstrip(".")
        return InvalidEvent(self.reason, self.message.replace("{where}", where))


Coerce = typing.Callable[[Any, bool], Any]
_BUILDERS: dict[type, Coerce] = {}


def build(cls: type, raw: dict, is_json: bool) -> Any:
    """``cls`` (an event dataclass) from a decoded map, every field checked against its type hint.

    Raises:
        InvalidEvent: ``missing_field``, ``bad_field`` or ``non_finite``, naming the field's path.
    """
    try:
        return _builder(cls)(raw, is_json)
    except _Bad as bad:
        raise bad.invalid() from None


def _builder(cls: type) -> Coerce:
    """A function that builds ``cls`` from a decoded map; compiled once per class from its
    type hints (decoding is on every consumer's hot path)."""
    if cls in _BUILDERS:
        return _BUILDERS[cls]
    hints = typing.get_type_hints(cls)
    plan = [(f.name, _coercer(hints[f.name]), type(None) in typing.get_args(hints[f.name]),
             f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
            for f in dataclasses.fields(cls)]

    def build(raw: dict, is_json: bool) -> Any:
        kwargs = {}
        for name, coerce, optional, required in plan:
            value = raw.get(name)
            if value is None and (not optional or name not in raw):
                if required:
                    bad = _Bad("missing_field", f"{cls.SCHEMA} needs field '{{where}}'")
                    bad.path.append(f".{name}")
                    raise bad
                continue
            try:
                kwargs[name] = coerce(value, is_json)
            except _Bad as bad:
                bad.path.append(f".{name}")
                raise
        return cls(**kwargs)

    _BUILDERS[cls] = build
    return build


def _coercer(hint: Any) -> Coerce:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        inner = _coercer(next(a for a in args if a is not type(None)))
        return lambda value, is_json: None if value is None else inner(value, is_json)
    if origin is tuple:
        return _tuple_of(_coercer(args[0]))
    if origin is dict:
        return _dict_of(_coercer(args[0]), _coercer(args[1]))
    if dataclasses.is_dataclass(hint):
        return _event_of(hint)
    try:
        return _SCALARS[hint]
    except KeyError:
        raise TypeError(f"no coercion for {hint!r}") from None  # a bug in the schema, not in the input


def _tuple_of(item: Coerce) -> Coerce:
    def as_tuple(value: Any, is_json: bool) -> tuple:
        if not isinstance(value, (list, tuple)):
            raise _Bad("bad_field", f"{{where}}: expected a list, got {type(value).__name__}")
        out = []
        for i, v in enumerate(value):
            try:
                out.append(item(v, is_json))
            except _Bad as bad:
                bad.path.append(f"[{i}]")
                raise
        return tuple(out)

    return as_tuple


def _dict_of(key: Coerce, val: Coerce) -> Coerce:
    def as_dict(value: Any, is_json: bool) -> dict:
        if not isinstance(value, dict):
            raise _Bad("bad_field", f"{{where}}: expected a map, got {type(value).__name__}")
        out = {}
        for k, v in value.items():
            try:
                k2 = key(k, is_json)
            except _Bad as bad:
                bad.path.append(" key")
                raise
            try:
                out[k2] = val(v, is_json)
            except _Bad as bad:
                bad.path.append(f".{k}")
                raise
        return out

    return as_dict


def _event_of(cls: type) -> Coerce:
    def as_event(value: Any, is_json: bool) -> Any:
        if not isinstance(value, dict):
            raise _Bad("bad_field", f"{{where}}: expected a map, got {type(value).__name__}")
        return _builder(cls)(value, is_json)

    return as_event


def _as_bytes(value: Any, is_json: bool) -> bytes:
    if is_json and isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except binascii.Error:
            raise _Bad("bad_field", "{where}: not valid base64") from None
    if not isinstance(value, bytes):
        raise _Bad("bad_field", f"{{where}}: expected bytes, got {type(value).__name__}")
    return value


def _as_float(value: Any, is_json: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Bad("bad_field", f"{{where}}: expected a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise _Bad("non_finite", f"{{where}} is {value}")
    return float(value)


def _as_int(value: Any, is_json: bool) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Bad("bad_field", f"{{where}}: expected an integer, got {type(value).__name__}")
    return value


def _as_str(value: Any, is_json: bool) -> str:
    if not isinstance(value, str):
        raise _Bad("bad_field", f"{{where}}: expected a string, got {type(value).__name__}")
    return value


def _as_bool(value: Any, is_json: bool) -> bool:
    if not isinstance(value, bool):
        raise _Bad("bad_field", "{where}: expected true/false")
    return value


_SCALARS: dict[type, Coerce] = {bytes: _as_bytes, float: _as_float, int: _as_int, str: _as_str, bool: _as_bool}
