"""Detectors: river-style ``update()`` classes on plain values.

Constructor arguments are public attributes; derived state is private, rebuilt by
``reset()`` and serializable with ``state_dict()`` / ``load_state_dict()`` (checkpointed
by the monitor). Results are read from properties; nothing auto-resets.
"""

from __future__ import annotations

from typing import Any

from streamfuse.monitor.stats import wilson_interval


class AccuracyDegradation:
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
            raise ValueError(f"baseline must be in (0, 1], got {baseline}")
        if not 0.0 <= margin < baseline:
            raise ValueError(f"margin must be in [0, baseline={baseline}), got {margin}")
        if z <= 0 or min_n < 1 or fire_windows < 1 or resolve_windows < 1:
            raise ValueError("z > 0, min_n >= 1, fire_windows >= 1 and resolve_windows >= 1 are required")
        self.baseline = baseline
        self.margin = margin
        self.z = z
        self.min_n = min_n
        self.fire_windows = fire_windows
        self.resolve_windows = resolve_windows
        self.reset()

    @property
    def threshold(self) -> float:
        return self.baseline - self.margin

    def reset(self) -> None:
        self._firing = False
        self._changed = False
        self._bad = 0
        self._good = 0
        self._last: tuple[float, float, float] | None = None  # accuracy, low, high

    def update(self, correct: int, n: int) -> None:
        self._changed = False
        if n < self.min_n:
            return
        acc = correct / n
        low, high = wilson_interval(correct, n, self.z)
        self._last = (acc, low, high)
        bad, good = high < self.threshold, acc >= self.threshold
        self._bad = self._bad + 1 if bad else 0
        self._good = self._good + 1 if good else 0
        if not self._firing and self._bad >= self.fire_windows:
            self._firing, self._changed = True, True
        elif self._firing and self._good >= self.resolve_windows:
            self._firing, self._changed = False, True

    @property
    def firing(self) -> bool:
        return self._firing

    @property
    def changed(self) -> bool:
        """Whether the last ``update`` fired or resolved the alert."""
        return self._changed

    @property
    def last(self) -> tuple[float, float, float] | None:
        """(accuracy, Wilson low, Wilson high) of the last window that counted."""
        return self._last

    def state_dict(self) -> dict[str, Any]:
        return {"firing": self._firing, "bad": self._bad, "good": self._good,
                "last": list(self._last) if self._last else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reset()
        self._firing, self._bad, self._good = bool(state["firing"]), int(state["bad"]), int(state["good"])
        self._last = tuple(state["last"]) if state.get("last") else None
