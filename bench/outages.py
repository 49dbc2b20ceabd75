"""Outages under a live demo-sized load, against a reference run without the outage.

Scenario ``redis``: the demo plant (4 assets, 2 lines, 2 Hz, real time) with a fogged
camera on line-0, worker + monitor + alert dispatcher as processes, a webhook receiver;
Redis (a private redis-server with persistence) is stopped for ``--outage-s`` seconds
from 45 s, while the fault (from 40 s) is being detected. Reported against the same run without the outage: samples without a prediction,
processes alive, KPI windows after the outage, and which of the reference run's alerts
and commands were published (the ratio is outage / reference).

Scenario ``broker``: the plant on per-modality topics through ``sync``, no fault; the
broker is frozen (SIGSTOP) for ``--freeze-s`` seconds (longer than the producers'
delivery timeout, 120 s). Reported: every producer's failed sends (retried / lost,
never silent), samples without a prediction, and sensor-fault alerts or masks for the
healthy sensors (the reference run has none).

Usage: python bench/outages.py [--scenario redis|broker|both] [--outage-s 30] [--freeze-s 150]
                               [--json out/outages.json]
"""
from __future__ import annotations

import argparse
from collections import Counter
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the chaos harness is shared with the chaos tests

from chaoslib import ChaosRun, RedisServer, Timed, chaos_settings, freeze, thaw  # noqa: E402
from streamfuse.config import Settings  # noqa: E402
from streamfuse.models.bootstrap import ensure_demo_bundle, ensure_models  # noqa: E402
from streamfuse.embedded import EmbeddedBroker  # noqa: E402
from report import emit, machine


def base_settings(bootstrap: str, redis_url: str, models: Path) -> Settings:
    tag = uuid.uuid4().hex[:8]
    s = Settings(kafka_bootstrap=bootstrap, broker="tansu", topic_prefix=f"b{tag}.", redis_url=redis_url,
                 redis_prefix=f"streamfuse-bench:{tag}:", model_dir=models.parent, bundle=models.name,
                 worker={"group": f"w-{tag}", "device": "cpu"}, monitor={"app_id": f"monitor-{tag}"})
    s = chaos_settings(s)  # short retries and alert grouping; then the demo's plant and windows:
    return s.model_copy(update={
        "sim": s.sim.model_copy(update={"assets": 4, "lines": 2, "rate_hz": 2.0, "label_delay_ms": 2000}),
        "monitor": s.monitor.model_copy(update={"kpi_window_ms": 5000, "label_grace_ms": 8000,
                                                "cooldown_ms": 30_000})})


def caught_up(run: ChaosRun, duration: float) -> bool:
    """The monitor closed the KPI windows up to the end of the plant time (less its grace)."""
    end = max((k.window_end_ms for k in run.observer.kpi_log), default=None)
    grace_s = (run.settings.monitor.label_grace_ms + run.settings.monitor.kpi_window_ms) / 1000
    return end is not None and run.observer.t_s(end) >= duration - grace_s - 5


def settled(quiet_s: float):
    """``until`` for a run whose samples may not all be predicted: predictions, dead letters,
    alerts and commands unchanged for ``quiet_s`` seconds."""
    seen: dict[str, object] = {"state": None, "since": time.monotonic()}

    def until(run: ChaosRun) -> bool:
        o = run.observer
        state = (len(o.prediction_counts), len(o.dead_reasons), len(o.alerts), len(o.commands))
        if state != seen["state"]:
            seen.update(state=state, since=time.monotonic())
        return time.monotonic() - seen["since"] >= quiet_s

    return until


def alert_keys(run: ChaosRun) -> set[tuple]:
    return {(a["kind"], a["modality"], a["scope"], a["scope_id"], a["status"]) for a in run.observer.alerts}


def command_keys(run: ChaosRun) -> set[tuple]:
    return {(c["action"], c["modality"], c["scope"], c["scope_id"]) for c in run.observer.commands}


def counts(run: ChaosRun) -> dict:
    ids = set(run.sim.stats.sample_ids)
    got = run.observer.prediction_counts
    return {"samples": len(ids), "without_prediction": len(ids - set(got)),
            "duplicate_predictions": sum(n - 1 for n in got.values()),
            "alerts": sorted(map(list, alert_keys(run))), "commands": sorted(map(list, command_keys(run))),
            "received_at_webhook": sum(run.received().values()),
            "processes_alive": {n: p.poll() is None for n, p in run.procs.items()},
            "send_retried": run.sim.stats.send_retried, "send_lost": run.sim.stats.send_lost}


def redis_run(models: Path, work: Path, duration: float, outage_s: float | None) -> dict:
    faults = ["image:fog@40/asset-0", "image:fog@40/asset-2"]  # line-0's camera
    with EmbeddedBroker() as broker, RedisServer(work / f"redis-{outage_s}") as redis:
        s = base_settings(broker.bootstrap, redis.url, models)
        ensure_models(s)
        run = ChaosRun(s, work / f"redis-{outage_s}", faults, duration, speed=1.0, run_id="rb")
        steps, fault = [], None
        if outage_s:
            t0 = time.monotonic()
            # from 45 s of plant time (the camera fogs at 40 s; its alert comes ~25 s later), once
            # the monitor is up (it has published KPIs)
            def back(r: ChaosRun) -> None:  # Redis back; the plant time then is the newest prediction's
                redis.start()
                ended_ms.append(max((p.ts_ms for p in r.observer.predictions.values()), default=0))

            ended_ms: list[int] = []
            fault = Timed(lambda r: time.monotonic() - t0 >= 45 and r.observer.kpi_log, lambda r: redis.stop(),
                          back, hold_s=outage_s)
            steps = fault.steps()
        try:
            run.run(steps=steps, until=lambda r: caught_up(r, duration), timeout_s=duration + 300)
            end_ms = max(k.window_end_ms for k in run.observer.kpi_log)
            out = counts(run)
            out["last_kpi_window_end_s"] = run.observer.t_s(end_ms)
            fused = sorted({k.window_start_ms for k in run.observer.kpi_log
                            if k.scope == "global" and k.modality == "fused"})
            width = s.monitor.kpi_window_ms
            out["kpi_window_gaps"] = sum((b - a) // width - 1 for a, b in zip(fused, fused[1:]))
            if fault is not None:
                out["outage_s"] = round(fault.ended - fault.started, 1)
                out["outage_ended_plant_s"] = run.observer.t_s(ended_ms[0]) if ended_ms else None
                out["kpi_windows_after_outage"] = sum(1 for w in fused if ended_ms and w >= ended_ms[0])
                out["logged_outage"] = {n: run.log(n).count("Redis unreachable") for n in ("monitor", "dispatcher")}
            return out
        finally:
            run.close()


def broker_run(models: Path, work: Path, duration: float, freeze_s: float | None) -> dict:
    with EmbeddedBroker() as broker, RedisServer(work / f"redis-b{freeze_s}") as redis:
        s = base_settings(broker.bootstrap, redis.url, models)
        ensure_models(s)
        run = ChaosRun(s, work / f"broker-{freeze_s}", [], duration, speed=1.0, run_id="bf",
                       processes=("sync", "worker", "monitor", "dispatcher"),
                       sim_options={"per_modality_topics": True})
        steps = []
        if freeze_s:
            t0 = time.monotonic()
            steps = Timed(lambda r: time.monotonic() - t0 >= 20, lambda r: freeze(broker.pid),
                          lambda r: thaw(broker.pid), hold_s=freeze_s).steps()
        try:
            # Readings that come back after their slot closed are dead-lettered as late (their
            # samples are never formed): the run ends once nothing has moved for 20 s.
            run.run(steps=steps, until=settled(20.0), timeout_s=duration + (freeze_s or 0) + 300,
                    every_sample=False)
            out = counts(run)
            out["sensor_fault_alerts"] = sum(1 for a in run.observer.alerts if a["kind"] == "sensor_fault")
            out["masks"] = sum(1 for c in run.observer.commands if c["action"] == "mask_modality")
            out["upstream_alerts"] = sorted({a["kind"] for a in run.observer.alerts})
            out["dead_letter_reasons"] = sorted({r for r, _ in run.observer.dead_reasons})
            out["late_readings"] = sum(1 for r, _ in run.observer.dead_reasons if r == "late_reading")
            out["dead_letters"] = dict(Counter(r for r, _ in run.observer.dead_reasons))
            return out
        finally:
            thaw(broker.pid)
            run.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenario", choices=("redis", "broker", "both"), default="both")
    ap.add_argument("--duration", type=float, default=90.0, help="seconds of plant time per run")
    ap.add_argument("--outage-s", type=float, default=30.0)
    ap.add_argument("--freeze-s", type=float, default=150.0)
    ap.add_argument("--models", type=Path, default=None, help="a trained bundle (default: the demo's)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    models = args.models or ensure_demo_bundle(Settings())
    work = Path(tempfile.mkdtemp(prefix="sf-outages-"))
    result: dict = {**machine(), "logs": str(work)}
    if args.scenario in ("redis", "both"):
        ref = redis_run(models, work, args.duration, None)
        out = redis_run(models, work, args.duration, args.outage_s)
        ref_a, out_a = set(map(tuple, ref["alerts"])), set(map(tuple, out["alerts"]))
        ref_c, out_c = set(map(tuple, ref["commands"])), set(map(tuple, out["commands"]))
        result["redis"] = {"reference": ref, "outage": out,
                           "alerts_ratio": len(ref_a & out_a) / max(1, len(ref_a)),
                           "commands_ratio": len(ref_c & out_c) / max(1, len(ref_c)),
                           "missing_alerts": sorted(ref_a - out_a), "missing_commands": sorted(ref_c - out_c)}
        r = result["redis"]
        print(f"Redis stopped {out['outage_s']:.0f} s: samples {out['samples']}, without prediction "
              f"{out['without_prediction']} (reference {ref['without_prediction']}), alive {out['processes_alive']}, "
              f"KPI windows after the outage (at {out['outage_ended_plant_s']} s of plant time) "
              f"{out['kpi_windows_after_outage']}, gaps {out['kpi_window_gaps']}; alerts {len(out_a)} vs "
              f"{len(ref_a)} (ratio {r['alerts_ratio']:.2f}), commands {len(out_c)} vs {len(ref_c)} "
              f"(ratio {r['commands_ratio']:.2f})")
    if args.scenario in ("broker", "both"):
        ref = broker_run(models, work, args.duration, None)
        out = broker_run(models, work, args.duration, args.freeze_s)
        result["broker"] = {"reference": ref, "frozen": out}
        print(f"broker frozen {args.freeze_s:.0f} s: samples {out['samples']}, without prediction "
              f"{out['without_prediction']}, sends retried {out['send_retried']} lost {out['send_lost']}, "
              f"sensor-fault alerts {out['sensor_fault_alerts']} (reference {ref['sensor_fault_alerts']}), masks "
              f"{out['masks']} (reference {ref['masks']}), alert kinds {out['upstream_alerts']}, late readings "
              f"{out['late_readings']}, dead letters {out['dead_letters']}, alive {out['processes_alive']}")
    emit(result, args.json, show=False)


if __name__ == "__main__":
    main()
