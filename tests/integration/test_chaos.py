"""Chaos tests: the pipeline (worker, monitor, alert dispatcher as processes; the simulated
plant; a webhook receiver subscribed to every alert) under one fault each. Each counts
sample ids from the samples topic to the predictions topic and alerts at the receiver,
prints the counts, and asserts 0 samples lost, bounded duplicates, every published
sensor-fault alert exactly once at the receiver, every process alive. Short windows and
timeouts (2 s KPI windows, 2 s sessions, 0.2-1 s retries) keep them short."""

from __future__ import annotations

import pytest
import redis

from chaoslib import ChaosRun, RedisServer, Timed, chaos_settings, freeze, thaw
from streamfuse.embedded import EmbeddedBroker
from streamfuse.faultpoint import EXIT_CODE
from streamfuse.inference.worker import MAX_BATCHES_IN_FLIGHT

pytestmark = pytest.mark.integration
FAULT = ["audio:mute@4-11/asset-0"]  # a sensor fault: alert + mask, then resolved + unmask
DURATION_S = 24.0


def fired_and_resolved(run: ChaosRun) -> bool:
    """A sensor fault fired and resolved, and every status of it published so far reached
    the receiver (alerts on different partitions arrive in any order: one being delivered
    says nothing of the others)."""
    return any(a["status"] == "resolved" and a["kind"] == "sensor_fault" for a in run.observer.alerts) and \
        any(st == "resolved" for _, st, _ in run.received()) and not run.undelivered()


def started(run: ChaosRun, n: int = 40) -> bool:
    return len(run.predicted) >= n


def alerted(run: ChaosRun) -> bool:
    return any(a["kind"] == "sensor_fault" for a in run.observer.alerts)


def in_flight(run: ChaosRun) -> int:
    """Predictions that may repeat after one worker restart: its uncommitted batches."""
    return (MAX_BATCHES_IN_FLIGHT + 2) * run.settings.worker.max_batch


@pytest.fixture
def chaos(settings, tmp_path):
    runs = []

    def make(s=None, **kw) -> ChaosRun:
        run = ChaosRun(s or chaos_settings(settings), tmp_path / f"run{len(runs)}", FAULT, DURATION_S, **kw)
        runs.append(run)
        return run

    yield make
    for run in runs:
        run.close()


def test_worker_sigkill(chaos):
    run = chaos().run(steps=[(started, lambda r: r.restart("worker"))], until=fired_and_resolved)
    print(f"\nchaos worker SIGKILL: {run.summary()}")
    run.assert_healthy(max_duplicate_predictions=in_flight(run))


def test_broker_frozen_10s(chaos, settings):
    with EmbeddedBroker() as own:
        s = chaos_settings(settings, kafka_bootstrap=own.bootstrap)
        fault = Timed(started, lambda r: freeze(own.pid), lambda r: thaw(own.pid), hold_s=10)
        run = chaos(s)
        try:
            run.run(steps=fault.steps(), until=fired_and_resolved)
        finally:
            thaw(own.pid)
        print(f"\nchaos broker SIGSTOP 10 s: {run.summary()}")
        run.assert_healthy(max_duplicate_predictions=in_flight(run))
        assert run.sim.stats.send_lost == 0


def test_redis_stopped_10s(chaos, settings, tmp_path):
    from streamfuse.models.bootstrap import ensure_models

    with RedisServer(tmp_path / "redis") as server:
        s = chaos_settings(settings, redis_url=server.url)
        ensure_models(s)  # the registry lives in this Redis
        during: dict[str, list] = {}

        def back(r: ChaosRun) -> None:  # note what was published while Redis was down, then restart it
            during.update(alerts=list(r.observer.alerts), commands=list(r.observer.commands))
            server.start()

        # stopped for 10 s, or until the fault's alert was published without Redis if later
        fault = Timed(started, lambda r: server.stop(), back, hold_s=10, also=alerted)
        run = chaos(s).run(steps=fault.steps(), until=lambda r: fired_and_resolved(r) and caught_up(r))
        print(f"\nchaos Redis stopped {fault.ended - fault.started:.0f} s: {run.summary()}; published during "
              f"the outage: {len(during['alerts'])} alerts, {len(during['commands'])} commands")
        run.assert_healthy(max_duplicate_predictions=in_flight(run))
        for name in ("monitor", "dispatcher"):
            log = run.log(name)
            assert log.count("Redis unreachable") == 1 and "reachable again" in log, (name, log[-2000:])
        # A command issued during the outage is published and applied at once; its audit
        # entry, its claim and the workers' acks reach Redis once it is back.
        assert during["alerts"] and during["commands"], during
        cmd = during["commands"][0]
        assert any(a["command_id"] == cmd["command_id"] and a["status"] == "applied" for a in run.observer.acks)
        audited = audit_ids(s)
        assert {c["command_id"] for c in run.observer.commands} <= audited["command"]
        assert cmd["command_id"] in audited["ack"]


def audit_ids(s) -> dict[str, set[str]]:
    """Ids in the Redis audit trail by type (alert, command, ack)."""
    from streamfuse.store import StatusStore, connect

    store = StatusStore(connect(s), s.redis_prefix)
    out: dict[str, set[str]] = {"alert": set(), "command": set(), "ack": set()}
    for _, fields in store.r.xrange(store.key("audit")):
        out.setdefault(fields[b"type"].decode(), set()).add(fields[b"id"].decode())
    return out


def caught_up(run: ChaosRun) -> bool:
    """Redis holds every command the monitor published (its state caught up)."""
    try:
        return {c["command_id"] for c in run.observer.commands} <= audit_ids(run.settings)["command"]
    except redis.RedisError:  # still down
        return False


def test_monitor_killed_mid_fault_between_produce_and_claim(chaos):
    """The monitor dies (os._exit) right after the broker acknowledged its first alert and
    before the claim: the alert is still delivered, exactly once, and the rest follows."""
    run = chaos(env={"monitor": {"STREAMFUSE_FAULTPOINT": "monitor-after-produce"}})
    codes = []

    def restart(r: ChaosRun) -> None:
        codes.append(r.procs["monitor"].returncode)
        r.restart("monitor")  # without the fault point

    run.run(steps=[(lambda r: r.procs["monitor"].poll() is not None, restart)], until=fired_and_resolved)
    assert codes == [EXIT_CODE], codes
    assert "fault point monitor-after-produce reached" in run.log("monitor")
    print(f"\nchaos monitor killed between produce and claim: {run.summary()}")
    run.assert_healthy(max_duplicate_predictions=0)
    first = run.observer.alerts[0]
    assert run.published()[(first["alert_id"], first["status"])] in (1, 2)  # re-derived after the restart, or not


def test_webhook_receiver_down(chaos):
    run = chaos()
    # down from the start for 8 s, and until the fault's alert was published meanwhile
    fault = Timed(lambda r: True, lambda r: r.rx.stop(), lambda r: r.rx.start(), hold_s=8, also=alerted)
    run.run(steps=fault.steps(), until=fired_and_resolved)
    print(f"\nchaos webhook receiver down {fault.ended - fault.started:.0f} s: {run.summary()}")
    run.assert_healthy(max_duplicate_predictions=0)
