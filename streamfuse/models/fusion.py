"""Fusion of per-modality class probabilities. Pure torch, no I/O.

The default, and the fallback every learned fusion must beat on validation, is the
Uni-Modal Ensemble (:func:`ume`): the mean of the present modalities' probabilities.
"""

from __future__ import annotations

import torch

from streamfuse.errors import ModelError
from streamfuse.models.config import FUSION_MODES

__all__ = ["FUSION_MODES", "ume"]


def ume(probs: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Uni-Modal Ensemble: average the probabilities of the modalities present.

    Absent modalities (missing, undecodable or masked) are left out and the mean is
    taken over the others, then renormalized to sum to 1. Their rows of ``probs`` are
    ignored entirely, so they may hold anything (zeros, NaN). A row with *no* modality
    present gets the uniform distribution ``1 / C``: "no evidence", never a made-up
    class; callers that must not predict in that case check ``present.any(1)``.

    Args:
        probs: ``[B, M, C]`` per-modality class probabilities.
        present: ``[B, M]`` bool, True where modality ``m`` of sample ``b`` counts.

    Returns:
        ``[B, C]`` fused probabilities, in ``probs``' dtype (computed in float32).

    Raises:
        ModelError: if the shapes do not match.

    Examples:
        >>> p = torch.tensor([[[0.75, 0.25], [0.5, 0.5]], [[0.75, 0.25], [0.5, 0.5]]])
        >>> ume(p, torch.tensor([[True, True], [False, True]])).tolist()
        [[0.625, 0.375], [0.5, 0.5]]
        >>> ume(p[:1], torch.tensor([[False, False]])).tolist()
        [[0.5, 0.5]]
    """
    if probs.dim() != 3 or present.shape != probs.shape[:2]:
        shapes = f"{list(probs.shape)} and {list(present.shape)}"
        raise ModelError(f"ume needs probs [B, M, C] and present [B, M]; got {shapes}")
    mask = present.to(device=probs.device, dtype=torch.bool).unsqueeze(-1)
    p = torch.where(mask, probs.float(), torch.zeros((), device=probs.device))
    total = p.sum(dim=1)  # [B, C]
    norm = total.sum(dim=-1, keepdim=True)
    uniform = torch.full_like(total, 1.0 / probs.shape[-1])
    fused = torch.where(norm > 0, total / norm.clamp_min(torch.finfo(torch.float32).tiny), uniform)
    return fused.to(probs.dtype)
