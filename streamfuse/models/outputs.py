"""What a :class:`~streamfuse.models.bundle.Bundle` returns, and what it swaps in.

Plain named tuples of CPU tensors (re-exported by :mod:`streamfuse.models.bundle`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from streamfuse.errors import InvalidEvent
from streamfuse.models.encoders import SensorModel
from streamfuse.models.fusion import FusionUnit

__all__ = ["CheckedProbs", "Encoded", "FusedOutput", "LoadedUnit"]


class CheckedProbs(NamedTuple):
    """Probabilities ``[n_good, C]`` for the readings that decoded; see ``CheckedBatch``."""

    probs: torch.Tensor
    indices: list[int]
    errors: list[tuple[int, InvalidEvent]]


class FusedOutput(NamedTuple):
    """Output of :meth:`Bundle.predict` for ``B`` samples and the bundle's ``M`` modalities.

    Attributes:
        probs: ``[B, C]`` fused probabilities (uniform where nothing was present).
        modality_probs: ``[B, M, C]``; rows of absent modalities are zero.
        present: ``[B, M]`` bool, the modalities that were fused.
        errors: ``(sample position, error)`` for readings that failed to decode.
    """

    probs: torch.Tensor
    modality_probs: torch.Tensor
    present: torch.Tensor
    errors: list[tuple[int, InvalidEvent]]


class Encoded(NamedTuple):
    """Every modality's output for ``B`` samples (:meth:`Bundle.encode`); all on the CPU.

    Attributes:
        modality_probs: ``[B, M, C]`` float32; rows not computed are zero.
        features: modality -> ``[B, D_m]`` float32 pre-logit features (zeros where not computed).
        computed: ``[B, M]`` bool: the reading was there, decoded and ran.
        errors: ``(sample position, error)`` for readings that failed to decode.
        seconds: modality -> wall time spent decoding and running it.
        signal_std: ``[B, M]`` float32, each reading's signal spread (``CheckedBatch``);
            NaN where not computed.
    """

    modality_probs: torch.Tensor
    features: dict[str, torch.Tensor]
    computed: torch.Tensor
    errors: list[tuple[int, InvalidEvent]]
    seconds: dict[str, float]
    signal_std: torch.Tensor | None = None


class LoadedUnit(NamedTuple):
    """One unit loaded on its own (``Registry.load_unit``), for :meth:`Bundle.with_unit`.

    Attributes:
        unit: a modality or ``"fusion"``.
        version: the unit's version id.
        module: a :class:`SensorModel` (eval, on the device) or a :class:`FusionUnit`.
        baseline: its validation metrics (``top1``, ``macro_f1``, ``n``).
        manifest: the unit's manifest.
    """

    unit: str
    version: str
    module: SensorModel | FusionUnit
    baseline: dict[str, Any]
    manifest: dict[str, Any]
