"""Fusion regression: the fused decision less accurate than a reference on the same
labelled samples, by a paired test. Pure logic."""

from __future__ import annotations

import math

from streamfuse.monitor.base import Detector, DetectorValueError, _check_counts, _check_positive, _hysteresis


def paired_difference_interval(b: int, c: int, n: int, z: float = 1.96) -> tuple[float, float, float]:
    """Agresti–Min interval for the difference of two paired proportions.

    On ``n`` samples judged by two classifiers, ``b`` is how many only the first got
    wrong and ``c`` how many only the second got wrong; the difference of the second's
    accuracy minus the first's is ``(b - c) / n``. Adding ½ to each cell of the 2×2
    table before the Wald interval (Agresti & Min, 2005) keeps its coverage near the
    nominal level even for small or zero discordant counts.

    Returns:
        (point difference, lower bound, upper bound), the bounds clipped to [-1, 1].

    Examples:
        >>> [round(v, 3) for v in paired_difference_interval(b=30, c=5, n=200)]
        [0.125, 0.068, 0.179]
        >>> [round(v, 3) for v in paired_difference_interval(b=0, c=0, n=50)]
        [0.0, -0.038, 0.038]
    """
    if n <= 0:
        return 0.0, -1.0, 1.0
    pb, pc = (b + 0.5) / (n + 2), (c + 0.5) / (n + 2)
    diff = pb - pc
    half = z * math.sqrt(max(0.0, pb + pc - diff * diff) / (n + 2))
    return (b - c) / n, max(-1.0, diff - half), min(1.0, diff + half)


class FusionRegression(Detector):
    """The fused decision less accurate than a reference on the same labelled samples,
    with statistical confidence. The reference is the better of the best single
    modality and the Uni-Modal Ensemble (UME) on that window.

    Fused and reference are judged on the *same* samples, so the test is paired: only
    the discordant samples carry information (``b``: the reference right and the fused
    label wrong; ``c``: the reverse), and the difference in accuracy is
    ``d = (b - c) / n``. A window is *bad* when the lower bound of the Agresti–Min
    interval of ``d`` (:func:`paired_difference_interval`) is above ``margin``: the
    fused decision is worse by more than the margin with confidence (one-sided level
    ``1 - Φ(-z)``, 97.5 % at ``z = 1.96``). A window is *good* when the point ``d`` is
    at or below ``margin - hysteresis`` (by default ``d <= 0``: the fused decision at
    least as accurate as the reference), so that a fusion a little worse than the margin
    does not resolve and re-fire on every lucky window.

    Pass ``discordant = b + c`` (samples on which exactly one of the two is right). When
    it is not known, the largest count that the two accuracies allow is assumed; that
    is the widest interval, so the test stays valid (never fires more easily) but is
    less powerful.

    The reference is the best of several candidates chosen on the same window, which
    flatters it a little (the winner's curse); the margin and ``fire_windows``
    consecutive windows absorb that. For strict control with ``k`` candidates, use the
    Bonferroni quantile (``z = 2.39`` for ``k = 3`` at one-sided 2.5 %).

    Args:
        margin: tolerated accuracy gap, in [0, 1).
        z: normal quantile of the bound.
        min_n: labelled samples a window needs to count.
        fire_windows: consecutive bad windows before firing.
        resolve_windows: consecutive good windows before resolving.
        hysteresis: how far below ``margin`` the point gap must fall to count as good,
            in [0, margin]; ``None`` is ``margin``.

    Examples:
        >>> import random
        >>> rng = random.Random(1)
        >>> reg = FusionRegression(margin=0.02, min_n=20)
        >>> history = []
        >>> for w in range(12):
        ...     drop = 0.3 if 4 <= w < 8 else 0.03       # a bad fusion head in windows 4..7
        ...     pairs = []                                # (reference right, fused right) per sample
        ...     for _ in range(80):
        ...         r = rng.random() < 0.9
        ...         pairs.append((r, r and rng.random() > drop or not r and rng.random() < 0.3))
        ...     ref, fused = sum(r for r, _ in pairs), sum(f for _, f in pairs)
        ...     reg.update(fused, ref, 80, discordant=sum(r != f for r, f in pairs))
        ...     history.append("F" if reg.firing else ".")
        >>> "".join(history)
        '.....FFFF...'
    """

    def __init__(
        self,
        margin: float = 0.02,
        z: float = 1.96,
        min_n: int = 30,
        fire_windows: int = 2,
        resolve_windows: int = 2,
        hysteresis: float | None = None,
    ) -> None:
        if not 0.0 <= margin < 1.0:
            raise DetectorValueError(f"margin must be in [0, 1), got {margin!r}")
        hysteresis = _hysteresis(hysteresis, "margin", margin, margin, "margin")
        _check_positive("z", z)
        self._init_windows(fire_windows, resolve_windows, min_n)
        self.margin = margin
        self.z = z
        self.hysteresis = hysteresis
        self.reset()

    def update(self, fused_correct: int, reference_correct: int, n: int, discordant: int | None = None) -> None:
        """One window: ``n`` labelled samples, how many the fused decision and the
        reference got right, and on how many exactly one of them was right."""
        self._changed = False
        _check_counts(fused_correct, n, "fused_correct")
        _check_counts(reference_correct, n, "reference_correct")
        gap = reference_correct - fused_correct  # = b - c
        # c (fused right, reference wrong) can be at most min(fused right, reference wrong).
        widest = abs(gap) + 2 * min(fused_correct, n - reference_correct, reference_correct, n - fused_correct)
        if discordant is None:
            discordant = widest
        elif not (abs(gap) <= discordant <= widest and (discordant - gap) % 2 == 0):
            raise DetectorValueError(f"discordant={discordant} is impossible with fused_correct={fused_correct}, "
                             f"reference_correct={reference_correct}, n={n}: it must be in "
                             f"[{abs(gap)}, {widest}] with the parity of {abs(gap)}")
        if n < self.min_n:
            return
        b, c = (discordant + gap) // 2, (discordant - gap) // 2
        self._last = paired_difference_interval(b, c, n, self.z)
        diff, low, _ = self._last
        self._step(bad=low > self.margin, good=diff <= self.margin - self.hysteresis)

    @property
    def last(self) -> tuple[float, float, float] | None:
        """(reference minus fused accuracy, lower bound, upper bound) of the last window that counted."""
        return self._last

