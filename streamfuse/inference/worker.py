"""The inference worker: ``samples`` → micro-batches → models + fusion → ``predictions``.

At-least-once: offsets are committed only after the batch's predictions (and dead-letter
records) are flushed; ``sample_id`` makes re-processing idempotent downstream. Commands
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

import torch
from prometheus_client import CollectorRegistry

from streamfuse.config import Settings
from streamfuse.errors import InvalidEvent
from streamfuse.events import (
    MSGPACK, Ack, Command, DeadLetter, Prediction, Sample, content_type_of, decode, encode, headers,
    split_bad_readings,
)
from streamfuse.inference.commands import CommandHandler
from streamfuse.inference.signals import signal_stats
from streamfuse.inference.contributions import (
    MAX_SHAPLEY_MODALITIES, confidence_entropy, leave_one_out_shares, shapley_values, subset_table,
)
from streamfuse.kafka import make_consumer, make_producer
from streamfuse.metrics import WorkerMetrics, serve
from streamfuse.models.bundle import Bundle
from streamfuse.topics import Topics

log = logging.getLogger(__name__)
HDRS = headers(MSGPACK)
RECONCILE_S = 2.0  # how often a worker compares what it serves with the registry


def now_ms() -> int:
    return int(time.time() * 1000)


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
        consumer = make_consumer(self.settings, wcfg.group, self.worker_id, max_poll_records=wcfg.max_batch)
        control = make_consumer(self.settings, None, f"{self.worker_id}-control")
        producer = make_producer(self.settings, self.worker_id)
        try:
            from kafka import TopicPartition

            ctl = [TopicPartition(self.topics.control, p)
                   for p in sorted(control.partitions_for_topic(self.topics.control) or {0})]
            control.assign(ctl)
            control.seek_to_beginning(*ctl)
            catch_up_to = control.end_offsets(ctl)  # commands before these are history
            consumer.subscribe([self.topics.samples])
            log.info("worker %s serving bundle %s (batch <= %d, delay <= %d ms)",
                     self.worker_id, self.bundle.version, wcfg.max_batch, wcfg.max_delay_ms)
            while not self._stop.is_set() and (max_samples is None or self.processed < max_samples):
                self._apply_commands(control, producer, catch_up_to)
                records, first_at = self._collect(consumer)
                if not records:
                    continue
                self._process(records, first_at, producer)
                producer.flush()
                consumer.commit()  # only after the outputs are flushed
        finally:
            self.commands.close()
            consumer.close()
            control.close()
            producer.close()
        return self.processed

    def _collect(self, consumer) -> tuple[list, float]:
        """Dynamic batching: up to ``max_batch`` records, waiting at most ``max_delay_ms``
        after the first one arrived (Triton's two knobs)."""
        cfg = self.settings.worker
        batch: list = []
        first_at = 0.0
        while len(batch) < cfg.max_batch:
            if batch:
                left_ms = cfg.max_delay_ms - (time.monotonic() - first_at) * 1000
                if left_ms <= 0:
                    break
                timeout = max(1, int(left_ms))
            else:
                timeout = 200  # idle: come back to check commands and stop
            polled = consumer.poll(timeout_ms=timeout, max_records=cfg.max_batch - len(batch))
            for msgs in polled.values():
                batch.extend(msgs)
            if not batch:
                break
            if not first_at:
                first_at = time.monotonic()
        return batch, first_at

    # ------------------------------------------------------------------ inference

    def _dead(self, producer, msg, exc: InvalidEvent) -> None:
        self.metrics.rejected.labels(exc.reason).inc()
        dead = DeadLetter(exc.reason, exc.detail, msg.topic, msg.value or b"", "worker", now_ms(),
                          msg.partition, msg.offset, msg.key, content_type_of(msg.headers), exc.modality)
        producer.send(self.topics.deadletter, key=msg.key, value=encode(dead), headers=HDRS)

    def _process(self, records: list, first_at: float, producer) -> None:
        samples: list[tuple[object, Sample]] = []
        for msg in records:
            try:
                sample = decode(msg.value, content_type_of(msg.headers), expect=Sample,
                                max_bytes=self.settings.max_payload_bytes)
            except InvalidEvent as exc:
                self._dead(producer, msg, exc)
                continue
            sample, errors = split_bad_readings(sample, self.settings.max_payload_bytes)
            for exc in errors:
                self._dead(producer, msg, exc)
            samples.append((msg, sample))
        if not samples:
            return
        started = time.monotonic()
        self.metrics.queue_wait.observe(started - first_at)
        b = self.bundle
        enc = b.encode([s.readings for _, s in samples])
        for m, seconds in enc.seconds.items():
            self.metrics.compute.labels(m).observe(seconds)
        for row, exc in enc.errors:
            self._dead(producer, samples[row][0], exc)
        masked = torch.tensor([[self.state.masked_for(m, smp) for m in b.modalities] for _, smp in samples],
                              dtype=torch.bool).reshape(len(samples), len(b.modalities))
        use = enc.computed & ~masked
        fused = b.fuse(enc, use, self.state.fusion_mode).numpy()
        usable = use.any(dim=1).numpy()
        players, y = use.numpy(), fused.argmax(axis=1)
        values = subset_table(lambda u: b.fuse(enc, torch.from_numpy(u), self.state.fusion_mode).numpy(),
                              players, y)
        shares = leave_one_out_shares(values, players)
        shapley = shapley_values(values, players) if len(b.modalities) <= MAX_SHAPLEY_MODALITIES else None
        probs, computed = enc.modality_probs.numpy(), enc.computed.numpy()
        conf, ent = confidence_entropy(probs)
        done_ms = now_ms()
        latency = (time.monotonic() - first_at) * 1000
        produced = 0
        for i, (msg, s) in enumerate(samples):
            if not usable[i]:
                self._dead(producer, msg, InvalidEvent(
                    "no_usable_modality", f"sample {s.sample_id}: no modality left to fuse (missing: "
                    f"{sorted(set(b.modalities) - {m for j, m in enumerate(b.modalities) if computed[i, j]})}, "
                    f"masked: {list(self.state.masked_labels())})"))
                continue
            present = [(j, m) for j, m in enumerate(b.modalities) if computed[i, j]]
            stats = {m: signal_stats(s.readings[m]) for _, m in present}
            pred = Prediction(
                sample_id=s.sample_id,
                asset_id=s.asset_id,
                line_id=s.line_id,
                ts_ms=s.ts_ms,
                classes=b.classes,
                fused_probs=tuple(float(x) for x in fused[i]),
                fused_label=b.classes[y[i]],
                fusion_mode=self.state.fusion_mode,
                modality_probs={m: tuple(float(x) for x in probs[i, j]) for j, m in present},
                missing=tuple(m for j, m in enumerate(b.modalities) if not computed[i, j]),
                masked=tuple(m for j, m in present if masked[i, j]),
                contributions={m: float(shares[i, j]) for j, m in present if players[i, j]},
                shapley={m: float(shapley[i, j]) for j, m in present if players[i, j]} if shapley is not None else {},
                confidence={m: float(conf[i, j]) for j, m in present},
                entropy={m: float(ent[i, j]) for j, m in present},
                agreement={m: bool(probs[i, j].argmax() == y[i]) for j, m in present},
                signal_std={m: st[0] for m, st in stats.items()},
                digest={m: st[1] for m, st in stats.items()},
                skew_ms={m: s.readings[m].ts_ms - s.ts_ms for _, m in present},
                versions=dict(b.versions),
                worker_id=self.worker_id,
                produced_ms=done_ms,
                latency_ms=latency,
            )
            producer.send(self.topics.predictions, key=msg.key, value=encode(pred), headers=HDRS)
            produced += 1
        self.processed += len(samples)
        self.metrics.samples.inc(produced)
        self.metrics.batches.inc()
        self.metrics.batch_size.observe(len(samples))

    # ------------------------------------------------------------------ commands

    def _apply_commands(self, control, producer, catch_up_to: dict | None = None) -> None:
        polled = control.poll(timeout_ms=0)
        acks: list[tuple[Command, str, str]] = []
        for tp, msgs in polled.items():
            for msg in msgs:
                try:
                    cmd = decode(msg.value, content_type_of(msg.headers), expect=Command)
                except InvalidEvent as exc:
                    self._dead(producer, msg, exc)
                    continue
                catching_up = catch_up_to is not None and msg.offset < catch_up_to.get(tp, 0)
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
            producer.send(self.topics.acks, key=self.worker_id.encode(), value=encode(ack), headers=HDRS)
            log.info("command %s %s(%s): %s %s", cmd.command_id, cmd.action, cmd.modality, status, reason)
        if acks:
            producer.flush()
