"""Evaluate a replay against the truth: labels and annotated fault windows.

Pure logic: predictions (as :class:`~streamfuse.replay.collect.Row`), labels, alerts,
commands and acks in; plain dicts out. Times are event ms; ``t_s`` fields are seconds
from the start of the run.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

from streamfuse.events import Ack, Alert, Command
from streamfuse.monitor.stats import macro_f1

FUSED = "fused"


def scores(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """Top-1 and macro-F1 of ``(predicted, true)`` pairs.

    Examples:
        >>> scores([("a", "a"), ("b", "a"), ("b", "b")])
        {'n': 3, 'top1': 0.6667, 'macro_f1': 0.6667}
        >>> scores([])
        {'n': 0, 'top1': None, 'macro_f1': None}
    """
    if not pairs:
        return {"n": 0, "top1": None, "macro_f1": None}
    return {"n": len(pairs), "top1": round(sum(p == t for p, t in pairs) / len(pairs), 4),
            "macro_f1": round(macro_f1([t for _, t in pairs], [p for p, _ in pairs]), 4)}


def _units(rows) -> list[str]:
    return sorted({m for r in rows for m in r.labels}) + [FUSED]


def _pred(r, unit: str) -> str | None:
    return r.fused if unit == FUSED else r.labels.get(unit)


def overall(rows, labels: dict[str, str]) -> dict[str, Any]:
    """Per modality and fused: Top-1 and macro-F1 over every labelled prediction."""
    out = {}
    for u in _units(rows):
        out[u] = scores([(p, labels[r.sample_id]) for r in rows if r.sample_id in labels
                         and (p := _pred(r, u)) is not None])
    return out


def bin_width(span_ms: int, window_ms: int, max_bins: int = 60) -> int:
    """A multiple of the KPI window giving at most ``max_bins`` bins over ``span_ms``.

    Examples:
        >>> bin_width(40_000, 2_000), bin_width(3_600_000, 5_000)
        (2000, 60000)
    """
    return window_ms * max(1, math.ceil(span_ms / (window_ms * max_bins)))


def over_time(rows, labels: dict[str, str], start_ms: int, bin_ms: int) -> dict[str, Any]:
    """Per time bin: Top-1 / macro-F1 per unit, mean contribution share and masked share
    per modality, and the count."""
    bins: dict[int, list] = {}
    for r in rows:
        bins.setdefault((r.ts_ms - start_ms) // bin_ms, []).append(r)
    units = _units(rows)
    mods = [u for u in units if u != FUSED]
    out: dict[str, Any] = {"bin_ms": bin_ms, "t_s": [], "n": [], "top1": {u: [] for u in units},
                           "macro_f1": {u: [] for u in units}, "contribution": {m: [] for m in mods},
                           "masked": {m: [] for m in mods}}
    for k in sorted(bins):
        rs = bins[k]
        out["t_s"].append(round(k * bin_ms / 1000, 3))
        out["n"].append(len(rs))
        for u in units:
            s = scores([(p, labels[r.sample_id]) for r in rs if r.sample_id in labels
                        and (p := _pred(r, u)) is not None])
            out["top1"][u].append(s["top1"])
            out["macro_f1"][u].append(s["macro_f1"])
        for m in mods:
            out["contribution"][m].append(round(sum(r.contributions.get(m, 0.0) for r in rs) / len(rs), 4))
            out["masked"][m].append(round(sum(m in r.masked for r in rs) / len(rs), 4))
    return out


def alert_record(a: Alert, start_ms: int) -> dict[str, Any]:
    """An alert event without wall-clock fields (every field is decided in event time)."""
    return {"alert_id": a.alert_id, "status": a.status, "kind": a.kind, "severity": a.severity,
            "modality": a.modality, "scope": a.scope, "scope_id": a.scope_id, "starts_ms": a.starts_ms,
            "event_ms": a.event_ms, "ends_ms": a.ends_ms, "t_s": round((a.event_ms - start_ms) / 1000, 3),
            "summary": a.summary, "value": None if a.value is None else round(a.value, 6),
            "threshold": None if a.threshold is None else round(a.threshold, 6)}


def command_record(c: Command, start_ms: int) -> dict[str, Any]:
    return {"command_id": c.command_id, "action": c.action, "modality": c.modality, "scope": c.scope,
            "scope_id": c.scope_id, "version": c.version, "fusion_mode": c.fusion_mode, "alert_id": c.alert_id,
            "issued_ms": c.issued_ms, "t_s": round((c.issued_ms - start_ms) / 1000, 3), "reason": c.reason}


def ack_record(a: Ack) -> dict[str, Any]:
    """An ack; ``worker_id`` (host-pid) and ``wall_ms`` differ between runs by nature."""
    return {"command_id": a.command_id, "status": a.status, "reason": a.reason, "masked": list(a.masked),
            "versions": dict(a.versions), "fusion_mode": a.fusion_mode, "worker_id": a.worker_id,
            "wall_ms": a.ts_ms}


def episodes(alerts: Iterable[dict[str, Any]], end_ms: int) -> list[dict[str, Any]]:
    """Firing → resolved pairs of alert records (open ones end at ``end_ms``, ``open``)."""
    out: dict[str, dict[str, Any]] = {}
    for a in alerts:
        if a["status"] == "firing" and a["alert_id"] not in out:
            out[a["alert_id"]] = {k: a[k] for k in ("alert_id", "kind", "severity", "modality", "scope",
                                                     "scope_id", "summary")} | {
                "start_ms": a["event_ms"], "end_ms": end_ms, "open": True}
        elif a["status"] == "resolved" and a["alert_id"] in out:
            out[a["alert_id"]].update(end_ms=a["event_ms"], open=False)
    return sorted(out.values(), key=lambda e: (e["start_ms"], e["alert_id"]))


def _covers(ep: dict[str, Any], fault: dict[str, Any], lines: dict[str, str]) -> bool:
    if ep["modality"] != fault["modality"]:
        return False
    asset = fault.get("asset_id")
    if asset is None or ep["scope"] == "global":
        return True
    return ep["scope_id"] == (asset if ep["scope"] == "asset" else lines.get(asset))


def detection(eps: list[dict[str, Any]], commands: list[dict[str, Any]], faults: list[dict[str, Any]],
              lines: dict[str, str], end_ms: int, tolerance_ms: int) -> list[dict[str, Any]]:
    """Per annotated fault: the first alert of its modality covering its asset that
    fired during it (or within ``tolerance_ms`` after), its delay, and the first command."""
    out = []
    for f in faults:
        until = (f["end_ms"] if f.get("end_ms") is not None else end_ms) + tolerance_ms
        hits = [e for e in eps if f["start_ms"] <= e["start_ms"] <= until and _covers(e, f, lines)]
        first = hits[0] if hits else None
        cmd = next((c for c in commands if first and c["alert_id"] == first["alert_id"]), None)
        out.append({"fault": f.get("fault") or f["modality"], "start_ms": f["start_ms"], "end_ms": f.get("end_ms"),
                    "detected": first is not None,
                    "alert": None if first is None else
                    {k: first[k] for k in ("alert_id", "kind", "scope", "scope_id")},
                    "delay_ms": None if first is None else first["start_ms"] - f["start_ms"],
                    "command": None if cmd is None else {"action": cmd["action"], "issued_ms": cmd["issued_ms"],
                                                         "delay_ms": cmd["issued_ms"] - f["start_ms"]}})
    return out


def false_alerts(eps: list[dict[str, Any]], faults: list[dict[str, Any]], span_ms: int, end_ms: int,
                 tolerance_ms: int) -> dict[str, Any]:
    """Alerts whose episode overlaps no annotated fault window widened by ``tolerance_ms``.

    Examples:
        >>> eps = [{"alert_id": "a", "start_ms": 5000, "end_ms": 9000}, {"alert_id": "b", "start_ms": 50, "end_ms": 60}]
        >>> false_alerts(eps, [{"start_ms": 10_000, "end_ms": 20_000}], 3_600_000, 30_000, 2_000)
        {'count': 1, 'per_hour': 1.0, 'alert_ids': ['b'], 'tolerance_ms': 2000}
    """
    def overlaps(e: dict[str, Any]) -> bool:
        return any(e["start_ms"] <= (f["end_ms"] if f.get("end_ms") is not None else end_ms) + tolerance_ms
                   and e["end_ms"] >= f["start_ms"] - tolerance_ms for f in faults)

    bad = [e["alert_id"] for e in eps if not overlaps(e)]
    hours = span_ms / 3_600_000
    return {"count": len(bad), "per_hour": round(len(bad) / hours, 3) if hours > 0 else None, "alert_ids": bad,
            "tolerance_ms": tolerance_ms}


def masked_time(commands: list[dict[str, Any]], acks: list[dict[str, Any]], rows, end_ms: int,
                start_ms: int) -> dict[str, Any]:
    """How long each modality was masked: intervals from applied mask / unmask commands
    (event time), and the share of predictions served without it."""
    applied = {a["command_id"] for a in acks if a["status"] == "applied"}
    open_: dict[tuple[str, str, str], int] = {}
    intervals = []
    for c in commands:
        if c["command_id"] not in applied or c["action"] not in ("mask_modality", "unmask_modality"):
            continue
        key = (c["modality"], c["scope"], c["scope_id"])
        if c["action"] == "mask_modality":
            open_.setdefault(key, c["issued_ms"])
        elif key in open_:
            intervals.append((*key, open_.pop(key), c["issued_ms"]))
    intervals += [(*k, t, end_ms) for k, t in open_.items()]
    per: dict[str, Any] = {}
    n = len(rows) or 1
    for m in sorted({m for r in rows for m in r.labels} | {i[0] for i in intervals}):
        mine = [i for i in intervals if i[0] == m]
        per[m] = {"masked_ms": sum(b - a for *_, a, b in mine), "samples_masked_share":
                  round(sum(m in r.masked for r in rows) / n, 4),
                  "intervals": [{"scope": s, "scope_id": sid, "from_s": round((a - start_ms) / 1000, 3),
                                 "to_s": round((b - start_ms) / 1000, 3)} for _, s, sid, a, b in sorted(mine)]}
    return per
