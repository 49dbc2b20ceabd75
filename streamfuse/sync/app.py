"""The ``streamfuse sync`` process: ``sensor.<modality>`` topics → synchronizer → ``samples``.

One consumer group reads the three sensor topics. Partition ``p`` of every sensor topic
forms task ``p`` (key = asset_id, so an asset's readings are all in one task) with its
own :class:`~streamfuse.sync.task.SyncTask` and
:class:`~streamfuse.sync.core.Synchronizer`; the range assignor keeps a task's partitions
on one member. Input partitions with unread records (position < high watermark) hold the
task's watermark back, so a backlog is caught up without spurious late readings. When a
task's inputs have been quiet for ``idle_ms`` of wall time, event time moves on with the
wall clock so the last slots close.

At-least-once: samples and dead letters are flushed before the offsets are committed,
and the committed offset of a partition is its oldest reading still waiting in an open
slot, so a crash loses no reading. Each commit carries the task's watermark and the read
position as metadata; after a restart or rebalance, re-read records below that position
are recognised as replays (no second dead letter, no spurious late reading) and closed
slots are not re-opened. A broker that drops commit metadata (the embedded test broker)
degrades to plain re-processing: slots near the restart point may be emitted again, with
the same ``sample_id``.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time

from prometheus_client import CollectorRegistry

from streamfuse.clock import now_ms
from streamfuse.config import Settings
from streamfuse.events import MSGPACK, DeadLetter, Sample, encode, headers
from streamfuse.metrics import ProducerMetrics, SyncMetrics
from streamfuse.sends import TrackedProducer
from streamfuse.sync.core import OUTCOMES, SyncConfig
from streamfuse.sync.task import DEAD_REASONS, SyncTask, checkpoint_metadata, parse_checkpoint
from streamfuse.topics import Topics

log = logging.getLogger(__name__)
HDRS = headers(MSGPACK)


def default_config(settings: Settings) -> SyncConfig:
    """The sync configuration for the plant's sample rate (``settings.sim.rate_hz``)."""
    return SyncConfig.for_rate(settings.sim.rate_hz)


class SyncProcess:
    """The Kafka loop around the tasks; see :func:`run_sync`."""

    def __init__(self, settings: Settings, config: SyncConfig, registry: CollectorRegistry, group: str) -> None:
        self.settings, self.config, self.group = settings, config, group
        self.topics = Topics(settings.topic_prefix)
        self.metrics = SyncMetrics(registry)
        self.registry = registry
        self._stop: threading.Event | None = None
        self.tasks: dict[int, SyncTask] = {}
        self._revoked: dict[int, SyncTask] = {}  # kept through a rebalance in case they come back
        self._pending: set[int] = set()  # new tasks waiting for their commit metadata
        self._positions: dict = {}  # TopicPartition -> read position at the last checkpoint
        self._ends: dict = {}  # TopicPartition -> end offset, refreshed by _refresh_ends
        self._ends_at = 0.0
        self.emitted = 0
        self._dirty = False
        self.consumer = self.producer = None

    def run(self, stop: threading.Event, max_samples: int | None) -> int:
        from kafka import ConsumerRebalanceListener
        from kafka.coordinator.assignors.range import RangePartitionAssignor

        from streamfuse.kafka import make_consumer, make_producer

        proc = self

        class Listener(ConsumerRebalanceListener):  # runs on the client's IO thread: no blocking calls
            def on_partitions_revoked(self, revoked):
                proc._on_revoked(revoked, keep=True)

            def on_partitions_lost(self, lost):
                proc._on_revoked(lost, keep=False)  # another member may have moved on: forget

            def on_partitions_assigned(self, assigned):
                proc._on_assigned(assigned)

        # Nothing may be lost: a send that fails is sent again until the broker takes it,
        # and offsets are committed only once every output was delivered.
        self.producer = TrackedProducer(make_producer(self.settings, "streamfuse-sync"), "sync",
                                        ProducerMetrics(self.registry).failures, max_attempts=None)
        self._stop = stop
        try:
            # The range assignor gives one member partition p of every sensor topic: a whole task.
            self.consumer = make_consumer(self.settings, self.group, "streamfuse-sync",
                                          partition_assignment_strategy=[RangePartitionAssignor])
            try:
                self.consumer.subscribe([self.topics.sensor(m) for m in self.config.modalities],
                                        listener=Listener())
                while not stop.is_set() and (max_samples is None or self.emitted < max_samples):
                    self._step()
            finally:
                try:
                    self._checkpoint()  # open slots are not emitted: their readings are re-read
                finally:
                    self.consumer.close()
        finally:
            self.producer.close()
        return self.emitted

    def _step(self) -> None:
        """One poll: feed the records, update the inputs' lag, emit, checkpoint."""
        polled = self.consumer.poll(timeout_ms=200)
        self._restore_pending()
        by_task: dict[int, list] = {}
        for tp, msgs in polled.items():
            by_task.setdefault(tp.partition, []).append(msgs)
        for p, lists in by_task.items():
            task = self.tasks.get(p)
            if task is None:  # revoked meanwhile: its new owner reads these
                continue
            # Interleave the task's inputs by record time (each partition stays in log order),
            # so that one topic's batch far ahead in event time does not outrun the others'.
            for msg in heapq.merge(*lists, key=lambda r: r.timestamp):
                self._dirty = True
                samples, dead = task.feed(msg, time.monotonic(), now_ms())
                self._count(task)
                self._emit(samples, dead)
        now = time.monotonic()
        self._refresh_ends(now)
        for p, task in list(self.tasks.items()):
            self._emit(task.tick(self._lagging(p), now), [])
        if self._dirty:
            self._checkpoint()

    def _lagging(self, p: int) -> dict[str, bool]:
        from kafka import TopicPartition

        out = {}
        assigned = self.consumer.assignment()
        for m in self.config.modalities:
            tp = TopicPartition(self.topics.sensor(m), p)
            if tp in assigned:  # an input we do not read cannot hold the watermark
                hw = self.consumer.highwater(tp)
                end = max(hw or 0, self._ends.get(tp, 0))
                out[m] = hw is None or self.consumer.position(tp) < end
        return out

    def _refresh_ends(self, now: float, every_s: float = 0.5) -> None:
        """Ask the broker for the inputs' end offsets now and then: the high watermark of the
        last fetch is stale when a partition's next fetch is slow (a large record), and an
        input that looks caught up on stale news would let the others outrun it."""
        from kafka.errors import KafkaError

        if now - self._ends_at < every_s:
            return
        self._ends_at = now
        try:
            self._ends = self.consumer.end_offsets(list(self.consumer.assignment()), timeout_ms=1000)
        except KafkaError as exc:  # the broker is away: the fetch positions will tell
            log.debug("sync could not read end offsets: %s", exc)

    def _count(self, task: SyncTask) -> None:
        mx = self.metrics
        for outcome, m in task.outcomes:  # a synchronizer outcome, or why the record was invalid
            valid = outcome in OUTCOMES
            if valid:
                mx.readings.labels(m).inc()
            if outcome == "duplicate":
                mx.duplicates.labels(m).inc()
            elif outcome == "late":
                mx.late.labels(m).inc()
            reason = DEAD_REASONS.get(outcome) if valid else outcome
            if reason is not None:
                mx.rejected.labels(reason).inc()

    def _emit(self, samples: list[Sample], dead: list[DeadLetter]) -> None:
        for s in samples:
            self.producer.send(self.topics.samples, key=s.asset_id.encode(), value=encode(s), headers=HDRS)
            self.metrics.samples.inc()
            for m in s.missing:
                self.metrics.missing.labels(m).inc()
        for d in dead:
            self.producer.send(self.topics.deadletter, key=d.key, value=encode(d), headers=HDRS)
        if samples or dead:
            self.emitted += len(samples)
            self._dirty = True

    def _checkpoint(self) -> None:
        """Flush every output, then commit (at-least-once)."""
        from kafka import TopicPartition
        from kafka.errors import CommitFailedError
        from kafka.structs import OffsetAndMetadata

        if not self.producer.flush(self._stop):
            log.warning("sync stopping with undelivered outputs: offsets not committed, they are re-read")
            return
        offsets = {}
        assigned = self.consumer.assignment()
        for p, task in self.tasks.items():
            for m in self.config.modalities:
                tp = TopicPartition(self.topics.sensor(m), p)
                if tp not in assigned:
                    continue
                pos = self._positions[tp] = self.consumer.position(tp)
                meta = checkpoint_metadata(task.sync.watermark, pos)
                offsets[tp] = OffsetAndMetadata(task.commit_offset(m, pos), meta, -1)
        if offsets:
            try:
                self.consumer.commit(offsets)
            except CommitFailedError as exc:  # rebalanced meanwhile: the new owner re-reads
                log.warning("sync commit failed (%s); records since the last commit will be re-read", exc)
        self._dirty = False

    # The loop checkpoints after every poll, so at a rebalance (which happens inside poll)
    # everything processed is already flushed and committed: the listener only moves state.

    def _on_revoked(self, revoked, keep: bool) -> None:
        for p in {tp.partition for tp in revoked}:
            task = self.tasks.pop(p, None)
            self._pending.discard(p)
            if task is not None and keep:
                self._revoked[p] = task

    def _on_assigned(self, assigned) -> None:
        for p in sorted({tp.partition for tp in assigned}):
            kept = self._revoked.pop(p, None)
            if kept is not None:
                # Ours before the rebalance, and current: records from the committed offset up
                # to our last position are replays of what it holds or has emitted.
                kept.restore({kept.modality_of[t.topic]: (None, self._positions[t]) for t in assigned
                              if t.partition == p and t in self._positions})
                self.tasks[p] = kept
            else:
                self.tasks[p] = SyncTask(self.config, self.topics, self.settings.max_payload_bytes)
                self._pending.add(p)
        self._revoked.clear()

    def _restore_pending(self) -> None:
        """New tasks resume from the commit metadata (looked up here, off the IO thread)."""
        from kafka import TopicPartition

        for p in sorted(self._pending):
            task, found = self.tasks[p], {}
            for topic, m in task.modality_of.items():
                committed = self.consumer.committed(TopicPartition(topic, p), metadata=True)
                cp = parse_checkpoint(committed.metadata if committed is not None else None)
                if cp is not None:
                    found[m] = cp
            task.restore(found)
            log.info("sync task %d assigned (resuming from commit metadata: %s)", p, bool(found))
        self._pending.clear()


def run_sync(settings: Settings, *, config: SyncConfig | None = None, stop: threading.Event | None = None,
             max_samples: int | None = None, registry: CollectorRegistry | None = None,
             group: str | None = None) -> int:
    """Run the synchronizer process until ``stop`` is set or ``max_samples`` samples are out.

    Args:
        settings: bootstrap, topic prefix, payload limit.
        config: slot settings; default :func:`default_config`.
        stop: set it to stop after the current poll (outputs are flushed and committed).
        max_samples: stop once at least this many samples were produced.
        registry: Prometheus registry for :class:`~streamfuse.metrics.SyncMetrics`.
        group: consumer group; default ``<topic prefix>sync`` (e.g. ``sf.sync``), so a
            replay namespace has its own.

    Returns:
        The number of samples produced.

    Raises:
        ConfigError: no bootstrap address is configured.
    """
    config = config or default_config(settings)
    proc = SyncProcess(settings, config, registry or CollectorRegistry(), group or f"{settings.topic_prefix}sync")
    log.info("sync %s → %s: %s", ", ".join(proc.topics.sensor(m) for m in config.modalities),
             proc.topics.samples, config)
    return proc.run(stop or threading.Event(), max_samples)
