"""Per-modality models, fusion (ume / weighted / head), bundles, datasets and two-stage training.

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
    "FusionConfig": "fusion",
    "FusionSet": "fusion",
    "FusionUnit": "fusion",
    "top1": "metrics",
    "macro_f1": "metrics",
    "Bundle": "bundle",
    "Encoded": "outputs",
    "FusedOutput": "outputs",
    "LoadedUnit": "outputs",
    "load_bundle": "bundle_io",
    "save_bundle": "bundle_io",
    "read_manifest": "manifest",
    "train_bundle": "train",
    "TrainConfig": "train",
    "TrainOptions": "train",
    "FusionOptions": "train",
    "EpochReport": "train",
    "resolve_device": "runtime",
    "Dataset": "dataset",
    "DatasetError": "dataset",
    "load_dataset": "dataset",
    "export_sim": "dataset",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
