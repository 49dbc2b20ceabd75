"""Event-time synchronizer: per-modality sensor readings → multi-modal samples (pure logic).

Slots. Every asset has one sample slot per ``period_ms``. Slot times are the multiples
of ``period_ms`` (since the epoch); a reading belongs to the slot whose time is nearest
to its ``ts_ms`` (slot ``n`` spans ``[n - period//2, n - period//2 + period)``) and joins
it only if ``|ts_ms - n| <= tolerance_ms``; otherwise it is ``outside_tolerance``. The
sample's id is :func:`slot_id` ``(asset_id, n)`` and its ``ts_ms`` is ``n``.

Watermark. One synchronizer serves one *task*: the co-partitioned sensor partitions
with the same number (an asset's readings all land in one task, key = asset_id). Its
watermark is the latest event time it has seen, held back by every *source* (an input
partition, named by the caller; by default the reading's modality) that the caller
marked as lagging (unread records wait in it), and raised by :meth:`advance`. It never
goes back. So a silent asset's slots close as soon as its partition moves on, and a
consumer that catches up a backlog faster on one topic than on another does not make
the slower topic's readings late. Slot ``n`` closes when the watermark passes
``n + tolerance_ms + grace_ms``; a closed slot is emitted once, with absent modalities in
``Sample.missing`` (never invented). A reading for a closed slot is ``late``.

Every reading has exactly one outcome (:data:`OUTCOMES`): it joined a slot, or it was a
``duplicate`` (same event id as a reading already in the slot: ignored), ``late``,
``extra`` (a second reading of the same modality in the slot: the first in the log
wins), ``outside_tolerance`` or ``unknown_modality``. Nothing is dropped silently: the
caller counts and dead-letters everything that did not join.

Pure logic: no Kafka, no clock; time is passed in.
"""

from __future__ import annotations

import dataclasses
import heapq
from dataclasses import dataclass

from streamfuse.errors import ConfigError, StreamfuseError
from streamfuse.events import MODALITIES, Sample, SensorEvent, decode, encode

OUTCOMES = ("joined", "duplicate", "late", "extra", "outside_tolerance", "unknown_modality")
_NEVER = -(1 << 62)  # watermark before any reading
_STATE_VERSION = 1


class SyncError(StreamfuseError):
    """A synchronizer state cannot be loaded (wrong version or another configuration)."""


def slot_time(ts_ms: int, period_ms: int) -> int:
    """The slot time nearest to ``ts_ms`` (a multiple of ``period_ms``; halfway goes up).

    Examples:
        >>> slot_time(1_049, 100), slot_time(1_050, 100), slot_time(-20, 100)
        (1000, 1100, 0)
    """
    return (ts_ms + period_ms // 2) // period_ms * period_ms


def slot_id(asset_id: str, slot_ms: int) -> str:
    """The id of an asset's sample at slot time ``slot_ms``; labels join on it.

    Examples:
        >>> slot_id("asset-3", 1_800_000_000_500)
        'asset-3-1800000000500'
    """
    return f"{asset_id}-{slot_ms}"


@dataclass(frozen=True)
class SyncConfig:
    """How readings are aligned.

    Args:
        period_ms: time between two samples of one asset.
        tolerance_ms: farthest a reading may be from its slot time; ``2 * tolerance_ms <=
            period_ms`` so that no reading is within tolerance of two slots.
        grace_ms: how long after a slot's last possible reading (slot time + tolerance)
            the watermark waits before closing it.
        modalities: the modalities a sample has; readings of others are rejected.
        max_open_slots: bound on open slots (memory); beyond it the oldest slots close
            early (counted in ``Synchronizer.forced_closes``).
        idle_ms: for the process: after this much wall time without readings (and no
            lagging input), event time is assumed to move on with the wall clock, so the
            last slots close when the plant goes quiet.

    Raises:
        ConfigError: for an out-of-range value; the message names it and the valid range.
    """

    period_ms: int = 500
    tolerance_ms: int = 125
    grace_ms: int = 500
    modalities: tuple[str, ...] = MODALITIES
    max_open_slots: int = 10_000
    idle_ms: int = 1_000

    def __post_init__(self) -> None:
        for name, lo in (("period_ms", 1), ("tolerance_ms", 0), ("grace_ms", 0), ("max_open_slots", 1),
                         ("idle_ms", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ConfigError(f"SyncConfig.{name}={value!r}: expected an integer >= {lo}")
        if 2 * self.tolerance_ms > self.period_ms:
            raise ConfigError(f"SyncConfig.tolerance_ms={self.tolerance_ms} is more than half of period_ms="
                              f"{self.period_ms}: a reading would match two slots; lower it")
        mods = tuple(self.modalities)
        if not mods or len(set(mods)) != len(mods) or not set(mods) <= set(MODALITIES):
            raise ConfigError(f"SyncConfig.modalities={mods!r}: expected distinct names from {MODALITIES}")
        object.__setattr__(self, "modalities", mods)

    @classmethod
    def for_rate(cls, rate_hz: float, **overrides) -> SyncConfig:
        """Defaults for ``rate_hz`` samples per second: tolerance a quarter period, grace one period.

        Examples:
            >>> c = SyncConfig.for_rate(5.0)
            >>> c.period_ms, c.tolerance_ms, c.grace_ms
            (200, 50, 200)
        """
        if isinstance(rate_hz, bool) or not isinstance(rate_hz, (int, float)) or not 0 < rate_hz < 1000:
            raise ConfigError(f"rate_hz={rate_hz!r}: expected a number in (0, 1000)")
        period = max(1, round(1000.0 / rate_hz))  # the plant's period (Plant.period_ms)
        return cls(**{"period_ms": period, "tolerance_ms": period // 4, "grace_ms": period, **overrides})


@dataclass(frozen=True)
class SyncResult:
    """What one call did: the samples it closed (oldest first) and the reading's outcome."""

    samples: tuple[Sample, ...] = ()
    outcome: str = "joined"  # one of OUTCOMES; "joined" for calls that add no reading

    @property
    def late(self) -> bool:
        return self.outcome == "late"

    @property
    def duplicate(self) -> bool:
        return self.outcome == "duplicate"


@dataclass
class _Slot:
    asset_id: str
    slot_ms: int
    readings: dict[str, SensorEvent]


class Synchronizer:
    """Aligns one task's readings into samples; see the module docstring for the rules.

    Args:
        config: slot period, tolerance, grace and bounds.

    Examples:
        >>> sync = Synchronizer(SyncConfig(period_ms=1000, tolerance_ms=100, grace_ms=500,
        ...                                modalities=("image", "series")))
        >>> def reading(m, ts, eid=None):
        ...     return SensorEvent(eid or f"{m}-{ts}", "asset-1", m, ts, b"", line_id="line-0")
        >>> [sync.add(reading(m, ts)).outcome for m, ts in [("image", 1020), ("series", 990), ("image", 1020)]]
        ['joined', 'joined', 'duplicate']
        >>> sync.add(reading("image", 1300)).outcome  # 300 ms from slot 1000, tolerance 100
        'outside_tolerance'
        >>> res = sync.add(reading("image", 2010))  # watermark 2010 > 1000 + 100 + 500
        >>> [(s.sample_id, s.ts_ms, sorted(s.readings), s.missing, s.line_id) for s in res.samples]
        [('asset-1-1000', 1000, ['image', 'series'], (), 'line-0')]
        >>> sync.add(reading("series", 1050)).outcome
        'late'
        >>> [(s.sample_id, s.missing) for s in sync.advance(2700)]  # 2700 > 2000 + 600
        [('asset-1-2000', ('series',))]
    """

    def __init__(self, config: SyncConfig) -> None:
        self.config = config
        self.reset()

    def reset(self) -> None:
        """Forget every slot, source and the watermark."""
        self._slots: dict[tuple[str, int], _Slot] = {}
        self._order: list[tuple[int, str]] = []  # heap of (slot_ms, asset_id) of open slots
        self._hi: dict[str, int] = {}  # source -> latest event time seen
        self._lagging: set[str] = set()
        self._wm = _NEVER
        self.forced_closes = 0

    # ------------------------------------------------------------------ reading state

    @property
    def watermark(self) -> int | None:
        """Current watermark (ms), or None before any reading or :meth:`advance`."""
        return None if self._wm == _NEVER else self._wm

    @property
    def latest_ms(self) -> int | None:
        """Latest event time seen on any source, or None."""
        return max(self._hi.values()) if self._hi else None

    @property
    def open_slots(self) -> int:
        return len(self._slots)

    def is_closed(self, slot_ms: int) -> bool:
        """Whether slot ``slot_ms`` (of any asset) is closed: a reading for it is late."""
        return slot_ms + self.config.tolerance_ms + self.config.grace_ms < self._wm

    # ------------------------------------------------------------------ input

    def add(self, event: SensorEvent, source: str | None = None) -> SyncResult:
        """Add one reading.

        Args:
            event: a validated reading.
            source: the input it came from (e.g. its topic partition); default its modality.

        Returns:
            The reading's outcome and the samples that closed because time moved on.
        """
        cfg = self.config
        src = event.modality if source is None else source
        if event.modality not in cfg.modalities:
            return SyncResult((), "unknown_modality")
        # Any valid reading is evidence of how far event time has come.
        self._hi[src] = max(self._hi.get(src, _NEVER), event.ts_ms)
        n = slot_time(event.ts_ms, cfg.period_ms)
        if abs(event.ts_ms - n) > cfg.tolerance_ms:
            outcome = "outside_tolerance"
        elif self.is_closed(n):
            outcome = "late"
        else:
            outcome = self._join(event, n)
        return SyncResult(self._close(), outcome)

    def _join(self, event: SensorEvent, n: int) -> str:
        key = (event.asset_id, n)
        slot = self._slots.get(key)
        if slot is None:
            if len(self._slots) >= self.config.max_open_slots:
                # Bounded memory: close the oldest slot time early, as if the watermark had passed it.
                oldest = self._order[0][0]
                self.forced_closes += 1
                self._wm = max(self._wm, oldest + self.config.tolerance_ms + self.config.grace_ms + 1)
                if self.is_closed(n):
                    return "late"
            slot = self._slots[key] = _Slot(event.asset_id, n, {})
            heapq.heappush(self._order, (n, event.asset_id))
        have = slot.readings.get(event.modality)
        if have is not None:
            return "duplicate" if have.event_id == event.event_id else "extra"
        slot.readings[event.modality] = event
        return "joined"

    def set_lagging(self, source: str, lagging: bool) -> tuple[Sample, ...]:
        """Mark an input as lagging (records wait unread in it) or caught up.

        A lagging source holds the watermark at the latest time read from it (before
        any reading: at the start). Returns the samples this releases.
        """
        if lagging:
            self._lagging.add(source)
        else:
            self._lagging.discard(source)
        return self._close()

    def advance(self, watermark_ms: int) -> tuple[Sample, ...]:
        """Raise the watermark to at least ``watermark_ms`` (e.g. idle time passed, or a
        restored checkpoint); returns the samples that close."""
        self._wm = max(self._wm, int(watermark_ms))
        return self._close()

    def flush(self) -> tuple[Sample, ...]:
        """End of input: close every open slot (later readings for them are late)."""
        if self._order:
            newest = max(n for n, _ in self._order)
            self._wm = max(self._wm, newest + self.config.tolerance_ms + self.config.grace_ms + 1)
        return self._close()

    def _close(self) -> tuple[Sample, ...]:
        if self._hi:
            held = [self._hi.get(s, _NEVER) for s in self._lagging]
            self._wm = max(self._wm, min([max(self._hi.values()), *held]))
        out = []
        while self._order and self.is_closed(self._order[0][0]):
            n, asset_id = heapq.heappop(self._order)
            out.append(self._sample(self._slots.pop((asset_id, n))))
        return tuple(out)

    def _sample(self, slot: _Slot) -> Sample:
        mods = self.config.modalities
        readings = {m: slot.readings[m] for m in mods if m in slot.readings}
        line_id = next((r.line_id for r in readings.values() if r.line_id), "")
        return Sample(slot_id(slot.asset_id, slot.slot_ms), slot.asset_id, slot.slot_ms, readings,
                      line_id=line_id, missing=tuple(m for m in mods if m not in readings))

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        """Everything needed to resume, as plain values (msgpack-able; readings as bytes)."""
        return {
            "version": _STATE_VERSION,
            "config": _config_key(self.config),
            "watermark": self._wm,
            "hi": dict(self._hi),
            "lagging": sorted(self._lagging),
            "forced_closes": self.forced_closes,
            "slots": [[s.asset_id, s.slot_ms, [encode(r) for r in s.readings.values()]]
                      for _, s in sorted(self._slots.items())],
        }

    def load_state_dict(self, state: dict) -> None:
        """Replace this synchronizer's state with one from :meth:`state_dict`.

        Raises:
            SyncError: the state has another version or was made with other slot settings.
        """
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            raise SyncError(f"synchronizer state version {state.get('version') if isinstance(state, dict) else state!r}"
                            f" is not {_STATE_VERSION}; start from an empty state (reset)")
        if state.get("config") != _config_key(self.config):
            raise SyncError(f"synchronizer state was saved with {state.get('config')}, this one has "
                            f"{_config_key(self.config)}; use the same SyncConfig or start empty")
        self.reset()
        self._wm = int(state["watermark"])
        self._hi = {str(k): int(v) for k, v in state["hi"].items()}
        self._lagging = set(state["lagging"])
        self.forced_closes = int(state["forced_closes"])
        for asset_id, n, raw in state["slots"]:
            events = [decode(b, expect=SensorEvent, check_payloads=False) for b in raw]
            self._slots[(asset_id, n)] = _Slot(asset_id, n, {e.modality: e for e in events})
            heapq.heappush(self._order, (n, asset_id))


def _config_key(config: SyncConfig) -> dict:
    keep = ("period_ms", "tolerance_ms", "grace_ms", "modalities")
    return {k: list(v) if isinstance(v, tuple) else v
            for k, v in dataclasses.asdict(config).items() if k in keep}
