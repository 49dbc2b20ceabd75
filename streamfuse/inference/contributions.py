"""Per-prediction, label-free explanation of a fused decision.

Pure numpy. For the modalities in the fusion, leave-one-out contribution
``c_m = max(0, p_fused[y] - p_without_m[y])`` of the fused label ``y``, normalized to
shares; with the UME fusion ``p_without_m`` is the mean of the others.
"""

from __future__ import annotations

import numpy as np


def leave_one_out_shares(probs: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Contribution shares of each modality to each fused decision (UME fusion).

    Args:
        probs: ``[B, M, C]`` per-modality class probabilities.
        present: ``[B, M]`` bool, modalities taking part in the fusion.

    Returns:
        ``[B, M]`` shares: non-negative, summing to 1 over the present modalities of each
        row (0 for absent ones; a row with none present is all 0). When no modality
        raises the fused label's probability, the present ones share equally.

    Examples:
        >>> import numpy as np
        >>> p = np.array([[[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]]])
        >>> leave_one_out_shares(p, np.array([[True, True, False]])).round(3).tolist()
        [[1.0, 0.0, 0.0]]
        >>> leave_one_out_shares(p, np.array([[True, True, True]])).round(3).tolist()
        [[0.909, 0.091, 0.0]]
    """
    present = present.astype(bool)
    w = present.astype(probs.dtype)[..., None]  # [B, M, 1]
    k = w.sum(axis=1)  # [B, 1]
    total = (probs * w).sum(axis=1)  # [B, C]
    fused = total / np.maximum(k, 1)
    y = fused.argmax(axis=1)  # [B]
    rows = np.arange(probs.shape[0])
    p_y = fused[rows, y]  # [B]
    # Without m: (total - p_m) / (k - 1), only defined when k > 1.
    p_m_y = probs[rows, :, y]  # [B, M]
    k1 = k - 1  # [B, 1]
    without = (total[rows, y][:, None] - p_m_y) / np.maximum(k1, 1)
    contrib = np.where(present & (k1 > 0), np.maximum(0.0, p_y[:, None] - without), 0.0)
    s = contrib.sum(axis=1, keepdims=True)
    equal = present / np.maximum(present.sum(axis=1, keepdims=True), 1)
    return np.where(s > 0, contrib / np.where(s > 0, s, 1), equal)


def confidence_entropy(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Max probability and entropy (nats) per row of ``[..., C]`` probabilities."""
    p = np.clip(probs, 1e-12, 1.0)
    return probs.max(axis=-1), -(p * np.log(p)).sum(axis=-1)
