"""Wire schema and codec.

Every Kafka value is a map with a ``schema`` key (``"sf.sample/1"``...). msgpack is the
default encoding (header ``content-type: application/msgpack``); JSON is accepted too,
with binary payloads base64-encoded, so that ``kcat`` and other plain clients can produce
events. Decoding validates structure and content and raises
:class:`~streamfuse.errors.InvalidEvent` with a reason code from :data:`REASONS`.

Pure logic: no Kafka, no clock.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import json
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Union

import msgpack
import numpy as np

from streamfuse.errors import InvalidEvent

MSGPACK = "application/msgpack"
JSON = "application/json"
MODALITIES: tuple[str, ...] = ("image", "audio", "series")
SCOPES: tuple[str, ...] = ("global", "line", "asset")  # what a KPI, an alert or a command is about
MAX_PAYLOAD_BYTES = 2_000_000  # a value larger than this is ``oversize`` (STREAMFUSE_MAX_PAYLOAD_BYTES)
IMAGE_ENCODINGS = ("jpeg", "png")
MAX_IMAGE_SIDE = 8192
SAMPLE_RATE_RANGE = (1_000, 384_000)
MAX_CHANNELS = 32

# Reason codes (a small fixed set: they are metric labels).
REASONS = (
    "undecodable",
    "unknown_schema",
    "unexpected_schema",
    "missing_field",
    "bad_field",
    "oversize",
    "non_finite",
    "unknown_modality",
    "bad_image",
    "bad_audio",
    "bad_series",
    "no_usable_modality",
    # the synchronizer's: valid readings that joined no sample
    "late_reading",  # its slot had already closed
    "outside_tolerance",  # too far from every slot time
    "extra_reading",  # a second reading of one modality for one slot
    # the plant gateways' (streamfuse.ingest)
    "unmapped",  # no rule of the mapping file matches the MQTT topic / OPC-UA node
    "bad_quality",  # an OPC-UA value whose status is not Good: there is no reading to keep
    "missing_readings",  # a gap (e.g. a server restart): readings that were never received
)


@dataclass(frozen=True, slots=True)
class SensorEvent:
    """One reading of one sensor. ``payload`` is JPEG/PNG, PCM16LE or float32LE bytes."""

    SCHEMA: ClassVar[str] = "sf.sensor/1"
    event_id: str
    asset_id: str
    modality: str
    ts_ms: int
    payload: bytes
    line_id: str = ""
    encoding: str = ""  # image: jpeg | png; audio: pcm16le; series: float32le
    sample_rate: int | None = None  # audio
    channels: int | None = None  # audio
    shape: tuple[int, ...] | None = None  # series
    # Where ts_ms came from, set by gateways: "device" (the sensor's or payload's own time),
    # "server" (an OPC-UA server's), "arrival" (the gateway's receive time: not the sensor's clock).
    time_source: str = ""


@dataclass(frozen=True, slots=True)
class Sample:
    """One synchronized multi-modal sample of one asset; ``missing`` lists absent modalities."""

    SCHEMA: ClassVar[str] = "sf.sample/1"
    sample_id: str
    asset_id: str
    ts_ms: int
    readings: dict[str, SensorEvent]
    line_id: str = ""
    missing: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Prediction:
    """The fused decision for one sample, with every modality's own view of it."""

    SCHEMA: ClassVar[str] = "sf.prediction/1"
    sample_id: str
    asset_id: str
    ts_ms: int  # the sample's event time
    classes: tuple[str, ...]
    fused_probs: tuple[float, ...]
    fused_label: str
    fusion_mode: str
    modality_probs: dict[str, tuple[float, ...]]
    line_id: str = ""
    missing: tuple[str, ...] = ()  # absent or undecodable; not computed
    masked: tuple[str, ...] = ()  # computed (shadow) but left out of the fusion
    contributions: dict[str, float] = field(default_factory=dict)  # leave-one-out shares, sum to 1
    shapley: dict[str, float] = field(default_factory=dict)  # exact Shapley values (<= 4 modalities)
    confidence: dict[str, float] = field(default_factory=dict)  # each modality's max probability
    entropy: dict[str, float] = field(default_factory=dict)  # each modality's entropy, nats
    agreement: dict[str, bool] = field(default_factory=dict)  # modality label == fused label
    signal_std: dict[str, float] = field(default_factory=dict)  # raw signal spread (sensor health)
    digest: dict[str, int] = field(default_factory=dict)  # CRC-32 of each reading's payload
    skew_ms: dict[str, int] = field(default_factory=dict)  # reading time - sample time
    versions: dict[str, str] = field(default_factory=dict)  # modality / "fusion" -> version
    worker_id: str = ""
    produced_ms: int = 0
    latency_ms: float = 0.0  # time in the worker: queue wait + compute


@dataclass(frozen=True, slots=True)
class Label:
    """Ground truth for a sample; arrives late, joins by ``sample_id``."""

    SCHEMA: ClassVar[str] = "sf.label/1"
    sample_id: str
    asset_id: str
    ts_ms: int
    label: str
    line_id: str = ""


@dataclass(frozen=True, slots=True)
class KpiSnapshot:
    """Rolling KPIs of one (scope, modality) over one event-time window."""

    SCHEMA: ClassVar[str] = "sf.kpi/1"
    scope: str  # global | line | asset
    scope_id: str  # "" for global
    modality: str  # a modality, or "fused"
    window_start_ms: int
    window_end_ms: int
    n: int
    n_labelled: int = 0
    n_correct: int = 0
    n_truth_classes: int = 0  # distinct true classes among the labelled samples
    truth_counts: dict[str, int] = field(default_factory=dict)  # labelled samples per true class
    n_right_classes: int = 0  # distinct true classes it answered right (a stuck model: at most one)
    accuracy: float | None = None
    accuracy_low: float | None = None  # Wilson bound
    accuracy_high: float | None = None
    macro_f1: float | None = None
    agreement: float | None = None  # with the fused label
    mean_confidence: float | None = None
    mean_entropy: float | None = None
    mean_contribution: float | None = None
    dominance: float | None = None  # fused label follows this modality while another disagrees
    missing_rate: float = 0.0
    masked_rate: float = 0.0
    n_flat: int = 0  # readings with a flat signal
    n_stuck: int = 0  # readings identical to the asset's previous one
    n_missing: int = 0
    mean_abs_skew_ms: float | None = None  # |reading time - sample time|
    # Fused only: the best single modality or UME on the same labelled samples (paired).
    ref_modality: str = ""
    ref_n: int = 0
    ref_correct: int = 0
    ref_fused_correct: int = 0
    ref_discordant: int = 0  # exactly one of fused and reference right
    mean_latency_ms: float | None = None
    # label-free: mean over the window's samples of P(right | agreement category), calibrated
    # on the validation split (streamfuse.monitor.evidence); known before any label arrives
    est_accuracy: float | None = None
    est_n: int = 0


@dataclass(frozen=True, slots=True)
class Alert:
    """A firing or resolved alert; ``fingerprint`` is stable over the alert's life."""

    SCHEMA: ClassVar[str] = "sf.alert/1"
    fingerprint: str
    alert_id: str  # one firing episode: fingerprint + start
    status: str  # firing | resolved
    kind: str  # degradation | ...
    severity: str  # info | warning | critical
    modality: str
    scope: str
    scope_id: str
    starts_ms: int
    event_ms: int  # event time at which this status was decided
    summary: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    value: float | None = None
    threshold: float | None = None
    ends_ms: int | None = None


@dataclass(frozen=True, slots=True)
class Command:
    """An instruction to every inference worker; idempotent by ``command_id``."""

    SCHEMA: ClassVar[str] = "sf.command/1"
    command_id: str
    action: str
    issued_ms: int
    modality: str | None = None
    version: str | None = None
    fusion_mode: str | None = None
    alert_id: str | None = None
    reason: str = ""
    scope: str = "global"  # mask / unmask apply to: global | line | asset
    scope_id: str = ""  # the line or asset id

    ACTIONS: ClassVar[tuple[str, ...]] = (
        "mask_modality",
        "unmask_modality",
        "rollback_model",
        "activate_model",
        "rollback_fusion",
        "set_fusion_mode",
    )


@dataclass(frozen=True, slots=True)
class Ack:
    """A worker's answer to a command, with its resulting state."""

    SCHEMA: ClassVar[str] = "sf.ack/1"
    command_id: str
    worker_id: str
    status: str  # applied | rejected | duplicate
    ts_ms: int
    reason: str = ""
    masked: tuple[str, ...] = ()
    versions: dict[str, str] = field(default_factory=dict)
    fusion_mode: str = ""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A rejected input, with the original bytes and why it was rejected."""

    SCHEMA: ClassVar[str] = "sf.deadletter/1"
    reason: str
    detail: str
    source_topic: str
    original: bytes
    component: str
    ts_ms: int
    partition: int = -1
    offset: int = -1
    key: bytes | None = None
    content_type: str = ""
    modality: str | None = None


DEAD_LETTER_KEEP_BYTES = 64 * 1024  # an oversized original keeps this much in its dead letter


def dead_letter_original(data: bytes | None, keep: int = DEAD_LETTER_KEEP_BYTES) -> tuple[bytes, str]:
    """The bytes a dead letter keeps of a rejected value, and a note for its detail.

    A value larger than ``keep`` is cut to its first ``keep`` bytes, so that a 8 MB poison
    record never makes an 8 MB dead letter (which could exceed the broker's limit and
    block the topic); the note gives the original size.

    Examples:
        >>> dead_letter_original(b"abc")
        (b'abc', '')
        >>> copy, note = dead_letter_original(b"x" * 10, keep=4)
        >>> copy, note
        (b'xxxx', '; original 10 bytes, first 4 kept')
    """
    data = data or b""
    if len(data) <= keep:
        return data, ""
    return data[:keep], f"; original {len(data)} bytes, first {keep} kept"


Event = Union[SensorEvent, Sample, Prediction, Label, KpiSnapshot, Alert, Command, Ack, DeadLetter]
_EVENT_CLASSES = frozenset(typing.get_args(Event))
SCHEMAS: dict[str, type] = {
    cls.SCHEMA: cls
    for cls in (SensorEvent, Sample, Prediction, Label, KpiSnapshot, Alert, Command, Ack, DeadLetter)
}


# ---------------------------------------------------------------------------- encode


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def to_map(event: Event) -> dict[str, Any]:
    """The event as a plain map, ``schema`` first."""
    cls = type(event)
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = _FIELD_NAMES[cls] = tuple(f.name for f in dataclasses.fields(cls))
    out: dict[str, Any] = {"schema": event.SCHEMA}
    for name in names:
        value = getattr(event, name)
        if type(value) in _EVENT_CLASSES:
            value = to_map(value)
        elif type(value) is dict:
            value = {k: to_map(v) if type(v) in _EVENT_CLASSES else v for k, v in value.items()}
        out[name] = value
    return out


def encode(event: Event) -> bytes:
    """msgpack bytes of ``event`` (send with header ``content-type: application/msgpack``)."""
    return msgpack.packb(to_map(event), use_bin_type=True)


def encode_json(event: Event) -> bytes:
    """JSON bytes of ``event``; ``bytes`` fields become base64 strings."""

    def default(o: Any) -> Any:
        if isinstance(o, bytes):
            return base64.b64encode(o).decode("ascii")
        raise TypeError(type(o).__name__)

    return json.dumps(to_map(event), default=default, separators=(",", ":")).encode()


# Header on a sample: a worker cutting stream batches ends the batch after this record
# (replays mark the last sample before each wait; see streamfuse.inference.feeder).
BATCH_END = "sf-batch-end"


def headers(content_type: str = MSGPACK) -> list[tuple[str, bytes]]:
    return [("content-type", content_type.encode())]


def content_type_of(hdrs: list[tuple[str, bytes]] | dict[str, bytes] | None) -> str:
    """The ``content-type`` header from Kafka headers (a list of pairs, or faust's mapping)."""
    pairs = hdrs.items() if isinstance(hdrs, dict) else hdrs or ()
    for k, v in pairs:
        if k.lower() == "content-type":
            return v.decode("latin-1")
    return ""


# ---------------------------------------------------------------------------- decode


def decode(
    data: bytes,
    content_type: str = "",
    *,
    expect: type | tuple[type, ...] | None = None,
    max_bytes: int = MAX_PAYLOAD_BYTES,
    check_payloads: bool = True,
) -> Event:
    """Decode and validate one Kafka value.

    Args:
        data: the raw value.
        content_type: the ``content-type`` header; empty means sniff (JSON starts with ``{``).
        expect: the event class(es) this topic carries; others are ``unexpected_schema``.
        max_bytes: values larger than this are ``oversize``.
        check_payloads: validate sensor payloads (image decodes, audio rate, finite series).
            A Sample's readings are checked separately by :func:`split_bad_readings`, so
            that one bad reading does not reject the whole sample.

    Returns:
        The typed event.

    Raises:
        InvalidEvent: with a reason from :data:`REASONS`.
    """
    if data is None:
        raise InvalidEvent("undecodable", "empty value (tombstone)")
    if len(data) > max_bytes:
        raise InvalidEvent("oversize", f"{len(data)} bytes > limit {max_bytes}")
    is_json = JSON in content_type or (not content_type and data[:1] in (b"{", b" ", b"\n"))
    try:
        raw = json.loads(data) if is_json else msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # any parser error means the bytes are not an event
        fmt = "JSON" if is_json else "msgpack"
        raise InvalidEvent("undecodable", f"not valid {fmt}: {exc}") from None
    if not isinstance(raw, dict):
        raise InvalidEvent("undecodable", f"expected a map, got {type(raw).__name__}")
    schema = raw.get("schema")
    cls = SCHEMAS.get(schema) if isinstance(schema, str) else None
    if cls is None:
        raise InvalidEvent("unknown_schema", f"schema {schema!r}; known: {', '.join(SCHEMAS)}")
    if expect is not None and not issubclass(cls, expect):
        names = ", ".join(c.SCHEMA for c in (expect if isinstance(expect, tuple) else (expect,)))
        raise InvalidEvent("unexpected_schema", f"{schema} on a topic that carries {names}")
    event = _build(cls, raw, is_json)
    if check_payloads and isinstance(event, SensorEvent):
        check_reading(event)
    if isinstance(event, Prediction):
        _check_prediction(event)
    return event


def _check_prediction(p: Prediction) -> None:
    n = len(p.classes)
    if n == 0:
        raise InvalidEvent("bad_field", "prediction has no classes")
    for name, probs in (("fused_probs", p.fused_probs), *((f"modality_probs.{m}", v) for m, v in
                                                        p.modality_probs.items())):
        if len(probs) != n:
            raise InvalidEvent("bad_field", f"{name} has {len(probs)} values for {n} classes")


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


def _build(cls: type, raw: dict, is_json: bool) -> Any:
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
        item = _coercer(args[0])

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
    if origin is dict:
        key, val = _coercer(args[0]), _coercer(args[1])

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
    if dataclasses.is_dataclass(hint):
        def as_event(value: Any, is_json: bool) -> Any:
            if not isinstance(value, dict):
                raise _Bad("bad_field", f"{{where}}: expected a map, got {type(value).__name__}")
            return _builder(hint)(value, is_json)

        return as_event
    try:
        return _SCALARS[hint]
    except KeyError:
        raise TypeError(f"no coercion for {hint!r}") from None  # a bug in the schema, not in the input


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


# ---------------------------------------------------------------------------- payloads


def check_reading(ev: SensorEvent, max_bytes: int | None = None, decode: bool = True) -> None:
    """Validate a reading's payload against its modality.

    Args:
        ev: the reading.
        max_bytes: payloads larger than this are ``oversize``.
        decode: decode image bodies (catches truncated and corrupt ones). A consumer that
            decodes every image anyway (the worker, in one batch) checks headers only and
            sets aside the bodies that fail there, so each image is decoded once.

    Raises:
        InvalidEvent: ``unknown_modality``, ``oversize``, ``bad_image``, ``bad_audio``,
            ``bad_series`` or ``non_finite``, with ``modality`` set.
    """
    m = ev.modality
    if m not in MODALITIES:
        raise InvalidEvent("unknown_modality", f"{m!r}; known: {', '.join(MODALITIES)}", m)
    if max_bytes is not None and len(ev.payload) > max_bytes:
        raise InvalidEvent("oversize", f"{m} payload {len(ev.payload)} bytes > {max_bytes}", m)
    if m == "image":
        _check_image(ev) if decode else _check_image_header(ev.payload)
    elif m == "audio":
        _check_audio(ev)
    else:
        _check_series(ev)


def image_size(data: bytes) -> tuple[int, int] | None:
    r"""``(width, height)`` from a JPEG's frame header or a PNG's IHDR; None if there is none.

    Reads headers only (microseconds), for a check before anything is decoded.

    Examples:
        >>> png = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\x0dIHDR" + (640).to_bytes(4, "big") + (480).to_bytes(4, "big")
        >>> image_size(png)
        (640, 480)
        >>> sof = b"\xff\xc0\x00\x11\x08" + (480).to_bytes(2, "big") + (640).to_bytes(2, "big")
        >>> image_size(b"\xff\xd8" + b"\xff\xe0\x00\x04ab" + sof)
        (640, 480)
        >>> image_size(b"\xff\xd8\xff\xda\x00\x02") is None  # scan data before any frame header
        True
    """
    if data.startswith(PNG_MAGIC):
        if len(data) < 24 or data[12:16] != b"IHDR":
            return None
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if not data.startswith(b"\xff\xd8"):
        return None
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length
            i += 2
            continue
        if marker in _JPEG_FRAMES:
            if i + 9 > n:
                return None
            return int.from_bytes(data[i + 7 : i + 9], "big"), int.from_bytes(data[i + 5 : i + 7], "big")
        if marker in (0xD9, 0xDA):  # end of image, start of scan: no frame header came first
            return None
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return None


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_FRAMES = frozenset((0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF))


def _check_image_header(data: bytes) -> None:
    if not (data.startswith(b"\xff\xd8\xff") or data.startswith(PNG_MAGIC)):
        raise InvalidEvent("bad_image", f"payload ({len(data)} bytes) is neither JPEG nor PNG", "image")
    size = image_size(data)
    if size is None:
        raise InvalidEvent("bad_image", f"image does not decode: no frame header in {len(data)} bytes", "image")
    w, h = size
    if not (0 < w <= MAX_IMAGE_SIDE and 0 < h <= MAX_IMAGE_SIDE):
        raise InvalidEvent("bad_image", f"image size {w}x{h} outside 1..{MAX_IMAGE_SIDE}", "image")


def _check_image(ev: SensorEvent) -> None:
    from PIL import Image, UnidentifiedImageError

    data = ev.payload
    _check_image_header(data)  # before decoding: a tiny file can claim a huge image
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # decodes fully: catches truncated and corrupt bodies
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as exc:
        raise InvalidEvent("bad_image", f"image does not decode: {exc}", "image") from None


def _check_audio(ev: SensorEvent) -> None:
    lo, hi = SAMPLE_RATE_RANGE
    if ev.sample_rate is None or not lo <= ev.sample_rate <= hi:
        raise InvalidEvent("bad_audio", f"sample_rate {ev.sample_rate} outside {lo}..{hi} Hz", "audio")
    ch = ev.channels if ev.channels is not None else 1
    if not 1 <= ch <= MAX_CHANNELS:
        raise InvalidEvent("bad_audio", f"channels {ch} outside 1..{MAX_CHANNELS}", "audio")
    if ev.encoding not in ("", "pcm16le"):
        raise InvalidEvent("bad_audio", f"encoding {ev.encoding!r}; only pcm16le", "audio")
    if not ev.payload or len(ev.payload) % (2 * ch):
        raise InvalidEvent(
            "bad_audio", f"{len(ev.payload)} bytes is not a whole number of {ch}-channel PCM16 frames", "audio"
        )


def _check_series(ev: SensorEvent) -> None:
    if ev.encoding not in ("", "float32le"):
        raise InvalidEvent("bad_series", f"encoding {ev.encoding!r}; only float32le", "series")
    n = len(ev.payload) // 4
    if not ev.payload or len(ev.payload) % 4:
        raise InvalidEvent("bad_series", f"{len(ev.payload)} bytes is not a float32 array", "series")
    if ev.shape is not None and (any(d <= 0 for d in ev.shape) or math.prod(ev.shape) != n):
        raise InvalidEvent("bad_series", f"shape {list(ev.shape)} does not match {n} values", "series")
    arr = np.frombuffer(ev.payload, dtype="<f4")
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        raise InvalidEvent("non_finite", f"series has {bad} NaN/inf values", "series")


def split_bad_readings(sample: Sample, max_bytes: int | None = None,
                       decode: bool = True) -> tuple[Sample, list[InvalidEvent]]:
    """Check every reading; bad ones are removed and marked missing.

    Args:
        sample: the sample.
        max_bytes: payloads larger than this are ``oversize``.
        decode: see :func:`check_reading`.

    Returns:
        The sample with only valid readings (bad modalities added to ``missing``) and the
        errors, each with ``modality`` set, for the dead-letter topic.
    """
    errors: list[InvalidEvent] = []
    good: dict[str, SensorEvent] = {}
    for name, ev in sample.readings.items():
        try:
            if name != ev.modality:
                raise InvalidEvent("bad_field", f"reading under {name!r} has modality {ev.modality!r}", name)
            check_reading(ev, max_bytes, decode)
        except InvalidEvent as exc:
            exc.modality = exc.modality or name
            errors.append(exc)
        else:
            good[name] = ev
    if not errors:
        return sample, errors
    missing = tuple(sorted(set(sample.missing) | (set(sample.readings) - set(good))))
    return dataclasses.replace(sample, readings=good, missing=missing), errors
