"""Classification metrics on integer class ids. Pure numpy: no torch, no I/O."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from streamfuse.errors import ModelError
from streamfuse.monitor.stats import macro_f1 as _macro_f1

ArrayLike = Sequence[int] | np.ndarray


def _pair(y_true: ArrayLike, y_pred: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    t = np.asarray(y_true, dtype=np.int64).reshape(-1)
    p = np.asarray(y_pred, dtype=np.int64).reshape(-1)
    if t.shape != p.shape:
        raise ModelError(f"y_true has {t.size} labels but y_pred has {p.size}")
    return t, p


def _ids(y_true: ArrayLike, y_pred: ArrayLike, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    t, p = _pair(y_true, y_pred)
    if t.size and (min(t.min(), p.min()) < 0 or max(t.max(), p.max()) >= n_classes):
        raise ModelError(f"class ids must be in 0..{n_classes - 1}")
    return t, p


def top1(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Top-1 accuracy: the fraction of predictions equal to the label.

    Returns:
        A float in [0, 1]; NaN when there are no labels.

    Raises:
        ModelError: if the two sequences differ in length.

    Examples:
        >>> top1([0, 1, 2, 2], [0, 1, 1, 2])
        0.75
        >>> top1([], [])
        nan
    """
    t, p = _pair(y_true, y_pred)
    return float((t == p).mean()) if t.size else float("nan")


def confusion(y_true: ArrayLike, y_pred: ArrayLike, n_classes: int) -> np.ndarray:
    """``[n_classes, n_classes]`` counts; rows are true classes, columns predictions.

    Raises:
        ModelError: on a length mismatch or a class id outside ``0..n_classes-1``.

    Examples:
        >>> confusion([0, 1, 1], [0, 1, 0], 2).tolist()
        [[1, 0], [1, 1]]
    """
    t, p = _ids(y_true, y_pred, n_classes)
    out = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(out, (t, p), 1)
    return out


def macro_f1(y_true: ArrayLike, y_pred: ArrayLike, n_classes: int) -> float:
    """Unweighted mean of the per-class F1 scores, on class ids checked against
    ``n_classes``; the rule is the monitor's, :func:`streamfuse.monitor.stats.macro_f1`.

    Classes that occur neither in ``y_true`` nor in ``y_pred`` are left out of the mean
    (their F1 is undefined): a window in which a rare fault never happened is not
    penalized for it. A class that is predicted but never true, or true but never
    predicted, counts with F1 = 0.

    Returns:
        A float in [0, 1]; 0.0 when there are no labels.

    Raises:
        ModelError: on a length mismatch or a class id outside ``0..n_classes-1``.

    Examples:
        >>> macro_f1([0, 0, 1, 1], [0, 0, 1, 1], 3)
        1.0
        >>> round(macro_f1([0, 0, 1, 1], [0, 1, 1, 1], 2), 4)  # F1 = 2/3 and 4/5
        0.7333
        >>> macro_f1([0, 0], [0, 2], 3)  # class 2 predicted, never true: F1 0
        0.3333333333333333
        >>> macro_f1([], [], 3)
        0.0
    """
    t, p = _ids(y_true, y_pred, n_classes)
    return _macro_f1(t.tolist(), p.tolist())
