"""Label matchers, severities, silences and inhibition rules (pure: no I/O, no clock).

Matchers follow Alertmanager: ``=`` and ``!=`` compare strings, ``=~`` and ``!~`` match a
regular expression against the *whole* value; a label that is absent has the value ``""``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from streamfuse.alerts.config import DEFAULT_INHIBIT
from streamfuse.alerts.errors import InvalidDuration, InvalidMatcher, InvalidSubscription

SEVERITIES: tuple[str, ...] = ("info", "warning", "critical")
OPS: tuple[str, ...] = ("=~", "!~", "!=", "=")  # longest first: "a!=b" is not "a!" = "b"
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")


def severity_rank(severity: str) -> int:
    """Order of a severity: info 0 < warning 1 < critical 2.

    Raises:
        InvalidSubscription: an unknown severity.

    Examples:
        >>> severity_rank("warning") > severity_rank("info")
        True
    """
    try:
        return SEVERITIES.index(severity)
    except ValueError:
        raise InvalidSubscription(f"unknown severity {severity!r}; use one of {', '.join(SEVERITIES)}") from None


@dataclass(frozen=True)
class Matcher:
    """One label matcher.

    Examples:
        >>> m = Matcher.parse("modality=~image|audio")
        >>> m.matches({"modality": "audio"}), m.matches({"modality": "series"})
        (True, False)
        >>> Matcher.parse("scope_id!=").matches({})
        False
        >>> str(Matcher.parse(" kind = degradation "))
        'kind=degradation'
    """

    name: str
    op: str
    value: str
    _regex: re.Pattern | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise InvalidMatcher(f"{self.name}{self.op}{self.value}", f"label name {self.name!r} is not valid")
        if self.op not in OPS:
            raise InvalidMatcher(f"{self.name}{self.op}{self.value}", f"unknown operator {self.op!r}")
        if self.op in ("=~", "!~"):
            try:
                object.__setattr__(self, "_regex", re.compile(self.value))
            except re.error as exc:
                raise InvalidMatcher(f"{self.name}{self.op}{self.value}", f"bad regular expression: {exc}") from None

    @classmethod
    def parse(cls, text: str) -> "Matcher":
        """Parse ``NAME<op>VALUE``; surrounding spaces and double quotes around VALUE are dropped.

        Raises:
            InvalidMatcher: no operator, a bad label name or a bad regular expression.
        """
        best: tuple[int, str] | None = None
        for op in OPS:
            i = text.find(op)
            if i >= 0 and (best is None or i < best[0] or (i == best[0] and len(op) > len(best[1]))):
                best = (i, op)
        if best is None:
            raise InvalidMatcher(text, "no operator")
        i, op = best
        value = text[i + len(op):].strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        return cls(text[:i].strip(), op, value)

    def matches(self, labels: Mapping[str, str]) -> bool:
        value = labels.get(self.name, "")
        if self.op == "=":
            return value == self.value
        if self.op == "!=":
            return value != self.value
        hit = self._regex.fullmatch(value) is not None  # type: ignore[union-attr]
        return hit if self.op == "=~" else not hit

    def __str__(self) -> str:
        return f"{self.name}{self.op}{self.value}"


def parse_matchers(texts: Iterable[str]) -> tuple[Matcher, ...]:
    """Parse every matcher text (see :meth:`Matcher.parse`)."""
    return tuple(Matcher.parse(t) for t in texts)


def matches_all(matchers: Iterable[Matcher], labels: Mapping[str, str]) -> bool:
    """True when every matcher matches (an empty list matches everything)."""
    return all(m.matches(labels) for m in matchers)


def parse_duration(text: str) -> float:
    """Seconds in a duration like ``90s``, ``30m``, ``2h``, ``1d``, ``1h30m`` or a bare number of seconds.

    Raises:
        InvalidDuration: anything else, or a duration that is not positive.

    Examples:
        >>> parse_duration("2h"), parse_duration("1h30m"), parse_duration("45")
        (7200.0, 5400.0, 45.0)
    """
    s = text.strip().lower()
    try:
        total = float(s)
    except ValueError:
        parts = _DURATION.findall(s)
        if not parts or "".join(n + u for n, u in parts) != s:
            raise InvalidDuration(f"cannot read duration {text!r}; write e.g. 90s, 30m, 2h, 1d or 1h30m") from None
        total = sum(float(n) * _UNITS[u] for n, u in parts)
    if total <= 0:
        raise InvalidDuration(f"duration {text!r} must be positive")
    return total


@dataclass(frozen=True)
class Silence:
    """Mutes every alert whose labels match all ``matchers`` while ``starts_ms <= now < ends_ms``.

    Examples:
        >>> s = Silence("s1", parse_matchers(["modality=audio"]), 0, 7_200_000)
        >>> s.mutes({"modality": "audio"}, now_ms=60_000), s.mutes({"modality": "audio"}, now_ms=7_200_000)
        (True, False)
    """

    id: str
    matchers: tuple[Matcher, ...]
    starts_ms: int
    ends_ms: int
    comment: str = ""
    created_by: str = ""

    def active(self, now_ms: int) -> bool:
        return self.starts_ms <= now_ms < self.ends_ms

    def mutes(self, labels: Mapping[str, str], now_ms: int) -> bool:
        return self.active(now_ms) and matches_all(self.matchers, labels)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "matchers": [str(m) for m in self.matchers], "starts_ms": self.starts_ms,
                "ends_ms": self.ends_ms, "comment": self.comment, "created_by": self.created_by}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Silence":
        return cls(d["id"], parse_matchers(d["matchers"]), int(d["starts_ms"]), int(d["ends_ms"]),
                   d.get("comment", ""), d.get("created_by", ""))


@dataclass(frozen=True)
class InhibitRule:
    """While a firing alert matches ``source``, alerts matching ``target`` with the same values of
    the ``equal`` labels are muted (Alertmanager's ``inhibit_rules``).

    Examples:
        >>> rule = DEFAULT_INHIBIT_RULES[0]
        >>> fault = {"kind": "sensor_fault", "asset": "a1", "modality": "audio"}
        >>> rule.inhibits(fault, {"kind": "degradation", "asset": "a1", "modality": "audio"})
        True
        >>> rule.inhibits(fault, {"kind": "degradation", "asset": "a2", "modality": "audio"})
        False
    """

    source: tuple[Matcher, ...]
    target: tuple[Matcher, ...]
    equal: tuple[str, ...]

    def inhibits(self, source_labels: Mapping[str, str], target_labels: Mapping[str, str]) -> bool:
        return (
            matches_all(self.source, source_labels)
            and matches_all(self.target, target_labels)
            and not matches_all(self.source, target_labels)  # an alert never inhibits its own kind
            and all(source_labels.get(n, "") == target_labels.get(n, "") for n in self.equal)
        )

    @classmethod
    def from_config(cls, source: Iterable[str], target: Iterable[str], equal: Iterable[str]) -> "InhibitRule":
        return cls(parse_matchers(source), parse_matchers(target), tuple(equal))


DEFAULT_INHIBIT_RULES: tuple[InhibitRule, ...] = (
    InhibitRule.from_config(DEFAULT_INHIBIT.source, DEFAULT_INHIBIT.target, DEFAULT_INHIBIT.equal),
)
