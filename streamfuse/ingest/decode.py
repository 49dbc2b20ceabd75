"""Gateway messages → :class:`~streamfuse.events.SensorEvent`, by a mapping rule.

Pure logic: the adapters pass the payload, the rule and the times they read; nothing
here does I/O or reads the clock. A payload that does not fit its rule raises
:class:`~streamfuse.errors.InvalidEvent` with a reason from
:data:`streamfuse.events.REASONS`, for the dead-letter topic.

Event ids are derived from the message (source, payload, event time), so a message the
MQTT broker delivers twice (after a gateway crash, before its ack) becomes two events
with one id, which the synchronizer counts and drops as a duplicate.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
from typing import Any

import numpy as np

from streamfuse.errors import InvalidEvent
from streamfuse.events import SensorEvent
from streamfuse.ingest.mapping import Rule
from streamfuse.readings import check_reading

TIME_SOURCE = {"arrival": "arrival", "payload": "device", "property": "device", "source": "device", "server": "server"}
MAX_ID_LEN = 200


def event_id(source: str, payload: bytes, ts_ms: int) -> str:
    """A stable id for one message: the same bytes on the same topic at the same time.

    Examples:
        >>> event_id("plant/a1/cam", b"xyz", 1000) == event_id("plant/a1/cam", b"xyz", 1000)
        True
        >>> event_id("plant/a1/cam", b"xyz", 1000) == event_id("plant/a1/cam", b"xyz", 1001)
        False
    """
    h = hashlib.blake2b(digest_size=12)
    h.update(source.encode())
    h.update(b"\0")
    h.update(payload)
    h.update(b"\0%d" % ts_ms)
    return h.hexdigest()


def to_event(rule: Rule, captures: dict[str, str], source: str, payload: Any, *, arrival_ms: int,
             device_ms: int | None = None, server_ms: int | None = None, max_bytes: int | None = None,
             properties: dict[str, str] | None = None) -> SensorEvent:
    """Build and validate the sensor event for one message.

    Args:
        rule: the matching mapping rule.
        captures: the topic's captures (``{}`` for OPC-UA).
        source: the MQTT topic or OPC-UA node id (for the event id and messages).
        payload: MQTT bytes, or an OPC-UA value (bytes, a number, a list of numbers, a string).
        arrival_ms: when the gateway received it (epoch ms).
        device_ms / server_ms: OPC-UA source / server timestamps, if the server sent them.
        max_bytes: payloads larger than this are ``oversize``.
        properties: MQTT 5 user properties (for ``time = "property"``).

    Returns:
        A validated event; ``time_source`` says where ``ts_ms`` came from.

    Raises:
        InvalidEvent: ``undecodable``, ``missing_field``, ``bad_field``, ``oversize`` or a
            payload check's reason (``bad_image``, ``bad_audio``, ``bad_series``, ``non_finite``).

    Examples:
        >>> from streamfuse.ingest.mapping import parse_mapping
        >>> m = parse_mapping({"mqtt": [{"topic": "p/{asset}/vib", "modality": "series", "format": "json",
        ...                              "time": "payload"}]})
        >>> rule, caps = m.match_topic("p/a1/vib")
        >>> ev = to_event(rule, caps, "p/a1/vib", b'{"ts_ms": 1500, "data": [0.5, 1.5]}', arrival_ms=9999)
        >>> ev.asset_id, ev.ts_ms, ev.time_source, ev.shape
        ('a1', 1500, 'device', (2,))
        >>> to_event(rule, caps, "p/a1/vib", b'{"data": [0.5]}', arrival_ms=9999)
        Traceback (most recent call last):
        ...
        streamfuse.errors.InvalidEvent: missing_field: p/a1/vib: JSON payload has no time field 'ts_ms'
    """
    asset = rule.fill(rule.asset, captures)
    if not asset or len(asset) > MAX_ID_LEN:
        raise InvalidEvent("bad_field", f"{source}: asset id {asset!r} is empty or too long", rule.modality)
    fields: dict[str, Any] = {"sample_rate": rule.sample_rate, "channels": rule.channels, "shape": rule.shape}
    stamps = {"arrival": arrival_ms, "source": device_ms, "server": server_ms}
    body, ts = _body_and_time(rule, source, payload, fields, stamps, properties or {})
    if max_bytes is not None and len(body) > max_bytes:
        raise InvalidEvent("oversize", f"{source}: payload {len(body)} bytes > {max_bytes}", rule.modality)
    ev = _build(rule, asset, rule.fill(rule.line, captures), source, body, ts, fields)
    check_reading(ev, max_bytes, decode=False)  # image bodies are decoded once, by the worker
    return ev


def _body_and_time(rule: Rule, source: str, payload: Any, fields: dict, stamps: dict[str, int | None],
                   properties: dict[str, str]) -> tuple[bytes, int]:
    """The reading's bytes, and its event time from where the rule says (``rule.time``)."""
    ts = stamps.get(rule.time)
    if rule.format == "json":
        body, ts_payload = _json_body(rule, source, payload, fields)
        if rule.time == "payload":
            ts = ts_payload
    else:
        body = _binary_body(rule, source, payload)
    if rule.time == "property":
        ts = _property_time(rule, source, properties)
    if ts is None:
        raise InvalidEvent("missing_field", f"{source}: no {rule.time} timestamp on the value", rule.modality)
    return body, int(ts)


def _build(rule: Rule, asset: str, line: str, source: str, body: bytes, ts: int, fields: dict) -> SensorEvent:
    m = rule.modality
    encoding, shape = "", None
    if m == "image":
        encoding = "png" if body.startswith(b"\x89PNG") else "jpeg"
    elif m == "audio":
        encoding = "pcm16le"
    else:
        encoding = "float32le"
        shape = tuple(fields["shape"]) if fields["shape"] else (len(body) // 4,)
    return SensorEvent(event_id(source, body, ts), asset, m, ts, body, line_id=line, encoding=encoding,
                       sample_rate=fields["sample_rate"] if m == "audio" else None,
                       channels=(fields["channels"] or 1) if m == "audio" else None, shape=shape,
                       time_source=TIME_SOURCE[rule.time])


def _binary_body(rule: Rule, source: str, payload: Any) -> bytes:
    if isinstance(payload, (bytes, bytearray, memoryview)):
        return bytes(payload)
    if rule.format == "float32" and _is_numbers(payload):
        return _floats(payload, source, rule.modality)
    raise InvalidEvent("undecodable", f"{source}: a {type(payload).__name__} value where format "
                       f"{rule.format!r} expects bytes", rule.modality)


def _json_body(rule: Rule, source: str, payload: Any, fields: dict) -> tuple[bytes, int | None]:
    m = rule.modality
    try:
        obj = json.loads(payload)
    except (ValueError, TypeError) as exc:
        raise InvalidEvent("undecodable", f"{source}: payload is not JSON: {exc}", m) from None
    if not isinstance(obj, dict):
        raise InvalidEvent("undecodable", f"{source}: JSON payload is a {type(obj).__name__}, not an object", m)
    data = obj.get(rule.data_field)
    if data is None:
        raise InvalidEvent("missing_field", f"{source}: JSON payload has no field {rule.data_field!r}", m)
    if isinstance(data, str):
        try:
            body = base64.b64decode(data, validate=True)
        except binascii.Error:
            raise InvalidEvent("bad_field", f"{source}: {rule.data_field} is not valid base64", m) from None
    elif m == "series" and _is_numbers(data):
        body = _floats(data, source, m)
    else:
        raise InvalidEvent("bad_field", f"{source}: {rule.data_field} must be base64 text"
                           + (" or a list of numbers" if m == "series" else ""), m)
    for key in ("sample_rate", "channels"):
        if key in obj:
            if isinstance(obj[key], bool) or not isinstance(obj[key], int):
                raise InvalidEvent("bad_field", f"{source}: {key} must be an integer, got {obj[key]!r}", m)
            fields[key] = obj[key]
    if "shape" in obj:
        if not isinstance(obj["shape"], list) or not all(isinstance(d, int) and d > 0 for d in obj["shape"]):
            raise InvalidEvent("bad_field", f"{source}: shape must be a list of positive integers", m)
        fields["shape"] = tuple(obj["shape"])
    return body, (_payload_time(rule, source, obj) if rule.time == "payload" else None)


def _payload_time(rule: Rule, source: str, obj: dict) -> int:
    value = obj.get(rule.time_field)
    if value is None:
        raise InvalidEvent("missing_field", f"{source}: JSON payload has no time field {rule.time_field!r}",
                           rule.modality)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidEvent("bad_field", f"{source}: {rule.time_field} must be a number, got {value!r}", rule.modality)
    ms = value * 1000 if rule.time_unit == "s" else value
    if not 0 <= ms < 2**53:
        raise InvalidEvent("bad_field", f"{source}: {rule.time_field}={value!r} is not an epoch time in "
                           f"{rule.time_unit}", rule.modality)
    return int(ms)


def _property_time(rule: Rule, source: str, properties: dict[str, str]) -> int:
    text = properties.get(rule.time_field)
    if text is None:
        raise InvalidEvent("missing_field", f"{source}: no MQTT 5 user property {rule.time_field!r}", rule.modality)
    try:
        value = float(text)
    except ValueError:
        raise InvalidEvent("bad_field", f"{source}: user property {rule.time_field}={text!r} is not a number",
                           rule.modality) from None
    return _payload_time(rule, source, {rule.time_field: value})


def _is_numbers(value: Any) -> bool:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return True
    return isinstance(value, (list, tuple)) and bool(value) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)


def _floats(value: Any, source: str, modality: str) -> bytes:
    arr = np.asarray(value if isinstance(value, (list, tuple)) else [value], dtype="<f8")
    if not np.isfinite(arr).all():
        raise InvalidEvent("non_finite", f"{source}: {int((~np.isfinite(arr)).sum())} NaN/inf values", modality)
    return arr.astype("<f4").tobytes()

