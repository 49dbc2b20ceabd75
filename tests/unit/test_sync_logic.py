"""Synchronizer (pure): slots, tolerance, grace, missing marks, late, duplicates, reorder,
lagging inputs, idle advance, bounded state, checkpoints; the sync task's record handling
without a broker; and the simulator's per-modality mode agreeing with the synchronizer."""

from __future__ import annotations

import io
import itertools
import random
from collections import namedtuple

import msgpack
import pytest
from PIL import Image

from streamfuse.config import Settings
from streamfuse.errors import ConfigError, StreamfuseError
from streamfuse.events import JSON, MSGPACK, REASONS, Label, SensorEvent, decode, encode, encode_json, headers
from streamfuse.sim.publish import ReadingDisorder, SimPublisher
from streamfuse.sync.core import OUTCOMES, SyncConfig, SyncError, Synchronizer, slot_id, slot_time
from streamfuse.sync.task import DEAD_REASONS, SyncTask, checkpoint_metadata, parse_checkpoint
from streamfuse.topics import Topics

CFG = SyncConfig(period_ms=1000, tolerance_ms=100, grace_ms=500)  # slot n closes when watermark > n + 600


def ev(m: str, ts: int, asset: str = "a1", eid: str | None = None, line: str = "line-0") -> SensorEvent:
    return SensorEvent(eid or f"{asset}-{m}-{ts}", asset, m, ts, b"x", line_id=line)


def valid(m: str, ts: int, asset: str = "a1") -> SensorEvent:
    """A reading whose payload passes validation (for the task, which decodes)."""
    payload = {"image": PNG, "audio": b"\0\0" * 8, "series": b"\0" * 16}[m]
    extra = {"image": {"encoding": "png"}, "audio": {"sample_rate": 8000, "channels": 1}, "series": {"shape": (4,)}}
    return SensorEvent(f"{asset}-{m}-{ts}", asset, m, ts, payload, line_id="line-0", **extra[m])


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="PNG")
    return buf.getvalue()


PNG = _png()


def ids(samples) -> list[str]:
    return [s.sample_id for s in samples]


# ---------------------------------------------------------------------------- config and helpers


def test_slot_time_and_id() -> None:
    assert [slot_time(t, 1000) for t in (0, 499, 500, 999, 1000, 1499, -1)] == [0, 0, 1000, 1000, 1000, 1000, 0]
    assert slot_time(10, 3) == 9 and slot_time(11, 3) == 12  # odd periods: halfway goes up
    assert slot_id("asset-2", 4000) == "asset-2-4000"


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"period_ms": 0}, "period_ms=0"),
        ({"tolerance_ms": -1}, "tolerance_ms=-1"),
        ({"tolerance_ms": 501}, "more than half"),
        ({"grace_ms": 1.5}, "grace_ms=1.5"),
        ({"modalities": ()}, "modalities"),
        ({"modalities": ("image", "image")}, "distinct"),
        ({"modalities": ("video",)}, "modalities"),
        ({"max_open_slots": 0}, "max_open_slots=0"),
        ({"period_ms": True}, "period_ms=True"),
    ],
)
def test_config_rejects(kwargs: dict, words: str) -> None:
    with pytest.raises(ConfigError, match=words) as info:
        SyncConfig(**{"period_ms": 1000, **kwargs})
    assert isinstance(info.value, StreamfuseError)


def test_config_for_rate_matches_the_plant_period() -> None:
    assert SyncConfig.for_rate(2.0) == SyncConfig(period_ms=500, tolerance_ms=125, grace_ms=500)
    assert SyncConfig.for_rate(3.0, grace_ms=0).period_ms == 333
    with pytest.raises(ConfigError):
        SyncConfig.for_rate(0)


def test_reason_codes_exist() -> None:
    assert set(DEAD_REASONS.values()) <= set(REASONS)
    assert set(DEAD_REASONS) | {"joined", "duplicate"} == set(OUTCOMES)


# ---------------------------------------------------------------------------- slotting and closing


def test_tolerance_is_inclusive_and_slots_are_nearest() -> None:
    sync = Synchronizer(CFG)
    results = [sync.add(ev(m, ts)) for m, ts in
               [("image", 900), ("audio", 1100), ("series", 1101), ("series", 1550), ("series", 2000)]]
    assert [r.outcome for r in results] == ["joined", "joined", "outside_tolerance", "outside_tolerance", "joined"]
    assert [r.samples for r in results[:4]] == [()] * 4  # the watermark (1550) has not passed 1600 ...
    (s1000,) = results[4].samples  # ... until the reading at 2000
    assert s1000.sample_id == "a1-1000" and s1000.ts_ms == 1000
    assert {m: r.ts_ms for m, r in s1000.readings.items()} == {"image": 900, "audio": 1100}


def test_grace_boundary_is_exact() -> None:
    sync = Synchronizer(CFG)
    sync.add(ev("image", 1000))
    assert sync.advance(1600) == () and sync.open_slots == 1  # not yet past 1000 + 100 + 500
    assert sync.add(ev("audio", 1050)).outcome == "joined"  # so a reading may still join
    assert ids(sync.advance(1601)) == ["a1-1000"]
    assert sync.add(ev("series", 1000)).outcome == "late"


def test_missing_is_marked_in_config_order_never_invented() -> None:
    cfg = SyncConfig(period_ms=1000, tolerance_ms=100, grace_ms=0, modalities=("series", "image", "audio"))
    sync = Synchronizer(cfg)
    sync.add(ev("image", 1000))
    (s,) = sync.advance(5000)
    assert list(s.readings) == ["image"] and s.missing == ("series", "audio")
    assert s.line_id == "line-0" and s.asset_id == "a1"


def test_unknown_modality_for_this_config() -> None:
    sync = Synchronizer(SyncConfig(period_ms=1000, tolerance_ms=100, grace_ms=0, modalities=("image",)))
    assert sync.add(ev("audio", 1000)).outcome == "unknown_modality"
    assert sync.open_slots == 0 and sync.watermark is None


def test_late_even_for_a_slot_that_never_opened() -> None:
    sync = Synchronizer(CFG)
    sync.add(ev("image", 9000))
    res = sync.add(ev("audio", 3000))
    assert res.late and res.samples == () and sync.open_slots == 1


def test_duplicates_ignored_and_extra_readings_rejected() -> None:
    sync = Synchronizer(CFG)
    assert sync.add(ev("image", 1000, eid="e1")).outcome == "joined"
    dup = sync.add(ev("image", 1000, eid="e1"))
    assert dup.duplicate and not dup.late
    assert sync.add(ev("image", 1010, eid="e2")).outcome == "extra"  # first in the log wins
    (s,) = sync.flush()
    assert s.readings["image"].event_id == "e1"


def test_watermark_passing_closes_every_asset_oldest_first() -> None:
    sync = Synchronizer(SyncConfig(period_ms=1000, tolerance_ms=100, grace_ms=5000))
    for asset, ts in [("b", 1000), ("a", 2000), ("a", 1000), ("b", 2000)]:
        assert sync.add(ev("image", ts, asset)).samples == ()
    assert ids(sync.add(ev("image", 7101, "c")).samples) == ["a-1000", "b-1000", "a-2000", "b-2000"]


def test_silent_asset_closes_when_its_partition_moves_on() -> None:
    sync = Synchronizer(CFG)
    sync.add(ev("image", 1000, "quiet"))
    out = [s for t in range(2000, 4000, 1000) for s in sync.add(ev("image", t, "busy")).samples]
    assert "quiet-1000" in ids(out)


def test_reorder_within_grace_gives_the_same_samples() -> None:
    readings = [ev(m, k * 1000 + j, a) for k in range(1, 30) for a in ("a", "b")
                for m, j in (("image", -80), ("audio", 40), ("series", 100)) if (k + len(m) + len(a)) % 7]
    rng = random.Random(7)

    def run(order):
        sync = Synchronizer(CFG)
        out = [s for r in order for s in sync.add(r).samples] + list(sync.flush())
        return [(s.sample_id, tuple(s.readings), s.missing) for s in out]

    expected = run(readings)
    for _ in range(5):  # displace readings by up to 0.5 s of event time (grace 0.5 s)
        order = sorted(readings, key=lambda r: r.ts_ms + rng.uniform(0, 500))
        assert run(order) == expected
    assert len(expected) == 29 * 2 and any(s[2] for s in expected)


# ---------------------------------------------------------------------------- watermark inputs


def test_lagging_source_holds_the_watermark() -> None:
    sync = Synchronizer(CFG)
    sync.set_lagging("audio", True)  # unread audio: nothing may close yet
    for t in range(1000, 6000, 1000):
        assert sync.add(ev("image", t)).samples == ()
    assert sync.watermark is None
    sync.add(ev("audio", 1000))  # audio reaches 1000: still held there
    assert sync.watermark == 1000 and sync.open_slots == 5
    assert ids(sync.set_lagging("audio", False)) == ["a1-1000", "a1-2000", "a1-3000", "a1-4000"]
    assert sync.add(ev("audio", 4000)).late  # the watermark never goes back


def test_idle_advance_closes_the_last_slot_and_flush_closes_all() -> None:
    sync = Synchronizer(CFG)
    sync.add(ev("image", 1000))
    assert ids(sync.add(ev("image", 2000, "b")).samples) == ["a1-1000"]
    assert sync.advance(2600) == () and ids(sync.advance(2601)) == ["b-2000"]  # nothing new: time passed in
    sync.add(ev("image", 3000))
    assert ids(sync.flush()) == ["a1-3000"] and sync.flush() == ()
    assert sync.add(ev("audio", 3050)).late


def test_bounded_open_slots_close_the_oldest_early() -> None:
    sync = Synchronizer(SyncConfig(period_ms=1000, tolerance_ms=100, grace_ms=100_000, max_open_slots=3))
    for t in (1000, 2000, 3000):
        sync.add(ev("image", t))
    res = sync.add(ev("image", 4000))
    assert ids(res.samples) == ["a1-1000"] and sync.open_slots == 3 and sync.forced_closes == 1
    assert sync.add(ev("audio", 1000)).late


# ---------------------------------------------------------------------------- checkpoints


def test_state_round_trip_continues_identically() -> None:
    stream = [ev(m, k * 1000 + j, a) for k in range(1, 12) for a in ("a", "b")
              for m, j in (("image", 0), ("audio", 50), ("series", -50)) if (k * len(m)) % 5]
    straight = Synchronizer(CFG)
    out1 = [s for r in stream for s in straight.add(r).samples] + list(straight.flush())
    first = Synchronizer(CFG)
    first.set_lagging("series", True)
    first.set_lagging("series", False)
    out2 = [s for r in stream[:25] for s in first.add(r).samples]
    state = msgpack.unpackb(msgpack.packb(first.state_dict(), use_bin_type=True), raw=False)
    second = Synchronizer(CFG)
    second.load_state_dict(state)
    assert second.open_slots == first.open_slots and second.watermark == first.watermark
    out2 += [s for r in stream[25:] for s in second.add(r).samples] + list(second.flush())
    assert out2 == out1


def test_state_from_another_config_or_version_is_refused() -> None:
    state = Synchronizer(CFG).state_dict()
    with pytest.raises(SyncError, match="saved with"):
        Synchronizer(SyncConfig(period_ms=2000)).load_state_dict(state)
    with pytest.raises(SyncError, match="version"):
        Synchronizer(CFG).load_state_dict({**state, "version": 99})


# ---------------------------------------------------------------------------- the sync task (no broker)

Rec = namedtuple("Rec", "topic partition offset key value headers")
TOPICS = Topics("t.")


class Feed:
    """Consumer records for one task, numbered per topic like a partition's offsets."""

    def __init__(self) -> None:
        self.offsets = dict.fromkeys(("image", "audio", "series"), 0)

    def rec(self, m: str, value: bytes, key: bytes = b"a1", ctype: str = MSGPACK) -> Rec:
        self.offsets[m] += 1
        return Rec(TOPICS.sensor(m), 0, self.offsets[m] - 1, key, value, headers(ctype))

    def reading(self, m: str, ts: int, asset: str = "a1") -> Rec:
        return self.rec(m, encode(valid(m, ts, asset)), asset.encode())


NOW_MS = 1_800_000_000_000  # wall time stamped on dead letters


def feed_all(task: SyncTask, recs, now: float = 0.0) -> tuple[list, list]:
    samples, dead = [], []
    for r in recs:
        s, d = task.feed(r, now, NOW_MS)
        samples += s
        dead += d
    return samples, dead


def test_task_dead_letters_bad_records_and_keeps_going() -> None:
    task, f = SyncTask(CFG, TOPICS, 100_000), Feed()
    for m in ("image", "audio", "series"):
        task.sync.set_lagging(m, False)
    recs = [
        f.rec("image", b"\x00 junk \xc1"),
        f.rec("audio", encode_json(Label("x", "a1", 1000, "normal")), ctype=JSON),
        f.rec("series", encode(valid("image", 1000))),  # an image reading on the series topic
        f.rec("image", encode(valid("image", 1000)), key=b"other"),  # key is not the asset id
        f.reading("image", 1000), f.reading("audio", 1400), f.reading("image", 1000),
        f.reading("series", 3000), f.reading("series", 1000),
    ]
    samples, dead = feed_all(task, recs)
    assert [d.reason for d in dead] == ["undecodable", "unexpected_schema", "bad_field", "bad_field",
                                        "outside_tolerance", "late_reading"]
    assert all(d.component == "sync" and d.original == r.value and d.ts_ms == NOW_MS
               for d, r in zip(dead, [*recs[:4], recs[5], recs[8]]))
    assert dead[-1].modality == "series" and dead[-1].offset == 2 and "a1-series-1000" in dead[-1].detail
    assert [(s.sample_id, s.missing) for s in samples] == [("a1-1000", ("audio", "series"))]
    assert task.outcomes == [("late", "series")]


def test_task_commit_offset_is_the_oldest_held_reading() -> None:
    task, f = SyncTask(SyncConfig(period_ms=1000, tolerance_ms=100, grace_ms=5000), TOPICS, 100_000), Feed()
    for m in ("image", "audio", "series"):
        task.sync.set_lagging(m, False)
    feed_all(task, [f.rec("image", b"junk"), f.reading("image", 1000), f.reading("image", 2000)])
    assert task.commit_offset("image", 3) == 1 and task.commit_offset("audio", 7) == 7
    samples, _ = feed_all(task, [f.reading("audio", 7000)])  # closes slot 1000: image offset 1 is done
    assert [s.sample_id for s in samples] == ["a1-1000"]
    assert task.commit_offset("image", 3) == 2 and task.commit_offset("audio", 1) == 0


def test_task_restore_recognises_replays() -> None:
    f = Feed()
    straggler = SensorEvent("late-1", "a1", "image", 1040, PNG, encoding="png")
    recs = [f.reading("image", 3000), f.rec("image", b"junk"), f.rec("image", encode(straggler)),
            f.reading("audio", 1000)]
    first = SyncTask(CFG, TOPICS, 100_000)
    for m in ("image", "audio", "series"):
        first.sync.set_lagging(m, False)
    samples, dead = feed_all(first, recs)
    assert samples == [] and [(d.reason, d.offset) for d in dead] == [
        ("undecodable", 1), ("late_reading", 2), ("late_reading", 0)]
    committed = {m: first.commit_offset(m, f.offsets[m]) for m in ("image", "audio")}
    assert committed == {"image": 0, "audio": 1}  # image 3000 waits in an open slot
    replay = [r for r in recs if r.offset >= committed[r.topic.rsplit(".", 1)[1]]]
    assert len(replay) == 3

    def restart(metadata: bool) -> tuple[SyncTask, list, list]:
        task = SyncTask(CFG, TOPICS, 100_000)  # its inputs lag until the consumer knows better
        if metadata:  # what the commit carried: the watermark and the read positions
            task.restore({m: parse_checkpoint(checkpoint_metadata(first.sync.watermark, f.offsets[m]))
                          for m in ("image", "audio")})
        return task, *feed_all(task, replay)

    task, samples, dead = restart(metadata=True)
    assert (samples, dead, task.sync.open_slots) == ([], [], 1)
    assert task.held == {("image", "a1-image-3000", 3000): 0}
    # Without it (a broker that drops commit metadata) the replay is processed again: the
    # junk is dead-lettered twice and the straggler reopens its slot (a partial re-emission).
    task, samples, dead = restart(metadata=False)
    assert [d.reason for d in dead] == ["undecodable"] and task.sync.open_slots == 2


def test_task_tick_applies_lagging_and_idle_advance() -> None:
    task, f = SyncTask(SyncConfig(period_ms=1000, tolerance_ms=100, grace_ms=500, idle_ms=500), TOPICS, 100_000), Feed()
    caught_up = {"image": False, "audio": False, "series": False}
    assert task.tick(caught_up, 0.0) == []  # nothing read yet: no idle advance
    feed_all(task, [f.reading("image", 2000)], now=100.0)  # the inputs start lagging: nothing closes while they do
    assert task.last_input == 100.0
    assert task.tick({**caught_up, "audio": True}, 160.0) == []
    assert task.tick(caught_up, 100.4) == []  # quiet for less than idle_ms
    assert task.tick(caught_up, 100.6) == []  # event time 2000 + 600: not past 2600
    (s,) = task.tick(caught_up, 100.65)  # well past: float seconds round
    assert s.sample_id == "a1-2000" and s.missing == ("audio", "series")


def test_checkpoint_metadata_parsing() -> None:
    assert parse_checkpoint(checkpoint_metadata(None, 3)) == (None, 3)
    for bad in ("", "{}", '{"w": "x", "pos": 1}', "[1, 2]", '{"w": 1, "pos": null}'):
        assert parse_checkpoint(bad) is None


# ---------------------------------------------------------------------------- simulator ↔ synchronizer


class FakeProducer:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, bytes]] = []

    def send(self, topic, key=None, value=None, headers=None):
        self.sent.append((topic, key, value))

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def simulate(disorder: ReadingDisorder, seconds: float = 20, malformed_every: int = 0):
    settings = Settings(topic_prefix="t.", sim={"assets": 3, "rate_hz": 5.0, "seed": 3, "label_delay_ms": 0})
    sim = SimPublisher(settings, start_ms=1_000_000_037, speed=None, run_id="u", per_modality_topics=True,
                       disorder=disorder, malformed_every=malformed_every)
    producer = FakeProducer()
    stats = sim.run(duration_s=seconds, producer=producer)
    return sim, stats, producer.sent


DISORDER = ReadingDisorder(jitter_ms=50, reorder_prob=0.2, reorder_ms=400, drop_prob=0.15, duplicate_prob=0.05,
                           late_prob=0.05, seed=11, sync=SyncConfig.for_rate(5.0, grace_ms=500))


def test_sim_per_modality_ground_truth_matches_the_synchronizer() -> None:
    sim, stats, sent = simulate(DISORDER)
    assert sim.start_ms % 200 == 0 and stats.samples == len(stats.sample_ids) == 300
    assert stats.dropped and stats.reordered and stats.duplicates and stats.late
    sync = Synchronizer(DISORDER.sync)
    samples, outcomes = [], []
    for topic, key, value in sent:
        if topic == "t.labels":
            continue
        r = decode(value, expect=SensorEvent)
        assert topic == f"t.sensor.{r.modality}" and key == r.asset_id.encode()
        res = sync.add(r)
        samples += res.samples
        outcomes.append((res.outcome, r.event_id))
    samples += sync.flush()
    assert [s.sample_id for s in samples] == sorted(stats.sample_ids, key=lambda i: (int(i.rsplit("-", 1)[1]), i))
    for s in samples:
        assert tuple(s.readings) == stats.slot_modalities[s.sample_id]
        assert s.missing == tuple(m for m in ("image", "audio", "series") if m not in s.readings)
        assert all(abs(r.ts_ms - s.ts_ms) <= 50 for r in s.readings.values())
    assert sorted(e for o, e in outcomes if o == "late") == sorted(stats.late)
    assert sum(o == "duplicate" for o, _ in outcomes) == stats.duplicates
    assert {o for o, _ in outcomes} == {"joined", "duplicate", "late"}
    labels = [decode(v) for t, _, v in sent if t == "t.labels"]
    assert sorted(lb.sample_id for lb in labels) == sorted(stats.sample_ids)


def test_sim_per_modality_is_reproducible_and_default_mode_unchanged() -> None:
    assert simulate(DISORDER, 3)[2] == simulate(DISORDER, 3)[2]
    settings = Settings(topic_prefix="t.", sim={"assets": 2})
    producer = FakeProducer()
    stats = SimPublisher(settings, start_ms=1_000_000_037, speed=None, run_id="d").run(max_samples=4,
                                                                                       producer=producer)
    assert stats.sample_ids == ["d-asset-0-0", "d-asset-1-0", "d-asset-0-1", "d-asset-1-1"]
    assert {t for t, _, _ in producer.sent} == {"t.samples", "t.labels"}


def test_sim_per_modality_malformed_readings() -> None:
    _, stats, sent = simulate(ReadingDisorder(seed=1), seconds=1, malformed_every=5)
    assert stats.malformed == 4 * 3
    task, offsets = SyncTask(SyncConfig.for_rate(5.0), TOPICS, 1_000_000), itertools.count()
    recs = [Rec(t, 0, next(offsets), k, v, headers(JSON if v[:1] == b"{" else MSGPACK))
            for t, k, v in sent if t != "t.labels"]
    reasons = [d.reason for d in feed_all(task, recs)[1]]
    assert sorted(reasons) == sorted(["undecodable", "unexpected_schema", "non_finite", "bad_field"] * 3)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"jitter_ms": 60}, "jitter_ms=60"),
        ({"reorder_ms": 1000}, "past the sync grace"),
        ({"drop_prob": 0.7, "late_prob": 0.5}, "at most 1"),
        ({"sync": SyncConfig.for_rate(10.0)}, "differs"),
    ],
)
def test_reading_disorder_rejects(kwargs: dict, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        ReadingDisorder(**kwargs).check(200)
