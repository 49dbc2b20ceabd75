"""Simulator → worker → monitor on the embedded broker with the real Redis."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from streamfuse.demo import Observer
from streamfuse.procs import spawn, stop_children
from streamfuse.sim.faults import parse_fault
from streamfuse.sim.publish import SimPublisher
from streamfuse.store import StatusStore, connect
from streamfuse.topics import ensure_topics

pytestmark = pytest.mark.integration

FAULT_AT_S = 20
DURATION_S = 75


def wait_for(predicate, timeout_s: float, observer: Observer, procs, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        observer.poll(200)
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"{p.args[-1]} exited with {p.returncode} while waiting for {what}")
        if predicate():
            return
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def test_sample_to_alert_end_to_end(settings, tmp_path: Path):
    ensure_topics(settings)
    start_ms = 1_800_000_000_000  # a fixed event-time origin: the run is reproducible
    sim = SimPublisher(settings, (parse_fault(f"image:fog@{FAULT_AT_S}"),), start_ms=start_ms,
                       speed=4.0, malformed_every=150, run_id="it")
    procs = [spawn("worker", settings, tmp_path), spawn("monitor", settings, tmp_path)]
    observer = Observer(settings, start_ms)
    try:
        stats = sim.run(duration_s=DURATION_S)  # 4x faster than real time, beside the consumers
        assert stats.malformed >= 8  # at least two rounds of every malformed kind
        wait_for(lambda: len(observer.prediction_counts) >= stats.samples, 120, observer, procs,
                 "a prediction for every sample")
        wait_for(lambda: any(a["modality"] == "image" and a["kind"] == "degradation" for a in observer.alerts)
                 and observer.acks, 60, observer, procs, "the image alert and the worker's ack")
    finally:
        stop_children(procs)

    # Every sample (including those with a broken image reading) got exactly one prediction.
    assert set(observer.prediction_counts) == set(stats.sample_ids)
    assert max(observer.prediction_counts.values()) == 1
    broken = [sid for sid in stats.sample_ids if sid.endswith("-badimg")]
    assert broken and all(observer.predictions[sid].missing == ("image",) for sid in broken)
    assert all(set(observer.predictions[sid].modality_probs) == {"audio", "series"} for sid in broken)

    # Malformed records are in the dead-letter topic with their reasons; nothing else is.
    rounds = stats.malformed // 4
    reasons = sorted(r for r, _ in observer.dead_reasons)
    assert reasons == sorted(["bad_image", "undecodable", "unexpected_schema", "unknown_schema"] * rounds)
    assert ("bad_image", "image") in observer.dead_reasons

    # KPI snapshots flowed; the image degradation alert fired after the fault, none before.
    # The fault hits the whole fleet, so each line raises its own alert (the narrowest
    # scope that explains it) and the fleet-wide one is inhibited.
    assert observer.counts["kpi_snapshots"] > 0
    image = [a for a in observer.alerts if a["modality"] == "image" and a["kind"] == "degradation"]
    assert image[0]["status"] == "firing" and image[0]["t_s"] > FAULT_AT_S
    assert all(a["t_s"] > FAULT_AT_S for a in observer.alerts)
    assert {a["modality"] for a in observer.alerts} == {"image"}

    # The alert caused a mask command for its scope, which the worker applied and acknowledged.
    cmd = next(c for c in observer.commands if c["action"] == "mask_modality")
    assert cmd["modality"] == "image" and cmd["alert_id"] in {a["alert_id"] for a in image}
    assert any(a["command_id"] == cmd["command_id"] and a["status"] == "applied" for a in observer.acks)

    # Redis holds the latest KPIs, the open alert and the audit trail for `streamfuse status`.
    status = StatusStore(connect(settings), settings.redis_prefix).status()
    assert any(k.startswith("global||image") for k in status["kpis"])
    assert any(a["modality"] == "image" for a in status["open_alerts"].values()), status["open_alerts"].keys()
    assert {e["type"] for e in status["recent_audit"]} >= {"alert", "command", "ack"}
