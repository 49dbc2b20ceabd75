"""What a replay publishes, and in which order: pure logic over a recording's records.

Every input record gets a *clock*, the event time at which it enters the pipeline:

* a sample or sensor reading: its own ``ts_ms``;
* anything else (labels, undecodable records): the event time the sensor stream had
  reached when the record was produced, read off the recording itself (the latest
  reading or sample produced at or before the record's Kafka timestamp), never before
  its own ``ts_ms``.

With a ``deadline`` (the monitor's: end of the label's KPI window plus the label grace)
labels are re-timed: one that arrived before its deadline enters with its sample (so it
is joined in every replay, however the monitor's reads interleave), one that arrived
after it keeps its lateness (and stays late). Labels are sorted by that clock within
their partition; every other topic-partition keeps its offset order, ordered by its
running maximum clock. The streams are merged by clock (ties: labels, then readings,
then samples).
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import msgpack

from streamfuse.events import MODALITIES, content_type_of

SENSOR_TOPICS = tuple(f"sensor.{m}" for m in MODALITIES)
INPUT_TOPICS = (*SENSOR_TOPICS, "samples", "labels")
OUTPUT_TOPICS = ("predictions", "kpis", "alerts", "control", "control.acks", "deadletter")
ALL_TOPICS = (*INPUT_TOPICS, *OUTPUT_TOPICS)
_RANK = {"labels": 0, "samples": 2}


def event_ts(value: bytes | None, content_type: str = "") -> int | None:
    """The ``ts_ms`` field of an event value, or None when it has none or does not decode.

    Examples:
        >>> import msgpack
        >>> event_ts(msgpack.packb({"schema": "sf.label/1", "ts_ms": 1500}))
        1500
        >>> event_ts(b'{"ts_ms": 7}', "application/json"), event_ts(b"\\xc1 junk")
        (7, None)
    """
    if not value:
        return None
    try:
        is_json = "json" in content_type or (not content_type and value[:1] == b"{")
        raw = json.loads(value) if is_json else msgpack.unpackb(value, raw=False)
    except Exception:  # any parser error: the record has no usable event time
        return None
    ts = raw.get("ts_ms") if isinstance(raw, dict) else None
    return ts if isinstance(ts, int) and not isinstance(ts, bool) else None


class WallToEvent:
    """Maps a Kafka timestamp to the event time the sensor stream had reached by then.

    Args:
        pairs: ``(kafka timestamp, event ts)`` of every reading and sample.

    Examples:
        >>> m = WallToEvent([(100, 5000), (100, 5200), (130, 5400)])
        >>> m(99), m(100), m(129), m(500)
        (None, 5200, 5200, 5400)
    """

    def __init__(self, pairs: Iterable[tuple[int, int]]) -> None:
        walls, events, top = [], [], None
        for w, e in sorted(pairs):
            top = e if top is None else max(top, e)
            if walls and walls[-1] == w:
                events[-1] = top
            else:
                walls.append(w)
                events.append(top)
        self._walls, self._events = walls, events

    def __call__(self, wall_ms: int) -> int | None:
        i = bisect.bisect_right(self._walls, wall_ms)
        return self._events[i - 1] if i else None


@dataclass
class Filters:
    """Which input records a replay publishes.

    Args:
        assets: only records keyed by these asset ids (None: all).
        from_ms / to_ms: only records whose event time is in ``[from_ms, to_ms)``
            (absolute event ms; None: unbounded). A label is kept by its sample's time.
    """

    assets: frozenset[str] | None = None
    from_ms: int | None = None
    to_ms: int | None = None

    def keep(self, key: bytes | None, when: int) -> bool:
        if self.assets is not None and (key is None or key.decode("utf-8", "replace") not in self.assets):
            return False
        return (self.from_ms is None or when >= self.from_ms) and (self.to_ms is None or when < self.to_ms)


@dataclass
class Stream:
    """One topic-partition to publish: records in offset order, each with its clock.

    ``clocks`` are running maxima (non-decreasing); ``records`` yields exactly as many
    records as there are clocks.
    """

    topic: str
    partition: int
    clocks: list[int]
    records: Iterator[dict[str, Any]]
    pos: int = 0

    @property
    def rank(self) -> tuple[int, str, int]:
        return (_RANK.get(self.topic, 1), self.topic, self.partition)

    @property
    def head(self) -> int | None:
        return self.clocks[self.pos] if self.pos < len(self.clocks) else None

    def pop(self) -> dict[str, Any]:
        self.pos += 1
        return next(self.records)


@dataclass
class Streams:
    """The merge of every stream by clock (see the module docstring)."""

    streams: list[Stream] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.streams = sorted((s for s in self.streams if s.clocks), key=lambda s: s.rank)

    @property
    def total(self) -> int:
        return sum(len(s.clocks) for s in self.streams)

    def next_clock(self) -> int | None:
        heads = [s.head for s in self.streams if s.head is not None]
        return min(heads) if heads else None

    def pop_before(self, bound: int | None) -> Iterator[tuple[Stream, dict[str, Any]]]:
        """Records with clock < ``bound`` (None: all), merged in clock order."""
        while True:
            best = None
            for s in self.streams:
                h = s.head
                if h is not None and (bound is None or h < bound) and (best is None or h < best.head):
                    best = s
            if best is None:
                return
            yield best, best.pop()

    def of(self, topic: str) -> list[Stream]:
        return [s for s in self.streams if s.topic == topic]


def clock_streams(sources: dict[tuple[str, int], Callable[[], Iterator[dict[str, Any]]]],
                  filters: Filters | None = None, deadline: Callable[[int], int] | None = None) -> Streams:
    """Two passes over the records: clocks first, then lazy streams of the kept records.

    Args:
        sources: ``(topic, partition) -> callable`` returning a fresh iterator over that
            topic-partition's records (as stored, see :mod:`streamfuse.replay.format`).
        filters: which records to keep.
        deadline: sample time -> the time its label must arrive by to be joined; on-time
            labels then enter with their sample (see the module docstring).

    Returns:
        The streams, ready to merge.
    """
    filters = filters or Filters()
    own: dict[tuple[str, int], list[tuple[int, int | None, int, bytes | None]]] = {}
    pairs = []
    for (topic, p), it in sources.items():
        rows = own[(topic, p)] = []
        for i, rec in enumerate(it()):
            ts = event_ts(rec["value"], content_type_of(rec["headers"]))
            if ts is not None and topic != "labels":
                pairs.append((rec["timestamp_ms"], ts))
            rows.append((i, ts, rec["timestamp_ms"], rec["key"]))
    wall = WallToEvent(pairs)
    out = []
    for (topic, p), rows in own.items():
        kept, clocks, top = set(), [], None
        for i, ts, stamp, key in rows:
            known = [x for x in (ts, wall(stamp) if topic == "labels" or ts is None else None) if x is not None]
            # Nothing to place it by (an undecodable record before any reading): where it was.
            clock = max(known) if known else (top if top is not None else 0)
            if not filters.keep(key, ts if ts is not None else clock):
                continue
            if topic == "labels":
                if deadline is not None and ts is not None and clock < deadline(ts):
                    clock = ts  # on time: it enters with its sample
                kept.add(i)
                clocks.append(clock)
                continue
            top = clock if top is None else max(top, clock)
            kept.add(i)
            clocks.append(top)
        if topic == "labels":
            records = [r for i, r in enumerate(sources[(topic, p)]()) if i in kept]
            order = sorted(range(len(clocks)), key=clocks.__getitem__)  # stable: offset order on ties
            out.append(Stream(topic, p, [clocks[i] for i in order], iter([records[i] for i in order])))
        else:
            out.append(Stream(topic, p, clocks, _kept(sources[(topic, p)](), kept)))
    return Streams(out)


def _kept(records: Iterator[dict[str, Any]], kept: set[int]) -> Iterator[dict[str, Any]]:
    return (r for i, r in enumerate(records) if i in kept)
