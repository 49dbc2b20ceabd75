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
from streamfuse.replay.plan import SENSOR_TOPICS, Stream, Streams


def run_sync_stage(ns: Namespace, streams: Streams, log_dir: Path, stall_s: float = 120.0,
                   on_progress: Callable[[int, int], None] | None = None) -> Streams:
    """Synchronize the recorded readings; returns ``streams`` with the sensor streams
    replaced by sample streams (clock = sample time).

    Raises:
        ReplayError: the synchronizer died or stalled.
    """
    from kafka import TopicPartition

    from streamfuse.kafka import make_consumer, make_producer
    from streamfuse.procs import spawn, stop_children
    from streamfuse.topics import Topics, ensure_topics

    stage = ns.settings.model_copy(update={"topic_prefix": ns.prefix + "sync."})
    ensure_topics(stage)
    t = Topics(stage.topic_prefix)
    proc = spawn("sync", stage, log_dir)  # its slot period comes from the plant rate, sim.rate_hz
    producer = make_producer(stage, "streamfuse-replay-sync")
    consumer = make_consumer(stage, None, "streamfuse-replay-sync")
    tps = [TopicPartition(n, p) for n in (t.samples, t.deadletter) for p in range(stage.partitions)]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    sensors = [s for s in streams.streams if s.topic in SENSOR_TOPICS]
    others = [s for s in streams.streams if s.topic not in SENSOR_TOPICS]
    expect: dict[tuple[str, int, int], str | None] = {}  # (topic, partition, offset) -> event id
    futures = []
    joined: set[str] = set()
    dead: set[tuple[str, int, int]] = set()
    out: dict[int, list[tuple[int, dict[str, Any]]]] = {}
    try:
        n = 0
        for stream, rec in Streams(sensors).pop_before(None):
            fut = producer.send(stage.topic_prefix + stream.topic, key=rec["key"], value=rec["value"],
                                headers=[(k, v) for k, v in rec["headers"]], partition=rec["partition"],
                                timestamp_ms=rec["timestamp_ms"])
            try:
                eid = decode(rec["value"], content_type_of(rec["headers"]), expect=SensorEvent,
                             max_bytes=stage.max_payload_bytes).event_id
            except InvalidEvent:
                eid = None
            futures.append((fut, eid))
            n += 1
            if on_progress is not None:
                on_progress(n, stream.clocks[stream.pos - 1])
        producer.flush()
        for fut, eid in futures:
            meta = fut.get(timeout=30)
            expect[(meta.topic, meta.partition, meta.offset)] = eid
        last, since = -1, time.monotonic()
        while True:
            for tp, msgs in consumer.poll(timeout_ms=100).items():
                for m in msgs:
                    ev = decode(m.value, content_type_of(m.headers), check_payloads=False)
                    if isinstance(ev, Sample):
                        joined.update(r.event_id for r in ev.readings.values())
                        out.setdefault(m.partition, []).append((ev.ts_ms, record_map(
                            m.key, m.value, m.headers, m.partition, m.offset, m.timestamp, m.timestamp_type)))
                    elif isinstance(ev, DeadLetter):
                        dead.add((ev.source_topic, ev.partition, ev.offset))
            for where, eid in list(expect.items()):
                if where in dead or (eid is not None and eid in joined):
                    del expect[where]
            if not expect:
                break
            if proc.poll() is not None:
                raise ReplayError(f"the synchronizer exited with {proc.returncode}; see {log_dir / 'sync.log'}",
                                  ns.prefix)
            if len(expect) != last:
                last, since = len(expect), time.monotonic()
            elif time.monotonic() - since > stall_s:
                raise ReplayError(f"the synchronizer stalled with {len(expect)} readings unaccounted for; see "
                                  f"{log_dir / 'sync.log'}", ns.prefix)
    finally:
        stop_children([proc])
        consumer.close()
        producer.close()
    samples = []
    for p, rows in sorted(out.items()):
        clocks, top = [], None
        for ts, _ in rows:
            top = ts if top is None else max(top, ts)
            clocks.append(top)
        samples.append(Stream("samples", p, clocks, iter([r for _, r in rows])))
    return Streams(others + samples)
