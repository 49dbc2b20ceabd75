"""The inference worker: ``samples`` → micro-batches → models + fusion → ``predictions``.

At-least-once: a batch's offsets are committed only after the broker acknowledged its
predictions (and dead-letter records); ``sample_id`` makes re-processing idempotent
downstream. Intake runs on its own thread (:mod:`streamfuse.inference.feeder`) and sends
are asynchronous, so a few batches can be uncommitted at once (``MAX_BATCHES_IN_FLIGHT``). Commands
on ``control`` are read by every worker (no consumer group) from the start of the topic,
so a worker that starts late reaches the current desired state, and are applied between
batches (:mod:`streamfuse.inference.commands`).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import deque

from confluent_kafka import OFFSET_BEGINNING, KafkaException, TopicPartition
from prometheus_client import CollectorRegistry

from streamfuse.clock import now_ms
from streamfuse.config import Settings
from streamfuse.errors import BrokerError, InvalidEvent
from streamfuse.events import Ack, Command, encode
from streamfuse.inference.commands import CommandHandler
from streamfuse.inference.feeder import Batch, Feeder, Offsets, Record, decode_record
from streamfuse.inference.outbox import Delivery, Outbox, dead_letter
from streamfuse.inference.predict import BatchContext, assemble, drop_non_finite, explain, masked_matrix
from streamfuse.kafka import consumer_lag, make_rd_consumer, make_rd_producer
from streamfuse.metrics import RedisMetrics, WorkerMetrics, serve
from streamfuse.redislink import RedisLink
from streamfuse.models.bundle import Bundle, Encoded
from streamfuse.topics import Topics

log = logging.getLogger(__name__)
RECONCILE_S = 2.0  # how often a worker compares what it serves with the registry
# Batches whose sends are not yet acknowledged before the worker waits for them. With the
# batch in compute and the one the feeder has ready, at most MAX_BATCHES_IN_FLIGHT + 2
# batches are uncommitted at any time: what a crash can make the next owner predict twice.
MAX_BATCHES_IN_FLIGHT = 2



class InferenceWorker:
    """One worker process (one GPU). Stop it with :meth:`stop` or ``max_samples``.

    Args:
        settings: effective settings (bootstrap, topics, batching knobs).
        bundle: the loaded model bundle.
        worker_id: unique per process; defaults to ``host-pid``.
        metrics_registry: Prometheus registry for this worker's metrics.
        model_registry: the model registry (versions, hot swaps); None = serve ``bundle`` only.
    """

    def __init__(self, settings: Settings, bundle: Bundle, worker_id: str | None = None,
                 metrics_registry: CollectorRegistry | None = None, model_registry=None) -> None:
        self.settings = settings
        self.bundle = bundle
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}"
        self.topics = Topics(settings.topic_prefix)
        self.metrics_registry = metrics_registry or CollectorRegistry()
        self.metrics = WorkerMetrics(self.metrics_registry)
        redis_up = RedisMetrics(self.metrics_registry).up.labels("worker") if model_registry is not None else None
        self.commands = CommandHandler(self, model_registry, RedisLink(f"worker {self.worker_id}", redis_up))
        self._next_reconcile = 0.0
        self.processed = 0
        self._stop = threading.Event()
        self.metrics.versions.info({m: v for m, v in bundle.versions.items()})

    @property
    def state(self):
        return self.commands.state

    def stop(self) -> None:
        self._stop.set()

    # ------------------------------------------------------------------ main loop

    def run(self, max_samples: int | None = None) -> int:
        """Consume until stopped (or ``max_samples`` predictions); returns the count."""
        wcfg = self.settings.worker
        serve(self.metrics_registry, wcfg.metrics_port)
        # librdkafka's statistics carry the consumer lag (the "consumer lag growing" alert rule)
        consumer = make_rd_consumer(self.settings, wcfg.group, self.worker_id,
                                    on_stats=lambda stats: self.metrics.lag.set(consumer_lag(stats)))
        control = make_rd_consumer(self.settings, None, f"{self.worker_id}-control")
        t = self.topics
        out = Outbox(make_rd_producer(self.settings, self.worker_id), self.metrics.produce_failures,
                     {t.predictions: "predictions", t.deadletter: "deadletter", t.acks: "acks"})
        feeder = Feeder(consumer, self.topics.samples, wcfg.max_batch, wcfg.max_delay_ms,
                        self.settings.max_payload_bytes, wcfg.stream_batches)
        in_flight: deque[tuple[Delivery, Offsets]] = deque()  # per batch, in order
        try:
            catch_up_to = self._assign_control(control)
            self.bundle.warm_up()  # trace the models now, not on the first batch
            feeder.start()
            log.info("worker %s serving bundle %s (batch <= %d, delay <= %d ms)",
                     self.worker_id, self.bundle.version, wcfg.max_batch, wcfg.max_delay_ms)
            while not self._stop.is_set() and (max_samples is None or self.processed < max_samples):
                self._apply_commands(control, out, catch_up_to)
                batch = feeder.get(timeout_s=0.2)
                if batch is not None:
                    delivery = Delivery()
                    self._process(batch, out, delivery)
                    in_flight.append((delivery, batch.offsets))
                out.poll()
                self._commit_delivered(in_flight, feeder, out)
                while len(in_flight) > MAX_BATCHES_IN_FLIGHT and not self._stop.is_set():
                    out.producer.poll(0.05)  # wait for the oldest batch's acks (a broker outage waits here)
                    self._commit_delivered(in_flight, feeder, out)
            self._drain(in_flight, feeder, out)
        finally:
            self.commands.close()
            feeder.close()
            control.close()
            self._flush_quietly(out)
        return self.processed

    def _drain(self, in_flight: deque, feeder: Feeder, out: Outbox, timeout_s: float = 30.0) -> None:
        """At stop: wait (bounded) for the batches in flight and commit what was delivered;
        the rest stays uncommitted and is re-read by the partitions' next owner."""
        deadline = time.monotonic() + timeout_s
        while in_flight and time.monotonic() < deadline:
            out.producer.poll(0.05)
            self._commit_delivered(in_flight, feeder, out)
        if in_flight:
            log.warning("stopping with %d batches not acknowledged by the broker; they stay uncommitted "
                        "and are predicted again by the next owner", len(in_flight))

    @staticmethod
    def _flush_quietly(out: Outbox) -> None:
        try:
            out.flush(10.0)
        except KafkaException as exc:
            log.warning("at stop: %s (their batches were not committed)", exc)

    def _assign_control(self, control) -> Offsets:
        """Read ``control`` from its start; returns the end offsets at start-up (commands
        before them are history, caught up on without acks)."""
        topic = self.topics.control
        meta = control.list_topics(topic, timeout=30).topics[topic]
        if meta.error is not None:
            raise BrokerError(f"cannot read the control topic {topic!r} ({meta.error.str()}); create the "
                              "topics first: streamfuse topics")
        parts = sorted(meta.partitions) or [0]
        ends = {(topic, p): control.get_watermark_offsets(TopicPartition(topic, p), timeout=30)[1] for p in parts}
        control.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        return ends

    def _commit_delivered(self, in_flight: deque, feeder: Feeder, out: Outbox) -> None:
        """Hand back, oldest first, the offsets of batches whose outputs the broker has
        acknowledged (at-least-once: a send that failed is sent again, its batch waits)."""
        while in_flight and out.settled(in_flight[0][0]):
            delivery, offsets = in_flight.popleft()
            feeder.commit(offsets)
            if delivery.handed_at and delivery.acked_at >= delivery.handed_at:
                self.metrics.stage.labels("ack").observe(delivery.acked_at - delivery.handed_at)

    # ------------------------------------------------------------------ inference

    def _dead(self, out: Outbox, msg: Record, exc: InvalidEvent, delivery: Delivery | None = None) -> None:
        self.metrics.rejected.labels(exc.reason).inc()
        dead = dead_letter(msg, exc, self.settings.max_payload_bytes, now_ms())
        out.send(self.topics.deadletter, msg.key, encode(dead), delivery)

    def _encode(self, samples: list, out: Outbox, delivery: Delivery) -> tuple[list, Encoded | None]:
        """The models on the batch. Should they fail on it as a whole (a reading the checks
        let through breaks a model), each sample is tried alone: those that fail alone are
        dead-lettered and the rest served, so that one poison sample cannot stop the worker.
        A failure of every sample alone is not the samples' fault: it is raised."""
        try:
            return samples, self.bundle.encode([s.readings for _, s in samples])
        except Exception as exc:  # isolate the culprit (below) rather than stop on it
            log.warning("the models failed on a batch of %d (%s: %s); trying its samples one by one",
                        len(samples), type(exc).__name__, exc)
            first = exc
        good, bad = [], []
        for msg, s in samples:
            try:
                self.bundle.encode([s.readings])
            except Exception as exc:
                bad.append((msg, InvalidEvent("bad_field", f"the models failed on it: {type(exc).__name__}: {exc}")))
            else:
                good.append((msg, s))
        if not good:
            raise first
        for msg, exc in bad:
            self._dead(out, msg, exc, delivery)
        return good, self.bundle.encode([s.readings for _, s in good])

    def _process(self, batch: Batch, out: Outbox, delivery: Delivery) -> None:
        """Models, fusion and contributions for one batch; its sends report to ``delivery``."""
        for msg, exc in batch.dead:
            self._dead(out, msg, exc, delivery)
        if not batch.samples:
            return
        started = time.monotonic()
        self.metrics.queue_wait.observe(started - batch.first_at)
        self.metrics.stage.labels("batch_wait").observe(started - batch.first_at)
        samples, enc = self._encode(batch.samples, out, delivery)
        b, mode = self.bundle, self.state.fusion_mode
        for row, exc in [*enc.errors, *drop_non_finite(enc, b.modalities)]:
            self._dead(out, samples[row][0], exc, delivery)
        masked = masked_matrix(self.state, [s for _, s in samples], b.modalities)
        explained = explain(b, enc, masked, mode)
        computed = time.monotonic()
        ctx = BatchContext(tuple(b.classes), tuple(b.modalities), mode, dict(b.versions), self.worker_id, now_ms(),
                           (computed - batch.first_at) * 1000)
        records, unusable = assemble([s for _, s in samples], enc, masked, explained, ctx)
        assembled = time.monotonic()
        for i in unusable:
            self._dead(out, samples[i][0], self._unusable(samples[i][1], enc.computed[i].tolist()), delivery)
        out.send_many(self.topics.predictions, [(samples[i][0].key, value) for i, value in records], delivery)
        delivery.handed_at = time.monotonic()
        self._observe(len(samples), len(records), enc, started, computed, assembled)

    def _unusable(self, sample, computed: list[bool]) -> InvalidEvent:
        mods = self.bundle.modalities
        return InvalidEvent("no_usable_modality", f"sample {sample.sample_id}: no modality left to fuse (missing: "
                            f"{sorted(m for m, c in zip(mods, computed) if not c)}, "
                            f"masked: {list(self.state.masked_labels())})")

    def _observe(self, n: int, produced: int, enc, started: float, computed: float, assembled: float) -> None:
        """One batch's metrics, once per batch."""
        m = self.metrics
        for modality, seconds in enc.seconds.items():
            m.compute.labels(modality).observe(seconds)
        m.stage.labels("compute").observe(computed - started)
        m.stage.labels("assemble").observe(assembled - computed)
        m.stage.labels("produce").observe(time.monotonic() - assembled)
        self.processed += n
        m.samples.inc(produced)
        m.batches.inc()
        m.batch_size.observe(n)

    # ------------------------------------------------------------------ commands

    def _apply_commands(self, control, out: Outbox, catch_up_to: Offsets | None = None) -> None:
        acks: list[tuple[Command, str, str]] = []
        for raw in control.consume(num_messages=1000, timeout=0):
            if raw.error() is not None:
                if raw.error().fatal():
                    raise KafkaException(raw.error())
                log.warning("control consumer: %s", raw.error())
                continue
            msg = Record.of(raw)
            try:
                cmd = decode_record(msg, Command, self.settings.max_payload_bytes)
            except InvalidEvent as exc:
                self._dead(out, msg, exc)
                continue
            catching_up = catch_up_to is not None and msg.offset < catch_up_to.get((msg.topic, msg.partition), 0)
            result = self.commands.apply(cmd, catching_up)
            if result is not None:
                acks.append((cmd, *result))
        if self.commands.registry is not None and time.monotonic() >= self._next_reconcile:
            self._next_reconcile = time.monotonic() + RECONCILE_S
            self.commands.reconcile()
        acks += self.commands.retry_waiting()
        acks += self.commands.finish_swaps()
        for cmd, status, reason in acks:
            self.metrics.commands.labels(cmd.action, status).inc()
            ack = Ack(cmd.command_id, self.worker_id, status, now_ms(), reason, self.state.masked_labels(),
                      dict(self.bundle.versions), self.state.fusion_mode)
            out.send(self.topics.acks, self.worker_id.encode(), encode(ack))
            log.info("command %s %s(%s): %s %s", cmd.command_id, cmd.action, cmd.modality, status, reason)
        if acks:
            self._flush_quietly(out)
