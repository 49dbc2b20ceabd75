"""Model bundles on disk: ``manifest.json`` plus one ``<modality>.safetensors`` per modality.

:func:`save_bundle` writes one (atomically), :func:`load_bundle` loads it for inference
as a :class:`Bundle`. Weights are only ever read with safetensors (never pickle), and
every file is checked against the sha256 in the manifest (see
:mod:`streamfuse.models.manifest` for the format).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from streamfuse.errors import InvalidEvent, ModelError
from streamfuse.events import MODALITIES, SensorEvent
from streamfuse.models.config import ModalityConfig
from streamfuse.models.encoders import SensorModel, create_model
from streamfuse.models.fusion import ume
from streamfuse.models.manifest import (
    FORMAT,
    HOW_TO_FIX,
    MANIFEST,
    bundle_version,
    check_manifest,
    file_sha256,
    read_manifest,
    weights_file,
)
from streamfuse.models.preprocess import batch_tensor, batch_tensor_checked
from streamfuse.models.runtime import autocast, resolve_device

__all__ = [
    "Bundle", "CheckedProbs", "FusedOutput", "bundle_version", "load_bundle", "read_manifest", "save_bundle",
    "weights_digest",
]


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


class Bundle:
    """A loaded bundle: one model per modality plus the fusion step, ready for inference.

    Attributes:
        path: the bundle directory.
        manifest: the parsed manifest.
        version: the bundle's version id.
        classes: class names, in probability order.
        modalities: the modalities, in the order of :meth:`predict`'s ``M`` axis.
        configs: modality -> :class:`ModalityConfig`.
        versions: modality -> weights version, plus ``"fusion"`` -> fusion version.
        baselines: validation metrics per modality and ``"fused"``.
        fusion_mode: ``"ume"``.
        device: where the models run.
        models: modality -> :class:`SensorModel` (eval mode, on ``device``).
        max_batch: inputs are processed in chunks of at most this many readings.
    """

    def __init__(
        self, path: Path, manifest: dict[str, Any], models: dict[str, SensorModel], device: torch.device
    ) -> None:
        self.path = path
        self.manifest = manifest
        self.version: str = manifest["version"]
        self.classes: tuple[str, ...] = tuple(manifest["classes"])
        self.modalities: tuple[str, ...] = tuple(manifest["modalities"])
        self.configs = {m: model.sf_config for m, model in models.items()}
        self.versions = {m: cfg.version for m, cfg in self.configs.items()}
        self.versions["fusion"] = manifest["fusion"]["version"]
        self.baselines: dict[str, dict[str, float]] = manifest["baselines"]
        self.fusion_mode: str = manifest["fusion"]["mode"]
        self.device = device
        self.models = models
        self.max_batch = 256

    def __repr__(self) -> str:
        mods = list(self.modalities)
        return f"Bundle({str(self.path)!r}, version={self.version!r}, modalities={mods}, device={self.device})"

    def _run(self, modality: str, batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), autocast(self.device):
            logits = self.models[modality](batch)
        return logits.float().softmax(dim=-1).cpu()

    def _model_cfg(self, modality: str) -> ModalityConfig:
        if modality not in self.models:
            raise ModelError(f"bundle {self.path} has no {modality!r} model, only {list(self.modalities)}", self.path)
        return self.configs[modality]

    def modality_probs(self, modality: str, readings: Sequence[SensorEvent]) -> torch.Tensor:
        """Class probabilities of one modality's model.

        Args:
            modality: one of :attr:`modalities`.
            readings: that modality's readings.

        Returns:
            ``[len(readings), C]`` float32 on the CPU.

        Raises:
            ModelError: the bundle has no model for ``modality``.
            InvalidEvent: a reading does not decode (use :meth:`modality_probs_checked`).
        """
        cfg = self._model_cfg(modality)
        out = [
            self._run(modality, batch_tensor(cfg, readings[i : i + self.max_batch], self.device))
            for i in range(0, len(readings), self.max_batch)
        ]
        return torch.cat(out) if out else torch.empty(0, len(self.classes))

    def modality_probs_checked(self, modality: str, readings: Sequence[SensorEvent]) -> CheckedProbs:
        """Like :meth:`modality_probs`, but readings that fail to decode are set aside."""
        cfg = self._model_cfg(modality)
        probs, indices, errors = [torch.empty(0, len(self.classes))], [], []
        for start in range(0, len(readings), self.max_batch):
            batch = batch_tensor_checked(cfg, readings[start : start + self.max_batch], self.device)
            if batch.indices:
                probs.append(self._run(modality, batch.tensor))
            indices += [start + i for i in batch.indices]
            errors += [(start + i, e) for i, e in batch.errors]
        return CheckedProbs(torch.cat(probs), indices, errors)

    def predict(self, samples: Sequence[Mapping[str, SensorEvent]]) -> FusedOutput:
        """Per-modality and UME-fused probabilities for a batch of samples.

        A modality that is missing from a sample, or whose reading fails to decode, is
        left out of that sample's fusion. Modalities the bundle lacks are ignored.

        Args:
            samples: modality -> reading maps, e.g. ``[s.readings for s in samples]``.

        Returns:
            A :class:`FusedOutput` (tensors float32 / bool on the CPU).
        """
        n, c = len(samples), len(self.classes)
        mp = torch.zeros(n, len(self.modalities), c)
        present = torch.zeros(n, len(self.modalities), dtype=torch.bool)
        errors: list[tuple[int, InvalidEvent]] = []
        for j, m in enumerate(self.modalities):
            rows = [i for i, s in enumerate(samples) if m in s]
            out = self.modality_probs_checked(m, [samples[i][m] for i in rows])
            good = [rows[k] for k in out.indices]
            mp[good, j] = out.probs
            present[good, j] = True
            errors += [(rows[k], e) for k, e in out.errors]
        return FusedOutput(ume(mp, present), mp, present, sorted(errors, key=lambda pair: pair[0]))


def weights_digest(model: nn.Module) -> str:
    """sha256 (hex) of a model's state: names, dtypes, shapes and values."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_bundle(
    path: str | Path, models: Mapping[str, nn.Module], manifest: Mapping[str, Any], *, overwrite: bool = False
) -> dict[str, Any]:
    """Write a bundle directory (atomically: a temporary sibling, then a rename).

    Args:
        path: the bundle directory to create.
        models: modality -> :class:`SensorModel`; their ``sf_config`` go into the manifest.
        manifest: at least ``version`` and ``created_ms`` (epoch ms); usually also
            ``fusion``, ``baselines``, ``test``, ``training``. ``format``, ``classes``,
            ``modalities``, ``configs`` and ``weights`` are filled in from ``models``.
        overwrite: replace an existing bundle at ``path``.

    Returns:
        The manifest as written.

    Raises:
        ModelError: no models, inconsistent classes/modalities, missing fields, or
            ``path`` exists and ``overwrite`` is False.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise ModelError(f"{path} already exists; choose a new directory or pass overwrite=True", path)
    order = [m for m in MODALITIES if m in models]
    if not order or len(order) != len(models):
        raise ModelError(f"models must be a non-empty map over {list(MODALITIES)}, got {list(models)}", path)
    configs = {m: _config_of(models[m], m, path) for m in order}
    classes = list(configs[order[0]].classes)
    for key, value in (("classes", classes), ("modalities", order)):
        if key in manifest and list(manifest[key]) != value:
            raise ModelError(f"manifest {key} {list(manifest[key])} do not match the models' {value}", path)
    out: dict[str, Any] = {"format": FORMAT, "fusion": {"mode": "ume", "version": "ume"}, "baselines": {}, "test": {}}
    out.update(manifest)
    out.update(format=FORMAT, classes=classes, modalities=order, configs={m: c.to_dict() for m, c in configs.items()})
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        out["weights"] = {}
        for m in order:
            file = weights_file(tmp, m)
            state = {k: v.detach().cpu().contiguous().clone() for k, v in models[m].state_dict().items()}
            meta = {"format": FORMAT, "modality": m, "config": json.dumps(configs[m].to_dict())}
            save_file(state, file, metadata=meta)  # self-describing: the registry can list a file alone
            out["weights"][m] = {"sha256": file_sha256(file), "bytes": file.stat().st_size}
        check_manifest(out, path)
        (tmp / MANIFEST).write_text(json.dumps(out, indent=2, sort_keys=True, allow_nan=False) + "\n")
        _replace_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


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
    """Load a bundle for inference (safetensors only; every file checked by sha256).

    Args:
        path: the bundle directory.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"``.

    Returns:
        The :class:`Bundle`, models in eval mode on ``device``.

    Raises:
        ModelError: the directory, manifest or a weights file is missing, corrupt or
            inconsistent with the manifest; the message names the path and the fix.
    """
    path = Path(path)
    manifest = read_manifest(path)
    dev = resolve_device(device)
    models: dict[str, SensorModel] = {}
    for m in manifest["modalities"]:
        file = weights_file(path, m)
        if not file.is_file():
            raise ModelError(f"weights file {file} is missing (manifest lists {m}); {HOW_TO_FIX}", file)
        if file_sha256(file) != manifest["weights"][m]["sha256"]:
            raise ModelError(
                f"{file} does not match the sha256 in {path / MANIFEST}: modified or partly copied; {HOW_TO_FIX}", file
            )
        model = create_model(ModalityConfig.from_dict(manifest["configs"][m]))
        try:
            model.load_state_dict(load_file(file), strict=True)
        except (SafetensorError, RuntimeError) as exc:
            raise ModelError(f"{file} does not fit its {m} config: {exc}; {HOW_TO_FIX}", file) from None
        models[m] = model.to(dev).eval()
    return Bundle(path, manifest, models, dev)
