"""Assemble ``summary.json`` from what a replay collected (see :mod:`.evaluate`).

Fields that differ between two replays of one recording by nature are kept apart:
``replay`` (wall time, speed, log paths) and, in ``acks``, ``worker_id`` (host-pid of
the worker process) and ``wall_ms``. Everything else — predictions' scores, alerts,
commands, detection delays — is decided in event time and is the same every time.
"""

from __future__ import annotations

from typing import Any

from streamfuse.config import MonitorSettings
from streamfuse.errors import InvalidEvent
from streamfuse.events import Alert, Command, content_type_of, decode
from streamfuse.monitor.evidence import estimate_errors
from streamfuse.replay.evaluate import (
    ack_record, alert_record, bin_width, command_record, detection, episodes, false_alerts, masked_time, over_time,
    overall,
)

DETERMINISTIC = ("alerts", "commands", "metrics", "fault_detection", "false_alerts", "masked", "counts")


def recorded_outputs(rec) -> dict[str, list]:
    """Alerts and commands the recorded (live) run published, if they were recorded."""
    out: dict[str, list] = {"alerts": [], "commands": []}
    for topic, kind, cls in (("alerts", "alerts", Alert), ("control", "commands", Command)):
        for p in rec.partitions(topic):
            for r in rec.records(topic, p):
                try:
                    out[kind].append(decode(r["value"], content_type_of(r["headers"]), expect=cls))
                except InvalidEvent:
                    continue
    return out


def summarize(col, labels: dict[str, str], annotations: list[dict[str, Any]], monitor: MonitorSettings,
              versions: dict[str, str], wall_s: float, counters: dict[str, Any], start_ms: int | None = None,
              recorded: dict[str, list] | None = None, tolerance_ms: int | None = None) -> dict[str, Any]:
    """The replay's summary.

    Args:
        col: the :class:`~streamfuse.replay.collect.Collector` after the replay.
        labels: sample id -> true class, from the recording.
        annotations: fault windows (event ms) from the recording's manifest.
        monitor: the monitor settings the replay ran with.
        versions: unit -> version served.
        wall_s: wall time of the replay.
        counters: from :meth:`Lockstep.run <streamfuse.replay.lockstep.Lockstep.run>`.
        start_ms: time zero of ``t_s`` fields (default: the first prediction).
        recorded: :func:`recorded_outputs` of the recording, to compare with.
        tolerance_ms: how far outside a fault window an alert still counts as explained
            by it (default ``(fire_windows + 1) * kpi_window_ms``).
    """
    rows = sorted(col.rows.values(), key=lambda r: (r.ts_ms, r.sample_id))
    start, end, span = _time_axis(rows, start_ms)
    tol = tolerance_ms if tolerance_ms is not None else (monitor.fire_windows + 1) * monitor.kpi_window_ms
    alerts = [alert_record(a, start) for a in col.alert_events]
    commands = [command_record(c, start) for c in col.command_events]
    acks = [ack_record(a) for a in col.ack_events]
    eps = episodes(alerts, end)
    lines = {r.asset_id: r.line_id for r in rows}
    out = {
        "replay": _timing(span, wall_s, counters),
        "start_ms": start, "end_ms": end,
        "models": dict(versions),
        "monitor": monitor.model_dump(mode="json"),
        "counts": _counts(rows, labels, col, alerts=alerts, commands=commands, acks=acks),
        "annotations": [dict(a, t_s=round((a["start_ms"] - start) / 1000, 3)) for a in annotations],
        "metrics": {"overall": overall(rows, labels),
                    "over_time": over_time(rows, labels, start, bin_width(span, monitor.kpi_window_ms))},
        "alerts": alerts,
        "commands": commands,
        "acks": acks,
        "episodes": eps,
        "fault_detection": detection(eps, commands, annotations, lines, end, tol),
        "false_alerts": false_alerts(eps, annotations, span, end, tol),
        "masked": masked_time(commands, acks, rows, end, start),
        # label-free accuracy estimate against the labelled accuracy, per global/line window
        "label_free_estimate": estimate_errors(getattr(col, "estimates", [])),
    }
    if recorded is not None and (recorded["alerts"] or recorded["commands"]):
        out["recorded"] = {"alerts": [alert_record(a, start) for a in recorded["alerts"]],
                           "commands": [command_record(c, start) for c in recorded["commands"]]}
    return out


def _timing(span_ms: int, wall_s: float, counters: dict[str, Any]) -> dict[str, Any]:
    """The summary's ``replay`` entry: wall time, event time, speed, the lock-step's counters."""
    return {"wall_s": round(wall_s, 3), "event_s": round(span_ms / 1000, 3),
            # after the pipeline's start-up (model loading, consumer group joins)
            "speed_x": _ratio(span_ms / 1000, wall_s - (counters.get("startup_s") or 0)),
            "speed_x_with_startup": _ratio(span_ms / 1000, wall_s), **counters}


def _time_axis(rows: list, start_ms: int | None) -> tuple[int, int, int]:
    """Time zero of the ``t_s`` fields (``start_ms``, or the first prediction's time), the
    end (just after the last prediction) and the predictions' span (ms, at least 1)."""
    first = rows[0].ts_ms if rows else 0
    start = start_ms if start_ms is not None else first
    end = (rows[-1].ts_ms + 1) if rows else start
    return start, end, max(1, end - first)


def _counts(rows: list, labels: dict[str, str], col, **outputs: list) -> dict[str, int]:
    """How many predictions (labelled, assets) and dead letters, KPI snapshots and
    ``outputs`` (alerts, commands, acks) the replay produced."""
    return {"predictions": len(rows), "labelled": sum(r.sample_id in labels for r in rows),
            "assets": len({r.asset_id for r in rows}), "dead_letter": col.counts.get("deadletter", 0),
            "kpi_snapshots": col.counts.get("kpi_snapshots", 0), **{k: len(v) for k, v in outputs.items()}}


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 2) if b > 0 else None


def decisions(summary: dict[str, Any]) -> dict[str, list]:
    """The alert and command lists of a summary: what two replays of one recording with
    the same settings must agree on exactly."""
    return {"alerts": summary["alerts"], "commands": summary["commands"]}
