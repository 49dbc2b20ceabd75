"""The inference worker: ``samples`` → micro-batches → models + fusion → ``predictions``.

At-least-once: offsets are committed only after the batch's predictions (and dead-letter
records) are flushed; ``sample_id`` makes re-processing idempotent downstream. Commands
on ``control`` are read by every worker (no consumer group) from the start of the topic,
so a worker that starts late reaches the current desired state, and are applied between
batches.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from prometheus_client import CollectorRegistry

from streamfuse.config import Settings
from streamfuse.errors import InvalidEvent
from streamfuse.events import (
    MSGPACK, Ack, Command, DeadLetter, Prediction, Sample, content_type_of, decode, encode, headers,
    split_bad_readings,
)
from streamfuse.inference.contributions import leave_one_out_shares
from streamfuse.kafka import make_consumer, make_producer
from streamfuse.metrics import WorkerMetrics, serve
from streamfuse.models.bundle import Bundle
from streamfuse.models.fusion import ume
from streamfuse.topics import Topics

log = logging.getLogger(__name__)
HDRS = headers(MSGPACK)


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class WorkerState:
    """What the commands have set; reported in every Ack."""

    masked: set[str] = field(default_factory=set)
    fusion_mode: str = "ume"
    seen_commands: set[str] = field(default_factory=set)


class InferenceWorker:
    """One worker process (one GPU). Stop it with :meth:`stop` or ``max_samples``.

    Args:
        settings: effective settings (bootstrap, topics, batching knobs).
        bundle: the loaded model bundle.
        worker_id: unique per process; defaults to ``host-pid``.
        registry: Prometheus registry for this worker's metrics.
    """

    def __init__(self, settings: Settings, bundle: Bundle, worker_id: str | None = None,
                 registry: CollectorRegistry | None = None) -> None:
        self.settings = settings
        self.bundle = bundle
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}"
        self.topics = Topics(settings.topic_prefix)
        self.registry = registry or CollectorRegistry()
        self.metrics = WorkerMetrics(self.registry)
        self.state = WorkerState(fusion_mode=bundle.fusion_mode)
        self.processed = 0
        self._stop = threading.Event()
        self.metrics.versions.info({m: v for m, v in bundle.versions.items()})

    def stop(self) -> None:
        self._stop.set()

    # ------------------------------------------------------------------ main loop

    def run(self, max_samples: int | None = None) -> int:
        """Consume until stopped (or ``max_samples`` predictions); returns the count."""
        wcfg = self.settings.worker
        serve(self.registry, wcfg.metrics_port)
        consumer = make_consumer(self.settings, wcfg.group, self.worker_id, max_poll_records=wcfg.max_batch)
        control = make_consumer(self.settings, None, f"{self.worker_id}-control")
        producer = make_producer(self.settings, self.worker_id)
        try:
            from kafka import TopicPartition

            ctl = [TopicPartition(self.topics.control, p)
                   for p in sorted(control.partitions_for_topic(self.topics.control) or {0})]
            control.assign(ctl)
            control.seek_to_beginning(*ctl)
            consumer.subscribe([self.topics.samples])
            log.info("worker %s serving bundle %s (batch <= %d, delay <= %d ms)",
                     self.worker_id, self.bundle.version, wcfg.max_batch, wcfg.max_delay_ms)
            while not self._stop.is_set() and (max_samples is None or self.processed < max_samples):
                self._apply_commands(control, producer)
                records, first_at = self._collect(consumer)
                if not records:
                    continue
                self._process(records, first_at, producer)
                producer.flush()
                consumer.commit()  # only after the outputs are flushed
        finally:
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
        probs = torch.zeros(len(samples), len(b.modalities), len(b.classes))
        present = torch.zeros(len(samples), len(b.modalities), dtype=torch.bool)
        for j, m in enumerate(b.modalities):
            t0 = time.monotonic()
            rows = [i for i, (_, s) in enumerate(samples) if m in s.readings]
            out = b.modality_probs_checked(m, [samples[i][1].readings[m] for i in rows])
            good = [rows[k] for k in out.indices]
            probs[good, j] = out.probs
            present[good, j] = True
            for k, exc in out.errors:
                exc.modality = exc.modality or m
                self._dead(producer, samples[rows[k]][0], exc)
            self.metrics.compute.labels(m).observe(time.monotonic() - t0)
        masked = torch.tensor([m in self.state.masked for m in b.modalities])
        fused_in = present & ~masked
        fused = ume(probs, fused_in).numpy()
        shares = leave_one_out_shares(probs.numpy(), fused_in.numpy())
        done_ms = now_ms()
        latency = (time.monotonic() - first_at) * 1000
        pn, presn = probs.numpy(), present.numpy()
        for i, (msg, s) in enumerate(samples):
            y = int(np.argmax(fused[i]))
            pred = Prediction(
                sample_id=s.sample_id,
                asset_id=s.asset_id,
                line_id=s.line_id,
                ts_ms=s.ts_ms,
                classes=b.classes,
                fused_probs=tuple(float(x) for x in fused[i]),
                fused_label=b.classes[y],
                fusion_mode=self.state.fusion_mode,
                modality_probs={m: tuple(float(x) for x in pn[i, j]) for j, m in enumerate(b.modalities)
                                if presn[i, j]},
                missing=tuple(m for j, m in enumerate(b.modalities) if not presn[i, j]),
                masked=tuple(m for j, m in enumerate(b.modalities) if presn[i, j] and m in self.state.masked),
                contributions={m: float(shares[i, j]) for j, m in enumerate(b.modalities) if shares[i, j] > 0},
                versions=dict(b.versions),
                worker_id=self.worker_id,
                produced_ms=done_ms,
                latency_ms=latency,
            )
            producer.send(self.topics.predictions, key=msg.key, value=encode(pred), headers=HDRS)
        self.processed += len(samples)
        self.metrics.samples.inc(len(samples))
        self.metrics.batches.inc()
        self.metrics.batch_size.observe(len(samples))

    # ------------------------------------------------------------------ commands

    def _apply_commands(self, control, producer) -> None:
        polled = control.poll(timeout_ms=0)
        for msgs in polled.values():
            for msg in msgs:
                try:
                    cmd = decode(msg.value, content_type_of(msg.headers), expect=Command)
                except InvalidEvent as exc:
                    self._dead(producer, msg, exc)
                    continue
                status, reason = self.apply(cmd)
                self.metrics.commands.labels(cmd.action, status).inc()
                ack = Ack(cmd.command_id, self.worker_id, status, now_ms(), reason,
                          tuple(sorted(self.state.masked)), dict(self.bundle.versions), self.state.fusion_mode)
                producer.send(self.topics.acks, key=self.worker_id.encode(), value=encode(ack), headers=HDRS)
                log.info("command %s %s(%s): %s %s", cmd.command_id, cmd.action, cmd.modality, status, reason)
        if polled:
            producer.flush()

    def apply(self, cmd: Command) -> tuple[str, str]:
        """Apply one command to this worker's state; returns (status, reason)."""
        st = self.state
        if cmd.command_id in st.seen_commands:
            return "duplicate", "already applied"
        st.seen_commands.add(cmd.command_id)
        if cmd.action in ("mask_modality", "unmask_modality"):
            if cmd.modality not in self.bundle.modalities:
                return "rejected", f"unknown modality {cmd.modality!r}; bundle has {list(self.bundle.modalities)}"
            if cmd.action == "mask_modality":
                st.masked.add(cmd.modality)
            else:
                st.masked.discard(cmd.modality)
            self.metrics.masked.labels(cmd.modality).set(1 if cmd.modality in st.masked else 0)
            return "applied", ""
        if cmd.action == "set_fusion_mode":
            if cmd.fusion_mode != "ume":
                return "rejected", f"fusion mode {cmd.fusion_mode!r} is not available in bundle {self.bundle.version}"
            st.fusion_mode = "ume"
            return "applied", ""
        # Model swaps need the model registry's version history, which this worker has not got.
        return "rejected", f"{cmd.action} needs a model registry; this worker serves one fixed bundle"
