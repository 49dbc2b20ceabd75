"""Small statistics on plain values (no numpy needed): Wilson bounds, macro-F1."""

from __future__ import annotations

import math
from collections import Counter


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion.

    Examples:
        >>> [round(x, 3) for x in wilson_interval(8, 10)]
        [0.49, 0.943]
        >>> wilson_interval(0, 0)
        (0.0, 1.0)
    """
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def macro_f1(y_true: list[str], y_pred: list[str]) -> float:
    """Macro-averaged F1 over the classes that occur in either list (any hashable,
    sortable labels); 0.0 when both are empty.

    Examples:
        >>> round(macro_f1(["a", "a", "b", "b"], ["a", "b", "b", "b"]), 3)
        0.733
        >>> macro_f1([], [])
        0.0
    """
    classes = sorted(set(y_true) | set(y_pred))
    if not classes:
        return 0.0
    tp = Counter(t for t, p in zip(y_true, y_pred) if t == p)
    true, pred = Counter(y_true), Counter(y_pred)  # tp + fn, tp + fp
    return sum(2 * tp[c] / (true[c] + pred[c]) for c in classes if tp[c]) / len(classes)
