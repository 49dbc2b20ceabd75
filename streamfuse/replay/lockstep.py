"""Publish a replay in lock-step with the monitor's event-time windows.

The monitor decides (alerts, commands) only when a KPI window closes, i.e. when its
watermark — the minimum over prediction partitions of the largest event time — passes
``window end + label grace``. Those thresholds are the replay's *barriers*. For each
barrier ``B``:

1. **publish** every record with clock < ``B``, then, in every samples partition, the
   records up to and including its first sample at or after ``B`` (the *probe*). A
   partition's predictions come out in offset order, so the window closes on the last
   probe prediction, after every sample of the step was served — never in the middle.
   The last sample published to each partition before a wait carries the
   :data:`~streamfuse.events.BATCH_END` header: the replay's worker cuts its micro-batches
   there and after ``max_batch`` records, never by the clock
   (:mod:`streamfuse.inference.feeder`), so every replay runs the same batches and gets
   the same numbers bit for bit, at the live batch size.
2. **resolve**: wait until each published sample has its prediction (or the worker's
   dead letter); a partition whose probe was dead-lettered is probed again.
3. **commands**: a *shadow* of the monitor (the same :class:`MonitorCore`, fed the same
   predictions and labels) says which commands the close issues. If any, wait until a
   worker has acknowledged each one before publishing further: every command takes
   effect at the same point of the sample stream in every replay, however fast the
   machine. Without commands the replay moves on at once (the monitor catches up in
   its own time; its decisions depend on event time only).

Labels that arrived before their deadline enter with their sample (:mod:`.plan`); a late
one waits until the monitor has closed its window, so it is late in every replay. At the
end, one *flush* sample per partition (a copy of its last sample, id
``replay-flush:<p>``, at the last barrier) closes the final windows; its own window
never closes and it is left out of every result. Then the replay waits until the
monitor has closed every window and handled a *barrier ack* (an
:class:`~streamfuse.events.Ack` from ``replay-barrier``, recorded in Redis once handled)
and checks that the monitor decided exactly what its shadow did.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from streamfuse.clock import now_ms
from streamfuse.config import Settings
from streamfuse.errors import InvalidEvent
from streamfuse.events import BATCH_END, MSGPACK, Ack, Label, Prediction, Sample, content_type_of, decode, encode, headers
from streamfuse.monitor.core import MonitorCore
from streamfuse.replay.collect import BARRIER_WORKER, FLUSH_PREFIX, Collector
from streamfuse.replay.errors import ReplayError
from streamfuse.replay.options import STALL_S
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


@dataclass(frozen=True)
class ReplayPipeline:
    """The replay namespace's running pipeline, as the lock-step talks to it.

    Args:
        settings: the replay namespace's settings.
        collector: reads the namespace's outputs.
        producer: a librdkafka producer for the namespace (``make_rd_producer``).
        store: the namespace's Redis status store (where the monitor records acks).
        alive: raises when a pipeline process died.
        baselines: the served models' baselines (as the monitor gets them).
        baselines_of: the baselines of given unit versions (the namespace's registry), so
            the shadow follows version changes as the monitor does.
    """

    settings: Settings
    collector: Collector
    producer: Any
    store: StatusStore
    alive: Callable[[], None]
    baselines: dict[str, dict[str, float]]
    baselines_of: Callable[[dict[str, str]], dict | None] | None = None


@dataclass(frozen=True)
class LockstepConfig:
    """How the lock-step runs: its pace, its patience, when it stops, whom it tells.

    Args:
        speed: event-time seconds per wall second; None = as fast as the pipeline goes.
        stall_s: a wait that sees no progress this long fails.
        stop: set it to stop early.
        on_progress: called with (records published, clock of the last one).
        on_label: called with each label published.
    """

    speed: float | None = None
    stall_s: float = STALL_S
    stop: threading.Event | None = None
    on_progress: Callable[[int, int], None] | None = None
    on_label: Callable[[Label], None] | None = None


class Lockstep:
    """Publishes ``streams`` into ``pipeline`` step by step (see the module's docstring).

    Args:
        pipeline: the replay namespace's running pipeline.
        streams: what to publish.
        config: pace, stall limit, stop, progress and label hooks.
    """

    def __init__(self, pipeline: ReplayPipeline, streams: Streams, config: LockstepConfig = LockstepConfig()) -> None:
        settings = pipeline.settings
        self.s, self.streams, self.col = settings, streams, pipeline.collector
        self.producer, self.store, self.alive = pipeline.producer, pipeline.store, pipeline.alive
        self.speed, self.stall_s, self.stop = config.speed, config.stall_s, config.stop or threading.Event()
        self.on_progress, self.on_label = config.on_progress, config.on_label
        self.window_ms, self.grace_ms = settings.monitor.kpi_window_ms, settings.monitor.label_grace_ms
        self.prefix = settings.topic_prefix
        self.shadow = MonitorCore(pipeline.baselines, settings.monitor, baselines_of=pipeline.baselines_of)
        # The label-free detectors decide every decision_step_ms of event time: then every
        # such step is a barrier too, so their commands land at the same sample every time.
        if self.shadow.sequential is not None:
            self.step_ms = math.gcd(self.window_ms, self.grace_ms, settings.monitor.decision_step_ms)
            self.step_grace_ms = 0
        else:
            self.step_ms, self.step_grace_ms = self.window_ms, self.grace_ms
        self.expected_alerts: list = []
        self.expected_commands: list = []
        self.shadow_closed: set[int] = set()
        self.shadow_windows: set[int] = set()  # windows the shadow got predictions for
        self.col.on_prediction = self._shadow
        self.pending: dict[tuple[int, int], str | None] = {}  # (partition, offset) -> sample id (None: bad)
        self.held: dict[int, tuple[dict[str, Any], str | None]] = {}  # samples partition -> last, unsent
        self.pub_max: dict[int, int] = {}  # samples partition -> latest predictable sample published
        self.last_sample: dict[int, tuple[bytes | None, Sample]] = {}
        self.published = 0
        self.ready_s: float | None = None  # until the first step's predictions (pipeline start-up)
        self.waited_commands = 0
        self._acked_upto = 0
        self._pace: tuple[float, int] | None = None

    # ------------------------------------------------------------------ main loop

    def run(self) -> dict[str, Any]:
        """Publish everything, then verify the monitor against its shadow; returns counters."""
        first = self.streams.next_clock()
        if first is None:
            raise ReplayError("nothing to replay: the recording (after --from/--to/--assets) has no input records")
        bound = threshold_after(first, self.step_ms, self.step_grace_ms)
        started = time.monotonic()
        while not self.stop.is_set():
            t0 = time.monotonic()
            for stream, rec in self.streams.pop_before(bound):
                self._publish(stream, rec)
            for stream in self.streams.of("samples"):
                if self.pub_max.get(stream.partition, bound - 1) < bound:
                    self._probe(stream)
            self._resolve()
            for stream in self.streams.of("samples"):  # a probe the worker dead-lettered does not close
                while (stream.head is not None and stream.partition in self.col.part_max
                       and self.col.part_max[stream.partition] < bound):
                    self._probe(stream)
                    self._resolve()
            t1 = time.monotonic()
            self._await_commands()
            if self.ready_s is None and self.col.rows:
                self.ready_s = time.monotonic() - started
            log.debug("step to %d: publish + predictions %.3f s, commands %.3f s", bound, t1 - t0,
                      time.monotonic() - t1)
            nxt = self.streams.next_clock()
            if nxt is None:
                break
            bound = threshold_after(max(bound, nxt), self.step_ms, self.step_grace_ms)
        self._flush()
        return {"published": self.published, "commands_awaited": self.waited_commands, "startup_s": self.ready_s,
                "windows_closed": len(self.shadow_closed), **self._verify()}

    # ------------------------------------------------------------------ publishing

    def _publish(self, stream: Stream, rec: dict[str, Any], clock: int | None = None, count: bool = True) -> None:
        clock = stream.clocks[stream.pos - 1] if clock is None else clock
        self._wait_pace(clock)
        sid = None
        if stream.topic == "samples":
            sid = self._sample_id(rec)
            if sid is not None:
                ts = self.last_sample[rec["partition"]][1].ts_ms
                self.pub_max[rec["partition"]] = max(self.pub_max.get(rec["partition"], ts), ts)
        elif stream.topic == "labels":
            self._label(rec, clock)
        if stream.topic == "samples":
            # Held back until the next sample of its partition, or the next wait: the last
            # sample before a wait carries the batch-end mark for the worker's stream batches.
            held = self.held.pop(rec["partition"], None)
            if held is not None:
                self._send_sample(*held, last=False)
            self.held[rec["partition"]] = (rec, sid)
        else:
            self.producer.produce(self.prefix + stream.topic, key=rec["key"], value=rec["value"],
                                  headers=[(k, v) for k, v in rec["headers"]], partition=rec["partition"],
                                  timestamp=rec["timestamp_ms"], on_delivery=self._delivered)
        if count:
            self.published += 1
            if self.on_progress is not None:
                self.on_progress(self.published, clock)

    def _send_sample(self, rec: dict[str, Any], sid: str | None, last: bool) -> None:
        hdrs = [(k, v) for k, v in rec["headers"]] + ([(BATCH_END, b"1")] if last else [])

        def sent(err, msg) -> None:  # where it landed: predictions and dead letters say so
            self._delivered(err, msg)
            self.pending[(msg.partition(), msg.offset())] = sid

        self.producer.produce(self.prefix + "samples", key=rec["key"], value=rec["value"], headers=hdrs,
                              partition=rec["partition"], timestamp=rec["timestamp_ms"], on_delivery=sent)
        self.producer.poll(0)

    def _delivered(self, err, msg) -> None:
        if err is not None:
            raise ReplayError(f"could not publish to {msg.topic()}: {err}", self.prefix)

    def _sample_id(self, rec: dict[str, Any]) -> str | None:
        """The id of a sample the worker will predict; None for one it will dead-letter."""
        try:
            sample = decode(rec["value"], content_type_of(rec["headers"]), expect=Sample,
                            max_bytes=self.s.max_payload_bytes)
        except InvalidEvent:
            return None
        self.last_sample[rec["partition"]] = (rec["key"], sample)
        return sample.sample_id

    def _label(self, rec: dict[str, Any], clock: int) -> None:
        try:
            label = decode(rec["value"], content_type_of(rec["headers"]), expect=Label)
        except InvalidEvent:
            return  # the monitor dead-letters it
        start = label.ts_ms - label.ts_ms % self.window_ms
        if clock >= start + self.window_ms + self.grace_ms and start in self.shadow_closed:
            # Late in the recording: late here too, once the monitor itself has closed the window.
            self._wait(lambda: start in self.col.closed, f"the monitor to close window {start} (a late label)")
        self.shadow.on_label(label)
        if self.on_label is not None:
            self.on_label(label)

    def _probe(self, stream: Stream) -> None:
        while stream.head is not None:
            clock = stream.head
            self._publish(stream, stream.pop(), clock)
            if self.held.get(stream.partition, (None, None))[1] is not None:
                return  # a sample the worker will predict

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

    def _flush(self) -> None:
        self._resolve()
        open_ = self.shadow_windows - self.shadow_closed
        if not open_:
            return
        end = max(open_) + self.window_ms + self.grace_ms
        flush = Stream("samples", -1, [end], iter(()))
        for p, (key, sample) in sorted(self.last_sample.items()):
            if self.col.part_max.get(p, end) >= end:
                continue
            readings = {m: dataclasses.replace(r, ts_ms=end) for m, r in sample.readings.items()}
            copy = dataclasses.replace(sample, sample_id=f"{FLUSH_PREFIX}{p}", ts_ms=end, readings=readings)
            self._publish(flush, {"key": key, "value": encode(copy), "headers": headers(MSGPACK), "partition": p,
                                  "timestamp_ms": now_ms()}, end, count=False)
        self._resolve()
        self._await_commands()

    # ------------------------------------------------------------------ the shadow monitor

    def _shadow(self, pred: Prediction, partition: int) -> None:
        self.shadow_windows.add(pred.ts_ms - pred.ts_ms % self.window_ms)
        out = self.shadow.on_prediction(pred, f"{self.prefix}predictions:{partition}")
        self.shadow_closed.update(k.window_start_ms for k in out.kpis if k.scope == "global" and k.modality == "fused")
        self.expected_alerts += out.alerts
        self.expected_commands += out.commands

    # ------------------------------------------------------------------ waiting

    def _wait(self, done: Callable[[], bool], what: str) -> None:
        last, since = None, time.monotonic()
        while not done():
            if self.stop.is_set():
                return
            self.alive()
            self.col.poll(20)
            mark = (sum(self.col.counts.values()), len(self.pending))
            if mark != last:
                last, since = mark, time.monotonic()
            elif time.monotonic() - since > self.stall_s:
                raise ReplayError(f"replay stalled for {self.stall_s:.0f} s waiting for {what}; see the worker "
                                  "and monitor logs in the replay's log directory", self.prefix)

    def _resolve(self) -> None:
        """Wait until every published sample is predicted or dead-lettered."""
        for rec, sid in self.held.values():
            self._send_sample(rec, sid, last=True)
        self.held.clear()
        if self.producer.flush(30):
            raise ReplayError("the broker did not take the replay's records within 30 s", self.prefix)

        def done() -> bool:
            for where, sid in list(self.pending.items()):
                dead = self.col.dead_at.get(where)
                if (sid is not None and sid in self.col.served_by) or (
                        dead is not None and (sid is None or dead == "no_usable_modality")):
                    del self.pending[where]
            return not self.pending

        self._wait(done, f"predictions of {len(self.pending)} samples")

    def _await_commands(self) -> None:
        """Wait until a worker has acknowledged every command the shadow expects so far."""
        todo = {c.command_id for c in self.expected_commands[self._acked_upto:]}
        if not todo:
            return
        self.waited_commands += len(todo)
        self._wait(lambda: todo <= {a.command_id for a in self.col.ack_events},
                   f"the monitor to issue and a worker to acknowledge {sorted(todo)}")
        self._acked_upto = len(self.expected_commands)

    def _verify(self) -> dict[str, Any]:
        """Wait for the monitor to finish, then compare its decisions with the shadow's."""
        self._wait(lambda: self.shadow_closed <= self.col.closed, "the monitor to close the last windows")
        marker = f"replay-barrier-{time.time_ns()}"
        self.producer.produce(self.prefix + "control.acks", key=BARRIER_WORKER.encode(), headers=headers(MSGPACK),
                              value=encode(Ack(marker, BARRIER_WORKER, "barrier", 0)), on_delivery=self._delivered)
        self.producer.flush(30)
        r, key = self.store.r, self.store.key("workers")

        def handled() -> bool:
            raw = r.hget(key, BARRIER_WORKER)
            return raw is not None and json.loads(raw).get("command_id") == marker

        # The monitor handles events one at a time: once it has recorded the marker, every
        # alert and command of the windows above is out.
        self._wait(handled, "the monitor to finish its last alerts and commands")
        self._wait(lambda: len(self.col.alert_events) >= len(self.expected_alerts)
                   and len(self.col.command_events) >= len(self.expected_commands), "the last alerts and commands")
        got = ([(a.alert_id, a.status) for a in self.col.alert_events],
               [c.command_id for c in self.col.command_events])
        want = ([(a.alert_id, a.status) for a in self.expected_alerts],
                [c.command_id for c in self.expected_commands])
        if got != want:
            log.warning("the monitor's decisions differ from the replay's shadow of it: monitor %s, shadow %s; "
                        "this replay may not be reproducible", got, want)
        return {"lockstep_verified": got == want,
                "lockstep_differences": [] if got == want else
                {"monitor_only": sorted(set(got[0] + got[1]) - set(want[0] + want[1]), key=str),
                 "shadow_only": sorted(set(want[0] + want[1]) - set(got[0] + got[1]), key=str)}}
