"""Label-free evidence from the reading itself: its signal spread against the range the
validation split showed.

Agreement (:mod:`streamfuse.monitor.evidence`) cannot see a fogged camera while the
machine sits in the one class the camera is stuck on: then it agrees. What the fog
cannot hide is the picture: its grey-level spread falls far below any healthy frame's
(measured on the demo plant: healthy 10.8-55.5, fog 1.2-4.5, dark 0.5-1.7; a healthy
microphone 0.015-0.107, one drowned in noise 0.20-0.35). Every prediction carries that
spread per reading (``Prediction.signal_std``), so it costs nothing to judge.

A :class:`SpreadRange` per modality is fitted on the validation split at training time
and travels with the unit's baseline (``baselines.<unit>.spread``), like the calibration:
``[LOW_FACTOR x q, HIGH_FACTOR x Q]`` of the split's :data:`QUANTILE` and ``1 - QUANTILE``
quantiles — wide margins, because lighting and gain vary more in a plant than in a
validation split. Its evidence is a Bernoulli log-likelihood ratio per reading: a broken
sensor reads out of range at least :data:`BROKEN_OUT_RATE` of the time, a healthy one at
the (smoothed) rate the split showed, ``p_out``. An out-of-range reading adds
``ln(BROKEN_OUT_RATE / p_out)`` (about 3.2 nats for 240 validation samples), one in range
``ln((1 - BROKEN_OUT_RATE) / (1 - p_out))`` (about -0.1), so the sequential detectors'
false-alarm budget still holds (the ratio's mean under the healthy rate is 1) and a fault
that leaves the spread alone (a bad model version) is slowed by a tenth of a nat per
reading only.

Pure: plain numbers in, plain numbers out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from streamfuse.errors import ConfigError

QUANTILE = 0.005  # the range's edges start from the split's 0.5 % and 99.5 % quantiles
LOW_FACTOR, HIGH_FACTOR = 0.5, 2.0  # ... and reach half the low one and twice the high one
BROKEN_OUT_RATE = 0.1  # the alternative: a broken sensor reads out of range at least this often
MIN_SAMPLES = 20  # fewer validation readings fit no range


@dataclass(frozen=True)
class SpreadRange:
    """One modality's healthy signal-spread range and how often a healthy reading leaves it.

    Examples:
        >>> r = SpreadRange.fit([10.0 + i % 40 for i in range(240)])
        >>> r.lo, r.hi, r.n, round(r.p_out, 4)
        (5.0, 98.0, 240, 0.0041)
        >>> r.out(3.0), r.out(30.0), round(r.llr(3.0), 2), round(r.llr(30.0), 2)
        (True, False, 3.19, -0.1)
        >>> SpreadRange.from_dict(r.to_dict()) == r
        True
        >>> SpreadRange.fit([1.0] * 5) is None, SpreadRange.fit([0.0] * 40) is None
        (True, True)
    """

    lo: float
    hi: float
    p_out: float  # smoothed share of the validation readings outside [lo, hi]
    n: int

    @classmethod
    def fit(cls, values: Sequence[float]) -> SpreadRange | None:
        """The range of one modality's validation spreads; None with fewer than
        :data:`MIN_SAMPLES` finite values or none above zero."""
        xs = sorted(v for v in values if math.isfinite(v))
        if len(xs) < MIN_SAMPLES or xs[-1] <= 0:
            return None
        k = min(len(xs) - 1, int(QUANTILE * len(xs)))
        lo, hi = LOW_FACTOR * xs[k], HIGH_FACTOR * xs[len(xs) - 1 - k]
        outside = sum(not lo <= v <= hi for v in xs)
        return cls(round(lo, 9), round(hi, 9), round((outside + 1) / (len(xs) + 2), 9), len(xs))

    def out(self, value: float) -> bool:
        return not self.lo <= value <= self.hi

    def llr(self, value: float) -> float:
        """Log-likelihood ratio of one reading's spread, broken vs healthy."""
        q = max(BROKEN_OUT_RATE, self.p_out)
        if self.out(value):
            return math.log(q / self.p_out)
        return math.log((1 - q) / (1 - self.p_out))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> SpreadRange:
        """Inverse of :meth:`to_dict`.

        Raises:
            ConfigError: a field missing, or values out of range (0 <= lo < hi, p_out in (0, 1)).
        """
        try:
            r = cls(float(data["lo"]), float(data["hi"]), float(data["p_out"]), int(data["n"]))
        except (KeyError, TypeError, ValueError):
            raise ConfigError(f"a spread range is {{'lo', 'hi', 'p_out', 'n'}}, got {data!r}; "
                              "retrain the bundle") from None
        if not (0 <= r.lo < r.hi < math.inf and 0 < r.p_out < 1 and r.n >= 1):
            raise ConfigError(f"spread range {data!r} is out of range (0 <= lo < hi, p_out in (0, 1), n >= 1); "
                              "retrain the bundle")
        return r


def ranges_from_baselines(baselines: Mapping[str, Any]) -> dict[str, SpreadRange]:
    """modality -> its range, from the baselines that carry one (``baselines.<unit>.spread``)."""
    return {m: SpreadRange.from_dict(b["spread"]) for m, b in baselines.items()
            if isinstance(b, Mapping) and b.get("spread")}


def spread_evidence(ranges: Mapping[str, SpreadRange], spread: Mapping[str, float]) -> dict[str, float]:
    """modality -> evidence LLR of one sample's readings (those with a range and a finite spread).

    Examples:
        >>> ranges = {"image": SpreadRange(5.0, 98.0, 0.004, 240)}
        >>> {m: round(v, 2) for m, v in spread_evidence(ranges, {"image": 2.0, "audio": 0.1}).items()}
        {'image': 3.22}
    """
    return {m: ranges[m].llr(v) for m, v in spread.items() if m in ranges and math.isfinite(v)}
