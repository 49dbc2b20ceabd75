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
import dataclasses
import json
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Union

import msgpack

from streamfuse.coerce import build
from streamfuse.errors import InvalidEvent
from streamfuse.readings import MODALITIES, check_reading

MSGPACK = "application/msgpack"
JSON = "application/json"
SCOPES: tuple[str, ...] = ("global", "line", "asset")  # what a KPI, an alert or a command is about
MAX_PAYLOAD_BYTES = 2_000_000  # a value larger than this is ``oversize`` (STREAMFUSE_MAX_PAYLOAD_BYTES)

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
    status: str  # a worker's: applied | rejected | duplicate; replay's lockstep markers: barrier
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
            A Sample's readings are checked separately by :func:`streamfuse.readings.split_bad_readings`, so
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
    event = build(cls, raw, is_json)
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
