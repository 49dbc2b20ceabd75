"""The synchronizer stage of a replay of per-modality readings.

Readings are published into ``<namespace>sync.sensor.*`` and a ``streamfuse sync``
process (same code as live, the recorded plant's rate) turns them into samples in
``<namespace>sync.samples``. The stage ends when every published reading is in a sample
or in the synchronizer's dead letters. Its samples then feed the lock-step replay like
recorded samples would: the synchronizer's wall-clock idle advance can only close slots
at the end of the stage, never in the middle of the pipeline's event time.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from streamfuse.errors import InvalidEvent
from streamfuse.events import DeadLetter, Sample, SensorEvent, content_type_of, decode
from streamfuse.replay.errors import ReplayError
from streamfuse.replay.format import record_map
from streamfuse.replay.namespace import Namespace
from streamfuse.replay.options import STALL_S
from streamfuse.replay.plan import SENSOR_TOPICS, Stream, Streams


def run_sync_stage(ns: Namespace, streams: Streams, log_dir: Path, stall_s: float = STALL_S,
                   on_progress: Callable[[int, int], None] | None = None) -> Streams:
    """Synchronize the recorded readings; returns ``streams`` with the sensor streams
    replaced by sample streams (clock = sample time).

    Raises:
        ReplayError: the synchronizer died or stalled.
    """
    sync = _Synchronizer(ns, log_dir)
    try:
        expect = sync.publish(Streams([s for s in streams.streams if s.topic in SENSOR_TOPICS]), on_progress)
        sync.await_accounted(expect, stall_s)
    finally:
        sync.close()
    return Streams([s for s in streams.streams if s.topic not in SENSOR_TOPICS] + sync.sample_streams())


class _Synchronizer:
    """A ``streamfuse sync`` process in ``<namespace>sync.``, a producer of its readings,
    and a consumer of what it makes of them: samples, and dead letters."""

    def __init__(self, ns: Namespace, log_dir: Path) -> None:
        from kafka import TopicPartition

        from streamfuse.kafka import make_consumer, make_producer
        from streamfuse.procs import spawn
        from streamfuse.topics import Topics, ensure_topics

        self.prefix, self.log_dir = ns.prefix, log_dir
        self.stage = ns.settings.model_copy(update={"topic_prefix": ns.prefix + "sync."})
        ensure_topics(self.stage)
        t = Topics(self.stage.topic_prefix)
        self.proc = spawn("sync", self.stage, log_dir)  # its slot period comes from the plant rate, sim.rate_hz
        self.producer = make_producer(self.stage, "streamfuse-replay-sync")
        self.consumer = make_consumer(self.stage, None, "streamfuse-replay-sync")
        tps = [TopicPartition(n, p) for n in (t.samples, t.deadletter) for p in range(self.stage.partitions)]
        self.consumer.assign(tps)
        self.consumer.seek_to_beginning(*tps)
        self.joined: set[str] = set()  # event ids of the readings in a sample
        self.dead: set[tuple[str, int, int]] = set()  # (topic, partition, offset) of dead-lettered readings
        self.out: dict[int, list[tuple[int, dict[str, Any]]]] = {}  # partition -> (sample time, record)

    def publish(self, sensors: Streams, on_progress: Callable[[int, int], None] | None
                ) -> dict[tuple[str, int, int], str | None]:
        """Publish the readings as recorded; returns where each landed -> its event id
        (None: one the synchronizer will dead-letter)."""
        futures = []
        for n, (stream, rec) in enumerate(sensors.pop_before(None), 1):
            fut = self.producer.send(self.stage.topic_prefix + stream.topic, key=rec["key"], value=rec["value"],
                                     headers=[(k, v) for k, v in rec["headers"]], partition=rec["partition"],
                                     timestamp_ms=rec["timestamp_ms"])
            try:
                eid = decode(rec["value"], content_type_of(rec["headers"]), expect=SensorEvent,
                             max_bytes=self.stage.max_payload_bytes).event_id
            except InvalidEvent:
                eid = None
            futures.append((fut, eid))
            if on_progress is not None:
                on_progress(n, stream.clocks[stream.pos - 1])
        self.producer.flush()
        expect: dict[tuple[str, int, int], str | None] = {}
        for fut, eid in futures:
            meta = fut.get(timeout=30)
            expect[(meta.topic, meta.partition, meta.offset)] = eid
        return expect

    def await_accounted(self, expect: dict[tuple[str, int, int], str | None], stall_s: float) -> None:
        """Wait until every reading in ``expect`` is in a sample or dead-lettered.

        Raises:
            ReplayError: the synchronizer exited, or ``stall_s`` passed without progress.
        """
        last, since = -1, time.monotonic()
        while True:
            self._poll()
            for where, eid in list(expect.items()):
                if where in self.dead or (eid is not None and eid in self.joined):
                    del expect[where]
            if not expect:
                return
            if self.proc.poll() is not None:
                raise ReplayError(f"the synchronizer exited with {self.proc.returncode}; see "
                                  f"{self.log_dir / 'sync.log'}", self.prefix)
            if len(expect) != last:
                last, since = len(expect), time.monotonic()
            elif time.monotonic() - since > stall_s:
                raise ReplayError(f"the synchronizer stalled with {len(expect)} readings unaccounted for; see "
                                  f"{self.log_dir / 'sync.log'}", self.prefix)

    def _poll(self) -> None:
        for tp, msgs in self.consumer.poll(timeout_ms=100).items():
            for m in msgs:
                ev = decode(m.value, content_type_of(m.headers), check_payloads=False)
                if isinstance(ev, Sample):
                    self.joined.update(r.event_id for r in ev.readings.values())
                    self.out.setdefault(m.partition, []).append((ev.ts_ms, record_map(
                        m.key, m.value, m.headers, m.partition, m.offset, m.timestamp, m.timestamp_type)))
                elif isinstance(ev, DeadLetter):
                    self.dead.add((ev.source_topic, ev.partition, ev.offset))

    def sample_streams(self) -> list[Stream]:
        """The synchronizer's samples, one stream per partition; a sample's clock is the
        latest sample time so far in its partition (clocks never go back)."""
        samples = []
        for p, rows in sorted(self.out.items()):
            clocks, top = [], None
            for ts, _ in rows:
                top = ts if top is None else max(top, ts)
                clocks.append(top)
            samples.append(Stream("samples", p, clocks, iter([r for _, r in rows])))
        return samples

    def close(self) -> None:
        """Stop the synchronizer; close the clients."""
        from streamfuse.procs import stop_children

        stop_children([self.proc])
        self.consumer.close()
        self.producer.close()
