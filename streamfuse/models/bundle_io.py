"""Bundles on disk: ``manifest.json``, ``<modality>.safetensors`` and ``fusion.safetensors``.

:func:`save_bundle` writes one (atomically), :func:`load_bundle` loads it as a
:class:`~streamfuse.models.bundle.Bundle`. Weights are only ever read with safetensors
(never pickle); every file is first checked to be whole safetensors
(:mod:`streamfuse.models.safefile`), then against the sha256 and tensor shapes in the
manifest (see :mod:`streamfuse.models.manifest` for the format).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from streamfuse.errors import ModelError
from streamfuse.events import MODALITIES
from streamfuse.models.bundle import Bundle
from streamfuse.models.config import CALIBRATED_MODES, ModalityConfig
from streamfuse.models.encoders import SensorModel, create_model
from streamfuse.models.fusion import FusionConfig, FusionSet, FusionUnit
from streamfuse.models.lora import Adapter, adapter_unit
from streamfuse.models.manifest import (
    FORMAT, FUSION_FILE, HOW_TO_FIX, MANIFEST, adapter_file, check_manifest, file_sha256, read_manifest,
    weights_file,
)
from streamfuse.models.runtime import resolve_device
from streamfuse.models.safefile import check_shapes, inspect_safetensors

__all__ = ["load_bundle", "read_manifest", "read_weights", "save_bundle", "weights_digest", "write_weights"]


def weights_digest(model: nn.Module) -> str:
    """sha256 (hex) of a model's state: names, dtypes, shapes and values."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def write_weights(
    file: Path, module: nn.Module | Mapping[str, torch.Tensor], metadata: dict[str, str]
) -> dict[str, Any]:
    """Save a module's state (or a map of tensors) as safetensors; returns its manifest
    entry (sha256, bytes, tensors)."""
    items = module.items() if isinstance(module, Mapping) else module.state_dict().items()
    state = {k: v.detach().cpu().contiguous().clone() for k, v in items}
    save_file(state, file, metadata={"format": FORMAT, **metadata})  # self-describing
    return {"sha256": file_sha256(file), "bytes": file.stat().st_size, "tensors": inspect_safetensors(file)}


def read_weights(file: Path, entry: Mapping[str, Any], where: Path) -> dict[str, torch.Tensor]:
    """Read a weights file after checking it is whole safetensors matching its manifest entry.

    Args:
        file: the ``.safetensors`` file.
        entry: its manifest entry: ``sha256`` and optionally ``tensors`` (name -> dtype, shape).
        where: the manifest (named in errors about it).

    Raises:
        ModelError: missing, pickle, truncated, modified, or shapes that differ from the
            manifest; the error names the file and the problem.
    """
    found = inspect_safetensors(file)
    if file_sha256(file) != entry.get("sha256"):
        raise ModelError(f"{file} does not match the sha256 in {where}: modified or partly copied; {HOW_TO_FIX}", file)
    if isinstance(entry.get("tensors"), Mapping):
        check_shapes(file, entry["tensors"], found, where)
    try:
        return load_file(file)
    except (SafetensorError, OSError) as exc:
        raise ModelError(f"cannot read {file}: {exc}; {HOW_TO_FIX}", file) from None


def build_sensor_model(cfg: ModalityConfig, state: Mapping[str, torch.Tensor], file: Path) -> SensorModel:
    """The model ``cfg`` describes with ``state`` loaded strictly (eval mode, CPU)."""
    model = create_model(cfg)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelError(f"{file} does not fit its {cfg.modality} config ({cfg.arch}): {exc}; {HOW_TO_FIX}",
                         file) from None
    return model.eval()


def build_fusion(section: Mapping[str, Any], state: Mapping[str, torch.Tensor], file: Path) -> FusionUnit:
    """The :class:`FusionUnit` a manifest's ``fusion`` section and its weights describe."""
    modes = [m for m in section["modes"] if m != "ume"]
    fusion = FusionSet(FusionConfig.from_dict(section["config"]), modes)
    try:
        fusion.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelError(f"{file} does not fit its fusion config: {exc}; {HOW_TO_FIX}", file) from None
    return FusionUnit(fusion.eval(), section["mode"], section["version"], dict(section["trained_on"]))


def save_bundle(
    path: str | Path, models: Mapping[str, nn.Module], manifest: Mapping[str, Any], *,
    fusion: FusionSet | None = None, overwrite: bool = False, adapters: Mapping[str, Adapter] | None = None,
) -> dict[str, Any]:
    """Write a bundle directory (atomically: a temporary sibling, then a rename).

    Args:
        path: the bundle directory to create.
        models: modality -> :class:`SensorModel`; their ``sf_config`` go into the manifest.
        manifest: at least ``version`` and ``created_ms`` (epoch ms); usually also
            ``fusion`` (mode, version, trained_on, candidates), ``baselines``, ``test``,
            ``training``. ``format``, ``classes``, ``modalities``, ``configs`` and
            ``weights`` are filled in from ``models``, and ``fusion``'s ``modes``,
            ``config`` and ``weights`` from ``fusion``.
        fusion: the learned fusion modes, written to ``fusion.safetensors``.
        overwrite: replace an existing bundle at ``path``.
        adapters: MMLoRA adapters per modality, written to ``lora_<modality>.safetensors``
            (``manifest["adapters"][m]`` must describe each; its ``weights`` are filled in).

    Returns:
        The manifest as written.

    Raises:
        ModelError: no models, inconsistent classes/modalities, missing fields, or
            ``path`` exists and ``overwrite`` is False.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise ModelError(f"{path} already exists; choose a new directory or pass overwrite=True", path)
    order, configs, classes = _checked_models(models, manifest, path)
    out: dict[str, Any] = {"format": FORMAT, "fusion": {"mode": "ume", "version": "ume"}, "baselines": {}, "test": {}}
    out.update(json.loads(json.dumps(manifest)))  # a deep copy; also proves it is JSON-safe
    out.update(format=FORMAT, classes=classes, modalities=order, configs={m: c.to_dict() for m, c in configs.items()})
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _write_unit_weights(tmp, out, models, configs, fusion, adapters or {})
        check_manifest(out, path)
        (tmp / MANIFEST).write_text(json.dumps(out, indent=2, sort_keys=True, allow_nan=False) + "\n")
        _replace_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _checked_models(models: Mapping[str, nn.Module], manifest: Mapping[str, Any],
                    path: Path) -> tuple[list[str], dict[str, ModalityConfig], list[str]]:
    """The modalities (in :data:`MODALITIES` order), their configs and the classes, after
    checking the models agree with each other and with the manifest's classes and modalities."""
    order = [m for m in MODALITIES if m in models]
    if not order or len(order) != len(models):
        raise ModelError(f"models must be a non-empty map over {list(MODALITIES)}, got {list(models)}", path)
    configs = {m: _config_of(models[m], m, path) for m in order}
    classes = list(configs[order[0]].classes)
    for key, value in (("classes", classes), ("modalities", order)):
        if key in manifest and list(manifest[key]) != value:
            raise ModelError(f"manifest {key} {list(manifest[key])} do not match the models' {value}", path)
    return order, configs, classes


def _write_unit_weights(tmp: Path, out: dict[str, Any], models: Mapping[str, nn.Module],
                        configs: Mapping[str, ModalityConfig], fusion: FusionSet | None,
                        adapters: Mapping[str, Adapter]) -> None:
    """Write every unit's weights file into ``tmp`` (models, learned fusion, adapters) and
    record each file's description in the manifest ``out``."""
    out["weights"] = {}
    for m, cfg in configs.items():
        meta = {"modality": m, "config": json.dumps(cfg.to_dict())}
        out["weights"][m] = write_weights(weights_file(tmp, m), models[m], meta)
    if fusion is not None and len(fusion.learned):
        section = out["fusion"]
        section.update(modes=list(fusion.modes), config=fusion.cfg.to_dict())
        meta = {"unit": "fusion", "config": json.dumps(fusion.cfg.to_dict())}
        section["weights"] = write_weights(tmp / FUSION_FILE, fusion, meta)
    for m, adapter in adapters.items():
        meta = {"unit": adapter_unit(m), "config": json.dumps(adapter.config())}
        out["adapters"][m]["weights"] = write_weights(adapter_file(tmp, m), adapter.tensors, meta)


def _config_of(model: nn.Module, modality: str, path: Path) -> ModalityConfig:
    cfg = getattr(model, "sf_config", None)
    if not isinstance(cfg, ModalityConfig) or cfg.modality != modality:
        raise ModelError(f"models[{modality!r}] is not a {modality} model from create_model()", path)
    return cfg


def _replace_dir(src: Path, dst: Path) -> None:
    old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
    if dst.exists():
        dst.rename(old)
    src.rename(dst)
    shutil.rmtree(old, ignore_errors=True)


def load_bundle(path: str | Path, device: str | torch.device = "cpu") -> Bundle:
    """Load a bundle for inference (safetensors only; every file checked first).

    Args:
        path: the bundle directory.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"``.

    Returns:
        The :class:`Bundle`, models in eval mode on ``device`` (fusion on the CPU).

    Raises:
        ModelError: the directory, manifest or a weights file is missing, corrupt, a
            pickle, truncated or inconsistent with the manifest; the message names the
            path and the fix.
    """
    path = Path(path)
    manifest = read_manifest(path)
    dev = resolve_device(device)
    where = path / MANIFEST
    models: dict[str, SensorModel] = {}
    for m in manifest["modalities"]:
        file = weights_file(path, m)
        if not file.is_file():
            raise ModelError(f"weights file {file} is missing (manifest lists {m}); {HOW_TO_FIX}", file)
        state = read_weights(file, manifest["weights"][m], where)
        cfg = ModalityConfig.from_dict(manifest["configs"][m])
        models[m] = build_sensor_model(cfg, state, file).to(dev)
    section = manifest["fusion"]
    fusion = None
    if len(section.get("modes", ["ume"])) > 1:
        file = path / FUSION_FILE
        fusion = build_fusion(section, read_weights(file, section["weights"], where), file)
    elif section["version"] != "ume" or section["mode"] in CALIBRATED_MODES:
        mode = section["mode"] if section["mode"] in CALIBRATED_MODES else "ume"
        fusion = FusionUnit(None, mode, section["version"], {})
    adapters = {m: read_adapter(rec, adapter_file(path, m), where) for m, rec in manifest.get("adapters", {}).items()}
    return Bundle(path, manifest, models, dev, fusion, adapters)


def read_adapter(record: Mapping[str, Any], file: Path, where: Path) -> Adapter:
    """An MMLoRA adapter from its manifest record and weights file (checked like any weights)."""
    tensors = read_weights(file, record["weights"], where)
    adapter = Adapter(record["modality"], record["base"], int(record["rank"]), float(record["alpha"]), tensors)
    if adapter.with_version().version != record["version"]:
        raise ModelError(f"{file} does not hold adapter {record['version']} named in {where}; {HOW_TO_FIX}", file)
    return adapter.with_version()
