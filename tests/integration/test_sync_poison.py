"""Poison records on the sensor topics: 2,501 malformed records (random bytes, truncated
msgpack, wrong types, 5 and 8 MB records, an unknown schema version, non-JPEG images, NaN
series) mixed with a simulated plant's valid readings. Every bad record is a dead letter
with its reason (an oversized one with its size and a truncated copy), every slot is a
sample, and sync never stops. With the worker's 2,502 on the samples topic
(test_worker_faults.py), 5,003 malformed records in all."""

from __future__ import annotations

import threading
from collections import Counter

import msgpack
import numpy as np
import pytest

from streamfuse.events import DEAD_LETTER_KEEP_BYTES, MSGPACK, SensorEvent, encode, headers, to_map
from streamfuse.kafka import make_producer
from streamfuse.sim.publish import SimPublisher
from streamfuse.topics import Topics
from test_sync import START_MS, Collector, SyncThread, sync_settings  # noqa: F401 (a fixture)

pytestmark = pytest.mark.integration
MODALITIES = ("image", "audio", "series")
PER_KIND = 119  # per kind and sensor topic: 7 kinds x 3 topics x 119 = 2,499, plus a 5 MB and an 8 MB record


def poison(rng: np.random.Generator, template: SensorEvent, kind: str) -> tuple[bytes, set[str]]:
    """One malformed record built from a valid reading, and the reasons it may get."""
    m = to_map(template)
    if kind == "random":  # random bytes may parse as a tiny msgpack value: never as an event
        return rng.bytes(int(rng.integers(1, 400))), {"undecodable", "unknown_schema"}
    if kind == "truncated":
        good = encode(template)
        return good[: int(rng.integers(1, len(good) - 1))], {"undecodable"}
    if kind == "wrong_type":
        field, value = [("ts_ms", "soon"), ("payload", 7), ("event_id", [1]), ("modality", 3), ("ts_ms", 1.5),
                        ("line_id", {"a": 1}), ("shape", "abc")][int(rng.integers(0, 7))]
        return msgpack.packb({**m, field: value}), {"bad_field"}
    if kind == "schema_v2":
        return msgpack.packb({**m, "schema": "sf.sensor/2"}), {"unknown_schema"}
    if kind == "not_jpeg":
        return msgpack.packb({**m, "modality": "image", "encoding": "jpeg",
                              "payload": b"GIF89a" + rng.bytes(200)}), {"bad_image"}
    if kind == "nan_series":
        return msgpack.packb({**m, "modality": "series", "encoding": "float32le", "shape": [64],
                              "payload": np.full(64, np.nan, "<f4").tobytes()}), {"non_finite"}
    if kind == "empty":
        return b"", {"undecodable"}
    raise ValueError(kind)


KINDS = ("random", "truncated", "wrong_type", "schema_v2", "not_jpeg", "nan_series", "empty")


def publish_poison(settings, templates: dict[str, SensorEvent]) -> dict[tuple[str, int, int], tuple[str, set[str]]]:
    """Produce the poison; returns (topic, partition, offset) -> (what, the reasons its dead letter may have)."""
    rng = np.random.default_rng(13)
    topics = Topics(settings.topic_prefix)
    producer = make_producer(settings, "test-poison")
    sent = []
    try:
        for i in range(PER_KIND):
            for kind in KINDS:
                for topic_m in MODALITIES:
                    t = templates[topic_m]
                    t = SensorEvent(f"{t.event_id}-p{i}{kind}", t.asset_id, t.modality, t.ts_ms, t.payload,
                                    t.line_id, t.encoding, t.sample_rate, t.channels, t.shape)
                    value, reasons = poison(rng, t, kind)
                    fut = producer.send(topics.sensor(topic_m), key=t.asset_id.encode(), value=value,
                                        headers=headers(MSGPACK))
                    sent.append((fut, kind, reasons))
        for size, topic_m in ((5_000_000, "image"), (8_000_000, "audio")):
            t = templates[topic_m]
            value = msgpack.packb({**to_map(t), "payload": rng.bytes(size)})
            fut = producer.send(topics.sensor(topic_m), key=t.asset_id.encode(), value=value, headers=headers(MSGPACK))
            sent.append((fut, f"big:{len(value)}", {"oversize"}))
        producer.flush()
    finally:
        producer.close()
    out = {}
    for fut, kind, reasons in sent:
        md = fut.get(timeout=10)
        out[(md.topic, md.partition, md.offset)] = (kind, reasons)
    return out


def test_poison_on_sensor_topics_goes_to_the_dead_letter_topic(sync_settings):  # noqa: F811 (the fixture)
    sim = SimPublisher(sync_settings, start_ms=START_MS, speed=None, run_id="px", per_modality_topics=True)
    sample, _ = sim.plant.sample(0, 0, START_MS)
    templates = dict(sample.readings)
    sync, out = SyncThread(sync_settings), Collector(sync_settings)
    try:
        poisoner = threading.Thread(target=lambda: expected.update(publish_poison(sync_settings, templates)))
        expected: dict = {}
        poisoner.start()
        stats = sim.run(duration_s=20)  # valid readings, interleaved with the poison
        poisoner.join(60)
        assert not poisoner.is_alive()
        out.wait(lambda: {s.sample_id for s in out.samples} >= set(stats.sample_ids)
                 and len(out.dead) >= len(expected), "every slot's sample and every poison record's dead letter",
                 sync, timeout_s=60)
    finally:
        sync.join()
    out.drain()
    assert sorted({s.sample_id for s in out.samples}) == sorted(stats.sample_ids)
    reasons = Counter(d.reason for d in out.dead)
    missing = Counter(s.missing for s in out.samples)
    assert all(set(s.readings) == set(MODALITIES) for s in out.samples), (reasons, missing)  # nothing joined
    print(f"\nsync poison: {len(expected)} malformed records with {stats.sensor_events} valid readings -> "
          f"{len(out.samples)} samples ({len(stats.sample_ids)} slots), dead letters {dict(reasons)}")
    # Each poison record is a dead letter with the reason its kind calls for, and nothing else is.
    got = {(d.source_topic, d.partition, d.offset): d for d in out.dead}
    assert len(got) == len(out.dead) == len(expected)
    for where, (kind, allowed) in expected.items():
        d = got[where]
        assert d.component == "sync" and d.reason in allowed, (kind, d.reason, d.detail)
        if kind.startswith("big:"):  # its size, and a truncated copy
            assert f"original {kind[4:]} bytes" in d.detail and len(d.original) == DEAD_LETTER_KEEP_BYTES
