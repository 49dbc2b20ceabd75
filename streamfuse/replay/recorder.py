"""``streamfuse record``: copy topics into a recording, without a consumer group.

The recorder assigns itself every partition of the chosen topics (so it never joins or
disturbs a consumer group), reads from the beginning (or from now), and writes each
record with its key, value, headers, partition, offset and timestamp unchanged (see
:mod:`streamfuse.replay.format`). Simulator runs add their fault windows as
*annotations*, so evaluations know the truth.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any, Iterable

from streamfuse.clock import now_ms
from streamfuse.config import Settings
from streamfuse.events import content_type_of
from streamfuse.replay.errors import RecordingError
from streamfuse.replay.format import RecordingWriter, record_map
from streamfuse.replay.plan import ALL_TOPICS, INPUT_TOPICS, OUTPUT_TOPICS, event_ts
from streamfuse.sim.faults import FaultSpec, parse_fault

log = logging.getLogger(__name__)
DEFAULT_TOPICS = INPUT_TOPICS


def resolve_topics(topics: Iterable[str] | None, prefix: str) -> list[str]:
    """Topic names without the prefix; ``all`` = inputs and outputs, ``outputs`` = the
    pipeline's outputs; default: sensor topics, samples and labels.

    Raises:
        RecordingError: an unknown topic name (the message lists the valid ones).

    Examples:
        >>> resolve_topics(["sf.samples", "labels"], "sf.")
        ['samples', 'labels']
        >>> len(resolve_topics(None, "sf.")), len(resolve_topics(["all"], "sf."))
        (5, 11)
    """
    if not topics:
        return list(DEFAULT_TOPICS)
    out: list[str] = []
    for t in topics:
        for name in (x.strip() for x in t.split(",")):
            name = name[len(prefix):] if prefix and name.startswith(prefix) else name
            group = {"all": ALL_TOPICS, "outputs": OUTPUT_TOPICS, "inputs": INPUT_TOPICS}.get(name, (name,))
            for g in group:
                if g not in ALL_TOPICS:
                    raise RecordingError(f"unknown topic {g!r}; choose from {', '.join(ALL_TOPICS)} "
                                         "(or all, inputs, outputs), without the topic prefix")
                if g not in out:
                    out.append(g)
    return out


def fault_annotations(faults: Iterable[FaultSpec | str], start_ms: int) -> list[dict[str, Any]]:
    """Fault windows in absolute event time, for a recording's manifest.

    Examples:
        >>> fault_annotations(["image:fog@20-50/asset-0"], 1_000_000)[0]["end_ms"]
        1050000
    """
    out = []
    for f in faults:
        f = parse_fault(f) if isinstance(f, str) else f
        out.append({"fault": str(f), "modality": f.modality, "kind": f.kind, "asset_id": f.asset_id,
                    "start_ms": start_ms + round(f.start_s * 1000),
                    "end_ms": None if f.end_s is None else start_ms + round(f.end_s * 1000)})
    return out


def _check_annotations(annotations: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    out = []
    for a in annotations or []:
        if not isinstance(a, dict) or not isinstance(a.get("start_ms"), int) or not a.get("modality"):
            raise RecordingError(f"annotation {a!r} needs at least 'modality' and an integer 'start_ms' "
                                 "(event ms); build them with fault_annotations(faults, start_ms)")
        out.append({"end_ms": None, "asset_id": None, "kind": "", "fault": "", **a})
    return out


def record(settings: Settings, out_dir: str | Path, topics: Iterable[str] | None = None,
           duration_s: float | None = None, until_ms: int | None = None, stop: threading.Event | None = None,
           annotations: list[dict[str, Any]] | None = None, from_now: bool = False, since_ms: int | None = None,
           meta: dict[str, Any] | None = None, compression: str = "gzip",
           on_progress: Any = None) -> dict[str, Any]:
    """Record topics under ``settings.topic_prefix`` into ``out_dir``.

    Without ``duration_s``, ``until_ms`` or ``stop`` this is a snapshot: it records what
    the topics hold now (up to their end offsets at the start) and returns.

    Args:
        settings: bootstrap and topic prefix of the source.
        out_dir: a new directory for the recording.
        topics: names without the prefix (``samples``, ``labels``, ``sensor.image``,
            ``predictions``...; ``all``, ``inputs``, ``outputs``); default: inputs.
        duration_s: stop after this many wall-clock seconds.
        until_ms: stop at this wall time (epoch ms) once caught up; records stamped at
            or after it are left out.
        stop: stop when this event is set (Ctrl-C in the CLI).
        annotations: fault windows in event ms (:func:`fault_annotations`).
        from_now: start at the end of the topics instead of the beginning.
        since_ms: leave out records stamped before this time.
        meta: extra information for the manifest (e.g. ``{"sim": ...}``).
        compression: ``gzip`` or ``none``.
        on_progress: called with the number of records written so far.

    Returns:
        The manifest.

    Raises:
        RecordingError: unknown topics, none of them exists, or ``out_dir`` holds a
            recording. BrokerError / ConfigError: the broker is not reachable.
    """
    names = resolve_topics(topics, settings.topic_prefix)
    notes = _check_annotations(annotations)
    writer = RecordingWriter(out_dir, compression)
    with _TopicCopy(settings, writer) as copy:
        started_ms = now_ms()
        try:
            copy.assign(names, from_now, out_dir)
            copy.run(duration_s, until_ms, stop, since_ms, on_progress)
        except BaseException:
            writer.close({"incomplete": True, "topics": copy.stats})
            raise
    return writer.close(_manifest(settings, copy.stats, notes, meta, started_ms, from_now, since_ms, until_ms))


class _TopicCopy:
    """A consumer without a group, assigned to every partition of the recorded topics,
    that copies their records into a :class:`RecordingWriter`; ``stats`` per topic."""

    def __init__(self, settings: Settings, writer: RecordingWriter) -> None:
        from streamfuse.kafka import make_consumer

        self.prefix, self.writer = settings.topic_prefix, writer
        self.consumer = make_consumer(settings, None, "streamfuse-recorder")
        self.stats: dict[str, dict[str, Any]] = {}
        self.tps: list = []

    def __enter__(self) -> "_TopicCopy":
        return self

    def __exit__(self, *exc: object) -> None:
        self.consumer.close()

    def assign(self, names: list[str], from_now: bool, out_dir: str | Path) -> None:
        """Assign every partition of the topics that exist, at their beginning (or end).

        Raises:
            RecordingError: none of them exists.
        """
        from kafka import TopicPartition

        for name in names:
            parts = self.consumer.partitions_for_topic(self.prefix + name)
            if not parts:
                log.warning("topic %s%s does not exist: not recorded", self.prefix, name)
                continue
            self.stats[name] = {"name": self.prefix + name, "partitions": len(parts), "records": 0}
            self.tps += [TopicPartition(self.prefix + name, p) for p in sorted(parts)]
        if not self.tps:
            raise RecordingError(f"none of the topics {names} exists under the prefix {self.prefix!r}; check "
                                 "STREAMFUSE_TOPIC_PREFIX and that the pipeline or simulator is running", out_dir)
        self.consumer.assign(self.tps)
        (self.consumer.seek_to_end if from_now else self.consumer.seek_to_beginning)(*self.tps)

    def run(self, duration_s: float | None, until_ms: int | None, stop: threading.Event | None,
            since_ms: int | None, on_progress: Any) -> None:
        """Copy records stamped in ``[since_ms, until_ms)`` until ``stop`` is set, the
        duration is over, or the copy caught up with the end offsets: those at the start
        for a snapshot (none of the three given), those at ``until_ms`` otherwise."""
        snapshot = duration_s is None and until_ms is None and stop is None
        ends = self.consumer.end_offsets(self.tps) if snapshot else None
        t0, total = time.monotonic(), 0
        while True:
            if stop is not None and stop.is_set():
                break
            if duration_s is not None and time.monotonic() - t0 >= duration_s:
                break
            if until_ms is not None and ends is None and now_ms() >= until_ms:
                ends = self.consumer.end_offsets(self.tps)  # catch up to what was there at the deadline
            if ends is not None and all(self.consumer.position(tp) >= ends[tp] for tp in self.tps):
                break
            total += self._write(self.consumer.poll(timeout_ms=200, max_records=2000), since_ms, until_ms)
            if on_progress is not None:
                on_progress(total)

    def _write(self, polled: dict, since_ms: int | None, until_ms: int | None) -> int:
        """Write the polled records stamped in ``[since_ms, until_ms)``; returns how many."""
        n = 0
        for tp, msgs in polled.items():
            name = tp.topic[len(self.prefix):]
            for m in msgs:
                if (since_ms is not None and m.timestamp < since_ms) or \
                        (until_ms is not None and m.timestamp >= until_ms):
                    continue
                self.writer.add(name, record_map(m.key, m.value, m.headers, m.partition, m.offset, m.timestamp,
                                                 m.timestamp_type))
                _count(self.stats[name], m, name)
                n += 1
        return n


def _count(st: dict[str, Any], m, name: str) -> None:
    st["records"] += 1
    st["first_timestamp_ms"] = min(st.get("first_timestamp_ms", m.timestamp), m.timestamp)
    st["last_timestamp_ms"] = max(st.get("last_timestamp_ms", m.timestamp), m.timestamp)
    if name in INPUT_TOPICS:
        ts = event_ts(m.value, content_type_of(m.headers))
        if ts is not None:
            st["first_event_ms"] = min(st.get("first_event_ms", ts), ts)
            st["last_event_ms"] = max(st.get("last_event_ms", ts), ts)


def _manifest(settings: Settings, stats: dict[str, dict[str, Any]], notes: list[dict[str, Any]],
              meta: dict[str, Any] | None, started_ms: int, from_now: bool, since_ms: int | None,
              until_ms: int | None) -> dict[str, Any]:
    def span(key: str, pick) -> int | None:
        vals = [s[key] for s in stats.values() if key in s]
        return pick(vals) if vals else None

    return {
        "created_ms": started_ms,
        "finished_ms": now_ms(),
        "source": {"topic_prefix": settings.topic_prefix, "broker": settings.broker_kind,
                   "partitions": settings.partitions, "start": "now" if from_now else "beginning",
                   "since_ms": since_ms, "until_ms": until_ms},
        "topics": stats,
        "counts": {k: v["records"] for k, v in stats.items()},
        "time_range": {"first_timestamp_ms": span("first_timestamp_ms", min),
                       "last_timestamp_ms": span("last_timestamp_ms", max),
                       "first_event_ms": span("first_event_ms", min), "last_event_ms": span("last_event_ms", max)},
        "annotations": notes,
        "meta": meta or {},
    }


def record_demo(settings: Settings, out_dir: str | Path, start_ms: int,
                faults: Iterable[FaultSpec | str] = ()) -> dict[str, Any]:
    """Record a finished demo or simulator run: every topic (inputs and outputs), only
    records stamped at or after ``start_ms``, with the faults as annotations.

    Call it after the simulated plant stopped and before the broker does.

    Args:
        settings: the run's settings (its ``sim`` block goes into the manifest, so a
            replay knows the sample rate).
        out_dir: a new directory.
        start_ms: the run's start, epoch ms (event time of its first sample).
        faults: the injected faults (``FaultSpec`` or spec strings), timed from ``start_ms``.

    Returns:
        The manifest.
    """
    return record(settings, out_dir, topics=["all"], since_ms=start_ms,
                  annotations=fault_annotations(faults, start_ms),
                  meta={"source": "simulator", "start_ms": start_ms, "sim": settings.sim.model_dump(),
                        "monitor": settings.monitor.model_dump(mode="json")})
