"""The detectors' common base: validation helpers, hysteresis streaks, serializable state.

Pure logic: plain values in; no I/O, no clock.
"""

from __future__ import annotations

import math
from typing import Any

from streamfuse.errors import StreamfuseError


class DetectorValueError(StreamfuseError, ValueError):
    """A detector argument or input outside its valid range; the message names the value
    and the range. (Also a ``ValueError``, as river's detectors raise.)"""


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise DetectorValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _check_counts(events: int, n: int, what: str = "events") -> None:
    if n < 0 or events < 0 or events > n:
        raise DetectorValueError(f"need 0 <= {what} <= n, got {what}={events}, n={n}")


def _check_finite(name: str, value: float) -> None:
    if not math.isfinite(value):
        raise DetectorValueError(f"{name} must be a finite number, got {value!r}")


def _check_range(name: str, value: Any, low: float, high: float, *, low_open: bool = False,
                 high_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        span = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise DetectorValueError(f"{name} must be in {span}, got {value!r}")


def _check_positive(name: str, value: Any) -> None:
    if not value > 0:
        raise DetectorValueError(f"{name} must be > 0, got {value!r}")


def _hysteresis(value: float | None, limit_name: str, limit: float, default: float, default_name: str) -> float:
    """``value`` checked to lie in ``[0, limit]``, or ``default`` for None."""
    if value is None:
        return default
    if not 0.0 <= value <= limit:
        raise DetectorValueError(f"hysteresis must be in [0, {limit_name}={limit}], or None for {default_name}, "
                                 f"got {value!r}")
    return value


class Detector:
    """The base of every detector: window counts, hysteresis streaks, the last value
    that counted, and their serialization.

    Subclasses validate their own arguments, call :meth:`_init_windows`, and keep their
    extra state in :meth:`_extra_state` / :meth:`_load_extra` (the default is ``last``).
    """

    fire_windows: int
    resolve_windows: int
    min_n: int

    def _init_windows(self, fire_windows: int, resolve_windows: int, min_n: int) -> None:
        _check_int("fire_windows", fire_windows, 1)
        _check_int("resolve_windows", resolve_windows, 1)
        _check_int("min_n", min_n, 1)
        self.fire_windows = fire_windows
        self.resolve_windows = resolve_windows
        self.min_n = min_n

    def reset(self) -> None:
        """Forget everything learned (the arguments stay)."""
        self._firing = False
        self._changed = False
        self._bad = 0
        self._good = 0
        self._last: Any = None

    def _step(self, bad: bool, good: bool) -> None:
        self._bad = self._bad + 1 if bad else 0
        self._good = self._good + 1 if good else 0
        if not self._firing and self._bad >= self.fire_windows:
            self._firing, self._changed = True, True
        elif self._firing and self._good >= self.resolve_windows:
            self._firing, self._changed = False, True

    @property
    def firing(self) -> bool:
        """Whether the alert is open."""
        return self._firing

    @property
    def changed(self) -> bool:
        """Whether the last ``update`` fired or resolved the alert."""
        return self._changed

    @property
    def last(self) -> Any:
        """The value(s) of the last window that counted (see the subclass)."""
        return self._last

    def state_dict(self) -> dict[str, Any]:
        """The learned state as plain JSON-able values."""
        return {"firing": self._firing, "bad": self._bad, "good": self._good, **self._extra_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`."""
        self.reset()
        self._firing, self._bad, self._good = bool(state["firing"]), int(state["bad"]), int(state["good"])
        self._load_extra(state)

    def _extra_state(self) -> dict[str, Any]:
        last = self._last
        return {"last": list(last) if isinstance(last, tuple) else last}

    def _load_extra(self, state: dict[str, Any]) -> None:
        last = state.get("last")
        self._last = tuple(last) if isinstance(last, list) else last


_Hysteresis = Detector  # the old private name
