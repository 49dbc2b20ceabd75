"""The declarative mapping file: MQTT topics and OPC-UA nodes → asset, modality, format.

One TOML file serves both gateways. Each ``[[mqtt]]`` rule names a topic pattern, each
``[[opcua]]`` rule a node id; both say which asset and modality a message is, how its
payload is encoded, and where its event time comes from::

    mqtt_subscribe = ["plant/#"]   # optional: broader filters; unmatched topics are dead-lettered

    [[mqtt]]
    topic = "plant/{line}/{asset}/camera"   # {name} captures one level (MQTT's +)
    modality = "image"
    format = "image"               # JPEG or PNG bytes
    # asset = "{asset}" and line = "{line}" are implied by the captures

    [[mqtt]]
    topic = "plant/{line}/{asset}/vibration"
    modality = "series"
    format = "json"                # {"ts_ms": ..., "data": [floats] or base64 float32}
    time = "payload"               # the event time is the payload's ts_ms field

    [[opcua]]
    node = "ns=2;s=Press1.Microphone"
    asset = "press-1"
    modality = "audio"
    format = "pcm16"
    sample_rate = 16000
    time = "source"                # the value's SourceTimestamp

Formats: ``image`` (JPEG/PNG bytes), ``pcm16`` (PCM16 little-endian; ``sample_rate`` and
``channels`` from the rule), ``float32`` (float32 little-endian bytes, or numbers from
OPC-UA; optional ``shape``), ``json`` (an object whose ``data_field`` holds base64 bytes
or, for series, a list of numbers; ``sample_rate``, ``channels`` and ``shape`` fields
override the rule's). Times: ``arrival`` (the gateway's receive time, marked as such on
the event), ``payload`` (a JSON field, ``time_field``, in ``time_unit`` ms or s), ``property`` (an
MQTT 5 user property named ``time_field``, for binary payloads),
``source`` / ``server`` (OPC-UA timestamps).

Pure logic: no I/O except :func:`load_mapping` reading the file.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streamfuse.errors import ConfigError
from streamfuse.events import MODALITIES

FORMATS = ("image", "pcm16", "float32", "json")
MQTT_TIMES = ("arrival", "payload", "property")
OPCUA_TIMES = ("source", "server", "arrival")
_CAPTURE = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]*)\}$")
_TEMPLATE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_RULE_KEYS = {"topic", "node", "asset", "line", "modality", "format", "time", "time_field", "time_unit",
              "data_field", "sample_rate", "channels", "shape", "sampling_interval_ms", "queue_size", "period_ms"}


@dataclass(frozen=True)
class TopicPattern:
    """An MQTT topic pattern with named one-level captures.

    Examples:
        >>> p = TopicPattern.parse("plant/{line}/{asset}/camera")
        >>> p.filter, p.names
        ('plant/+/+/camera', ('line', 'asset'))
        >>> p.match("plant/line-0/press-1/camera")
        {'line': 'line-0', 'asset': 'press-1'}
        >>> p.match("plant/line-0/press-1/microphone") is None
        True
        >>> TopicPattern.parse("site/+/#").match("site/a/b/c")
        {}
    """

    pattern: str
    levels: tuple[str, ...]
    names: tuple[str, ...]

    @classmethod
    def parse(cls, pattern: str) -> TopicPattern:
        levels = tuple(pattern.split("/"))
        names = []
        for i, level in enumerate(levels):
            m = _CAPTURE.match(level)
            if m:
                names.append(m.group(1))
            elif level == "#" and i != len(levels) - 1:
                raise ConfigError(f"topic pattern {pattern!r}: '#' must be the last level")
            elif level not in ("+", "#") and any(c in level for c in "+#{}"):
                raise ConfigError(f"topic pattern {pattern!r}: level {level!r} mixes text and a wildcard; "
                                  "use a whole level: '+', '#' or '{name}'")
        if len(set(names)) != len(names):
            raise ConfigError(f"topic pattern {pattern!r} captures a name twice")
        return cls(pattern, levels, tuple(names))

    @property
    def filter(self) -> str:
        """The MQTT subscription filter (captures become ``+``)."""
        return "/".join("+" if _CAPTURE.match(lv) else lv for lv in self.levels)

    def match(self, topic: str) -> dict[str, str] | None:
        """The captures if ``topic`` matches, else None."""
        parts = topic.split("/")
        out: dict[str, str] = {}
        for i, level in enumerate(self.levels):
            if level == "#":
                return out
            if i >= len(parts):
                return None
            m = _CAPTURE.match(level)
            if m:
                out[m.group(1)] = parts[i]
            elif level != "+" and level != parts[i]:
                return None
        return out if len(parts) == len(self.levels) else None


def filter_covers(a: str, b: str) -> bool:
    """Whether every topic that MQTT filter ``b`` matches also matches filter ``a``.

    Examples:
        >>> filter_covers("plant/#", "plant/+/camera"), filter_covers("plant/+/camera", "plant/#")
        (True, False)
        >>> filter_covers("plant/+/camera", "plant/l1/camera"), filter_covers("a/+", "a/b/c")
        (True, False)
    """
    la, lb = a.split("/"), b.split("/")
    for i, level in enumerate(la):
        if level == "#":
            return True
        if i >= len(lb) or lb[i] == "#" or (level != "+" and level != lb[i]) or (level == "+" and lb[i] == "#"):
            return False
    return len(la) == len(lb)


@dataclass(frozen=True)
class Rule:
    """One mapping rule (see the module docstring for the keys)."""

    source: str  # an MQTT topic pattern or an OPC-UA node id
    modality: str
    format: str
    asset: str  # literal, or a template of the topic's captures: "{asset}"
    line: str = ""
    time: str = "arrival"
    time_field: str = "ts_ms"
    time_unit: str = "ms"
    data_field: str = "data"
    sample_rate: int | None = None
    channels: int | None = None
    shape: tuple[int, ...] | None = None
    sampling_interval_ms: float | None = None  # OPC-UA: overrides the setting
    queue_size: int | None = None  # OPC-UA: overrides the setting
    period_ms: float | None = None  # OPC-UA: how often the value changes (to size gaps)
    pattern: TopicPattern | None = field(default=None, compare=False)

    def fill(self, template: str, captures: dict[str, str]) -> str:
        """``template`` with the topic's captures filled in."""
        return _TEMPLATE.sub(lambda m: captures.get(m.group(1), ""), template)


@dataclass(frozen=True)
class Mapping:
    """Every rule of a mapping file; first match wins."""

    mqtt: tuple[Rule, ...] = ()
    opcua: tuple[Rule, ...] = ()
    mqtt_subscribe: tuple[str, ...] = ()  # extra (broader) MQTT filters

    @property
    def mqtt_filters(self) -> tuple[str, ...]:
        """The filters to subscribe to, leaving out those another one covers: a broker
        delivers a message once per matching subscription (Mosquitto does)."""
        wanted = list(dict.fromkeys([*self.mqtt_subscribe, *(r.pattern.filter for r in self.mqtt)]))
        return tuple(f for i, f in enumerate(wanted)
                     if not any(filter_covers(g, f) and (not filter_covers(f, g) or j < i)
                                for j, g in enumerate(wanted) if j != i))

    def match_topic(self, topic: str) -> tuple[Rule, dict[str, str]] | None:
        """The first MQTT rule matching ``topic`` and its captures, or None."""
        for r in self.mqtt:
            captures = r.pattern.match(topic)
            if captures is not None:
                return r, captures
        return None

    def node_rules(self) -> dict[str, Rule]:
        return {r.source: r for r in self.opcua}


def load_mapping(path: Path | str) -> Mapping:
    """Read and validate a mapping file.

    Raises:
        ConfigError: the file is missing, is not TOML, or a rule is invalid; the message
            names the file, the rule and the key.
    """
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"mapping file {path} does not exist; set STREAMFUSE_INGEST__MAPPING or --mapping") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"mapping file {path} is not valid TOML: {exc}") from None
    return parse_mapping(raw, str(path))


def parse_mapping(raw: dict[str, Any], where: str = "mapping") -> Mapping:
    """Build a :class:`Mapping` from the parsed TOML.

    Examples:
        >>> m = parse_mapping({"mqtt": [{"topic": "p/{asset}/cam", "modality": "image", "format": "image"}]})
        >>> rule, caps = m.match_topic("p/a1/cam")
        >>> rule.fill(rule.asset, caps), rule.time
        ('a1', 'arrival')
        >>> parse_mapping({"mqtt": [{"topic": "p/cam", "modality": "smell", "format": "image"}]})
        Traceback (most recent call last):
        ...
        streamfuse.errors.ConfigError: mapping mqtt rule 1 (p/cam): modality 'smell'; expected one of image, audio, series
    """
    unknown = set(raw) - {"mqtt", "opcua", "mqtt_subscribe"}
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; expected mqtt_subscribe, [[mqtt]] "
                          "and [[opcua]] rules")
    sections = {}
    for name in ("mqtt", "opcua"):
        rules = raw.get(name, [])
        if not isinstance(rules, list) or not all(isinstance(r, dict) for r in rules):
            raise ConfigError(f"{where}: {name} rules must be [[{name}]] tables")
        sections[name] = tuple(_rule(r, f"{where} {name} rule {i + 1}", name) for i, r in enumerate(rules))
    subscribe = raw.get("mqtt_subscribe", [])
    if not isinstance(subscribe, list) or not all(isinstance(f, str) for f in subscribe):
        raise ConfigError(f"{where}: mqtt_subscribe must be a list of MQTT topic filters")
    for f in subscribe:
        _pattern(f, f"{where} mqtt_subscribe")
    out = Mapping(sections["mqtt"], sections["opcua"], tuple(subscribe))
    nodes = [r.source for r in out.opcua]
    if len(set(nodes)) != len(nodes):
        raise ConfigError(f"{where}: an OPC-UA node is mapped twice: {sorted(n for n in nodes if nodes.count(n) > 1)}")
    if not out.mqtt and not out.opcua:
        raise ConfigError(f"{where} has no rules: add [[mqtt]] or [[opcua]] tables")
    return out


def _rule(raw: dict[str, Any], where: str, kind: str) -> Rule:
    key = "topic" if kind == "mqtt" else "node"
    src = raw.get(key)
    if not isinstance(src, str) or not src:
        raise ConfigError(f"{where}: needs a '{key}' string")
    where = f"{where} ({src})"
    unknown = set(raw) - _RULE_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; known: {', '.join(sorted(_RULE_KEYS))}")
    pattern = _pattern(src, where) if kind == "mqtt" else None
    default_asset = "{asset}" if pattern is not None and "asset" in pattern.names else None
    default_line = "{line}" if pattern is not None and "line" in pattern.names else ""
    times = MQTT_TIMES if kind == "mqtt" else OPCUA_TIMES
    rule = Rule(
        source=src,
        modality=_choice(raw, "modality", MODALITIES, where, None),
        format=_choice(raw, "format", FORMATS, where, None),
        asset=_text(raw, "asset", where, default_asset),
        line=_text(raw, "line", where, default_line),
        time=_choice(raw, "time", times, where, times[0]),
        time_field=_text(raw, "time_field", where, "ts_ms"),
        time_unit=_choice(raw, "time_unit", ("ms", "s"), where, "ms"),
        data_field=_text(raw, "data_field", where, "data"),
        sample_rate=_int(raw, "sample_rate", where),
        channels=_int(raw, "channels", where),
        shape=_shape(raw.get("shape"), where),
        sampling_interval_ms=_number(raw, "sampling_interval_ms", where),
        queue_size=_int(raw, "queue_size", where),
        period_ms=_number(raw, "period_ms", where),
        pattern=pattern,
    )
    _check_rule(rule, where, pattern)
    return rule


def _pattern(text: str, where: str) -> TopicPattern:
    try:
        return TopicPattern.parse(text)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _check_rule(rule: Rule, where: str, pattern: TopicPattern | None) -> None:
    if rule.time == "payload" and rule.format != "json":
        raise ConfigError(f"{where}: time = 'payload' needs format = 'json' (binary payloads carry no time field)")
    if rule.format == "pcm16" and rule.modality != "audio" or rule.format == "image" and rule.modality != "image":
        raise ConfigError(f"{where}: format {rule.format!r} does not fit modality {rule.modality!r}")
    if rule.format == "pcm16" and rule.sample_rate is None:
        raise ConfigError(f"{where}: format 'pcm16' needs sample_rate (Hz)")
    names = set(_TEMPLATE.findall(rule.asset) + _TEMPLATE.findall(rule.line))
    have = set(pattern.names) if pattern is not None else set()
    if names - have:
        raise ConfigError(f"{where}: asset/line use {sorted(names - have)}, which the topic does not capture")


def _text(raw: dict, key: str, where: str, default: str | None) -> str:
    value = raw.get(key, default)
    if value is None:
        raise ConfigError(f"{where}: needs '{key}'")
    if not isinstance(value, str):
        raise ConfigError(f"{where}: {key} must be a string, got {value!r}")
    return value


def _choice(raw: dict, key: str, options: tuple[str, ...], where: str, default: str | None) -> str:
    value = _text(raw, key, where, default)
    if value not in options:
        raise ConfigError(f"{where}: {key} {value!r}; expected one of {', '.join(options)}")
    return value


def _int(raw: dict, key: str, where: str) -> int | None:
    value = raw.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigError(f"{where}: {key} must be a positive integer, got {value!r}")
    return value


def _number(raw: dict, key: str, where: str) -> float | None:
    value = raw.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
        raise ConfigError(f"{where}: {key} must be a number >= 0, got {value!r}")
    return None if value is None else float(value)


def _shape(value: Any, where: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not value or not all(isinstance(d, int) and d > 0 for d in value):
        raise ConfigError(f"{where}: shape must be a list of positive integers, got {value!r}")
    return tuple(value)
