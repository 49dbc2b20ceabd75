"""The monitor as a faust-streaming app: decode, call :class:`MonitorCore`, emit.

One agent reads predictions, labels (both keyed by asset_id, co-partitioned) and the
workers' acks, so that they reach the logic in arrival order. Outputs go to ``kpis``,
``alerts`` and ``control``; rejected inputs to ``deadletter``; the latest state and the
alert → command → ack audit trail to Redis.

Restart safety: open KPI records live in a changelogged faust table (``records``), one
entry per batch of events (:class:`~streamfuse.monitor.changelog.BatchLog`: a few
changelog records a second instead of about two per event), and the detectors' and
policy's state in another (``state``, written whenever a window closes), so a killed
monitor resumes where it stopped. A batch is written whenever faust is about to commit
the consumer's offsets (:func:`~streamfuse.faust_transport.install`'s ``before_commit``)
and with every checkpoint; the producer's flush before the commit waits until it is
acknowledged, so a committed offset never covers an event whose records are not in the
changelog. Events are acknowledged as faust does by default: a monitor killed before a
commit gets them again.

At-least-once alerts and commands: each has a deterministic id; the monitor leases its
claim in Redis, produces it, waits for the broker's acknowledgement, and only then marks
the claim done (:class:`ClaimedPublisher`). Killed in between, the restarted monitor (or a
redundant one) re-derives it and, once the lease lapsed, publishes it again with the same
id, which the alert dispatcher and the workers drop as a duplicate; a re-derived output
whose claim is done is not published again.

Redis is not on the data path: every Redis write (status, audit, claims, readiness) goes
through a write-behind :class:`~streamfuse.store.StatusWriter`, so a Redis outage never
stops or crashes the agent. During an outage the monitor keeps computing KPIs and
publishing alerts and commands on time; a claim that cannot be checked counts as not
claimed (publish: duplicates are harmless, losses are not), and the writes made during
the outage land, in order, once Redis is back (``streamfuse_redis_up{process="monitor"}``
shows the outage; it is logged once when it starts and once when it ends).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from pathlib import Path

import msgpack

from prometheus_client import CollectorRegistry

from streamfuse.clock import now_ms
from streamfuse.config import Settings
from streamfuse.errors import InvalidEvent
from streamfuse.events import (
    MSGPACK, Ack, Alert, Command, DeadLetter, Label, Prediction, content_type_of, dead_letter_original, decode, encode,
)
from streamfuse.faust_transport import install as install_transport
from streamfuse.kafka import faust_config
from streamfuse.faultpoint import reached
from streamfuse.metrics import MonitorMetrics, RedisMetrics, serve
from streamfuse.control import ProposalStore
from streamfuse.monitor.changelog import PREFIX as BATCH_PREFIX, BatchLog
from streamfuse.monitor.core import MonitorCore, Outputs
from streamfuse.monitor.input_progress import InputProgress, committed_offsets
from streamfuse.models.registry import Registry
from streamfuse.store import RedisLink, StatusStore, StatusWriter, connect
from streamfuse.topics import Topics

log = logging.getLogger(__name__)
HEADERS = {"content-type": MSGPACK.encode()}
LEASE_MS = 5_000  # a monitor's right to publish an output, before another may take it over
LEASE_POLL_S = 0.02  # how often a monitor waiting for another's output asks again
BATCH_WRITES = 500  # a batch entry is written at the latest after this many records (about 0.5 KB each)
GAUGED = ("accuracy", "macro_f1", "agreement", "mean_contribution", "mean_confidence", "dominance", "missing_rate",
          "est_accuracy")


class ClaimedPublisher:
    """Publish alerts and commands at least once, and once across monitors: take a lease on
    the output's claim in Redis, produce, wait for the broker's acknowledgement, then mark
    the claim done (write-behind).

    Redundant monitors (each its own app id, all reading the same inputs) derive the same
    outputs under the same ids. The first to lease an output publishes it; the others wait
    until it is done (nothing to publish) or until the lease lapses (:data:`LEASE_MS`: its
    holder died between the lease and the claim), then take it over. A claim that cannot be
    checked (Redis down) counts as not claimed: publishing twice is harmless (ids make it
    idempotent downstream), not publishing is not.
    """

    def __init__(self, link: RedisLink, store: StatusStore, writer: StatusWriter, owner: str) -> None:
        self.link, self.store, self.writer, self.owner = link, store, writer, owner
        self.published: set[str] = set()  # claims of this process's life: known without asking Redis

    async def publish(self, kind: str, ident: str, topic, key: bytes, value: bytes) -> bool:
        """True when it was produced now; False when it had been published before."""
        claim = f"{kind}:{ident}"
        if claim in self.published:
            return False
        while (state := self.link.attempt(self.store.lease, kind, ident, self.owner, LEASE_MS,
                                          what=f"taking the {kind} claim", default="taken")) == "held":
            await asyncio.sleep(LEASE_POLL_S)  # another monitor is publishing it
        if state == "done":
            return False
        fut = await topic.send(key=key, value=value, headers=HEADERS)
        await fut  # the broker's acknowledgement
        reached("monitor-after-produce")
        self.published.add(claim)
        self.writer.submit(f"claiming {kind} {ident}", self.store.claim, kind, ident)
        return True


def _unpack(key: str, value: bytes):
    """A ``records`` entry: a batch (msgpack), or one record of an older monitor (JSON)."""
    return msgpack.unpackb(value, raw=False) if key.startswith(BATCH_PREFIX) else json.loads(value)


class MonitorService:
    """Everything an agent body does, outside faust: restore and checkpoint the core through
    the app's tables, hand it decoded events, and emit its outputs (topics, metrics,
    Redis). ``records`` and ``state`` are faust tables (mappings); ``out`` the output topics."""

    def __init__(self, settings: Settings, baselines: dict[str, dict[str, float]], registry: CollectorRegistry,
                 records, state, out: dict) -> None:
        self.settings, self.records, self.state, self.out = settings, records, state, out
        self.metrics = MonitorMetrics(registry)
        link = RedisLink("monitor", RedisMetrics(registry).up.labels("monitor"))
        self.store = StatusStore(connect(settings, check=False, timeout_s=2.0), settings.redis_prefix)
        self.writer = StatusWriter(link, "monitor-redis-writer")
        owner = f"{settings.monitor.app_id}@{socket.gethostname()}:{os.getpid()}"
        self.publish = ClaimedPublisher(link, self.store, self.writer, owner).publish
        # Approval mode: commands wait for an operator (streamfuse.control) instead of going out.
        self.proposals = ProposalStore(self.store.r, settings.redis_prefix) if settings.monitor.approval else None
        models = Registry(settings, client=self.store.r)

        def baselines_of(versions: dict[str, str]) -> dict | None:  # None: Redis down, asked again later
            return link.attempt(models.baselines_of, versions, what="reading the baselines of new model versions")

        self.log = BatchLog()
        self.core = MonitorCore(baselines, settings.monitor, self.log.put, baselines_of)
        topics = Topics(settings.topic_prefix)
        self.progress = InputProgress((topics.predictions, topics.labels))
        self.restored = False
        self.seq = 0
        self._legacy: list[str] = []  # per-record entries of an older monitor, dropped after the first flush

    def restore(self) -> None:
        """Continue from the newest checkpoint and the open KPI records, if any, and from
        the input partitions' committed offsets."""
        self.progress.started(committed_offsets(self.settings, self.settings.monitor.app_id, self.progress.topics))
        snaps = [v for k, v in self.state.items() if k.startswith("core@") and v]
        best = max(snaps, key=lambda v: v["seq"], default=None)
        entries = [(k, _unpack(k, v)) for k, v in self.records.items()]
        for key in self.log.restore(entries):  # left behind by a kill between a flush and its tombstones
            self._write(key, None)
        self._legacy = [k for k, _ in entries if not k.startswith(BATCH_PREFIX)]
        for key, value in entries:  # written one per record by an older monitor: carried into the next batch
            if not key.startswith(BATCH_PREFIX):
                self.log.put(key, value)
        if best is not None or self.log.live:
            self.core.load_state_dict(best["core"] if best else {}, list(self.log.live.items()))
            self.seq = best["seq"] if best else 0
            log.warning("monitor restored: %d open records, %d open alerts", len(self.log.live),
                        len(self.core.open_alerts()))
        self.restored = True

    def checkpoint(self, partition: int) -> None:
        """The core's state, in ``partition`` of the state table's changelog (named, not
        the current event's: the housekeeping timer checkpoints too)."""
        self.flush()  # the records the checkpoint's state goes with
        self.seq += 1
        key, value = f"core@{partition}", {"seq": self.seq, "core": self.core.state_dict()}
        self.state.data[key] = value
        self.state.send_changelog(partition, key, value)

    def flush(self) -> None:
        """Write the batch's records as one table entry and drop the entries that no longer
        matter. Runs with each checkpoint and before each commit of the consumer's offsets
        (no current event there), so it names the changelog partition itself: entry
        ``b:<seq>`` goes to partition ``seq % partitions``, where its tombstone finds it
        after a restart too."""
        out = self.log.flush()
        if out is None:
            return
        key, ops, gone = out
        self._write(key, ops)
        for old in gone:
            self._write(old, None)
        for old in self._legacy:  # its partition was its event's: a tombstone in each
            self.records.data.pop(old, None)
            for partition in range(self.settings.partitions):
                self.records.send_changelog(partition, old, None, value_serializer="raw")
        self._legacy = []

    def _write(self, key: str, value) -> None:
        partition = int(key[len(BATCH_PREFIX):]) % self.settings.partitions
        if value is None:
            self.records.data.pop(key, None)
            self.records.send_changelog(partition, key, None, value_serializer="raw")
        else:
            packed = msgpack.packb(value, use_bin_type=True)
            self.records.data[key] = packed
            self.records.send_changelog(partition, key, packed)

    async def on_event(self, value: bytes, headers, key, msg) -> None:
        """One consumed record: decode, dead-letter what is invalid, hand the rest to the core."""
        if not self.restored:
            self.restore()  # tables are recovered before the first event is delivered
        try:
            ev = decode(value, content_type_of(headers), expect=(Prediction, Label, Ack),
                        max_bytes=self.settings.max_payload_bytes)
        except InvalidEvent as exc:
            await self._dead_letter(exc, value, key, msg)
            self.progress.read(msg.topic, msg.partition, msg.offset)  # read: no unread record holds the watermark
            return
        core, metrics = self.core, self.metrics
        if isinstance(ev, Ack):
            metrics.events.labels("ack").inc()
            core.on_ack(ev)
            self.writer.submit(f"recording the ack of {ev.command_id}", self.store.put_ack, ev)
        elif isinstance(ev, Label):
            metrics.events.labels("label").inc()
            self.progress.read(msg.topic, msg.partition, msg.offset, ev.ts_ms)
            await self._settle(core.on_label(ev), msg.partition)  # windows held for labels may close
        else:
            metrics.events.labels("prediction").inc()
            self.progress.read(msg.topic, msg.partition, msg.offset, ev.ts_ms)
            await self._settle(core.on_prediction(ev, f"{msg.topic}:{msg.partition}"), msg.partition)
        if self.log.pending >= BATCH_WRITES:  # keep an entry well under the broker's record size limit
            self.flush()
        metrics.pending_labels.set(core.kpis.pending_labels)

    async def _settle(self, result: Outputs, partition: int) -> None:
        """Publish first, checkpoint after: killed in between, the monitor re-derives the
        same outputs from the older checkpoint, and the Redis claims drop them."""
        core, metrics = self.core, self.metrics
        if core.kpis.watermark:
            metrics.watermark.set(core.kpis.watermark / 1000)
        await self.emit(result)
        if result.kpis or result.alerts:
            self.checkpoint(partition)
            metrics.late.labels("prediction").set(core.kpis.late_predictions)
            metrics.late.labels("label").set(core.kpis.late_labels)

    async def _dead_letter(self, exc: InvalidEvent, value: bytes, key, msg) -> None:
        self.metrics.rejected.labels(exc.reason).inc()
        original, note = dead_letter_original(value)
        dead = DeadLetter(exc.reason, exc.detail + note, msg.topic, original, "monitor",
                          int(msg.timestamp * 1000), msg.partition, msg.offset, key)
        await self.out["deadletter"].send(key=key, value=encode(dead), headers=HEADERS)

    async def tick(self) -> None:
        """Wall-clock housekeeping, once restored: windows a held watermark lets go with no
        event to come (the input's last records read), unacknowledged commands."""
        if self.restored:
            result = self.core.release()
            result.extend(self.core.tick(now_ms()))
            await self._settle(result, 0)

    async def emit(self, result: Outputs) -> None:
        await self._emit_kpis(result)
        for a in result.alerts:
            await self._emit_alert(a)
        for c in result.commands:
            await self._emit_command(c)

    async def _emit_kpis(self, result: Outputs) -> None:
        for s in result.kpis:
            await self.out["kpis"].send(key=f"{s.scope}|{s.scope_id}|{s.modality}".encode(), value=encode(s),
                                        headers=HEADERS)
            if s.scope == "global":
                for kpi in GAUGED:
                    value = getattr(s, kpi)
                    if value is not None:
                        self.metrics.kpi.labels(s.scope, s.modality, kpi).set(value)
        if result.kpis:
            self.writer.submit("writing the latest KPIs", self.store.put_kpis, result.kpis)
        for s in result.estimates:  # label-free, at the window's end: long before its labels
            if s.est_accuracy is not None:
                self.metrics.accuracy_estimate.labels(s.scope, s.scope_id, s.modality).set(s.est_accuracy)

    async def _emit_alert(self, a: Alert) -> None:
        if not await self.publish("alert", f"{a.alert_id}:{a.status}", self.out["alerts"], a.fingerprint.encode(),
                                  encode(a)):
            return
        self.writer.submit(f"recording alert {a.alert_id}", self.store.put_alert, a)
        self.metrics.alerts.labels(a.kind, a.status).inc()
        self.metrics.firing.labels(a.kind, a.modality).inc(1 if a.status == "firing" else -1)
        log.warning("alert %s %s: %s", a.status, a.alert_id, a.summary)

    async def _emit_command(self, c: Command) -> None:
        if self.proposals is not None:
            if self.proposals.hold(c, now_ms()):
                log.warning("command %s %s %s proposed; `streamfuse control approve %s` sends it",
                            c.command_id, c.action, c.modality, c.command_id)
            return
        if not await self.publish("command", c.command_id, self.out["control"], (c.modality or "").encode(),
                                  encode(c)):
            return
        self.core.issued(c, now_ms())
        self.writer.submit(f"recording command {c.command_id}", self.store.put_command, c)
        self.metrics.commands.labels(c.action).inc()
        log.warning("command %s %s %s %s:%s", c.command_id, c.action, c.modality, c.scope, c.scope_id)

    def mark_ready(self) -> None:
        self.writer.submit("marking the monitor ready", self.store.mark_ready, "monitor", self.settings.monitor.app_id)


def create_app(settings: Settings, baselines: dict[str, dict[str, float]], registry: CollectorRegistry | None = None):
    """The monitor's faust app. Building it starts nothing: no metrics server (see
    :func:`run_monitor`), no change to faust's global transport registry."""
    import faust

    service: MonitorService | None = None

    def before_commit() -> None:  # the batch of records the acknowledged events wrote
        if service is not None:
            service.flush()

    topics = Topics(settings.topic_prefix)
    datadir = Path(settings.monitor.data_dir or Path(settings.model_dir).parent / "faust") / settings.monitor.app_id
    datadir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        settings.monitor.app_id, **faust_config(settings), web_enabled=False, store="memory://",
        datadir=str(datadir), autodiscover=False,
    )
    install_transport(app, before_commit)  # before anything reads app.transport
    raw = {"key_serializer": "raw", "value_serializer": "raw"}
    source = app.topic(topics.predictions, topics.labels, topics.acks, **raw)
    out = {name: app.topic(getattr(topics, name), **raw) for name in ("kpis", "alerts", "control", "deadletter")}
    records = app.Table("records", default=None, partitions=settings.partitions, value_type=bytes)  # msgpack
    state = app.Table("state", default=None, partitions=settings.partitions)
    service = MonitorService(settings, baselines, registry or CollectorRegistry(), records, state, out)
    service.core.kpis.input_behind = lambda: service.progress.behind(app.consumer)

    @app.agent(source)
    async def monitor(stream):
        async for event in stream.events():
            await service.on_event(event.value, event.headers, event.key, event.message)

    @app.timer(1.0)
    async def housekeeping() -> None:
        await service.tick()

    @app.task
    async def ready() -> None:
        service.mark_ready()

    return app


def run_monitor(settings: Settings, baselines: dict[str, dict[str, float]], loglevel: str = "warn") -> None:
    """Run the monitor in the foreground until SIGTERM / Ctrl-C, its metrics served on
    ``settings.monitor.metrics_port``."""
    from faust.worker import Worker

    registry = CollectorRegistry()
    serve(registry, settings.monitor.metrics_port)
    app = create_app(settings, baselines, registry)
    worker = Worker(app, loglevel=loglevel)
    # faust's terminal spinner sets the root logger to DEBUG (each record spins it): every
    # aiokafka debug message then becomes a LogRecord, about a tenth of the monitor's CPU.
    worker.spinner = None
    worker.execute_from_commandline()
