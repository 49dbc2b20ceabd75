"""The monitor as a faust-streaming app: decode, call :class:`MonitorCore`, emit.

One agent reads predictions, labels (both keyed by asset_id, co-partitioned) and the
workers' acks, so that they reach the logic in arrival order. Outputs go to ``kpis``,
``alerts`` and ``control``; rejected inputs to ``deadletter``; the latest state and the
alert → command → ack audit trail to Redis.

Restart safety: open KPI records live in a changelogged faust table (``records``) and
the detectors' and policy's state in another (``state``, written whenever a window
closes), so a killed monitor resumes where it stopped.

At-least-once alerts and commands: each has a deterministic id; the monitor produces it,
waits for the broker's acknowledgement, and only then claims the id in Redis. Killed
between the two, the restarted monitor re-derives and publishes it again with the same
id, which the alert dispatcher and the workers drop as a duplicate; a re-derived output
whose claim is in Redis is not published again.

Redis is not on the data path: every Redis write (status, audit, claims, readiness) goes
through a write-behind :class:`~streamfuse.store.StatusWriter`, so a Redis outage never
stops or crashes the agent. During an outage the monitor keeps computing KPIs and
publishing alerts and commands on time; a claim that cannot be checked counts as not
claimed (publish: duplicates are harmless, losses are not), and the writes made during
the outage land, in order, once Redis is back (``streamfuse_redis_up{process="monitor"}``
shows the outage; it is logged once when it starts and once when it ends).
"""

from __future__ import annotations

import logging
from pathlib import Path

from prometheus_client import CollectorRegistry

from streamfuse.clock import now_ms
from streamfuse.config import Settings
from streamfuse.errors import InvalidEvent
from streamfuse.events import (
    MSGPACK, Ack, DeadLetter, Label, Prediction, content_type_of, dead_letter_original, decode, encode,
)
from streamfuse.kafka import faust_config
from streamfuse.faultpoint import reached
from streamfuse.metrics import MonitorMetrics, RedisMetrics, serve
from streamfuse.control import ProposalStore
from streamfuse.monitor.core import MonitorCore, Outputs
from streamfuse.models.registry import Registry
from streamfuse.store import RedisLink, StatusStore, StatusWriter, connect
from streamfuse.topics import Topics

log = logging.getLogger(__name__)
HEADERS = {"content-type": MSGPACK.encode()}
GAUGED = ("accuracy", "macro_f1", "agreement", "mean_contribution", "mean_confidence", "dominance", "missing_rate",
          "est_accuracy")



class ClaimedPublisher:
    """Publish alerts and commands at least once: produce unless claimed before, wait for
    the broker's acknowledgement, then claim the id in Redis (write-behind).

    A claim that cannot be checked (Redis down) counts as not claimed: publishing twice
    is harmless (ids make it idempotent downstream), not publishing is not.
    """

    def __init__(self, link: RedisLink, store: StatusStore, writer: StatusWriter) -> None:
        self.link, self.store, self.writer = link, store, writer
        self.published: set[str] = set()  # claims of this process's life: known without asking Redis

    async def publish(self, kind: str, ident: str, topic, key: bytes, value: bytes) -> bool:
        """True when it was produced now; False when it had been published before."""
        claim = f"{kind}:{ident}"
        if claim in self.published or self.link.attempt(self.store.claimed, kind, ident,
                                                        what=f"checking the {kind} claim", default=False):
            return False
        fut = await topic.send(key=key, value=value, headers=HEADERS)
        await fut  # the broker's acknowledgement
        reached("monitor-after-produce")
        self.published.add(claim)
        self.writer.submit(f"claiming {kind} {ident}", self.store.claim, kind, ident)
        return True


def create_app(settings: Settings, baselines: dict[str, dict[str, float]], registry: CollectorRegistry | None = None):
    import faust

    registry = registry or CollectorRegistry()
    metrics = MonitorMetrics(registry)
    serve(registry, settings.monitor.metrics_port)
    topics = Topics(settings.topic_prefix)
    datadir = Path(settings.monitor.data_dir or Path(settings.model_dir).parent / "faust") / settings.monitor.app_id
    datadir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        settings.monitor.app_id, **faust_config(settings), web_enabled=False, store="memory://",
        datadir=str(datadir), autodiscover=False,
    )
    raw = {"key_serializer": "raw", "value_serializer": "raw"}
    source = app.topic(topics.predictions, topics.labels, topics.acks, **raw)
    out = {name: app.topic(getattr(topics, name), **raw) for name in ("kpis", "alerts", "control", "deadletter")}
    records = app.Table("records", default=None, partitions=settings.partitions)
    state = app.Table("state", default=None, partitions=settings.partitions)
    link = RedisLink("monitor", RedisMetrics(registry).up.labels("monitor"))
    store = StatusStore(connect(settings, check=False, timeout_s=2.0), settings.redis_prefix)
    writer = StatusWriter(link, "monitor-redis-writer")
    publish = ClaimedPublisher(link, store, writer).publish
    # Approval mode: commands wait for an operator (streamfuse.control) instead of going out.
    proposals = ProposalStore(store.r, settings.redis_prefix) if settings.monitor.approval else None

    def sink(key: str, value) -> None:
        if value is None:
            records.pop(key, None)
        else:
            records[key] = value

    models = Registry(settings, client=store.r)

    def baselines_of(versions: dict[str, str]) -> dict | None:  # None: Redis down, asked again later
        return link.attempt(models.baselines_of, versions, what="reading the baselines of new model versions")

    core = MonitorCore(baselines, settings.monitor, sink, baselines_of)
    restored = {"done": False, "seq": 0}

    def restore() -> None:
        snaps = [v for k, v in state.items() if k.startswith("core@") and v]
        best = max(snaps, key=lambda v: v["seq"], default=None)
        if best is not None or len(records):
            core.load_state_dict(best["core"] if best else {}, list(records.items()))
            restored["seq"] = best["seq"] if best else 0
            log.warning("monitor restored: %d open records, %d open alerts", len(records), len(core.open_alerts()))
        restored["done"] = True

    def checkpoint(partition: int) -> None:
        restored["seq"] += 1
        state[f"core@{partition}"] = {"seq": restored["seq"], "core": core.state_dict()}

    async def emit(result: Outputs) -> None:
        for s in result.kpis:
            await out["kpis"].send(key=f"{s.scope}|{s.scope_id}|{s.modality}".encode(), value=encode(s),
                                   headers=HEADERS)
            if s.scope == "global":
                for kpi in GAUGED:
                    value = getattr(s, kpi)
                    if value is not None:
                        metrics.kpi.labels(s.scope, s.modality, kpi).set(value)
        if result.kpis:
            writer.submit("writing the latest KPIs", store.put_kpis, result.kpis)
        for s in result.estimates:  # label-free, at the window's end: long before its labels
            if s.est_accuracy is not None:
                metrics.accuracy_estimate.labels(s.scope, s.scope_id, s.modality).set(s.est_accuracy)
        for a in result.alerts:
            if not await publish("alert", f"{a.alert_id}:{a.status}", out["alerts"], a.fingerprint.encode(),
                                 encode(a)):
                continue
            writer.submit(f"recording alert {a.alert_id}", store.put_alert, a)
            metrics.alerts.labels(a.kind, a.status).inc()
            metrics.firing.labels(a.kind, a.modality).inc(1 if a.status == "firing" else -1)
            log.warning("alert %s %s: %s", a.status, a.alert_id, a.summary)
        for c in result.commands:
            if proposals is not None:
                if proposals.hold(c, now_ms()):
                    log.warning("command %s %s %s proposed; `streamfuse control approve %s` sends it",
                                c.command_id, c.action, c.modality, c.command_id)
                continue
            if not await publish("command", c.command_id, out["control"], (c.modality or "").encode(), encode(c)):
                continue
            core.issued(c, now_ms())
            writer.submit(f"recording command {c.command_id}", store.put_command, c)
            metrics.commands.labels(c.action).inc()
            log.warning("command %s %s %s %s:%s", c.command_id, c.action, c.modality, c.scope, c.scope_id)

    @app.agent(source)
    async def monitor(stream):
        async for event in stream.events():
            if not restored["done"]:
                restore()  # tables are recovered before the first event is delivered
            msg = event.message
            try:
                ev = decode(event.value, content_type_of(event.headers),
                            expect=(Prediction, Label, Ack), max_bytes=settings.max_payload_bytes)
            except InvalidEvent as exc:
                metrics.rejected.labels(exc.reason).inc()
                original, note = dead_letter_original(event.value)
                dead = DeadLetter(exc.reason, exc.detail + note, msg.topic, original, "monitor",
                                  int(msg.timestamp * 1000), msg.partition, msg.offset, event.key)
                await out["deadletter"].send(key=event.key, value=encode(dead), headers=HEADERS)
                continue
            if isinstance(ev, Ack):
                metrics.events.labels("ack").inc()
                core.on_ack(ev)
                writer.submit(f"recording the ack of {ev.command_id}", store.put_ack, ev)
            elif isinstance(ev, Label):
                metrics.events.labels("label").inc()
                core.on_label(ev)
            else:
                metrics.events.labels("prediction").inc()
                result = core.on_prediction(ev, f"{msg.topic}:{msg.partition}")
                if core.kpis.watermark:
                    metrics.watermark.set(core.kpis.watermark / 1000)
                # Publish first, checkpoint after: killed in between, the monitor re-derives
                # the same outputs from the older checkpoint, and the Redis claims drop them.
                await emit(result)
                if result.kpis or result.alerts:
                    checkpoint(msg.partition)
            metrics.pending_labels.set(core.kpis.pending_labels)

    @app.timer(1.0)
    async def housekeeping() -> None:
        if restored["done"]:
            await emit(core.tick(now_ms()))

    @app.task
    async def ready() -> None:
        writer.submit("marking the monitor ready", store.mark_ready, "monitor", settings.monitor.app_id)

    return app


def run_monitor(settings: Settings, baselines: dict[str, dict[str, float]], loglevel: str = "warn") -> None:
    """Run the monitor in the foreground until SIGTERM / Ctrl-C."""
    from faust.worker import Worker

    app = create_app(settings, baselines)
    worker = Worker(app, loglevel=loglevel)
    # faust's terminal spinner sets the root logger to DEBUG (each record spins it): every
    # aiokafka debug message then becomes a LogRecord, about a tenth of the monitor's CPU.
    worker.spinner = None
    worker.execute_from_commandline()
