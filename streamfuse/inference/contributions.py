"""Per-prediction, label-free explanation of a fused decision. Pure numpy.

Everything derives from a *subset table*: for every subset ``S`` of the modalities
(a bitmask over the bundle's ``M`` modalities, ``2**M`` columns), ``values[b, S]`` is the
probability the fusion gives row ``b``'s fused label ``ŷ`` when only ``S`` takes part
(the empty set gives the uniform ``1/C``). The worker fills it by calling the fusion on
each subset, so the same code explains UME, weighted and head fusion.

* leave-one-out: ``c_m = max(0, v(P) - v(P \\ {m}))`` over the players ``P`` (the
  modalities in the fusion), normalized to shares;
* exact Shapley values of the game ``v`` over ``P`` (feasible for ``M <= 4``; they sum to
  ``v(P) - v(∅)``).
"""

from __future__ import annotations

from math import factorial

import numpy as np

MAX_SHAPLEY_MODALITIES = 4


def subset_masks(m: int) -> np.ndarray:
    """``[2**m, m]`` bool: row ``s`` says which modalities bitmask ``s`` contains.

    Examples:
        >>> subset_masks(2).astype(int).tolist()
        [[0, 0], [1, 0], [0, 1], [1, 1]]
    """
    s = np.arange(2**m)[:, None]
    return ((s >> np.arange(m)[None, :]) & 1).astype(bool)


def _bits(players: np.ndarray) -> np.ndarray:
    return (players.astype(np.int64) << np.arange(players.shape[1])).sum(axis=1)


def subset_table(fuse, players: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The fused decision and its subset table, from one call of the fusion on every
    subset at once (the full subset's rows are the fusion of each row's players).

    Args:
        fuse: ``fuse(use) -> [K, C]`` probabilities for a ``[K, M]`` bool mask of the
            modalities that take part; it is called once, with ``K = 2**M * B`` rows,
            subset-major (row ``s * B + b`` is row ``b`` under subset ``s``). Rows with no
            modality must give the uniform distribution.
        players: ``[B, M]`` bool, each row's modalities in the fusion.

    Returns:
        ``(fused, values)``: ``[B, C]`` the fusion of each row's players, and ``[B, 2**M]``
        the probability of each row's fused label ``ŷ = argmax(fused)`` per subset (subsets
        reaching outside a row's players are evaluated on their intersection with them).

    Examples:
        >>> import numpy as np
        >>> p = np.array([[[0.9, 0.1], [0.6, 0.4]]])
        >>> def ume(use):
        ...     w = use[..., None]
        ...     k = w.sum(axis=1)
        ...     return np.where(k > 0, (p * w).sum(axis=1) / np.maximum(k, 1), 0.5)
        >>> fused, values = subset_table(ume, np.array([[True, True]]))
        >>> fused.round(2).tolist(), values.round(2).tolist()
        ([[0.75, 0.25]], [[0.5, 0.9, 0.6, 0.75]])
    """
    b, m = players.shape
    masks = subset_masks(m)
    use = (players[None, :, :] & masks[:, None, :]).reshape(-1, m)
    probs = np.asarray(fuse(use)).reshape(2**m, b, -1)
    fused = probs[-1]  # the full subset: each row's players
    return fused, probs[:, np.arange(b), fused.argmax(axis=1)].T.astype(np.float64)


def leave_one_out_shares(values: np.ndarray, players: np.ndarray) -> np.ndarray:
    """Leave-one-out contribution shares.

    Args:
        values: ``[B, 2**M]`` subset table.
        players: ``[B, M]`` bool, the modalities in each row's fusion.

    Returns:
        ``[B, M]``: non-negative, summing to 1 over each row's players (0 elsewhere); when
        no player raises ``ŷ``'s probability, or only one plays, the players share equally.

    Examples:
        >>> import numpy as np
        >>> # UME of (0.9, 0.6, 0.2) for label 0 with C = 2: v(S) = mean over S, v(∅) = 0.5
        >>> p = [0.9, 0.6, 0.2]
        >>> v = [np.mean([p[i] for i in range(3) if s >> i & 1]) if s else 0.5 for s in range(8)]
        >>> leave_one_out_shares(np.array([v]), np.array([[True, True, True]])).round(3).tolist()
        [[0.909, 0.091, 0.0]]
    """
    b, m = players.shape
    full = _bits(players)
    rows = np.arange(b)
    out = np.zeros((b, m))
    for j in range(m):
        without = full & ~(1 << j)
        gain = values[rows, full] - values[rows, without]
        out[:, j] = np.where(players[:, j] & (players.sum(axis=1) > 1), np.maximum(gain, 0.0), 0.0)
    total = out.sum(axis=1, keepdims=True)
    equal = players / np.maximum(players.sum(axis=1, keepdims=True), 1)
    return np.where(total > 0, out / np.where(total > 0, total, 1), equal)


def shapley_values(values: np.ndarray, players: np.ndarray) -> np.ndarray:
    """Exact Shapley values of each row's game ``v`` restricted to its players.

    Args:
        values: ``[B, 2**M]`` subset table.
        players: ``[B, M]`` bool.

    Returns:
        ``[B, M]``; each row sums to ``v(P) - v(∅)``; non-players get 0.

    Raises:
        ValueError: more than :data:`MAX_SHAPLEY_MODALITIES` modalities.

    Examples:
        >>> import numpy as np
        >>> p = [0.9, 0.6, 0.2]
        >>> v = [np.mean([p[i] for i in range(3) if s >> i & 1]) if s else 0.5 for s in range(8)]
        >>> phi = shapley_values(np.array([v]), np.array([[True, True, True]]))
        >>> phi.round(3).tolist(), round(float(phi.sum()), 3)
        ([[0.272, 0.047, -0.253]], 0.067)
    """
    b, m = players.shape
    if m > MAX_SHAPLEY_MODALITIES:
        raise ValueError(f"exact Shapley needs <= {MAX_SHAPLEY_MODALITIES} modalities, got {m}")
    sizes = subset_masks(m).sum(axis=1)  # |S| per bitmask
    # weight[p, k] = k! (p - k - 1)! / p!  for a coalition of k among p players
    weight = np.array([[factorial(k) * factorial(p - k - 1) / factorial(p) if p > k else 0.0
                        for k in range(m + 1)] for p in range(m + 1)])
    out = np.zeros((b, m))
    full = _bits(players)
    n = players.sum(axis=1)  # players per row
    for s in range(2**m):
        in_players = (s & ~full) == 0  # S ⊆ P, per row
        w = weight[n, sizes[s]]
        for j in range(m):
            if s >> j & 1:
                continue
            gain = values[:, s | (1 << j)] - values[:, s]
            out[:, j] += np.where(in_players & players[:, j], w * gain, 0.0)
    return out


def confidence_entropy(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Max probability and entropy (nats) per row of ``[..., C]`` probabilities.

    Examples:
        >>> import numpy as np
        >>> c, h = confidence_entropy(np.array([[0.5, 0.5], [1.0, 0.0]]))
        >>> c.tolist(), h.round(3).tolist()
        ([0.5, 1.0], [0.693, 0.0])
    """
    p = np.clip(probs, 1e-12, 1.0)
    return probs.max(axis=-1), -(p * np.log(p)).sum(axis=-1)
