"""Wire formats of notifications (pure): Alertmanager's webhook body (version "4") and the
alert list of Alertmanager's ``POST /api/v2/alerts``.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Iterable, Mapping

ZERO_TIME = "0001-01-01T00:00:00Z"  # Alertmanager's "no end" in webhook bodies


def iso(ms: int | None) -> str:
    """RFC 3339 UTC time of epoch milliseconds; ``None`` is Alertmanager's zero time.

    Examples:
        >>> iso(1_800_000_000_123), iso(None)
        ('2027-01-15T08:00:00.123Z', '0001-01-01T00:00:00Z')
    """
    if ms is None:
        return ZERO_TIME
    t = dt.datetime.fromtimestamp(ms / 1000, tz=dt.timezone.utc)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def _clean(labels: Mapping[str, str]) -> dict[str, str]:
    # Alertmanager treats an empty label as an absent one; leave them out.
    return {k: str(v) for k, v in sorted(labels.items()) if v != ""}


def _common(maps: list[dict[str, str]]) -> dict[str, str]:
    if not maps:
        return {}
    first = maps[0]
    return {k: v for k, v in first.items() if all(m.get(k) == v for m in maps[1:])}


def webhook_alert(notice: Mapping[str, Any], generator_url: str = "") -> dict[str, Any]:
    """One alert of a webhook body, from a :class:`~streamfuse.alerts.lifecycle.Notice` dict."""
    resolved = notice["status"] == "resolved"
    return {
        "status": notice["status"],
        "labels": _clean(notice["labels"]),
        "annotations": _clean(notice["annotations"]),
        "startsAt": iso(notice["starts_ms"]),
        "endsAt": iso(notice["ends_ms"]) if resolved else ZERO_TIME,
        "generatorURL": generator_url,
        "fingerprint": notice["fingerprint"],
    }


def webhook_body(receiver: str, group_key: str, group_labels: Mapping[str, str],
                 notices: Iterable[Mapping[str, Any]], external_url: str = "") -> dict[str, Any]:
    """An Alertmanager webhook body, version "4", so that existing receivers understand it.

    Examples:
        >>> n = {"status": "firing", "labels": {"kind": "degradation", "scope_id": ""}, "annotations": {},
        ...      "starts_ms": 0, "ends_ms": None, "fingerprint": "fp1"}
        >>> b = webhook_body("sub1", '{kind="degradation"}', {"kind": "degradation"}, [n])
        >>> b["version"], b["status"], b["alerts"][0]["labels"], b["commonLabels"]
        ('4', 'firing', {'kind': 'degradation'}, {'kind': 'degradation'})
    """
    alerts = [webhook_alert(n, external_url) for n in notices]
    return {
        "version": "4",
        "groupKey": group_key,
        "truncatedAlerts": 0,
        "status": "firing" if any(a["status"] == "firing" for a in alerts) else "resolved",
        "receiver": receiver,
        "groupLabels": _clean(group_labels),
        "commonLabels": _common([a["labels"] for a in alerts]),
        "commonAnnotations": _common([a["annotations"] for a in alerts]),
        "externalURL": external_url,
        "alerts": alerts,
    }


def alertmanager_alerts(notices: Iterable[Mapping[str, Any]], now_ms: int, hold_ms: int,
                        generator_url: str = "") -> list[dict[str, Any]]:
    """The body of ``POST /api/v2/alerts``.

    A firing alert gets ``endsAt = now + hold_ms``: repeats (every repeat interval) keep it
    alive, and it expires by itself if streamfuse goes away. A resolved one ends at its
    resolution time (never in the future), which resolves it in Alertmanager at once.

    Examples:
        >>> n = {"status": "resolved", "labels": {"kind": "degradation"}, "annotations": {"summary": "ok"},
        ...      "starts_ms": 0, "ends_ms": 5_000, "fingerprint": "fp1"}
        >>> alertmanager_alerts([n], now_ms=9_000, hold_ms=60_000)[0]["endsAt"]
        '1970-01-01T00:00:05.000Z'
    """
    out = []
    for n in notices:
        starts = min(n["starts_ms"], now_ms)  # event time may run ahead of the wall clock (replays)
        if n["status"] == "firing":
            ends = now_ms + hold_ms
        else:
            ends = max(starts, min(n["ends_ms"] if n["ends_ms"] is not None else now_ms, now_ms))
        item = {"labels": _clean(n["labels"]), "annotations": _clean(n["annotations"]),
                "startsAt": iso(starts), "endsAt": iso(ends)}
        if generator_url:
            item["generatorURL"] = generator_url
        out.append(item)
    return out
