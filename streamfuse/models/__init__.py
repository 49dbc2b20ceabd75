"""Per-modality models, fusion, bundles and stage-1 training.

Names are imported lazily, so that ``streamfuse.models.metrics`` (pure numpy) can be
used without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ModalityConfig": "config",
    "default_config": "config",
    "DEFAULT_ARCHS": "config",
    "create_model": "encoders",
    "SensorModel": "encoders",
    "count_params": "encoders",
    "batch_tensor": "preprocess",
    "batch_tensor_checked": "preprocess",
    "CheckedBatch": "preprocess",
    "ume": "fusion",
    "FUSION_MODES": "config",
    "top1": "metrics",
    "macro_f1": "metrics",
    "Bundle": "bundle",
    "FusedOutput": "bundle",
    "load_bundle": "bundle",
    "save_bundle": "bundle",
    "read_manifest": "manifest",
    "train_bundle": "train",
    "TrainOptions": "train",
    "EpochReport": "train",
    "resolve_device": "runtime",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
