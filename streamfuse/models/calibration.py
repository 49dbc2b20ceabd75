"""The bundle's label-free calibration, fitted on the validation split at training time.

Each validation sample's per-modality answers (the stage-1 models, or the UMT encoders
when those are served) and the fused answer go into
:meth:`streamfuse.monitor.evidence.Calibration.fit`; the tables are stored with each
unit's baseline (``baselines.<unit>.calibration``) so that they travel with the unit
through the registry to the monitor and the workers.
"""

from __future__ import annotations

from collections.abc import MutableMapping, Sequence
from typing import Any

import torch

from streamfuse.monitor.evidence import FUSED, Calibration

__all__ = ["attach_calibration", "fit_calibration"]


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
        >>> cal.units, round(cal.p_correct("image", 1, "agree"), 2)
        (('audio', 'fused', 'image'), 0.92)
    """
    labels = probs.float().argmax(-1).tolist()
    have = present.tolist()
    truth = y.cpu().tolist()
    rows = [({m: classes[labels[i][j]] for j, m in enumerate(order) if have[i][j]}, classes[truth[i]])
            for i in range(len(truth))]
    fused_labels = [classes[c] for c in fused.float().argmax(-1).tolist()]
    keep = [i for i, (lab, _) in enumerate(rows) if lab]
    return Calibration.fit([rows[i] for i in keep], [fused_labels[i] for i in keep])


def attach_calibration(baselines: MutableMapping[str, Any], cal: Calibration) -> None:
    """Store each unit's tables with its baseline (``fused`` with the fusion's); the
    baselines' maps are replaced, not changed (the candidates' records share them)."""
    for unit, base in list(baselines.items()):
        tables = cal.unit_dict(FUSED if unit == "fused" else unit)
        if tables and isinstance(base, MutableMapping):
            baselines[unit] = {**base, "calibration": tables}
