"""Bring your own trained model: a per-modality unit from an architecture name, safetensors
weights and a preprocessing JSON (``streamfuse models import-unit``).

Everything is checked before anything is written: the weights are whole safetensors (a
pickle is refused), the preprocessing JSON is a valid
:class:`~streamfuse.models.config.ModalityConfig` for the modality, the tensors are
exactly those of the architecture (names and shapes; the classifier's rows must match
the classes), a streamfuse-written file's own preprocessing agrees with the JSON, and a
forward pass on a probe input gives finite ``[B, classes]`` logits. Optionally the unit
is scored on a dataset's validation split, which becomes its baseline. Every error names
the file at fault and what to do.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from streamfuse.clock import now_ms
from streamfuse.errors import ModelError
from streamfuse.events import MODALITIES
from streamfuse.models.bundle_io import weights_digest, write_weights
from streamfuse.models.config import ModalityConfig
from streamfuse.models.encoders import SensorModel, create_model
from streamfuse.models.preprocess import example_input
from streamfuse.models.safefile import inspect_safetensors

__all__ = ["build_imported", "import_unit"]
# Fields that change what the model sees; a streamfuse-written file records them.
PREPROCESSING = ("image_size", "mean", "std", "sample_rate", "n_fft", "hop_length", "n_mels", "clip_samples",
                 "series_len", "in_channels")


def _read_config(modality: str, arch: str, path: Path) -> ModalityConfig:
    if modality not in MODALITIES:
        raise ModelError(f"unknown modality {modality!r}; valid: {', '.join(MODALITIES)}")
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        example = '{"classes": ["ok", "fault"], "image_size": 64}'
        raise ModelError(f"preprocessing JSON {path} is unreadable ({exc}); write a JSON map with classes and the "
                         f"preprocessing fields, e.g. {example}", path) from None
    if not isinstance(data, dict):
        raise ModelError(f"preprocessing JSON {path} must be a map of ModalityConfig fields", path)
    for key, want in (("modality", modality), ("arch", arch)):
        if data.setdefault(key, want) != want:
            raise ModelError(f"preprocessing JSON {path} says {key} {data[key]!r}, the command {want!r}; "
                             "make them agree", path)
    data.pop("version", None)
    try:
        return ModalityConfig.from_dict(data)
    except ModelError as exc:
        raise ModelError(f"preprocessing JSON {path}: {exc}", path) from None


def _file_config(weights: Path) -> dict[str, Any] | None:
    """The ModalityConfig a streamfuse-written weights file carries in its metadata, if any."""
    try:
        with safe_open(str(weights), "pt") as f:
            meta = f.metadata() or {}
        return json.loads(meta["config"]) if "config" in meta else None
    except (SafetensorError, OSError, ValueError):
        return None


def _check_tensors(model: SensorModel, state: dict[str, torch.Tensor], weights: Path, pre: Path) -> dict[str, Any]:
    """Map the file's keys onto ``model.net`` and explain the first disagreement."""
    cfg = model.sf_config
    net_state = {k[4:]: v for k, v in state.items() if k.startswith("net.")} if any(
        k.startswith("net.") for k in state) else state
    own = model.net.state_dict()
    missing, extra = sorted(set(own) - set(net_state)), sorted(set(net_state) - set(own))
    if missing or extra:
        raise ModelError(f"{weights} is not a {cfg.arch!r} checkpoint: {len(missing)} tensors missing (e.g. "
                         f"{missing[:2]}), {len(extra)} unexpected (e.g. {extra[:2]}); export the weights of that "
                         "architecture, or pass the --arch they were trained with", weights)
    clf = {n for n, p in model.net.named_parameters()
           if any(p is q for q in model.net.get_classifier().parameters())}
    for name, want in own.items():
        got = net_state[name].shape
        if got == want.shape:
            continue
        if name in clf:
            raise ModelError(f"{weights} has a {got[0]}-class classifier ({name} {list(got)}), but {pre} lists "
                             f"{cfg.num_classes} classes {list(cfg.classes)}; list the classes the model was "
                             "trained on, in its logit order", weights)
        raise ModelError(f"{pre} disagrees with {weights}: tensor {name} is {list(got)} in the weights, "
                         f"{list(want.shape)} for this preprocessing (in_channels {cfg.in_channels}); fix the "
                         "preprocessing JSON to what the model was trained with", pre)
    return net_state


def build_imported(modality: str, arch: str, weights: str | Path, preprocessing: str | Path) -> SensorModel:
    """Validate the three inputs and return the model (eval, CPU, version set).

    Raises:
        ModelError: naming the file at fault and the fix (see the module docstring).
    """
    weights, pre = Path(weights), Path(preprocessing)
    inspect_safetensors(weights)  # refuses pickles, truncated and foreign files first
    cfg = _read_config(modality, arch, pre)
    recorded = _file_config(weights)
    if recorded is not None:
        diff = {k: (recorded.get(k), v) for k, v in cfg.to_dict().items()
                if k in PREPROCESSING and k in recorded and recorded[k] != v}
        if diff:
            raise ModelError(f"{pre} disagrees with the preprocessing recorded in {weights}: "
                             + ", ".join(f"{k} {f} in the weights, {j} in the JSON" for k, (f, j) in diff.items())
                             + "; use the values the model was trained with", pre)
    try:
        state = load_file(weights)
    except (SafetensorError, OSError) as exc:
        raise ModelError(f"cannot read {weights}: {exc}; export it again with safetensors.torch.save_file", weights) \
            from None
    model = create_model(cfg)
    net_state = _check_tensors(model, state, weights, pre)
    model.net.load_state_dict(net_state, strict=True)
    model.eval()
    with torch.inference_mode():
        logits = model(example_input(cfg))
    if logits.shape != (2, cfg.num_classes) or not torch.isfinite(logits).all():
        raise ModelError(f"{weights}: a probe input gives logits {list(logits.shape)} "
                         f"{'with NaN/inf ' if not torch.isfinite(logits).all() else ''}instead of finite "
                         f"[2, {cfg.num_classes}]; check the weights and {pre}", weights)
    model.set_version(f"{modality}-{weights_digest(model)[:12]}")
    return model


def _score(model: SensorModel, data: Path) -> dict[str, Any]:
    from streamfuse.models.dataset import load_dataset
    from streamfuse.models.preprocess import batch_tensor_checked
    from streamfuse.models.splits import score

    cfg = model.sf_config
    ds = load_dataset(data, modalities=[cfg.modality], classes=cfg.classes, require=("val",))
    pairs = [(s, lab) for s, lab in ds.split("val") if cfg.modality in s.readings]
    batch = batch_tensor_checked(cfg, [s.readings[cfg.modality] for s, _ in pairs])
    index = {c: i for i, c in enumerate(cfg.classes)}
    y = torch.tensor([index[pairs[i][1].label] for i in batch.indices])
    with torch.inference_mode():
        pred = torch.cat([model(part).argmax(-1) for part in batch.tensor.split(256)]) if len(y) else y
    return score(y, pred, cfg.num_classes) if len(y) else {}


def import_unit(root: Path, modality: str, arch: str, weights: str | Path, preprocessing: str | Path,
                data: str | Path | None = None, created_ms: int | None = None) -> dict[str, Any]:
    """Validate, then store a unit under ``root/<modality>/<version>``; returns its manifest.

    Args:
        root: the registry's units directory.
        modality, arch: what the weights are.
        weights: a ``.safetensors`` file (timm key layout, or a streamfuse weights file).
        preprocessing: a JSON map of :class:`ModalityConfig` fields (``classes`` required).
        data: optional dataset folder; its validation split gives the unit's baseline.
        created_ms: the unit's creation time (epoch ms); default now.

    Raises:
        ModelError: any check fails; nothing is written then.
    """
    from streamfuse.models.units import UNIT_FORMAT, UNIT_MANIFEST, UNIT_WEIGHTS, read_unit_manifest, write_unit

    model = build_imported(modality, arch, weights, preprocessing)
    have = Path(root) / modality / model.sf_config.version
    if (have / UNIT_MANIFEST).is_file():  # the version is a digest of the weights: already imported
        return read_unit_manifest(have)
    baseline = _score(model, Path(data)) if data is not None else {}
    cfg = model.sf_config
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / UNIT_WEIGHTS
        entry = write_weights(file, model, {"modality": modality, "config": json.dumps(cfg.to_dict())})
        manifest = {
            "format": UNIT_FORMAT, "unit": modality, "kind": "modality", "version": cfg.version,
            "classes": list(cfg.classes), "config": cfg.to_dict(),
            "created_ms": created_ms if created_ms is not None else now_ms(),
            "source": {"imported": str(Path(weights).resolve()), "preprocessing": str(Path(preprocessing).resolve())},
            "baseline": baseline, "test": {}, "weights": {"file": UNIT_WEIGHTS, **entry},
        }
        write_unit(root, manifest, file)
    return manifest
