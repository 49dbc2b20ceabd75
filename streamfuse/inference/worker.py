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
import zlib
from collections import deque

import numpy as np
import torch
from confluent_kafka import OFFSET_BEGINNING, KafkaException, TopicPartition
from prometheus_client import CollectorRegistry

from streamfuse.config import Settings
from streamfuse.errors import BrokerError, InvalidEvent
from streamfuse.events import MSGPACK, Ack, Command, DeadLetter, Prediction, content_type_of, decode, encode, headers
from streamfuse.inference.commands import CommandHandler
from streamfuse.inference.contributions import (
    MAX_SHAPLEY_MODALITIES, confidence_entropy, leave_one_out_shares, shapley_values, subset_table,
)
from streamfuse.inference.feeder import Batch, Feeder, Offsets, Record
from streamfuse.kafka import consumer_lag, make_rd_consumer, make_rd_producer
from streamfuse.metrics import WorkerMetrics, serve
from streamfuse.models.bundle import Bundle, Encoded
from streamfuse.topics import Topics

log = logging.getLogger(__name__)
HDRS = headers(MSGPACK)
RECONCILE_S = 2.0  # how often a worker compares what it serves with the registry
# Batches whose sends are not yet acknowledged before the worker waits for them. With the
# batch in compute and the one the feeder has ready, at most MAX_BATCHES_IN_FLIGHT + 2
# batches are uncommitted at any time: what a crash can make the next owner predict twice.
MAX_BATCHES_IN_FLIGHT = 2


def now_ms() -> int:
    return int(time.time() * 1000)


class Delivery:
    """Counts one batch's sends until the broker has acknowledged them all."""

    def __init__(self) -> None:
        self.pending = 0
        self.error: Exception | None = None

    def sent(self) -> None:
        self.pending += 1

    def report(self, err, _msg) -> None:  # librdkafka's delivery callback (from Outbox.poll/flush)
        self.pending -= 1
        if err is not None and self.error is None:
            self.error = KafkaException(err)

    def done(self) -> bool:
        """All acknowledged; raises if one failed (the batch must not be committed)."""
        if self.error is not None:
            raise self.error
        return self.pending == 0


class Outbox:
    """The worker's producer (librdkafka): sends with the msgpack header, reporting each
    delivery to the batch it belongs to."""

    def __init__(self, producer) -> None:
        self.producer = producer

    def send(self, topic: str, key: bytes | None, value: bytes, delivery: Delivery | None = None) -> None:
        while True:
            try:
                self.producer.produce(topic, value=value, key=key, headers=HDRS,
                                      on_delivery=delivery.report if delivery is not None else None)
                break
            except BufferError:  # the local queue is full: let deliveries drain
                self.producer.poll(0.05)
        if delivery is not None:
            delivery.sent()

    def poll(self) -> None:
        self.producer.poll(0)

    def flush(self, timeout_s: float = 60.0) -> None:
        left = self.producer.flush(timeout_s)
        if left:
            raise KafkaException(f"{left} records still undelivered after {timeout_s:.0f} s")


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
        self.commands = CommandHandler(self, model_registry)
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
        out = Outbox(make_rd_producer(self.settings, self.worker_id))
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
                    if len(in_flight) > MAX_BATCHES_IN_FLIGHT:
                        out.flush()
                out.poll()
                self._commit_delivered(in_flight, feeder)
            out.flush()
            self._commit_delivered(in_flight, feeder)
        finally:
            self.commands.close()
            feeder.close()
            control.close()
            out.flush()
        return self.processed

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

    @staticmethod
    def _commit_delivered(in_flight: deque, feeder: Feeder) -> None:
        """Hand back, oldest first, the offsets of batches whose outputs the broker has
        acknowledged (at-least-once: a send that failed stops the worker uncommitted)."""
        while in_flight and in_flight[0][0].done():
            _, offsets = in_flight.popleft()
            feeder.commit(offsets)

    # ------------------------------------------------------------------ inference

    def _dead(self, out: Outbox, msg: Record, exc: InvalidEvent, delivery: Delivery | None = None) -> None:
        self.metrics.rejected.labels(exc.reason).inc()
        dead = DeadLetter(exc.reason, exc.detail, msg.topic, msg.value or b"", "worker", now_ms(),
                          msg.partition, msg.offset, msg.key, content_type_of(msg.headers), exc.modality)
        out.send(self.topics.deadletter, msg.key, encode(dead), delivery)

    def _process(self, batch: Batch, out: Outbox, delivery: Delivery) -> None:
        """Models, fusion and contributions for one batch; its sends report to ``delivery``."""
        for msg, exc in batch.dead:
            self._dead(out, msg, exc, delivery)
        samples = batch.samples
        if not samples:
            return
        started = time.monotonic()
        self.metrics.queue_wait.observe(started - batch.first_at)
        b, mode = self.bundle, self.state.fusion_mode
        enc = b.encode([s.readings for _, s in samples])
        for m, seconds in enc.seconds.items():
            self.metrics.compute.labels(m).observe(seconds)
        for row, exc in enc.errors:
            self._dead(out, samples[row][0], exc, delivery)
        n, mods = len(samples), b.modalities
        masked = torch.tensor([[self.state.masked_for(m, smp) for m in mods] for _, smp in samples],
                              dtype=torch.bool).reshape(n, len(mods))
        use = enc.computed & ~masked
        fused = b.fuse(enc, use, mode).numpy()
        players, y = use.numpy(), fused.argmax(axis=1)

        def fuse_subsets(subsets: np.ndarray) -> np.ndarray:  # all subsets in one call
            k = subsets.shape[0] // n
            tiled = Encoded(enc.modality_probs.repeat(k, 1, 1), {m: f.repeat(k, 1) for m, f in enc.features.items()},
                            enc.computed.repeat(k, 1), [], {})
            return b.fuse(tiled, torch.from_numpy(subsets), mode).numpy()

        values = subset_table(fuse_subsets, players, y)
        shares = leave_one_out_shares(values, players).tolist()
        shapley = shapley_values(values, players).tolist() if len(mods) <= MAX_SHAPLEY_MODALITIES else None
        probs, computed = enc.modality_probs.numpy(), enc.computed.numpy()
        conf, ent = (a.tolist() for a in confidence_entropy(probs))
        agree = (probs.argmax(axis=2) == y[:, None]).tolist()
        stds, fused_l, probs_l = enc.signal_std.tolist(), fused.tolist(), probs.tolist()
        usable, masked_l = players.any(axis=1).tolist(), masked.tolist()
        versions, produced_ms = dict(b.versions), now_ms()
        latency = (time.monotonic() - batch.first_at) * 1000
        produced = 0
        for i, (msg, s) in enumerate(samples):
            if not usable[i]:
                self._dead(out, msg, InvalidEvent(
                    "no_usable_modality", f"sample {s.sample_id}: no modality left to fuse (missing: "
                    f"{sorted(set(mods) - {m for j, m in enumerate(mods) if computed[i, j]})}, "
                    f"masked: {list(self.state.masked_labels())})"), delivery)
                continue
            present = [(j, m) for j, m in enumerate(mods) if computed[i, j]]
            fused_in = [(j, m) for j, m in present if players[i, j]]
            pred = Prediction(
                sample_id=s.sample_id,
                asset_id=s.asset_id,
                line_id=s.line_id,
                ts_ms=s.ts_ms,
                classes=b.classes,
                fused_probs=tuple(fused_l[i]),
                fused_label=b.classes[y[i]],
                fusion_mode=mode,
                modality_probs={m: tuple(probs_l[i][j]) for j, m in present},
                missing=tuple(m for j, m in enumerate(mods) if not computed[i, j]),
                masked=tuple(m for j, m in present if masked_l[i][j]),
                contributions={m: shares[i][j] for j, m in fused_in},
                shapley={m: shapley[i][j] for j, m in fused_in} if shapley is not None else {},
                confidence={m: conf[i][j] for j, m in present},
                entropy={m: ent[i][j] for j, m in present},
                agreement={m: agree[i][j] for j, m in present},
                signal_std={m: stds[i][j] for j, m in present},
                digest={m: zlib.crc32(s.readings[m].payload) for _, m in present},
                skew_ms={m: s.readings[m].ts_ms - s.ts_ms for _, m in present},
                versions=versions,
                worker_id=self.worker_id,
                produced_ms=produced_ms,
                latency_ms=latency,
            )
            out.send(self.topics.predictions, msg.key, encode(pred), delivery)
            produced += 1
        self.processed += n
        self.metrics.samples.inc(produced)
        self.metrics.batches.inc()
        self.metrics.batch_size.observe(n)

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
                cmd = decode(msg.value, content_type_of(msg.headers), expect=Command)
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
        acks += self.commands.finish_swaps()
        for cmd, status, reason in acks:
            self.metrics.commands.labels(cmd.action, status).inc()
            ack = Ack(cmd.command_id, self.worker_id, status, now_ms(), reason, self.state.masked_labels(),
                      dict(self.bundle.versions), self.state.fusion_mode)
            out.send(self.topics.acks, self.worker_id.encode(), encode(ack))
            log.info("command %s %s(%s): %s %s", cmd.command_id, cmd.action, cmd.modality, status, reason)
        if acks:
            out.flush()
