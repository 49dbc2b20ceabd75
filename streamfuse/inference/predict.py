"""The worker's batch math, between the models and the producer. No I/O, no clock.

One batch goes through four steps, each on whole arrays:

1. :func:`drop_non_finite`: model outputs that are not finite (a reading with extreme
   values the checks let through) are taken out, as if that reading were missing;
2. :func:`masked_matrix`: which modality is masked for which sample (commands);
3. :func:`explain`: fusion, the subset table and from it the contributions, Shapley
   values, confidence, entropy and agreement;
4. :func:`assemble`: one msgpack ``sf.prediction/1`` record per usable sample, built
   straight from the arrays' lists (no per-sample dataclass and ``to_map`` on the hot
   path; ``tests/unit/test_worker_predict.py`` checks the bytes decode to the same
   :class:`~streamfuse.events.Prediction` as the one built field by field).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import msgpack
import numpy as np
import torch

from streamfuse.errors import InvalidEvent
from streamfuse.events import Prediction, Sample
from streamfuse.inference.contributions import (
    MAX_SHAPLEY_MODALITIES,
    confidence_entropy,
    leave_one_out_shares,
    shapley_values,
    subset_table,
)
from streamfuse.models.bundle import Bundle, Encoded


def drop_non_finite(enc: Encoded, modalities: Sequence[str]) -> list[tuple[int, InvalidEvent]]:
    """Take out, in place, every computed (row, modality) whose probabilities, features or
    signal spread are not finite: not computed any more, probabilities zeroed (so they
    cannot leak into a fusion). Returns ``(row, error)`` for the dead-letter topic.

    Examples:
        >>> enc = Encoded(torch.tensor([[[0.5, 0.5], [float("nan"), 0.5]]]), {}, torch.tensor([[True, True]]),
        ...               [], {}, torch.tensor([[1.0, 2.0]]))
        >>> [(row, e.reason, e.modality) for row, e in drop_non_finite(enc, ("image", "series"))]
        [(0, 'non_finite', 'series')]
        >>> enc.computed.tolist(), enc.modality_probs[0, 1].tolist()
        ([[True, False]], [0.0, 0.0])
    """
    ok = torch.isfinite(enc.modality_probs).all(dim=2)
    if enc.signal_std is not None:
        ok &= torch.isfinite(enc.signal_std) | ~enc.computed
    for j, m in enumerate(modalities):
        if m in enc.features:
            ok[:, j] &= torch.isfinite(enc.features[m]).all(dim=1)
    bad = enc.computed & ~ok
    if not bool(bad.any()):
        return []
    enc.computed[bad] = False
    enc.modality_probs[bad] = 0.0
    for j, m in enumerate(modalities):
        if m in enc.features:
            enc.features[m][bad[:, j]] = 0.0
    return [(int(i), InvalidEvent("non_finite", f"the {modalities[j]} model's output is not finite "
                                  "(the reading has extreme values)", modalities[j]))
            for i, j in bad.nonzero().tolist()]


def masked_matrix(state, samples: Sequence[Sample], modalities: Sequence[str]) -> torch.Tensor:
    """``[B, M]`` bool: modality ``m`` is masked for sample ``b`` (a :class:`WorkerState`)."""
    if not state.masks:
        return torch.zeros(len(samples), len(modalities), dtype=torch.bool)
    return torch.tensor([[state.masked_for(m, s) for m in modalities] for s in samples],
                        dtype=torch.bool).reshape(len(samples), len(modalities))


@dataclass
class Explained:
    """One batch's fused decision and its explanation (numpy, rows = samples)."""

    fused: np.ndarray  # [B, C] fused probabilities
    label: np.ndarray  # [B] index of the fused label
    players: np.ndarray  # [B, M] bool, modalities in the fusion
    shares: np.ndarray  # [B, M] leave-one-out contribution shares
    shapley: np.ndarray | None  # [B, M] exact Shapley values (None above MAX_SHAPLEY_MODALITIES)
    confidence: np.ndarray  # [B, M]
    entropy: np.ndarray  # [B, M]
    agreement: np.ndarray  # [B, M] bool, modality label == fused label


def explain(bundle: Bundle, enc: Encoded, masked: torch.Tensor, mode: str) -> Explained:
    """Fuse the computed, unmasked modalities and explain each row's decision.

    Args:
        bundle: serves the fusion (``bundle.fuse``).
        enc: the models' outputs for the batch.
        masked: ``[B, M]`` from :func:`masked_matrix`.
        mode: the fusion mode.
    """
    players = (enc.computed & ~masked).numpy()
    n = players.shape[0]

    def fuse_subsets(subsets: np.ndarray) -> np.ndarray:  # all subsets in one call
        k = subsets.shape[0] // n
        tiled = Encoded(enc.modality_probs.repeat(k, 1, 1), {m: f.repeat(k, 1) for m, f in enc.features.items()},
                        enc.computed.repeat(k, 1), [], {})
        return bundle.fuse(tiled, torch.from_numpy(subsets), mode).numpy()

    fused, values = subset_table(fuse_subsets, players)
    y = fused.argmax(axis=1)
    shapley = shapley_values(values, players) if players.shape[1] <= MAX_SHAPLEY_MODALITIES else None
    probs = enc.modality_probs.numpy()
    conf, ent = confidence_entropy(probs)
    return Explained(fused, y, players, leave_one_out_shares(values, players), shapley, conf, ent,
                     probs.argmax(axis=2) == y[:, None])


@dataclass(frozen=True)
class BatchContext:
    """What every prediction of one batch shares."""

    classes: tuple[str, ...]
    modalities: tuple[str, ...]
    fusion_mode: str
    versions: dict[str, str]
    worker_id: str
    produced_ms: int
    latency_ms: float


def assemble(samples: Sequence[Sample], enc: Encoded, masked: torch.Tensor, ex: Explained,
             ctx: BatchContext) -> tuple[list[tuple[int, bytes]], list[int]]:
    """The prediction records of a batch.

    Returns:
        ``(row, msgpack bytes)`` for each sample with a modality to fuse, and the rows
        with none (for the dead-letter topic, ``no_usable_modality``).
    """
    mods, classes = ctx.modalities, ctx.classes
    computed, players = enc.computed.tolist(), ex.players.tolist()
    probs, fused, masked_l = enc.modality_probs.tolist(), ex.fused.tolist(), masked.tolist()
    shares, conf, ent = ex.shares.tolist(), ex.confidence.tolist(), ex.entropy.tolist()
    agree, stds, label = ex.agreement.tolist(), enc.signal_std.tolist(), ex.label.tolist()
    shapley = ex.shapley.tolist() if ex.shapley is not None else None
    head = {"schema": Prediction.SCHEMA}
    versions, pack = ctx.versions, msgpack.Packer(use_bin_type=True).pack
    every = list(range(len(mods)))
    out, unusable = [], []
    for i, s in enumerate(samples):
        if not any(players[i]):
            unusable.append(i)
            continue
        # the common row has every modality: its columns are the rows of the arrays as they are
        complete = all(computed[i])
        cols = every if complete else [j for j in every if computed[i][j]]
        names = mods if complete else [mods[j] for j in cols]
        pick = None if complete else cols
        fused_in = [(j, mods[j]) for j in cols if players[i][j]]
        readings = s.readings

        # Field order is Prediction's (to_map's), so the bytes are what encode() gives.
        out.append((i, pack({
            **head, "sample_id": s.sample_id, "asset_id": s.asset_id, "ts_ms": s.ts_ms, "classes": classes,
            "fused_probs": fused[i], "fused_label": classes[label[i]], "fusion_mode": ctx.fusion_mode,
            "modality_probs": _present(names, probs[i], pick), "line_id": s.line_id,
            "missing": [m for j, m in enumerate(mods) if not computed[i][j]],
            "masked": [mods[j] for j in cols if masked_l[i][j]],
            "contributions": {m: shares[i][j] for j, m in fused_in},
            "shapley": {m: shapley[i][j] for j, m in fused_in} if shapley is not None else {},
            "confidence": _present(names, conf[i], pick), "entropy": _present(names, ent[i], pick),
            "agreement": _present(names, agree[i], pick), "signal_std": _present(names, stds[i], pick),
            "digest": {m: zlib.crc32(readings[m].payload) for m in names},
            "skew_ms": {m: readings[m].ts_ms - s.ts_ms for m in names},
            "versions": versions, "worker_id": ctx.worker_id, "produced_ms": ctx.produced_ms,
            "latency_ms": ctx.latency_ms,
        })))
    return out, unusable


def _present(names: Sequence[str], row: list, cols: list[int] | None) -> dict:
    """``{modality: value}`` of one row's present modalities (``cols``: their columns;
    None when every modality is present).

    Examples:
        >>> _present(("image", "audio"), [0.5, 0.25], None), _present(("audio",), [0.5, 0.25], [1])
        ({'image': 0.5, 'audio': 0.25}, {'audio': 0.25})
    """
    return dict(zip(names, row if cols is None else [row[j] for j in cols]))
