"""Detectors of broken inputs, not broken models: a sensor's flat or frozen readings
(:class:`RecentRate`, per reading), its dropouts (:class:`RateAlarm`), clock skew between an
asset's modalities (:class:`SkewAlarm`), and every asset quiet at once (:class:`UpstreamOutage`).

River-style, with the hysteresis rule of :mod:`streamfuse.monitor.detectors`: constructor
arguments are public attributes, ``update()`` returns nothing, results are properties,
state is checkpointed with ``state_dict()`` / ``load_state_dict()``.
"""

from __future__ import annotations

import math
from typing import Any

from streamfuse.monitor.base import (
    Detector, DetectorValueError, _check_counts, _check_finite, _check_int, _check_positive, _check_range, _hysteresis,
)
from streamfuse.monitor.stats import wilson_interval


class RecentRate(Detector):
    """Per reading: the share of bad readings (flat, frozen) among a sensor's last
    ``readings``; fires at or above ``threshold`` and resolves once the last ``readings``
    are all good. A dead sensor is caught within a few readings — not windows — and an
    intermittent one (every other reading bad) within ``readings``.

    A healthy signal is never flat nor byte-identical to the previous reading, so the
    count needs no statistics; ``readings`` only bounds how long an intermittent fault
    can hide.

    Args:
        readings: how many of the latest readings count (>= 1).
        threshold: share of them, in (0, 1], at which the sensor is faulty.

    Examples:
        >>> det, history = RecentRate(readings=6, threshold=0.5), []
        >>> for i in range(24):
        ...     det.update(6 <= i < 14)                  # readings 6..13 are flat
        ...     history.append("F" if det.firing else ".")
        >>> "".join(history)
        '........FFFFFFFFFFF.....'
        >>> det.update(True); det.state_dict()["recent"], det.firing
        ([False, False, False, False, False, True], False)
    """

    def __init__(self, readings: int = 6, threshold: float = 0.5) -> None:
        _check_int("readings", readings, 1)
        _check_range("threshold", threshold, 0.0, 1.0, low_open=True)
        self._init_windows(1, 1, 1)
        self.readings = readings
        self.threshold = threshold
        self.reset()

    def reset(self) -> None:
        super().reset()
        self._recent: list[bool] = []

    def update(self, bad: bool) -> None:
        """One reading of the sensor: whether it was bad."""
        self._changed = False
        self._recent = [*self._recent, bool(bad)][-self.readings:]
        rate = sum(self._recent) / len(self._recent)
        self._last = rate
        if not self._firing and bad and sum(self._recent) >= self.threshold * self.readings:
            self._firing = self._changed = True
        elif self._firing and len(self._recent) == self.readings and not any(self._recent):
            self._firing, self._changed = False, True

    def _extra_state(self) -> dict[str, Any]:
        return {**super()._extra_state(), "recent": list(self._recent)}

    def _load_extra(self, state: dict[str, Any]) -> None:
        super()._load_extra(state)
        self._recent = [bool(b) for b in state.get("recent", [])]


class RateAlarm(Detector):
    """A rate of bad readings above a threshold, with statistical confidence: flatlined
    or stuck signals, dropouts (missing readings).

    A window of ``n`` readings with ``events`` bad ones is *bad* when the Wilson lower
    bound of ``events / n`` is above ``threshold`` (so a small window cannot fire on
    noise) and *good* when the point rate is at or below ``threshold - hysteresis``.
    Windows with fewer than ``min_n`` readings are no evidence. The default hysteresis
    is half the threshold: without it a sensor whose true fault rate sits a little above
    the threshold would resolve and re-fire whenever a window happened to come out low.

    Args:
        threshold: rate in [0, 1) above which the sensor is faulty.
        fire_windows: consecutive bad windows before firing.
        resolve_windows: consecutive good windows before resolving.
        min_n: readings a window needs to count.
        hysteresis: how far below ``threshold`` the rate must fall to count as good;
            ``None`` is half the threshold.
        z: normal quantile of the Wilson bound (1.96 ≈ 95 %).

    Examples:
        >>> import random
        >>> rng = random.Random(5)
        >>> dropout = RateAlarm(threshold=0.2, fire_windows=2, resolve_windows=2, min_n=10)
        >>> history = []
        >>> for w in range(12):
        ...     p = 0.7 if 3 <= w < 7 else 0.02          # the microphone drops out in windows 3..6
        ...     missing = sum(rng.random() < p for _ in range(30))
        ...     dropout.update(missing, 30)
        ...     history.append("F" if dropout.firing else ".")
        >>> "".join(history)
        '....FFFF....'
        >>> dropout.update(3, 4)     # too few readings: no evidence
        >>> dropout.changed, dropout.firing
        (False, False)
    """

    def __init__(
        self,
        threshold: float,
        fire_windows: int = 2,
        resolve_windows: int = 2,
        min_n: int = 10,
        hysteresis: float | None = None,
        z: float = 1.96,
    ) -> None:
        if not 0.0 <= threshold < 1.0:
            raise DetectorValueError(f"threshold must be in [0, 1), got {threshold!r}")
        hysteresis = _hysteresis(hysteresis, "threshold", threshold, threshold / 2, "half of it")
        _check_positive("z", z)
        self._init_windows(fire_windows, resolve_windows, min_n)
        self.threshold = threshold
        self.hysteresis = hysteresis
        self.z = z
        self.reset()

    def update(self, events: int, n: int) -> None:
        """``events`` bad readings out of ``n`` in one window."""
        self._changed = False
        _check_counts(events, n)
        if n < self.min_n:
            return
        rate = events / n
        low, high = wilson_interval(events, n, self.z)
        self._last = (rate, low, high)
        self._step(bad=low > self.threshold, good=rate <= self.threshold - self.hysteresis)

    @property
    def last(self) -> tuple[float, float, float] | None:
        """(rate, Wilson low, Wilson high) of the last window that counted."""
        return self._last


class SkewAlarm(Detector):
    """Clock skew between an asset's modalities: the mean absolute offset of a
    modality's readings from their sample slots above a limit.

    A window is *bad* when the mean absolute skew exceeds ``max_abs_skew_ms`` and *good*
    when it is at or below ``max_abs_skew_ms - hysteresis_ms``. Windows with fewer than
    ``min_n`` matched readings (or no skew measured) are no evidence.

    Args:
        max_abs_skew_ms: the largest acceptable mean absolute skew.
        fire_windows: consecutive bad windows before firing.
        resolve_windows: consecutive good windows before resolving.
        min_n: matched readings a window needs to count.
        hysteresis_ms: how far below the limit the skew must fall to count as good;
            ``None`` is a quarter of ``max_abs_skew_ms``.

    Examples:
        >>> import random
        >>> rng = random.Random(2)
        >>> skew = SkewAlarm(max_abs_skew_ms=200.0)
        >>> history = []
        >>> for w in range(10):
        ...     offset = 450.0 if 2 <= w < 6 else 20.0    # the camera's clock runs late in windows 2..5
        ...     skew.update(abs(rng.gauss(offset, 30.0)), n=20)
        ...     history.append("F" if skew.firing else ".")
        >>> "".join(history)
        '...FFFF...'
        >>> skew.hysteresis_ms
        50.0
    """

    def __init__(
        self,
        max_abs_skew_ms: float,
        fire_windows: int = 2,
        resolve_windows: int = 2,
        min_n: int = 5,
        hysteresis_ms: float | None = None,
    ) -> None:
        if not (isinstance(max_abs_skew_ms, (int, float)) and math.isfinite(max_abs_skew_ms)
                and max_abs_skew_ms > 0):
            raise DetectorValueError(f"max_abs_skew_ms must be a finite number > 0, got {max_abs_skew_ms!r}")
        if hysteresis_ms is None:
            hysteresis_ms = max_abs_skew_ms / 4
        if not 0.0 <= hysteresis_ms < max_abs_skew_ms:
            raise DetectorValueError(f"hysteresis_ms must be in [0, max_abs_skew_ms={max_abs_skew_ms}), "
                             f"or None for a quarter of it, got {hysteresis_ms!r}")
        self._init_windows(fire_windows, resolve_windows, min_n)
        self.max_abs_skew_ms = max_abs_skew_ms
        self.hysteresis_ms = float(hysteresis_ms)
        self.reset()

    def update(self, mean_abs_skew_ms: float | None, n: int) -> None:
        """One window's mean absolute skew over ``n`` matched readings."""
        self._changed = False
        if mean_abs_skew_ms is None or n < self.min_n:
            return
        _check_finite("mean_abs_skew_ms", mean_abs_skew_ms)
        self._last = mean_abs_skew_ms
        self._step(bad=mean_abs_skew_ms > self.max_abs_skew_ms,
                   good=mean_abs_skew_ms <= self.max_abs_skew_ms - self.hysteresis_ms)

    @property
    def last(self) -> float | None:
        """The mean absolute skew of the last window that counted."""
        return self._last


class UpstreamOutage(Detector):
    """Every asset quiet at once: the broker or an upstream gateway, not the sensors.

    A window is *bad* when at least ``min_n`` assets reported and every one of them had
    a modality go quiet (missing readings above the sensor-fault rate); *good* when at
    most half of them did. While it fires the monitor says "upstream outage" and holds
    back the per-sensor dropout alerts and their masks (masking healthy sensors fixes
    nothing when the pipe in front of them is down).

    Args:
        fire_windows: consecutive bad windows before firing.
        resolve_windows: consecutive good windows before resolving.
        min_n: assets a window needs to count (one quiet asset is a sensor fault).

    Examples:
        >>> out = UpstreamOutage(fire_windows=1, resolve_windows=2)
        >>> history = []
        >>> for quiet in (0, 1, 4, 4, 3, 0, 0, 0):        # 4 assets; all go quiet in windows 2..3
        ...     out.update(quiet, 4)
        ...     history.append("F" if out.firing else ".")
        >>> "".join(history)
        '..FFFF..'
    """

    def __init__(self, fire_windows: int = 1, resolve_windows: int = 2, min_n: int = 2) -> None:
        self._init_windows(fire_windows, resolve_windows, min_n)
        self.reset()

    def update(self, quiet_assets: int, assets: int) -> None:
        """How many of the ``assets`` that reported in one window had a modality go quiet."""
        self._changed = False
        _check_counts(quiet_assets, assets, "quiet_assets")
        if assets < self.min_n:
            return
        self._last = quiet_assets / assets
        self._step(bad=quiet_assets == assets, good=2 * quiet_assets <= assets)
