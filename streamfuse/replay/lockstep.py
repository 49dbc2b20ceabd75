"""Publish a replay in lock-step with the monitor's event-time windows.

The monitor decides (alerts, commands) only when a KPI window closes, i.e. when its
watermark — the minimum over prediction partitions of the largest event time — passes
``window end + label grace``. Those thresholds are the replay's *barriers*. For each
barrier ``B``:

1. **bulk**: publish every record with clock < ``B``; wait until each published sample
   has its prediction (or the worker's dead letter). No window can close: the
   watermark stays below ``B``.
2. **probe**: in every samples partition whose predictions are still below ``B``,
   publish records up to and including the first sample that will be predicted. The
   window closes on the last probe prediction, so every probe sample is served before
   any command the close may cause.
3. **settle**: wait for the global KPI snapshot of each window that must close; publish
   a *barrier ack* (an :class:`~streamfuse.events.Ack` from ``replay-barrier``) and wait
   until the monitor has recorded it in Redis — it handles events one at a time, so the
   whole close (KPIs, alerts, commands) is done by then; read the commands it issued
   from its Redis audit stream and wait until a worker has acknowledged each one.

So every command takes effect at the same point of the sample stream in every replay,
whatever the machine's speed. At the end, one *flush* sample per partition (a copy of
its last sample, id ``replay-flush:<p>``, time = the last barrier) closes the final
windows; its own window never closes and it is left out of every result.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from typing import Any, Callable

from streamfuse.config import Settings
from streamfuse.errors import InvalidEvent
from streamfuse.events import MSGPACK, Ack, Sample, content_type_of, decode, encode, headers
from streamfuse.replay.collect import BARRIER_WORKER, FLUSH_PREFIX, Collector
from streamfuse.replay.errors import ReplayError
from streamfuse.replay.plan import Stream, Streams
from streamfuse.store import StatusStore

log = logging.getLogger(__name__)


def threshold_after(clock: int, window_ms: int, grace_ms: int) -> int:
    """The first window-closing threshold (``k * window + grace``) after ``clock``.

    Examples:
        >>> threshold_after(0, 2000, 4000), threshold_after(4000, 2000, 4000), threshold_after(4001, 2000, 4000)
        (2000, 6000, 6000)
    """
    return ((clock - grace_ms) // window_ms + 1) * window_ms + grace_ms


class Lockstep:
    """Args:
        settings: the replay namespace's settings.
        streams: what to publish.
        collector: reads the namespace's outputs.
        producer: a kafka-python producer for the namespace.
        store: the namespace's Redis status store (the monitor's audit stream).
        alive: raises when a pipeline process died.
        speed: event-time seconds per wall second; None = as fast as the pipeline goes.
        on_progress: called with (records published, clock of the last one).
        stall_s: a wait that sees no progress this long fails.
        stop: set it to stop early.
        on_label: called with (value, headers) of each label published.
    """

    def __init__(self, settings: Settings, streams: Streams, collector: Collector, producer, store: StatusStore,
                 alive: Callable[[], None], speed: float | None = None,
                 on_progress: Callable[[int, int], None] | None = None, stall_s: float = 120.0,
                 stop: threading.Event | None = None,
                 on_label: Callable[[bytes, list], None] | None = None) -> None:
        self.s, self.streams, self.col, self.producer, self.store = settings, streams, collector, producer, store
        self.alive, self.speed, self.on_progress, self.stall_s = alive, speed, on_progress, stall_s
        self.stop = stop or threading.Event()
        self.on_label = on_label
        self.window_ms, self.grace_ms = settings.monitor.kpi_window_ms, settings.monitor.label_grace_ms
        self.prefix = settings.topic_prefix
        self.pending: dict[tuple[int, int], str | None] = {}  # (partition, offset) -> sample id (None: bad)
        self.futures: list[tuple[Any, str | None]] = []
        self.last_sample: dict[int, tuple[bytes | None, Sample]] = {}
        self.closed_before: int | None = None
        self.published = 0
        self.barriers = 0
        self._audit_from = "-"
        self._pace: tuple[float, int] | None = None

    # ------------------------------------------------------------------ main loop

    def run(self) -> dict[str, Any]:
        """Publish everything, settle every window; returns counters."""
        first = self.streams.next_clock()
        if first is None:
            raise ReplayError("nothing to replay: the recording (after --from/--to/--assets) has no input records")
        bound = threshold_after(first, self.window_ms, self.grace_ms)
        while not self.stop.is_set():
            t0 = time.monotonic()
            for stream, rec in self.streams.pop_before(bound):
                self._publish(stream, rec)
            t1 = time.monotonic()
            self._resolve()
            t2 = time.monotonic()
            nxt = self.streams.next_clock()
            if nxt is None:
                break
            self._probe(bound)
            t3 = time.monotonic()
            self._settle()
            log.debug("barrier %d: publish %.3f s, predictions %.3f s, probe %.3f s, settle %.3f s", bound,
                      t1 - t0, t2 - t1, t3 - t2, time.monotonic() - t3)
            bound = threshold_after(max(bound, self.streams.next_clock() or bound), self.window_ms, self.grace_ms)
        self._flush()
        return {"published": self.published, "barriers": self.barriers}

    # ------------------------------------------------------------------ publishing

    def _publish(self, stream: Stream, rec: dict[str, Any], clock: int | None = None) -> None:
        clock = stream.clocks[stream.pos - 1] if clock is None else clock
        self._wait_pace(clock)
        topic = self.prefix + stream.topic
        hdrs = [(k, v) for k, v in rec["headers"]]
        fut = self.producer.send(topic, key=rec["key"], value=rec["value"], headers=hdrs,
                                 partition=rec["partition"], timestamp_ms=rec["timestamp_ms"])
        if stream.topic == "samples":
            self.futures.append((fut, self._sample_id(rec)))
        elif stream.topic == "labels" and self.on_label is not None:
            self.on_label(rec["value"], rec["headers"])
        self.published += 1
        if self.on_progress is not None:
            self.on_progress(self.published, clock)

    def _sample_id(self, rec: dict[str, Any]) -> str | None:
        """The id of a sample the worker will predict; None for one it will dead-letter."""
        try:
            sample = decode(rec["value"], content_type_of(rec["headers"]), expect=Sample,
                            max_bytes=self.s.max_payload_bytes)
        except InvalidEvent:
            return None
        self.last_sample[rec["partition"]] = (rec["key"], sample)
        return sample.sample_id

    def _wait_pace(self, clock: int) -> None:
        if self.speed is None:
            return
        if self._pace is None:
            self._pace = (time.monotonic(), clock)
        wall0, clock0 = self._pace
        # Rate limiting, not synchronisation: hold the event-time pace the user asked for.
        left = wall0 + (clock - clock0) / 1000 / self.speed - time.monotonic()
        if left > 0:
            self.stop.wait(left)

    def _probe(self, bound: int) -> None:
        for stream in self.streams.of("samples"):
            if self.col.part_max.get(stream.partition, bound - 1) >= bound:
                continue  # this partition's watermark is past the barrier already
            while stream.head is not None:
                clock = stream.head
                rec = stream.pop()
                self._publish(stream, rec, clock)
                if self.futures[-1][1] is not None:
                    break
        ids = [sid for _, sid in self.futures]
        tp = time.time()
        from streamfuse.replay.collect import DEBUG_SEEN, DEBUG_POLLS
        DEBUG_POLLS.clear()
        self._resolve()
        log.debug("probe: %s %s", [tuple(round(x - tp, 3) for x in DEBUG_SEEN[i]) for i in ids if i in DEBUG_SEEN], [round(x, 3) for x in DEBUG_POLLS])

    def _flush(self) -> None:
        self._resolve()
        starts = [w for w in self.col.prediction_windows if self.closed_before is None or w >= self.closed_before]
        if not starts:
            return
        end = max(starts) + self.window_ms + self.grace_ms
        flush = Stream("samples", -1, [end], iter(()))
        for p, (key, sample) in sorted(self.last_sample.items()):
            if self.col.part_max.get(p, end) >= end:
                continue
            readings = {m: dataclasses.replace(r, ts_ms=end) for m, r in sample.readings.items()}
            copy = dataclasses.replace(sample, sample_id=f"{FLUSH_PREFIX}{p}", ts_ms=end, readings=readings)
            rec = {"key": key, "value": encode(copy), "headers": headers(MSGPACK), "partition": p,
                   "timestamp_ms": int(time.time() * 1000)}
            self._publish(flush, rec, end)
            self.published -= 1  # not a recorded record
        self._resolve()
        self._settle()

    # ------------------------------------------------------------------ waiting

    def _wait(self, done: Callable[[], bool], what: str) -> None:
        last, since = None, time.monotonic()
        while not done():
            if self.stop.is_set():
                return
            self.alive()
            self.col.poll(50)
            mark = (len(self.col.prediction_counts), len(self.col.closed), len(self.col.ack_events))
            if mark != last:
                last, since = mark, time.monotonic()
            elif time.monotonic() - since > self.stall_s:
                raise ReplayError(f"replay stalled for {self.stall_s:.0f} s waiting for {what}; see the worker "
                                  "and monitor logs in the replay's log directory", self.prefix)

    def _resolve(self) -> None:
        """Wait until every published sample is predicted or dead-lettered."""
        self.producer.flush()
        for fut, sid in self.futures:
            meta = fut.get(timeout=30)
            self.pending[(meta.partition, meta.offset)] = sid
        self.futures.clear()

        def done() -> bool:
            for where, sid in list(self.pending.items()):
                dead = self.col.dead_at.get(where)
                if (sid is not None and sid in self.col.prediction_counts) or (
                        dead is not None and (sid is None or dead == "no_usable_modality")):
                    del self.pending[where]
            return not self.pending

        self._wait(done, f"predictions of {len(self.pending)} samples")

    def _settle(self) -> None:
        wm = self.col.watermark
        if wm is None:
            return
        w, g = self.window_ms, self.grace_ms
        due = {s for s in self.col.prediction_windows
               if (self.closed_before is None or s >= self.closed_before) and s + w + g <= wm}
        passed = (wm - g) // w * w
        self.closed_before = max(self.closed_before if self.closed_before is not None else passed, passed)
        if not due:
            return
        self._wait(lambda: due <= self.col.closed, f"the monitor to close windows {sorted(due)}")
        self.barriers += 1
        marker = f"replay-barrier-{self.barriers}"
        self.producer.send(self.prefix + "control.acks", key=BARRIER_WORKER.encode(), headers=headers(MSGPACK),
                           value=encode(Ack(marker, BARRIER_WORKER, "barrier", wm)))
        self.producer.flush()
        r, key = self.store.r, self.store.key("workers")

        def marked() -> bool:
            raw = r.hget(key, BARRIER_WORKER)
            return raw is not None and json.loads(raw).get("command_id") == marker

        self._wait(marked, "the monitor to finish the windows' alerts and commands")
        alerts, commands = set(), set()
        for entry_id, fields in r.xrange(self.store.key("audit"), min=self._audit_from):
            self._audit_from = "(" + entry_id.decode()
            kind = fields.get(b"type", b"").decode()
            if kind == "alert":
                alerts.add((fields[b"id"].decode(), fields[b"status"].decode()))
            elif kind == "command":
                commands.add(fields[b"id"].decode())

        def applied() -> bool:
            seen_alerts = {(a.alert_id, a.status) for a in self.col.alert_events}
            acked = {a.command_id for a in self.col.ack_events}
            return alerts <= seen_alerts and commands <= acked

        self._wait(applied, f"workers to acknowledge commands {sorted(commands)}")
