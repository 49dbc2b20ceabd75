"""Alert lifecycle, pure: identity, deduplication, firing → resolved, repeats, muting, grouping.

No I/O and no clock: every method takes ``now_ms`` (wall-clock milliseconds) from its
caller. The dispatcher persists :class:`AlertState` in Redis so that deduplication holds
across monitor and dispatcher restarts.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from streamfuse.alerts.matchers import DEFAULT_INHIBIT_RULES, InhibitRule, Silence, matches_all
from streamfuse.events import Alert

RESOLVED_RETENTION_MS = 7 * 24 * 3600 * 1000  # resolved states kept this long to drop late duplicates


def fingerprint(labels: dict[str, str]) -> str:
    """Stable 16-hex-digit fingerprint of an alert's identifying labels (order-free).

    Examples:
        >>> fingerprint({"kind": "degradation", "modality": "image"}) == fingerprint(
        ...     {"modality": "image", "kind": "degradation"})
        True
        >>> fingerprint({"kind": "degradation", "modality": "image"})
        '9b10b81f6a725174'
    """
    text = "\x1f".join(f"{k}={labels[k]}" for k in sorted(labels))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def alert_labels(alert: Alert) -> dict[str, str]:
    """The labels that routing, silences and inhibition see: the alert's own labels plus its
    fields ``alertname``, ``kind``, ``severity``, ``modality``, ``scope``, ``scope_id`` and
    ``asset`` (= ``scope_id`` of an asset-scoped alert unless the alert names its asset).

    Examples:
        >>> a = Alert("fp", "fp@1", "firing", "degradation", "warning", "audio", "asset", "a7", 1, 2)
        >>> alert_labels(a)["asset"], alert_labels(a)["alertname"]
        ('a7', 'streamfuse_degradation')
    """
    out = {"alertname": f"streamfuse_{alert.kind}", "kind": alert.kind, "severity": alert.severity,
           "modality": alert.modality, "scope": alert.scope, "scope_id": alert.scope_id}
    if alert.scope in ("asset", "line"):
        out[alert.scope] = alert.scope_id
    out.update(alert.labels)
    return out


def alert_annotations(alert: Alert) -> dict[str, str]:
    """Human-facing details of an alert, as strings (Alertmanager annotations)."""
    out = {"summary": alert.summary, "alert_id": alert.alert_id}
    if alert.value is not None:
        out["value"] = f"{alert.value:.4g}"
    if alert.threshold is not None:
        out["threshold"] = f"{alert.threshold:.4g}"
    return {k: v for k, v in out.items() if v}


@dataclass
class AlertState:
    """What the dispatcher knows of one fingerprint. ``notified_ms`` is None while the current
    firing episode has not been notified (it was silenced or inhibited)."""

    fingerprint: str
    labels: dict[str, str]
    annotations: dict[str, str]
    status: str
    starts_ms: int
    ends_ms: int | None = None
    changed_ms: int = 0
    notified_ms: int | None = None
    repeat: int = 0
    muted_by: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in _STATE_FIELDS}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "AlertState":
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


@dataclass(frozen=True)
class Notice:
    """One notification to route: ``key`` is unique per (fingerprint, episode, status, repeat)."""

    key: str
    fingerprint: str
    status: str
    labels: dict[str, str]
    annotations: dict[str, str]
    starts_ms: int
    ends_ms: int | None
    repeat: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in _NOTICE_FIELDS}

    @classmethod
    def of(cls, st: AlertState) -> "Notice":
        key = f"{st.fingerprint}:{st.starts_ms}:{st.status}"
        repeat = st.repeat if st.status == "firing" else 0
        return cls(key + (f":{repeat}" if repeat else ""), st.fingerprint, st.status, dict(st.labels),
                   dict(st.annotations), st.starts_ms, st.ends_ms, repeat)


_STATE_FIELDS = tuple(f.name for f in dataclasses.fields(AlertState))
_NOTICE_FIELDS = tuple(f.name for f in dataclasses.fields(Notice))


@dataclass
class AlertTracker:
    """Turns the monitor's alert events into notifications, once each.

    A firing event for a fingerprint that is already firing (a monitor restart, a redelivery)
    is a duplicate; so is a resolved event for one already resolved, and a firing event of
    an episode that has already resolved (same or earlier start). A resolved event is
    notified only when its firing was. Muted (silenced or inhibited) firings are notified
    by :meth:`tick` once they are no longer muted; alerts still firing are re-notified every
    ``repeat_interval_ms``.

    Examples:
        >>> t = AlertTracker(repeat_interval_ms=60_000)
        >>> fire = Alert("fp1", "fp1@0", "firing", "degradation", "critical", "image", "global", "", 0, 0)
        >>> [n.key for n in t.observe(fire, now_ms=1_000)]
        ['fp1:0:firing']
        >>> t.observe(fire, now_ms=2_000)  # the monitor restarted and fired again
        []
        >>> [n.key for n in t.tick(now_ms=61_000)]
        ['fp1:0:firing:1']
        >>> done = dataclasses.replace(fire, status="resolved", event_ms=9_000, ends_ms=9_000)
        >>> [n.key for n in t.observe(done, now_ms=62_000)], t.observe(done, now_ms=63_000)
        (['fp1:0:resolved'], [])
    """

    states: dict[str, AlertState] = field(default_factory=dict)
    repeat_interval_ms: int = 4 * 3600 * 1000
    inhibit_rules: tuple[InhibitRule, ...] = DEFAULT_INHIBIT_RULES
    duplicates: int = 0
    muted: int = 0
    _dirty: set[str] = field(default_factory=set, repr=False)
    _sources: dict[str, AlertState] = field(default_factory=dict, repr=False)  # firing inhibition sources

    def __post_init__(self) -> None:
        for st in self.states.values():
            self._index(st)

    def _index(self, st: AlertState) -> None:
        # Inhibition only looks at firing alerts that match a rule's source: keep those at hand,
        # so that muting stays cheap with thousands of alerts firing.
        if st.status == "firing" and any(matches_all(r.source, st.labels) for r in self.inhibit_rules):
            self._sources[st.fingerprint] = st
        else:
            self._sources.pop(st.fingerprint, None)

    def observe(self, alert: Alert, now_ms: int, silences: Iterable[Silence] = ()) -> list[Notice]:
        """Take in one alert event; return the notifications it causes (zero or one)."""
        labels, annotations = alert_labels(alert), alert_annotations(alert)
        st = self.states.get(alert.fingerprint)
        self._dirty.add(alert.fingerprint)
        stale = st is not None and alert.status == "firing" and alert.starts_ms <= st.starts_ms
        if st is not None and (st.status == alert.status or stale):  # stale: a late copy of an old episode
            if not stale:
                st.labels, st.annotations = labels, annotations
                self._index(st)
            self.duplicates += 1
            return []
        if alert.status == "firing":
            st = self.states[alert.fingerprint] = AlertState(
                alert.fingerprint, labels, annotations, "firing", alert.starts_ms, changed_ms=now_ms)
            self._index(st)
            return self._notify_firing(st, now_ms, list(silences))
        if st is None:  # never saw it fire: remember it, so that a late firing is not taken as new
            self.states[alert.fingerprint] = AlertState(
                alert.fingerprint, labels, annotations, "resolved", alert.starts_ms,
                alert.ends_ms or alert.event_ms, changed_ms=now_ms)
            return []
        st.status, st.ends_ms, st.changed_ms = "resolved", alert.ends_ms or alert.event_ms, now_ms
        st.labels, st.annotations, st.muted_by = labels, annotations, ""
        self._index(st)
        return [Notice.of(st)] if st.notified_ms is not None else []

    def tick(self, now_ms: int, silences: Iterable[Silence] = ()) -> list[Notice]:
        """Notify firings no longer muted and repeats that are due; forget old resolved states."""
        silences = list(silences)
        out: list[Notice] = []
        for st in list(self.states.values()):
            if st.status == "resolved":
                if now_ms - st.changed_ms > RESOLVED_RETENTION_MS:
                    del self.states[st.fingerprint]
                    self._dirty.add(st.fingerprint)
            elif st.notified_ms is None:
                out += self._notify_firing(st, now_ms, silences, count_muted=False)
            elif now_ms - st.notified_ms >= self.repeat_interval_ms and not self.mute_reason(
                    st.labels, now_ms, silences):
                st.repeat += 1
                st.notified_ms = now_ms
                self._dirty.add(st.fingerprint)
                out.append(Notice.of(st))
        return out

    def mute_reason(self, labels: Mapping[str, str], now_ms: int, silences: Iterable[Silence]) -> str:
        """``"silenced:<id>"``, ``"inhibited:<fingerprint>"`` or ``""`` when nothing mutes these labels."""
        for s in silences:
            if s.mutes(labels, now_ms):
                return f"silenced:{s.id}"
        rules = [r for r in self.inhibit_rules if matches_all(r.target, labels)]
        for src in self._sources.values() if rules else ():
            if any(r.inhibits(src.labels, labels) for r in rules):
                return f"inhibited:{src.fingerprint}"
        return ""

    def take_dirty(self) -> dict[str, AlertState | None]:
        """States changed since the last call (None = forgotten), for persisting."""
        out = {fp: self.states.get(fp) for fp in self._dirty}
        self._dirty.clear()
        return out

    def _notify_firing(self, st: AlertState, now_ms: int, silences: list[Silence],
                       count_muted: bool = True) -> list[Notice]:
        reason = self.mute_reason(st.labels, now_ms, silences)
        if reason:
            if st.muted_by != reason:
                self._dirty.add(st.fingerprint)
            st.muted_by = reason
            self.muted += count_muted
            return []
        st.notified_ms, st.muted_by = now_ms, ""
        self._dirty.add(st.fingerprint)
        return [Notice.of(st)]


def group_labels(labels: Mapping[str, str], group_by: Iterable[str]) -> dict[str, str]:
    """The grouping labels' values (absent labels are left out)."""
    return {k: labels[k] for k in group_by if labels.get(k)}


def group_key(labels: Mapping[str, str], group_by: Iterable[str]) -> str:
    """Alertmanager-style group key.

    Examples:
        >>> group_key({"kind": "degradation", "modality": "image", "scope": "global"}, ["kind", "modality"])
        '{kind="degradation",modality="image"}'
    """
    return "{" + ",".join(f'{k}="{v}"' for k, v in sorted(group_labels(labels, group_by).items())) + "}"


def group_due(now_ms: int, pending_due_ms: int | None, last_sent_ms: int | None, wait_ms: int,
              interval_ms: int) -> int:
    """When a group holding a new notification should be sent.

    A group that already waits keeps its time (the newcomer joins it); a new group waits
    ``wait_ms``; a group sent less than ``interval_ms`` ago waits until that interval is over.

    Examples:
        >>> group_due(1_000, None, None, wait_ms=2_000, interval_ms=10_000)
        3000
        >>> group_due(1_000, 2_500, None, wait_ms=2_000, interval_ms=10_000)
        2500
        >>> group_due(1_000, None, 0, wait_ms=2_000, interval_ms=10_000)
        10000
    """
    if pending_due_ms is not None:
        return pending_due_ms
    due = now_ms + wait_ms
    if last_sent_ms is not None:
        due = max(due, last_sent_ms + interval_ms)
    return due
