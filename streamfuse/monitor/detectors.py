"""Detectors: river-style ``update()`` classes on plain values.

Constructor arguments are public attributes; derived state is private, rebuilt by
``reset()`` and serializable with ``state_dict()`` / ``load_state_dict()`` (checkpointed
by the monitor as plain JSON). Results are read from properties; nothing auto-resets.

Every detector sees one value per KPI window and shares one hysteresis rule: a window is
*bad*, *good*, or neither (inside the band between the two conditions), or it is no
evidence at all (too few samples; the streaks are left as they are). The alert fires
after ``fire_windows`` consecutive bad windows and resolves after ``resolve_windows``
consecutive good ones; a window in the band breaks both streaks. Because *good* is
stricter than *not bad*, a signal hovering at the threshold cannot flap.

This module holds the detectors of a model's health: labelled accuracy
(:class:`AccuracyDegradation`) and the label-free proxies (:class:`PageHinkley` on
confidence and agreement, :class:`Dominance` on the contribution share). The detectors of
broken inputs (sensors, the pipe) are in :mod:`streamfuse.monitor.sensor_faults`, the
paired fusion test in :mod:`streamfuse.monitor.paired`, the label-free sequential ones in
:mod:`streamfuse.monitor.sequential`, the shared base class in :mod:`streamfuse.monitor.base`.
"""

from __future__ import annotations

import math
from typing import Any

from streamfuse.monitor.base import Detector, DetectorValueError, _check_finite, _check_int, _check_range
from streamfuse.monitor.stats import wilson_interval

DIRECTIONS = ("down", "up", "both")


class AccuracyDegradation(Detector):
    """A modality's accuracy below its stage-1 baseline, with statistical confidence.

    Each ``update(correct, n)`` is one KPI window. A window is *bad* when the Wilson
    upper bound of its accuracy is below ``baseline - margin`` (so a small window
    cannot fire on noise) and *good* when its point accuracy is at or above that
    threshold. The alert fires after ``fire_windows`` consecutive bad windows and
    resolves after ``resolve_windows`` consecutive good ones; windows with fewer than
    ``min_n`` labelled samples are no evidence either way. The gap between the two
    conditions is the hysteresis band that stops flapping.

    Args:
        baseline: the modality's validation Top-1 from its model bundle.
        margin: tolerated drop below the baseline.
        z: normal quantile of the Wilson bound (1.96 ≈ 95 %).
        min_n: labelled samples a window needs to count.
        fire_windows: consecutive bad windows before firing.
        resolve_windows: consecutive good windows before resolving.

    Examples:
        >>> import random
        >>> rng = random.Random(7)
        >>> det = AccuracyDegradation(baseline=0.9, margin=0.15, fire_windows=2)
        >>> history = []
        >>> for w in range(12):
        ...     p = 0.9 if w < 4 or w >= 8 else 0.3      # a fault in windows 4..7
        ...     correct = sum(rng.random() < p for _ in range(40))
        ...     det.update(correct, 40)
        ...     history.append("F" if det.firing else ".")
        >>> "".join(history)
        '.....FFFF...'
        >>> det.firing
        False
    """

    def __init__(
        self,
        baseline: float,
        margin: float = 0.15,
        z: float = 1.96,
        min_n: int = 10,
        fire_windows: int = 2,
        resolve_windows: int = 2,
    ) -> None:
        if not 0.0 < baseline <= 1.0:
            raise DetectorValueError(f"baseline must be in (0, 1], got {baseline}")
        if not 0.0 <= margin < baseline:
            raise DetectorValueError(f"margin must be in [0, baseline={baseline}), got {margin}")
        _check_range("z", z, 0.0, math.inf, low_open=True, high_open=True)
        self._init_windows(fire_windows, resolve_windows, min_n)
        self.baseline = baseline
        self.margin = margin
        self.z = z
        self.reset()

    @property
    def threshold(self) -> float:
        return self.baseline - self.margin

    def update(self, correct: int, n: int, expected: float | None = None) -> None:
        """One window: ``correct`` of ``n`` labelled samples right. ``expected``: the
        accuracy to expect of this window (its classes' recall); default the baseline."""
        self._changed = False
        if n < self.min_n:
            return
        threshold = self.threshold if expected is None else expected - self.margin
        acc = correct / n
        low, high = wilson_interval(correct, n, self.z)
        self._last = (acc, low, high)
        self._step(bad=high < threshold, good=acc >= threshold)

    @property
    def last(self) -> tuple[float, float, float] | None:
        """(accuracy, Wilson low, Wilson high) of the last window that counted."""
        return self._last


class PageHinkley(Detector):
    """A shift in the mean of a label-free per-window proxy (confidence, agreement,
    contribution share), by Page-Hinkley against a frozen reference level.

    The first ``warmup_windows`` windows that count set the reference level ``μ``
    (their mean); they are no evidence. After that, for direction ``"down"``, each
    window ``x`` adds to the cumulative statistic
    ``PH = max(0, PH + (μ - δ) - x)``, which grows while the level sits more than
    ``delta`` below the reference and shrinks by at least ``delta`` per window
    otherwise (``"up"`` mirrors it; ``"both"`` keeps the two and uses the larger).
    A window is *bad* when ``PH > threshold``; the alert fires after ``fire_windows``
    bad windows, so ``fire_windows=1`` is the plain Page-Hinkley alarm: the statistic
    already integrates the evidence.

    Why a frozen reference rather than river's running mean of everything seen: with a
    running mean the faulty windows leak into the reference, so detection slows the
    longer the fault lasts and the statistic's return after recovery depends on how
    long the stream had been running. The reference is learned again only by
    :meth:`rebase` or :meth:`reset`.

    Resolving: while firing, a window is *good* when its value is back within
    ``delta / 2`` of the reference (``x >= μ - δ/2`` for ``"down"``); the alert
    resolves after ``resolve_windows`` such windows in a row. Half of ``delta``, not
    ``delta``: a level that stays a little beyond ``delta`` (which the statistic flags,
    slowly) must not resolve whenever noise lifts two windows over the edge. At that moment, and only then, the
    cumulative sums restart from zero (the restart of Page's scheme after an alarm,
    at the transition the caller sees through ``changed``); otherwise the sum built up
    during a long fault would still exceed the threshold after recovery and re-fire
    the alert at once. To accept a new level as normal instead (a deliberate model
    change, a replaced sensor) call :meth:`rebase`: the next ``warmup_windows`` windows
    become the reference and an open alert resolves once windows clear against it.

    Args:
        delta: the tolerated shift, in the proxy's units: half the shift to detect is
            the classic choice, and it should be at least twice the noise of one
            window's value so that a recovered level reliably clears ``delta / 2``.
        threshold: ``λ``, the cumulative excess that raises the alarm.
        min_n: samples a window needs to count (``update``'s ``n``).
        warmup_windows: counted windows that set the reference level.
        direction: ``"down"``, ``"up"`` or ``"both"``.
        fire_windows: consecutive bad windows before firing.
        resolve_windows: consecutive windows back within ``delta / 2`` before resolving.

    Examples:
        >>> import random
        >>> rng = random.Random(3)
        >>> ph = PageHinkley(delta=0.05, threshold=0.5, warmup_windows=5)
        >>> history = []
        >>> for w in range(20):
        ...     level = 0.6 if 8 <= w < 14 else 0.85     # mean confidence drops in windows 8..13
        ...     ph.update(rng.gauss(level, 0.02))
        ...     history.append("F" if ph.firing else ".")
        >>> "".join(history)
        '..........FFFFF.....'
        >>> round(ph.reference, 3), ph.statistic < ph.threshold
        (0.855, True)
    """

    def __init__(
        self,
        delta: float = 0.05,
        threshold: float = 0.5,
        min_n: int = 1,
        warmup_windows: int = 5,
        direction: str = "down",
        fire_windows: int = 1,
        resolve_windows: int = 2,
    ) -> None:
        if not (isinstance(delta, (int, float)) and math.isfinite(delta) and delta >= 0):
            raise DetectorValueError(f"delta must be a finite number >= 0, got {delta!r}")
        if not (isinstance(threshold, (int, float)) and math.isfinite(threshold) and threshold > 0):
            raise DetectorValueError(f"threshold must be a finite number > 0, got {threshold!r}")
        if direction not in DIRECTIONS:
            raise DetectorValueError(f"direction must be one of {', '.join(map(repr, DIRECTIONS))}, got {direction!r}")
        _check_int("warmup_windows", warmup_windows, 1)
        self._init_windows(fire_windows, resolve_windows, min_n)
        self.delta = delta
        self.threshold = threshold
        self.warmup_windows = warmup_windows
        self.direction = direction
        self.reset()

    def reset(self) -> None:
        super().reset()
        self.rebase()

    def rebase(self) -> None:
        """Learn the reference again from the next ``warmup_windows`` windows.

        Keeps the alert state: an open alert resolves once ``resolve_windows`` windows
        are back within ``delta / 2`` of the new reference.
        """
        self._changed = False
        self._bad = self._good = 0
        self._n_ref = 0
        self._sum_ref = 0.0
        self._reference: float | None = None
        self._down = 0.0  # evidence that the level dropped
        self._up = 0.0  # evidence that the level rose

    def update(self, x: float | None, n: int = 1) -> None:
        """One window's proxy value ``x`` over ``n`` samples; ``None`` is no evidence."""
        self._changed = False
        if x is None or n < self.min_n:
            return
        _check_finite("x", x)
        if self._reference is None:
            self._n_ref += 1
            self._sum_ref += x
            if self._n_ref >= self.warmup_windows:
                self._reference = self._sum_ref / self._n_ref
            return
        ref, delta = self._reference, self.delta
        self._down = max(0.0, self._down + (ref - delta) - x)
        self._up = max(0.0, self._up + x - (ref + delta))
        edge = delta / 2
        cleared = {"down": x >= ref - edge, "up": x <= ref + edge, "both": abs(x - ref) <= edge}
        self._step(bad=self.statistic > self.threshold, good=cleared[self.direction])
        if self._changed and not self._firing:
            self._down = self._up = 0.0

    @property
    def reference(self) -> float | None:
        """The reference level; ``None`` while warming up."""
        return self._reference

    @property
    def statistic(self) -> float:
        """The Page-Hinkley statistic in the configured direction (compared with ``threshold``)."""
        return {"down": self._down, "up": self._up, "both": max(self._down, self._up)}[self.direction]

    def _extra_state(self) -> dict[str, Any]:
        return {"n_ref": self._n_ref, "sum_ref": self._sum_ref, "reference": self._reference,
                "down": self._down, "up": self._up}

    def _load_extra(self, state: dict[str, Any]) -> None:
        self._n_ref, self._sum_ref = int(state["n_ref"]), float(state["sum_ref"])
        self._reference = None if state["reference"] is None else float(state["reference"])
        self._down, self._up = float(state["down"]), float(state["up"])


class Dominance(Detector):
    """One modality dominating the fused decision while the others are healthy.

    A window is *bad* when the modality's mean contribution share is above
    ``threshold`` and the other modalities are healthy (no open degradation or sensor
    fault: a modality that carries the decision because the others are masked or
    broken is not dominating, it is covering). A window is *good* when the share is
    below ``threshold - hysteresis``, whatever the others do. Fires after
    ``fire_windows`` bad windows in a row, resolves after ``resolve_windows`` good ones.

    Args:
        threshold: share in (0, 1) above which the modality dominates.
        fire_windows: consecutive bad windows before firing.
        resolve_windows: consecutive good windows before resolving.
        hysteresis: how far below ``threshold`` the share must fall to count as good.
        min_n: samples a window needs to count (``update``'s ``n``).

    Examples:
        >>> import random
        >>> rng = random.Random(11)
        >>> dom = Dominance(threshold=0.6, fire_windows=3, resolve_windows=3, hysteresis=0.05)
        >>> history = []
        >>> for w in range(16):
        ...     level = 0.8 if 3 <= w < 9 else 0.4        # image takes over in windows 3..8
        ...     dom.update(rng.gauss(level, 0.03), others_healthy=True)
        ...     history.append("F" if dom.firing else ".")
        >>> "".join(history)
        '.....FFFFFF.....'
    """

    def __init__(
        self,
        threshold: float = 0.6,
        fire_windows: int = 3,
        resolve_windows: int = 3,
        hysteresis: float = 0.05,
        min_n: int = 1,
    ) -> None:
        if not 0.0 < threshold < 1.0:
            raise DetectorValueError(f"threshold must be in (0, 1), got {threshold!r}")
        if not 0.0 <= hysteresis < threshold:
            raise DetectorValueError(f"hysteresis must be in [0, threshold={threshold}), got {hysteresis!r}")
        self._init_windows(fire_windows, resolve_windows, min_n)
        self.threshold = threshold
        self.hysteresis = hysteresis
        self.reset()

    def update(self, share: float | None, others_healthy: bool, n: int = 1) -> None:
        """One window's mean contribution share of the modality; ``None`` is no evidence."""
        self._changed = False
        if share is None or n < self.min_n:
            return
        _check_finite("share", share)
        self._last = share
        self._step(bad=share > self.threshold and others_healthy, good=share < self.threshold - self.hysteresis)

    @property
    def last(self) -> float | None:
        """The share of the last window that counted."""
        return self._last
