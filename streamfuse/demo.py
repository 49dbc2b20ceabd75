"""``streamfuse demo``: the whole pipeline on one machine.

Starts the embedded broker (unless ``STREAMFUSE_KAFKA_BOOTSTRAP`` is set), checks Redis,
creates the topics, trains the demo bundle on simulator data at first run (cached under
the model directory), starts a worker and the monitor as child processes, runs the
simulated plant (or streams a labelled dataset's rows as the plant, ``--dataset``, serving
the ``--models`` bundle) in real time, shows a live KPI table and writes a JSON summary.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from streamfuse.clock import now_ms
from streamfuse.config import Settings
from streamfuse.events import Ack, Alert, Command, KpiSnapshot, decode
from streamfuse.models.bootstrap import ensure_models
from streamfuse.procs import ChildExited, spawn, stop_children
from streamfuse.sim.faults import FaultSpec
from streamfuse.topics import Topics

if TYPE_CHECKING:
    from streamfuse.sim.dataset_plant import DatasetRows


@dataclass
class Observer:
    """Reads every output topic from the start and keeps counts and the latest KPIs."""

    settings: Settings
    start_ms: int
    counts: dict[str, int] = field(default_factory=dict)
    kpis: dict[str, KpiSnapshot] = field(default_factory=dict)  # latest global snapshot per modality
    kpi_log: list[KpiSnapshot] = field(default_factory=list)  # every global and line snapshot
    alerts: list[dict[str, Any]] = field(default_factory=list)
    commands: list[dict[str, Any]] = field(default_factory=list)
    acks: list[dict[str, Any]] = field(default_factory=list)
    predictions: dict[str, Any] = field(default_factory=dict)  # sample_id -> last Prediction
    served_by: dict[str, list[str]] = field(default_factory=dict)  # sample_id -> worker ids, in order
    dead_reasons: list[tuple[str, str | None]] = field(default_factory=list)  # (reason, modality)

    def __post_init__(self) -> None:
        from kafka import TopicPartition

        from streamfuse.kafka import make_consumer

        t = Topics(self.settings.topic_prefix)
        self.names = {t.predictions: "predictions", t.kpis: "kpi_snapshots", t.alerts: "alerts",
                      t.control: "commands", t.acks: "acks", t.deadletter: "deadletter"}
        self.consumer = make_consumer(self.settings, None, "streamfuse-demo-observer")
        tps = [TopicPartition(name, p) for name in self.names
               for p in sorted(self.consumer.partitions_for_topic(name) or {0})]
        self.consumer.assign(tps)
        self.consumer.seek_to_beginning(*tps)
        self.counts = {v: 0 for v in self.names.values()}

    @property
    def prediction_counts(self) -> dict[str, int]:
        """sample_id -> how many predictions it got (more than one only after a crash)."""
        return {sid: len(ws) for sid, ws in self.served_by.items()}

    def t_s(self, ms: int) -> float:
        return round((ms - self.start_ms) / 1000, 1)

    def poll(self, timeout_ms: int = 200) -> None:
        for tp, msgs in self.consumer.poll(timeout_ms=timeout_ms).items():
            kind = self.names[tp.topic]
            for msg in msgs:
                self.counts[kind] += 1
                ev = decode(msg.value, check_payloads=False)
                if kind == "deadletter":
                    self.dead_reasons.append((ev.reason, ev.modality))
                elif kind == "predictions":
                    self.served_by.setdefault(ev.sample_id, []).append(ev.worker_id)
                    self.predictions[ev.sample_id] = ev
                elif isinstance(ev, KpiSnapshot):
                    if ev.scope != "asset":
                        self.kpi_log.append(ev)
                    if ev.scope == "global":
                        self.kpis[ev.modality] = ev
                elif isinstance(ev, Alert):
                    self.alerts.append({"modality": ev.modality, "kind": ev.kind, "status": ev.status,
                                        "scope": ev.scope, "scope_id": ev.scope_id, "t_s": self.t_s(ev.event_ms),
                                        "alert_id": ev.alert_id, "summary": ev.summary})
                elif isinstance(ev, Command):
                    self.commands.append({"action": ev.action, "modality": ev.modality, "scope": ev.scope,
                                          "scope_id": ev.scope_id, "version": ev.version,
                                          "fusion_mode": ev.fusion_mode, "t_s": self.t_s(ev.issued_ms),
                                          "command_id": ev.command_id, "alert_id": ev.alert_id})
                elif isinstance(ev, Ack):
                    self.acks.append({"command_id": ev.command_id, "worker_id": ev.worker_id,
                                      "status": ev.status, "reason": ev.reason, "masked": list(ev.masked),
                                      "versions": dict(ev.versions), "t_s": self.t_s(ev.ts_ms)})

    def view(self, sim_stats, elapsed_s: float, duration_s: float):
        """The live view: the fleet's KPIs per modality, and the latest alerts in a panel of
        their own (their summaries wrap there instead of stretching the KPI columns)."""
        from rich.console import Group
        from rich.panel import Panel
        from rich.table import Table

        table = Table(title=f"streamfuse demo  t={elapsed_s:5.1f}/{duration_s:.0f} s   samples {sim_stats.samples}"
                            f"  predictions {len(self.served_by)}  dead-letter {self.counts['deadletter']}"
                            f"  alerts {self.counts['alerts']}  commands {self.counts['commands']}")
        for col in ("modality", "window", "n", "acc", "agree", "contrib", "conf", "missing", "masked"):
            table.add_column(col, justify="right" if col not in ("modality",) else "left")

        def f(x: float | None) -> str:
            return "-" if x is None else f"{x:.2f}"

        for m, k in sorted(self.kpis.items()):
            table.add_row(m, f"{self.t_s(k.window_end_ms):.0f}s", str(k.n), f(k.accuracy), f(k.agreement),
                          f(k.mean_contribution), f(k.mean_confidence), f(k.missing_rate), f(k.masked_rate))
        alerts = Table.grid(padding=(0, 1))
        for col in ("t", "status", "summary"):
            alerts.add_column(col, justify="right" if col == "t" else "left", no_wrap=col != "summary")
        for a in self.alerts[-4:]:
            colour = "red" if a["status"] == "firing" else "green"
            alerts.add_row(f"{a['t_s']:.0f}s", f"[{colour}]{a['status']}[/{colour}]", a["summary"])
        return Group(table, Panel(alerts if self.alerts else "none yet", title="latest alerts", title_align="left"))


def fault_report(observer: Observer, faults: tuple[FaultSpec, ...], window_ms: int,
                 duration_s: float) -> dict[str, Any]:
    """Alert → command → ack chains, detection delay per fault (in windows) and fused
    accuracy before, during and after each fault, from what the observer read."""
    chains = []
    for a in observer.alerts:
        if a["status"] != "firing":
            continue
        cmds = [c for c in observer.commands if c["alert_id"] == a["alert_id"]]
        chains.append({"alert": {k: a[k] for k in ("t_s", "kind", "modality", "scope", "scope_id", "summary")},
                       "commands": [{"t_s": c["t_s"], "action": c["action"], "modality": c["modality"],
                                     "scope": c["scope"], "scope_id": c["scope_id"],
                                     "acks": [{"worker_id": k["worker_id"], "status": k["status"], "t_s": k["t_s"]}
                                              for k in observer.acks if k["command_id"] == c["command_id"]]}
                                    for c in cmds]})

    def fused_acc(t0: float, t1: float) -> float | None:
        snaps = [k for k in observer.kpi_log if k.scope == "global" and k.modality == "fused" and k.n_labelled
                 and t0 <= observer.t_s(k.window_start_ms) and observer.t_s(k.window_end_ms) <= t1]
        n = sum(k.n_labelled for k in snaps)
        return round(sum(k.n_correct for k in snaps) / n, 4) if n else None

    per_fault = []
    for f in faults:
        end = f.end_s if f.end_s is not None else duration_s
        hits = [a for a in observer.alerts if a["status"] == "firing" and a["modality"] == f.modality
                and a["t_s"] >= f.start_s]
        first = min((a["t_s"] for a in hits), default=None)
        per_line, masked = _per_line(observer, f, hits)
        per_fault.append({
            "fault": str(f),
            "first_alert_t_s": first,
            "first_alert_t_s_per_line": per_line,
            "masked_t_s_per_line": masked,
            "detection_delay_windows": None if first is None else round((first - f.start_s) * 1000 / window_ms, 1),
            "fused_accuracy": {"before": fused_acc(0, f.start_s), "during": fused_acc(f.start_s, end),
                               "after": fused_acc(end, duration_s) if f.end_s is not None else None},
        })
    return {"chains": chains, "fault_detection": per_fault}


def _per_line(observer: Observer, f: FaultSpec, hits: list[dict[str, Any]]) -> tuple[dict, dict]:
    """Per line: the first alert about the fault's modality and the first mask of it (t_s)."""
    lines = sorted({a["scope_id"] for a in observer.alerts if a["scope"] == "line"}
                   | {c["scope_id"] for c in observer.commands if c["scope"] == "line"})

    def covers(x: dict[str, Any], ln: str) -> bool:
        return x["scope"] == "global" or (x["scope"] == "line" and x["scope_id"] == ln)

    alerts = {ln: min((a["t_s"] for a in hits if covers(a, ln)), default=None) for ln in lines}
    masks = {ln: min((c["t_s"] for c in observer.commands if c["action"] == "mask_modality" and covers(c, ln)
                      and c["modality"] == f.modality and c["t_s"] >= f.start_s), default=None) for ln in lines}
    return alerts, masks


def wait_for_deliveries(settings: Settings, observer: Observer, timeout_s: float) -> dict[str, Any]:
    """Delivery counters once the dispatcher has nothing pending (or at the deadline)."""
    from streamfuse.alerts.outbox import delivery_stats

    deadline = time.monotonic() + timeout_s
    while True:
        stats = delivery_stats(settings)
        done = stats["received"] >= observer.counts["alerts"] and not stats["pending"]
        if done or time.monotonic() > deadline:
            return stats
        time.sleep(0.2)  # polling Redis counters; nothing to subscribe to


def serve_models(settings: Settings, console, dataset: DatasetRows | None, models: Path | None) -> Settings:
    """Active models for the demo: the ``models`` bundle (imported and activated) or as
    :func:`ensure_models`; checks that the ``dataset``'s labels are among their classes.

    Returns:
        The settings, with ``bundle`` pointing at ``models`` when given.

    Raises:
        UnknownLabelError: a row's label is not a class of the served models (the row named).
    """
    if models is not None:
        settings = settings.model_copy(update={"bundle": str(Path(models).resolve())})
    registry = ensure_models(settings, console, fresh=models is not None)
    if dataset is not None:
        unit, version = next(iter(registry.active().items()))  # active units agree on classes
        dataset.check_classes(registry.manifest(unit, version)["classes"], "the served models'")
    return settings


def run_demo(settings: Settings, duration_s: float, faults: tuple[FaultSpec, ...], summary_path: Path | None,
             console, log_dir: Path, malformed_every: int = 200, record_dir: Path | None = None,
             dataset: DatasetRows | None = None, models: Path | None = None) -> dict[str, Any]:
    """The demo; with ``dataset`` its rows are the plant (labels checked against the served
    classes), with ``models`` that bundle is imported, activated and served."""
    from streamfuse.embedded import EmbeddedBroker
    from streamfuse.sim.publish import SimPublisher
    from streamfuse.store import StatusStore, connect
    from streamfuse.topics import ensure_topics

    broker = None
    procs: list[subprocess.Popen] = []
    if not settings.kafka_bootstrap:
        broker = EmbeddedBroker().start()
        settings = settings.model_copy(update={"kafka_bootstrap": broker.bootstrap, "broker": "tansu"})
        console.print(f"embedded broker on {broker.bootstrap}")
    try:
        store = StatusStore(connect(settings), settings.redis_prefix)
        # A fresh status for this run; the user's alert subscriptions and silences stay.
        store.clear(keep=("alerts:subscriptions", "alerts:silences"))
        ensure_topics(settings)
        settings = serve_models(settings, console, dataset, models)
        procs = [spawn("worker", settings, log_dir), spawn("monitor", settings, log_dir),
                 spawn("alerts", settings, log_dir, "dispatch")]
        start_ms = now_ms()
        sim = SimPublisher(settings, faults, start_ms=start_ms, speed=1.0, malformed_every=malformed_every,
                           run_id=f"demo{start_ms}", dataset=dataset)
        observer = Observer(settings, start_ms)
        thread = threading.Thread(target=sim.run, kwargs={"duration_s": duration_s}, daemon=True)
        thread.start()
        _watch(observer, sim, thread, procs, duration_s, console, log_dir)
        for _ in range(5):  # pick up the last acks and snapshots
            observer.poll(200)
        observer.consumer.close()
        notifications = wait_for_deliveries(settings, observer, timeout_s=settings.alerts.group_wait_s + 10)
        summary = _summary(settings, observer, sim.stats, notifications, duration_s, faults)
        _keep(summary, settings, start_ms, faults, record_dir, summary_path, console)
        return summary
    finally:
        stop_children(procs)
        if broker is not None:
            broker.stop()


def _watch(observer: Observer, sim, thread: threading.Thread, procs: list[subprocess.Popen], duration_s: float,
           console, log_dir: Path) -> None:
    """The live view, until the plant has finished and its predictions are in (or 30 s
    more); a child process that exits ends the demo with its log named."""
    from rich.live import Live

    t0 = time.monotonic()
    with Live(observer.view(sim.stats, 0, duration_s), console=console, refresh_per_second=2) as live:
        while thread.is_alive() or (len(observer.served_by) < sim.stats.samples
                                    and time.monotonic() - t0 < duration_s + 30):
            observer.poll()
            live.update(observer.view(sim.stats, time.monotonic() - t0, duration_s))
            for p, name in zip(procs, ("worker", "monitor", "alerts")):
                if p.poll() is not None:
                    raise ChildExited(name, p.returncode, log_dir / f"{name}.log")


def _summary(settings: Settings, observer: Observer, stats, notifications: dict[str, Any], duration_s: float,
             faults: tuple[FaultSpec, ...]) -> dict[str, Any]:
    return {
        "duration_s": duration_s,
        "faults": [str(f) for f in faults],
        "bundle": str(settings.bundle_dir),
        "counts": {"sensor_events": stats.sensor_events, "samples": stats.samples,
                   "labels": stats.labels, "malformed_injected": stats.malformed,
                   "predictions": len(observer.served_by),
                   "dead_letter": observer.counts["deadletter"], "kpi_snapshots": observer.counts["kpi_snapshots"],
                   "alerts": observer.counts["alerts"], "commands": observer.counts["commands"],
                   "acks": observer.counts["acks"], "notifications_sent": notifications["sent"]},
        "notifications": notifications,
        "alerts": observer.alerts,
        "commands": observer.commands,
        "acks": observer.acks,
        "final_kpis": {m: {"accuracy": k.accuracy, "agreement": k.agreement,
                           "mean_contribution": k.mean_contribution, "masked_rate": k.masked_rate}
                       for m, k in sorted(observer.kpis.items())},
        **fault_report(observer, faults, settings.monitor.kpi_window_ms, duration_s),
    }


def _keep(summary: dict[str, Any], settings: Settings, start_ms: int, faults: tuple[FaultSpec, ...],
          record_dir: Path | None, summary_path: Path | None, console) -> None:
    """Record the run (``--record``) and write the summary (``--summary``), as asked."""
    if record_dir is not None:
        from streamfuse.replay.recorder import record_demo

        manifest = record_demo(settings, record_dir, start_ms, faults)
        summary["recording"] = {"dir": str(record_dir), "records": manifest["counts"]}
        console.print(f"recorded the run into {record_dir}")
    if summary_path is not None:
        summary_path.parent.mkdir(parents=True, exist_ok=True)
        summary_path.write_text(json.dumps(summary, indent=2))
        console.print(f"summary written to {summary_path}")
