"""The worker's intake: micro-batches by time (live) and by the stream (replays)."""

from __future__ import annotations

import random
import time

import numpy as np
import pytest
from poison import malformed_records

from streamfuse.events import BATCH_END, MSGPACK, Sample, SensorEvent, encode, headers
from streamfuse.inference.feeder import Feeder


class Msg:
    """The parts of a confluent-kafka Message the feeder reads."""

    def __init__(self, partition: int, offset: int, value: bytes, marked: bool = False) -> None:
        self._p, self._o, self._v = partition, offset, value
        self._h = headers(MSGPACK) + ([(BATCH_END, b"1")] if marked else [])

    def error(self):
        return None

    def topic(self):
        return "t"

    def partition(self):
        return self._p

    def offset(self):
        return self._o

    def key(self):
        return b"k"

    def value(self):
        return self._v

    def headers(self):
        return self._h


class Consumer:
    """Hands out pre-arranged deliveries: chunk ``i`` becomes available ``i * gap_s`` after
    the first read, so tests decide how and when records arrive."""

    def __init__(self, chunks: list[list[Msg]], gap_s: float = 0.0) -> None:
        self.chunks, self.gap_s = [list(c) for c in chunks], gap_s
        self.start: float | None = None
        self.taken = 0  # chunks fully handed out
        self.delivered = 0
        self.commits: list = []

    def subscribe(self, topics, on_revoke=None):
        self.on_revoke = on_revoke

    def _take(self, n: int, timeout: float) -> list[Msg]:
        if self.start is None:
            self.start = time.monotonic()
        deadline = time.monotonic() + timeout
        while True:
            while self.chunks and not self.chunks[0]:
                self.chunks.pop(0)
                self.taken += 1
            if self.chunks and time.monotonic() >= self.start + self.taken * self.gap_s:
                out, self.chunks[0] = self.chunks[0][:n], self.chunks[0][n:]
                self.delivered += len(out)
                return out
            if time.monotonic() >= deadline:
                return []
            time.sleep(0.001)

    def poll(self, timeout):
        got = self._take(1, timeout)
        return got[0] if got else None

    def consume(self, num_messages, timeout):
        return self._take(num_messages, timeout)

    def commit(self, offsets, asynchronous):
        self.commits.append(offsets)

    def close(self):
        pass


def sample_bytes(partition: int, i: int) -> bytes:
    ev = SensorEvent(f"e{partition}-{i}", "a", "series", i, np.arange(4, dtype="<f4").tobytes())
    return encode(Sample(f"s{partition}-{i}", "a", i, {"series": ev}))


def stream(n_per_partition: int, marks: set[tuple[int, int]]) -> dict[int, list[Msg]]:
    return {p: [Msg(p, i, sample_bytes(p, i), (p, i) in marks) for i in range(n_per_partition)] for p in range(3)}


def batches_of(feeder: Feeder, n_records: int) -> list[list[str]]:
    feeder.start()
    out, seen, deadline = [], 0, time.monotonic() + 10
    while seen < n_records and time.monotonic() < deadline:
        b = feeder.get(0.1)
        if b is not None:
            out.append([s.sample_id for _, s in b.samples])
            seen += len(b.samples) + len(b.dead)
    feeder.close()
    return out


def next_batch(feeder: Feeder, timeout_s: float = 5.0):
    """The feeder's next batch, waiting at most ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        batch = feeder.get(0.05)
        if batch is not None:
            return batch
    raise AssertionError(f"no batch within {timeout_s} s")


def wait_until(predicate, what: str, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def interleaved(parts: dict[int, list[Msg]], seed: int) -> list[list[Msg]]:
    """The same records, per-partition order kept, delivered in a random interleaving and
    random chunk sizes (as fetches would)."""
    rng = random.Random(seed)
    queues = {p: list(ms) for p, ms in parts.items()}
    order: list[Msg] = []
    while any(queues.values()):
        p = rng.choice([p for p, q in queues.items() if q])
        order.append(queues[p].pop(0))
    chunks, i = [], 0
    while i < len(order):
        k = rng.randint(1, 7)
        chunks.append(order[i:i + k])
        i += k
    return chunks


def test_stream_batches_depend_on_the_records_not_on_their_arrival():
    marks = {(0, 4), (0, 9), (1, 1), (1, 9), (2, 6), (2, 9)}
    parts = stream(10, marks)
    runs = []
    for seed in range(4):
        feeder = Feeder(Consumer(interleaved(parts, seed), gap_s=0.003 * seed), "t", max_batch=4, max_delay_ms=1,
                        max_payload_bytes=10_000, stream_batches=True)
        runs.append(sorted(batches_of(feeder, 30)))
    assert all(r == runs[0] for r in runs)
    p0 = [b for b in runs[0] if b[0].startswith("s0-")]
    # cut after max_batch records or after a marked one, in offset order
    assert sorted(p0) == [["s0-0", "s0-1", "s0-2", "s0-3"], ["s0-4"], ["s0-5", "s0-6", "s0-7", "s0-8"], ["s0-9"]]
    assert ["s1-0", "s1-1"] in runs[0] and ["s1-6", "s1-7", "s1-8", "s1-9"] in runs[0]


def test_time_batches_close_after_the_delay_and_at_max_batch():
    parts = stream(6, set())
    chunks = [parts[0][:2], parts[0][2:], parts[1]]
    feeder = Feeder(Consumer(chunks, gap_s=0.15), "t", max_batch=4, max_delay_ms=50, max_payload_bytes=10_000)
    got = batches_of(feeder, 12)
    assert got[0] == ["s0-0", "s0-1"]  # the next records came after the 50 ms delay
    assert all(len(b) <= 4 for b in got) and sum(map(len, got)) == 12


def test_offsets_handed_back_are_committed_and_bad_records_are_dead():
    msgs = [Msg(0, 0, sample_bytes(0, 0)), Msg(0, 1, b"\xc1 not msgpack", marked=True)]
    consumer = Consumer([msgs])
    feeder = Feeder(consumer, "t", max_batch=8, max_delay_ms=1, max_payload_bytes=10_000, stream_batches=True)
    feeder.start()
    batch = next_batch(feeder)
    assert [s.sample_id for _, s in batch.samples] == ["s0-0"]
    assert [e.reason for _, e in batch.dead] == ["undecodable"]
    feeder.commit(batch.offsets)
    feeder.close()
    assert [(tp.topic, tp.partition, tp.offset) for c in consumer.commits for tp in c] == [("t", 0, 2)]


@pytest.mark.parametrize("stream_batches", [False, True])
def test_a_failing_consumer_surfaces_in_get(stream_batches):
    class Broken(Consumer):
        def poll(self, timeout):
            raise RuntimeError("broker gone")

    feeder = Feeder(Broken([]), "t", max_batch=4, max_delay_ms=1, max_payload_bytes=10_000,
                    stream_batches=stream_batches)
    feeder.start()
    with pytest.raises(RuntimeError, match="broker gone"):
        for _ in range(50):
            feeder.get(0.05)
    feeder.close()


def test_a_rebalance_drops_unstarted_batches_and_commits_the_started_ones_first():
    """On revoke, what the worker has not started is dropped (its partitions' next owner
    reads it from the last commit) and what it has is committed before the partitions go."""
    msgs = [Msg(0, i, sample_bytes(0, i), marked=True) for i in range(3)]
    events: list[str] = []

    class Rebalancing(Consumer):
        def poll(self, timeout):
            if self.delivered == 2 and not events:  # after two batches: revoke
                events.append("revoke")
                self.on_revoke(self, [])
                events.append("revoked")
            return super().poll(timeout)

        def commit(self, offsets, asynchronous):
            events.append(f"commit {offsets[0].offset}")
            super().commit(offsets, asynchronous)

    consumer = Rebalancing([msgs[:2], msgs[2:]], gap_s=0.05)
    feeder = Feeder(consumer, "t", max_batch=8, max_delay_ms=1, max_payload_bytes=10_000, stream_batches=True)
    feeder.start()
    first = next_batch(feeder)  # the worker starts the first batch; the second waits in the queue
    wait_until(lambda: "revoke" in events and feeder._ready.empty(), "the revoke to drop the second batch")
    assert events == ["revoke"]  # now waiting for the started batch: nothing committed before it is handed back
    feeder.commit(first.offsets)  # its outputs are out
    wait_until(lambda: "revoked" in events, "the revoke to finish")
    third = next_batch(feeder)
    feeder.close()
    assert events[:3] == ["revoke", "commit 1", "revoked"]  # committed before the partitions went
    assert [s.sample_id for _, s in third.samples] == ["s0-2"]  # the second batch was dropped, not served


def test_every_malformed_record_is_dead_lettered_with_a_reason_and_the_valid_ones_pass():
    from streamfuse.events import REASONS

    bad = malformed_records([sample_bytes(0, i) for i in range(10)], 1000, seed=11, oversize_to=10_000)
    msgs, surely_bad = [], set()
    for i, (value, sure, _) in enumerate(bad):
        msgs.append(Msg(0, 2 * i, value))
        msgs.append(Msg(0, 2 * i + 1, sample_bytes(0, i), marked=i == len(bad) - 1))  # a valid one after each
        if sure:
            surely_bad.add(2 * i)
    feeder = Feeder(Consumer([msgs]), "t", max_batch=64, max_delay_ms=1, max_payload_bytes=10_000,
                    stream_batches=True)
    feeder.start()
    dead: dict[int, list[str]] = {}
    served: set[int] = set()
    deadline = time.monotonic() + 20
    while len(served | set(dead)) < len(msgs) and time.monotonic() < deadline:
        b = feeder.get(0.1)
        for rec, exc in b.dead if b is not None else ():
            dead.setdefault(rec.offset, []).append(exc.reason)
        served.update(rec.offset for rec, _ in (b.samples if b is not None else ()))
    feeder.close()
    assert len(served | set(dead)) == len(msgs)  # every record accounted for: the feeder never died
    assert surely_bad <= set(dead), sorted(surely_bad - set(dead))[:10]
    assert all(r in REASONS for rs in dead.values() for r in rs)
    assert {2 * i + 1 for i in range(len(bad))} <= served - set(dead)  # every valid sample passes
