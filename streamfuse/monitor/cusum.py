"""Page's CUSUM on per-sample log-likelihood ratios, and its threshold from a false-alarm
budget: the building blocks of :mod:`streamfuse.monitor.sequential`.

**The budget.** For a CUSUM of exact log-likelihood ratios the mean time between false
alarms on healthy data is at least ``e^h`` samples (Lorden, 1971). With ``D`` detectors,
detector ``d`` seeing ``r_d`` samples a second and a budget of ``B`` false alarms a day
for the whole monitor (``STREAMFUSE_MONITOR__FALSE_ALARMS_PER_DAY``), each detector gets
``B / D`` (Bonferroni) and so ``h_d = ln(D · r_d · 86400 / B)`` (:func:`budget_threshold`).

Pure logic: no I/O, no clock.
"""

from __future__ import annotations

import math
from typing import Any

from streamfuse.errors import ConfigError
from streamfuse.monitor.base import Detector, DetectorValueError, _check_finite, _check_range

DAY_S = 86_400
MAX_FALSE_ALARMS_PER_DAY = 10_000.0  # beyond this a "budget" is no longer a guard


def budget_threshold(false_alarms_per_day: float, detectors: int, samples_per_s: float) -> float:
    """The CUSUM threshold ``h`` (nats) that keeps ``detectors`` detectors, each seeing
    ``samples_per_s`` samples a second, within ``false_alarms_per_day`` together.

    Raises:
        ConfigError: a budget outside ``(0, 10000]`` a day, or no detector.

    Examples:
        >>> round(budget_threshold(1.0, 9, 8.0), 2)
        15.64
        >>> round(budget_threshold(24.0, 9, 8.0), 2)   # one a hour: 3.2 nats less
        12.47
        >>> budget_threshold(0, 9, 8.0)
        Traceback (most recent call last):
        ...
        streamfuse.errors.ConfigError: false_alarms_per_day must be in (0, 10000.0], got 0
    """
    check_budget(false_alarms_per_day)
    if detectors < 1:
        raise ConfigError(f"budget_threshold needs at least one detector, got {detectors}")
    per_day = max(samples_per_s, 1e-9) * DAY_S
    return max(1.0, math.log(detectors * per_day / false_alarms_per_day))


def check_budget(false_alarms_per_day: Any) -> float:
    """The budget, or a ConfigError that names the value and the allowed range."""
    ok = isinstance(false_alarms_per_day, (int, float)) and not isinstance(false_alarms_per_day, bool)
    if not ok or not math.isfinite(false_alarms_per_day) or not 0 < false_alarms_per_day <= MAX_FALSE_ALARMS_PER_DAY:
        raise ConfigError(f"false_alarms_per_day must be in (0, {MAX_FALSE_ALARMS_PER_DAY}], got "
                          f"{false_alarms_per_day!r}")
    return float(false_alarms_per_day)


class Cusum(Detector):
    """Page's CUSUM on per-sample log-likelihood ratios, with a recovery CUSUM.

    ``S = max(0, S + llr)`` fires at ``S >= threshold``. While firing, the evidence for
    healthy, ``R = max(0, R - llr)``, resolves the alarm at ``R >= resolve_threshold``;
    then both restart from zero (Page's restart after an alarm). ``threshold`` may be
    changed between updates (the monitor derives it from the budget and the sample
    rate); :meth:`fire` raises the alarm from outside (fleet attribution).

    Args:
        threshold: ``h`` in nats (> 0).
        resolve_threshold: nats of healthy evidence that resolve; None = ``threshold``.

    Examples:
        >>> import random
        >>> rng = random.Random(4)
        >>> det = Cusum(threshold=8.0)
        >>> history = []
        >>> for i in range(60):
        ...     broken = 20 <= i < 40
        ...     odd = rng.random() < (0.6 if broken else 0.05)   # the sensor is the odd one out
        ...     det.update(2.5 if odd else -0.9)
        ...     history.append("F" if det.firing else ".")
        >>> "".join(history)
        '..............................FFFFFFFFFFFFFFFF..............'
        >>> det.state_dict()["firing"], round(det.statistic, 1)
        (False, 0.0)
    """

    def __init__(self, threshold: float, resolve_threshold: float | None = None) -> None:
        _check_range("threshold", threshold, 0.0, math.inf, low_open=True, high_open=True)
        if resolve_threshold is not None:
            _check_range("resolve_threshold", resolve_threshold, 0.0, math.inf, low_open=True, high_open=True)
        self.threshold = threshold
        self.resolve_threshold = resolve_threshold
        self.reset()

    def reset(self) -> None:
        super().reset()
        self._s = 0.0
        self._r = 0.0
        self._n = 0

    def update(self, llr: float) -> None:
        """One sample's log-likelihood ratio (broken vs healthy)."""
        if isinstance(llr, bool) or not isinstance(llr, (int, float)):
            raise DetectorValueError(f"llr must be a number, got {llr!r}")
        _check_finite("llr", llr)
        self._changed = False
        self._n += 1
        self._s = max(0.0, self._s + llr)
        if not self._firing:
            if self._s >= self.threshold:
                self._firing, self._changed, self._r = True, True, 0.0
            return
        self._r = max(0.0, self._r - llr)
        limit = self.threshold if self.resolve_threshold is None else self.resolve_threshold
        if self._r >= limit:
            self._firing, self._changed = False, True
            self._s = self._r = 0.0

    def fire(self) -> None:
        """Open the alarm now (attributed from a wider scope); a no-op when firing."""
        self._changed = False
        if not self._firing:
            self._firing, self._changed, self._r = True, True, 0.0

    @property
    def statistic(self) -> float:
        """``S``, the evidence that the unit is broken, in nats."""
        return self._s

    @property
    def n(self) -> int:
        """Samples seen."""
        return self._n

    def state_dict(self) -> dict[str, Any]:
        return {"s": self._s, "r": self._r, "n": self._n, "firing": self._firing}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reset()
        self._s, self._r, self._n = float(state["s"]), float(state["r"]), int(state["n"])
        self._firing = bool(state["firing"])
