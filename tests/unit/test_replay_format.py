"""The recording format and the replay plan: pure file I/O and ordering, no broker."""

from __future__ import annotations

import gzip
import json

import msgpack
import pytest

from streamfuse.events import Label, Sample, SensorEvent, encode, headers
from streamfuse.replay.errors import RecordingError
from streamfuse.replay.format import MAGIC, Recording, RecordingWriter, iter_segment, record_map
from streamfuse.replay.lockstep import threshold_after
from streamfuse.replay.plan import Filters, Stream, Streams, WallToEvent, clock_streams, event_ts


def rec(offset: int, value: bytes | None, ts: int, partition: int = 0, key: bytes | None = b"asset-0") -> dict:
    return record_map(key, value, [("content-type", b"application/msgpack"), ("x-empty", b"")], partition, offset,
                      ts, 0)


@pytest.mark.parametrize("compression", ["gzip", "none"])
def test_segments_keep_every_field_byte_for_byte(tmp_path, compression):
    w = RecordingWriter(tmp_path / "r", compression, segment_bytes=200)
    sent = [rec(i, bytes(range(256)) * (i + 1), 1000 + i, partition=i % 2) for i in range(6)]
    sent.append(rec(6, None, 2000, key=None))  # a tombstone without a key
    for r in sent:
        w.add("samples", r)
    man = w.close({"topics": {"samples": {"partitions": 2}}})
    assert len(man["segments"]) > 2  # rotated at 200 bytes
    got = Recording(tmp_path / "r")
    back = [r for p in got.partitions("samples") for r in got.records("samples", p)]
    assert sorted(back, key=lambda r: r["offset"]) == sent
    assert all(s["sha256"] and s["records"] for s in man["segments"])


def test_a_modified_segment_is_refused_with_its_name(tmp_path):
    w = RecordingWriter(tmp_path / "r")
    w.add("labels", rec(0, b"x", 1))
    w.close({})
    seg = next((tmp_path / "r" / "labels").iterdir())
    seg.write_bytes(seg.read_bytes()[:-3])
    with pytest.raises(RecordingError, match=seg.name):
        Recording(tmp_path / "r")
    with pytest.raises(RecordingError, match="truncated or corrupt"):
        list(iter_segment(seg))
    assert Recording(tmp_path / "r", verify=False).manifest["format"] == "streamfuse-recording/1"


def test_not_a_recording_and_not_a_segment(tmp_path):
    with pytest.raises(RecordingError, match="streamfuse record --out"):
        Recording(tmp_path)
    bad = tmp_path / "x.sfrec"
    bad.write_bytes(b"nope" + MAGIC)
    with pytest.raises(RecordingError, match="bad magic"):
        list(iter_segment(bad))
    RecordingWriter(tmp_path / "r").close({})
    with pytest.raises(RecordingError, match="already holds a recording"):
        RecordingWriter(tmp_path / "r")
    RecordingWriter(tmp_path / "i").close({"incomplete": True})
    with pytest.raises(RecordingError, match="stopped with an error"):
        Recording(tmp_path / "i")


def test_segment_layout_is_the_documented_one(tmp_path):
    w = RecordingWriter(tmp_path / "r", "gzip")
    w.add("sensor.image", rec(7, b"\xff\xd8", 5, partition=2))
    man = w.close({})
    seg = man["segments"][0]
    assert seg["file"] == "sensor.image/002-00000.sfrec.gz"
    raw = gzip.decompress((tmp_path / "r" / seg["file"]).read_bytes())
    assert raw.startswith(MAGIC)
    n = int.from_bytes(raw[len(MAGIC):len(MAGIC) + 4], "big")
    body = msgpack.unpackb(raw[len(MAGIC) + 4:len(MAGIC) + 4 + n], raw=False)
    assert body["value"] == b"\xff\xd8" and body["offset"] == 7 and body["partition"] == 2
    assert json.loads((tmp_path / "r" / "manifest.json").read_text())["format"] == "streamfuse-recording/1"


def test_event_time_of_values():
    ev = SensorEvent("e", "asset-0", "series", 1234, b"\x00" * 8)
    assert event_ts(encode(ev)) == 1234
    assert event_ts(b'{"ts_ms": 5}', "application/json") == 5
    assert event_ts(None) is None and event_ts(msgpack.packb({"ts_ms": True})) is None


def test_wall_to_event_is_a_running_maximum():
    m = WallToEvent([(10, 300), (20, 100), (30, 400)])
    assert (m(5), m(10), m(25), m(30)) == (None, 300, 300, 400)


def _sample(i: int, ts: int, asset: str = "asset-0") -> bytes:
    r = SensorEvent(f"e{i}", asset, "series", ts, b"\x00" * 8, "line-0", "float32le", shape=(2,))
    return encode(Sample(f"s{i}", asset, ts, {"series": r}, "line-0"))


def _label(i: int, ts: int, asset: str = "asset-0") -> bytes:
    return encode(Label(f"s{i}", asset, ts, "normal", "line-0"))


def _sources(records: dict[tuple[str, int], list[dict]]):
    return {k: (lambda v=v: iter(v)) for k, v in records.items()}


def test_clocks_merge_and_retime_labels():
    # Samples every 200 ms of event time, published 10 ms of wall time apart (5x faster
    # than real time); labels published 1 s of event time later (5 ticks).
    samples = [rec(i, _sample(i, 10_000 + 200 * i), 500 + 10 * i) for i in range(20)]
    labels = [rec(i, _label(i, 10_000 + 200 * i), 500 + 10 * (i + 5)) for i in range(15)]
    # A malformed sample record: placed by its Kafka timestamp, between s4 and s5.
    samples.insert(5, rec(99, b"\xc1junk", 545))
    srcs = _sources({("samples", 0): samples, ("labels", 0): labels})
    plain = clock_streams(srcs)
    lab = plain.of("labels")[0]
    assert lab.clocks[:3] == [11_000, 11_200, 11_400]  # the stream's event time when each arrived
    assert plain.of("samples")[0].clocks[5] == 10_800  # junk: the event time reached at 545
    # With a deadline (window 2 s + grace 1 s) on-time labels enter with their sample.
    deadline = lambda ts: ts - ts % 2000 + 2000 + 1000  # noqa: E731
    streams = clock_streams(srcs, deadline=deadline)
    assert streams.of("labels")[0].clocks[:3] == [10_000, 10_200, 10_400]
    order = [(s.topic, s.clocks[s.pos - 1]) for s, _ in streams.pop_before(10_400)]
    assert order == [("labels", 10_000), ("samples", 10_000), ("labels", 10_200), ("samples", 10_200)]
    assert streams.next_clock() == 10_400


def test_a_label_later_than_its_deadline_keeps_its_lateness():
    samples = [rec(i, _sample(i, 10_000 + 200 * i), 500 + 10 * i) for i in range(40)]
    late = [rec(0, _label(0, 10_000), 500 + 10 * 30)]  # arrives 6 s of event time later
    streams = clock_streams(_sources({("samples", 0): samples, ("labels", 0): late}),
                            deadline=lambda ts: ts - ts % 2000 + 3000)
    assert streams.of("labels")[0].clocks == [16_000]


def test_filters_by_asset_and_time():
    samples = [rec(i, _sample(i, 10_000 + 200 * i, f"asset-{i % 2}"), 500 + 10 * i, key=f"asset-{i % 2}".encode())
               for i in range(10)]
    f = Filters(assets=frozenset({"asset-1"}), from_ms=10_400, to_ms=11_400)
    streams = clock_streams(_sources({("samples", 0): samples}), f)
    kept = [r for _, r in streams.pop_before(None)]
    assert [r["offset"] for r in kept] == [3, 5]


def test_streams_keep_partition_order_under_a_running_maximum():
    s = Stream("samples", 0, [5, 5, 9], iter(["a", "b", "c"]))
    t = Stream("labels", 0, [6], iter(["x"]))
    assert [r for _, r in Streams([s, t]).pop_before(None)] == ["a", "b", "x", "c"]


def test_thresholds_are_window_ends_plus_grace():
    assert threshold_after(10_999, 2000, 1000) == 11_000
    assert threshold_after(11_000, 2000, 1000) == 13_000


def test_headers_of_records_round_trip(tmp_path):
    w = RecordingWriter(tmp_path / "r", "none")
    w.add("labels", record_map(b"k", b"v", headers("application/json") + [("trace", b"\x00\x01")], 0, 0, 1))
    w.close({})
    back = next(Recording(tmp_path / "r").records("labels", 0))
    assert back["headers"] == [["content-type", b"application/json"], ["trace", b"\x00\x01"]]
