"""One synchronizer task: partition ``p`` of every sensor topic, its :class:`Synchronizer`,
the held offsets and the commit metadata. Consumer records in, samples and dead letters
out; no Kafka and no clock inside (the caller passes the time), so it is tested without a
broker. The process around it is :mod:`streamfuse.sync.app`.
"""

from __future__ import annotations

import json

from streamfuse.errors import InvalidEvent
from streamfuse.events import DeadLetter, Sample, SensorEvent, content_type_of, dead_letter_original, decode
from streamfuse.sync.core import SyncConfig, Synchronizer
from streamfuse.topics import Topics

# sync outcome -> dead-letter reason; "joined" and "duplicate" are not dead letters
DEAD_REASONS = {"late": "late_reading", "extra": "extra_reading", "outside_tolerance": "outside_tolerance",
                "unknown_modality": "unknown_modality"}


def checkpoint_metadata(watermark: int | None, position: int) -> str:
    """Commit metadata: the task's watermark and the partition's read position.

    Examples:
        >>> checkpoint_metadata(1500, 42)
        '{"w":1500,"pos":42}'
        >>> parse_checkpoint('{"w":1500,"pos":42}'), parse_checkpoint(None), parse_checkpoint("junk")
        ((1500, 42), None, None)
    """
    return json.dumps({"w": watermark, "pos": position}, separators=(",", ":"))


def parse_checkpoint(metadata: str | None) -> tuple[int | None, int] | None:
    """``(watermark, position)`` from :func:`checkpoint_metadata`, or None if absent or foreign."""
    try:
        raw = json.loads(metadata) if metadata else None
        w, pos = raw["w"], raw["pos"]
    except (ValueError, TypeError, KeyError):
        return None
    if not isinstance(pos, int) or not (w is None or isinstance(w, int)):
        return None
    return w, pos


class SyncTask:
    """One task: partition ``p`` of every sensor topic and its synchronizer. No Kafka inside:
    :meth:`feed` takes a consumer record and returns what to produce.

    Args:
        config: the sync configuration.
        topics: topic names (to map a record's topic to its modality).
        max_bytes: readings larger than this are dead-lettered as ``oversize``.
    """

    def __init__(self, config: SyncConfig, topics: Topics, max_bytes: int) -> None:
        self.config = config
        self.sync = Synchronizer(config)
        self.modality_of = {topics.sensor(m): m for m in config.modalities}
        self.max_bytes = max_bytes
        self.held: dict[tuple[str, str, int], int] = {}  # (modality, event_id, ts) -> offset, in open slots
        self.resume: dict[str, int] = {}  # modality -> offset below which records are replays
        self.last_input: float | None = None  # monotonic seconds of the last reading
        self.last_seen: dict[str, float] = {}  # modality -> monotonic seconds of its last valid reading
        self.outcomes: list[tuple[str, str]] = []  # (outcome, modality) of the last feed, for metrics
        for m in config.modalities:
            self.sync.set_lagging(m, True)  # until the consumer knows the partition's end

    def restore(self, checkpoints: dict[str, tuple[int | None, int]]) -> None:
        """Resume from commit metadata (modality -> (watermark, position))."""
        for m, (w, pos) in checkpoints.items():
            self.resume[m] = max(pos, self.resume.get(m, 0))
            if w is not None:
                self.sync.advance(w)

    def feed(self, msg, now: float, now_ms: int) -> tuple[list[Sample], list[DeadLetter]]:
        """Decode, validate and synchronize one consumer record.

        Args:
            msg: a consumer record (``topic``, ``partition``, ``offset``, ``key``,
                ``value``, ``headers``).
            now: monotonic seconds, the clock of :meth:`tick` (when the input was last live).
            now_ms: wall time in ms, stamped on the dead letters.

        Returns:
            The samples that closed and the dead letters to produce.
        """
        m = self.modality_of[msg.topic]
        replay = msg.offset < self.resume.get(m, -1)
        self.outcomes = []
        try:
            ev = decode(msg.value, content_type_of(msg.headers), expect=SensorEvent, max_bytes=self.max_bytes)
            if ev.modality != m:
                raise InvalidEvent("bad_field", f"a {ev.modality!r} reading on {msg.topic}, which carries {m}", m)
            if msg.key != ev.asset_id.encode():
                raise InvalidEvent("bad_field", f"record key {msg.key!r} is not the asset_id {ev.asset_id!r}: "
                                   "produce with key = asset_id so that an asset's readings share a partition", m)
        except InvalidEvent as exc:
            if replay:
                return [], []  # dead-lettered before the restart
            self.outcomes.append((exc.reason, exc.modality or m))
            return [], [_dead(msg, exc.reason, exc.detail, exc.modality or m, now_ms)]
        self.last_input = self.last_seen[m] = now
        res = self.sync.add(ev, source=m)
        if res.outcome == "joined":
            self.held[(m, ev.event_id, ev.ts_ms)] = msg.offset
        samples = self._release(res.samples)
        if replay and res.outcome != "joined":
            return samples, []  # handled before the restart: its outputs were flushed then
        self.outcomes.append((res.outcome, m))
        reason = DEAD_REASONS.get(res.outcome)
        if reason is None:
            return samples, []
        detail = f"{res.outcome}: {ev.event_id} at {ev.ts_ms} (watermark {self.sync.watermark})"
        return samples, [_dead(msg, reason, detail, m, now_ms)]

    def tick(self, lagging: dict[str, bool], now: float) -> list[Sample]:
        """Update which inputs hold the watermark, then apply the idle advance; returns
        samples released.

        An input holds the watermark while records wait unread in it (``lagging``) and
        also while it is live: it delivered a reading within ``idle_ms`` of wall time. A
        live input is never outrun by another that the consumer happens to fetch further
        ahead (after a broker outage, or a backlog: a fetch of small series readings
        spans far more event time than one of images), so its readings are not late; an
        input that went silent (a dead camera) stops holding after ``idle_ms``.
        """
        out = []
        idle_s = self.config.idle_ms / 1000
        for m, lag in lagging.items():
            live = m in self.last_seen and now - self.last_seen[m] < idle_s
            out += self._release(self.sync.set_lagging(m, lag or live))
        quiet = self.last_input is not None and now - self.last_input >= self.config.idle_ms / 1000
        if quiet and not any(lagging.values()) and self.sync.latest_ms is not None:
            out += self._release(self.sync.advance(self.sync.latest_ms + int((now - self.last_input) * 1000)))
        return out

    def commit_offset(self, modality: str, position: int) -> int:
        """Where a restart must resume this partition: its oldest held reading, else ``position``."""
        held = [o for (m, _, _), o in self.held.items() if m == modality]
        return min(held, default=position)

    def _release(self, samples) -> list[Sample]:
        for s in samples:
            for m, ev in s.readings.items():
                self.held.pop((m, ev.event_id, ev.ts_ms), None)
        return list(samples)


def _dead(msg, reason: str, detail: str, modality: str | None, now_ms: int) -> DeadLetter:
    original, note = dead_letter_original(msg.value)  # an oversized record keeps its size and a prefix
    return DeadLetter(reason, detail + note, msg.topic, original, "sync", now_ms,
                      msg.partition, msg.offset, msg.key, content_type_of(msg.headers), modality)
