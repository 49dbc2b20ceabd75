"""The bundle's label-free calibration, fitted on the validation split at training time.

Each validation sample's per-modality answers (the stage-1 models, or the UMT encoders
when those are served) and the fused answer go into
:meth:`streamfuse.monitor.evidence.Calibration.fit`; the tables are stored with each
unit's baseline (``baselines.<unit>.calibration``) so that they travel with the unit
through the registry to the monitor and the workers. Each modality's healthy
signal-spread range (:class:`streamfuse.monitor.spread.SpreadRange`, from the same split's
raw readings) goes with them (``baselines.<unit>.spread``).
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

import torch

from streamfuse.monitor.evidence import FUSED, Calibration
from streamfuse.monitor.spread import SpreadRange

__all__ = ["attach_calibration", "class_recall", "fit_calibration", "fit_spread"]
PRIOR_N = 2.0  # pseudo-samples at the unit's overall accuracy behind each class's recall


def fit_calibration(probs: torch.Tensor, present: torch.Tensor, y: torch.Tensor, fused: torch.Tensor,
                    order: Sequence[str], classes: Sequence[str]) -> Calibration:
    """Fit on one split's outputs.

    Args:
        probs: ``[N, M, C]`` per-modality probabilities; present: ``[N, M]`` bool.
        y: ``[N]`` true class ids; fused: ``[N, C]`` fused probabilities.
        order: the modalities along ``M``; classes: along ``C``.

    Examples:
        >>> p = torch.tensor([[[0.9, 0.1], [0.8, 0.2]], [[0.2, 0.8], [0.1, 0.9]]])
        >>> cal = fit_calibration(p, torch.ones(2, 2, dtype=torch.bool), torch.tensor([0, 1]), p.mean(1),
        ...                       ("image", "audio"), ("ok", "bad"))
        >>> cal.units, round(cal.p_correct("image", 1, "agree", conf=0.95), 2)
        (('audio', 'fused', 'image'), 0.97)
    """
    conf, labels = (t.tolist() for t in probs.float().max(-1))
    have = present.tolist()
    truth = y.cpu().tolist()
    rows = [({m: classes[labels[i][j]] for j, m in enumerate(order) if have[i][j]}, classes[truth[i]],
             {m: conf[i][j] for j, m in enumerate(order) if have[i][j]}) for i in range(len(truth))]
    fused_labels = [classes[c] for c in fused.float().argmax(-1).tolist()]
    keep = [i for i, row in enumerate(rows) if row[0]]
    return Calibration.fit([rows[i] for i in keep], [fused_labels[i] for i in keep])


def class_recall(probs: torch.Tensor, present: torch.Tensor, y: torch.Tensor, order: Sequence[str],
                 classes: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per modality, how often it is right on each true class of one split (smoothed toward
    its overall accuracy by :data:`PRIOR_N` pseudo-samples): the monitor's expected accuracy
    of a window is the mean over its labelled samples' classes, so a window full of a class
    the model finds hard is not a degradation.

    Examples:
        >>> p = torch.tensor([[[0.9, 0.1]], [[0.8, 0.2]], [[0.3, 0.7]], [[0.6, 0.4]]])
        >>> class_recall(p, torch.ones(4, 1, dtype=torch.bool), torch.tensor([0, 0, 1, 1]), ("series",), ("ok", "bad"))
        {'series': {'bad': 0.625, 'ok': 0.875}}
    """
    pred, truth, have = probs.float().argmax(-1), y.cpu(), present.cpu()
    out: dict[str, dict[str, float]] = {}
    for j, m in enumerate(order):
        rows = have[:, j]
        if not bool(rows.any()):
            continue
        right = (pred[rows, j] == truth[rows]).float()
        overall = float(right.mean())
        per = {}
        for c, name in enumerate(classes):
            of_c = truth[rows] == c
            per[name] = round((float(right[of_c].sum()) + PRIOR_N * overall) / (int(of_c.sum()) + PRIOR_N), 6)
        out[m] = dict(sorted(per.items()))
    return out


def fit_spread(spread: Mapping[str, torch.Tensor]) -> dict[str, SpreadRange]:
    """modality -> its healthy signal-spread range, from one split's readings (those with
    too few readings get none).

    Examples:
        >>> fit_spread({"image": torch.arange(10.0, 250.0), "audio": torch.ones(3)})
        {'image': SpreadRange(lo=5.5, hi=496.0, p_out=0.004132231, n=240)}
    """
    fitted = {m: SpreadRange.fit(v.float().tolist()) for m, v in sorted(spread.items())}
    return {m: r for m, r in fitted.items() if r is not None}


def attach_calibration(baselines: MutableMapping[str, Any], cal: Calibration,
                       recall: dict[str, dict[str, float]] | None = None,
                       spread: Mapping[str, SpreadRange] | None = None) -> None:
    """Store each unit's tables (and per-class recall, :func:`class_recall`, and its
    spread range, :func:`fit_spread`) with its baseline (``fused`` with the fusion's); the
    baselines' maps are replaced, not changed (the candidates' records share them)."""
    for unit, base in list(baselines.items()):
        if not isinstance(base, MutableMapping):
            continue
        tables = cal.unit_dict(FUSED if unit == "fused" else unit)
        extra: dict[str, Any] = {"calibration": tables} if tables else {}
        if recall and unit in recall:
            extra["recall"] = recall[unit]
        if spread and unit in spread:
            extra["spread"] = spread[unit].to_dict()
        if extra:
            baselines[unit] = {**base, **extra}
