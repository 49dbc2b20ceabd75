"""A loaded model bundle: one model per modality plus the fusion step, for inference.

:meth:`Bundle.encode` runs every modality's model once per sample and keeps its class
probabilities and features; :meth:`Bundle.fuse` combines any subset of them with any
available fusion mode (cheap: no model runs), which is what leave-one-out and Shapley
contributions need. :meth:`Bundle.with_unit` returns a new bundle with one unit (a
modality's model or the fusion) swapped, so a worker swaps atomically by reassigning.

Bundles are written and read by :mod:`streamfuse.models.bundle_io` (``save_bundle``,
``load_bundle``) and assembled from registry units by
:mod:`streamfuse.models.registry`.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from streamfuse.errors import InvalidEvent, ModelError
from streamfuse.events import SensorEvent
from streamfuse.models.config import ModalityConfig
from streamfuse.models.encoders import SensorModel
from streamfuse.models.fusion import FusionUnit, quality, ume
from streamfuse.models.lora import Adapter, adapter_unit, merged
from streamfuse.models.manifest import MANIFEST, bundle_version
from streamfuse.models.outputs import CheckedProbs, Encoded, FusedOutput, LoadedUnit
from streamfuse.models.preprocess import batch_tensor, batch_tensor_checked, example_input
from streamfuse.models.runtime import autocast, served_forward

__all__ = [
    "MANIFEST", "Bundle", "CheckedProbs", "Encoded", "FusedOutput", "LoadedUnit", "bundle_version",
]
log = logging.getLogger(__name__)


def warm_up(model: SensorModel) -> None:
    """Build ``model``'s served form on an example batch, so that the first real batch does not
    pay for tracing: at start-up, or in the thread that loads a new version."""
    device = next(model.parameters()).device
    served_forward(model, example_input(model.sf_config, device))


class Bundle:
    """One model per modality plus the fusion step, ready for inference.

    Attributes:
        path: where it was loaded from (a bundle directory, or the registry's units).
        manifest: the bundle manifest (for a registry bundle: assembled from its units).
        version: the bundle's version id (derived from the unit versions and classes).
        classes: class names, in probability order.
        modalities: the modalities, in the order of every ``M`` axis.
        configs: modality -> :class:`ModalityConfig`.
        versions: modality -> weights version, plus ``"fusion"`` -> fusion version.
        baselines: validation metrics per modality and ``"fused"``.
        fusion: the :class:`FusionUnit`.
        fusion_modes: the fusion modes :meth:`fuse` accepts (always ``"ume"``).
        fusion_mode: the active mode (``fusion.mode``, or ``"ume"`` when that mode cannot
            be used with these encoders; ``fusion_note`` then says why).
        device: where the models run.
        models: modality -> :class:`SensorModel` served (eval mode, on ``device``): the
            base model, or a copy with its MMLoRA adapter merged in.
        base_models: modality -> the base model (without adapter).
        adapters: modality -> :class:`~streamfuse.models.lora.Adapter` applied to it
            (an adapter trained on another base version is not applied; see ``fusion_note``).
        units: every unit this bundle can serve: modalities, their adapters, the fusion.
        max_batch: inputs are processed in chunks of at most this many readings.
    """

    def __init__(
        self, path: Path, manifest: dict[str, Any], models: dict[str, SensorModel], device: torch.device,
        fusion: FusionUnit | None = None, adapters: Mapping[str, Adapter] | None = None,
        served: Mapping[str, SensorModel] | None = None,
    ) -> None:
        self.path = path
        self.manifest = manifest
        self.classes: tuple[str, ...] = tuple(manifest["classes"])
        self.modalities: tuple[str, ...] = tuple(manifest["modalities"])
        self.configs = {m: models[m].sf_config for m in self.modalities}
        self.fusion = fusion if fusion is not None else FusionUnit.ume_only()
        self.versions = {m: cfg.version for m, cfg in self.configs.items()}
        self.base_models = dict(models)
        self.adapters = {m: a for m, a in (adapters or {}).items() if m in models and a.base == self.versions[m]}
        self.units = (*self.modalities, *(adapter_unit(m) for m in self.modalities), "fusion")
        models = dict(models)
        for m, a in self.adapters.items():  # reuse a merged model a swap of another unit kept
            kept = (served or {}).get(m)
            models[m] = kept if kept is not None else merged(models[m], a).to(device)
            self.versions[adapter_unit(m)] = a.version
        self.versions["fusion"] = self.fusion.version
        self.version: str = manifest.get("version") or bundle_version(self.versions, self.classes)
        self.baselines: dict[str, dict[str, Any]] = dict(manifest["baselines"])
        records = manifest.get("adapters") or {}
        self.baselines |= {m: records[m]["baseline"] for m in self.adapters if records.get(m, {}).get("baseline")}
        from streamfuse.monitor.evidence import Calibration

        # validation calibration (label-free reliability), carried by each unit's baseline
        self.calibration = Calibration.from_baselines(self.baselines)
        self.fusion_modes: tuple[str, ...] = self.fusion.available(self.modalities, self.versions,
                                                                  calibrated=self.calibration is not None)
        self.fusion_mode: str = self.fusion.mode if self.fusion.mode in self.fusion_modes else "ume"
        self.fusion_note = ""
        if self.fusion_mode != self.fusion.mode:
            self.fusion_note = (f"fusion {self.fusion.version} mode {self.fusion.mode!r} was trained on encoders "
                                f"{dict(self.fusion.trained_on)}, not {self.versions}; using 'ume'")
            log.warning("bundle %s: %s", self.version, self.fusion_note)
        self.device = device
        self.models = models
        self.max_batch = 256

    def __repr__(self) -> str:
        mods = list(self.modalities)
        return (f"Bundle({str(self.path)!r}, version={self.version!r}, modalities={mods}, "
                f"fusion={self.fusion_mode!r}, device={self.device})")

    # ------------------------------------------------------------------ per modality

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

    def forward(self, modality: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features and logits of one modality's model for the input batch ``x``, run as
        served: traced on the CPU (:func:`~streamfuse.models.runtime.served_forward`,
        built on the first call unless :func:`warm_up` did it), under inference mode and
        the device's autocast."""
        with torch.inference_mode(), autocast(self.device):
            return served_forward(self.models[modality], x)(x)

    def warm_up(self) -> None:
        """Build every model's served form now (see :func:`warm_up`)."""
        for model in self.models.values():
            warm_up(model)

    # ------------------------------------------------------------------ encode + fuse

    def encode(self, samples: Sequence[Mapping[str, SensorEvent]]) -> Encoded:
        """Run every modality's model once on a batch of samples.

        A modality missing from a sample, or whose reading fails to decode, is not
        computed for it (its error is in ``errors``). Modalities the bundle lacks are ignored.

        Args:
            samples: modality -> reading maps, e.g. ``[s.readings for s in samples]``.

        Returns:
            An :class:`Encoded` (float32 / bool tensors on the CPU).
        """
        n, c = len(samples), len(self.classes)
        probs = torch.zeros(n, len(self.modalities), c)
        computed = torch.zeros(n, len(self.modalities), dtype=torch.bool)
        signal_std = torch.full((n, len(self.modalities)), float("nan"))
        features: dict[str, torch.Tensor] = {}
        errors: list[tuple[int, InvalidEvent]] = []
        seconds: dict[str, float] = {}
        for j, m in enumerate(self.modalities):
            t0 = time.perf_counter()
            model, cfg = self.models[m], self.configs[m]
            feats = torch.zeros(n, model.num_features)
            rows = [i for i, s in enumerate(samples) if m in s]
            for start in range(0, len(rows), self.max_batch):
                chunk = rows[start : start + self.max_batch]
                batch = batch_tensor_checked(cfg, [samples[i][m] for i in chunk], self.device)
                if batch.indices:
                    f, logits = self.forward(m, batch.tensor)
                    good = _rows([chunk[k] for k in batch.indices])
                    probs[good, j] = logits.float().softmax(dim=-1).cpu()
                    feats[good] = f.float().cpu()
                    computed[good, j] = True
                    signal_std[good, j] = batch.signal_std
                errors += [(chunk[k], e) for k, e in batch.errors]
            features[m] = feats
            seconds[m] = time.perf_counter() - t0  # .cpu() above waited for the device
        return Encoded(probs, features, computed, sorted(errors, key=lambda pair: pair[0]), seconds, signal_std)

    def fuse(self, enc: Encoded, use: torch.Tensor, mode: str | None = None) -> torch.Tensor:
        """Fuse the modalities in ``use`` (intersected with ``enc.computed``).

        Cheap (no model runs), so it can be called for every subset of modalities.

        Args:
            enc: the output of :meth:`encode` on this bundle.
            use: ``[B, M]`` bool, the modalities to fuse per sample.
            mode: one of :attr:`fusion_modes`; None = :attr:`fusion_mode`.

        Returns:
            ``[B, C]`` float32 probabilities on the CPU; uniform for a row with nothing to fuse.

        Raises:
            ModelError: ``mode`` is not available, or ``use`` does not fit ``enc``.

        Examples:
            >>> b = Bundle.__new__(Bundle)
            >>> b.modalities, b.fusion_modes, b.fusion_mode = ("image", "audio"), ("ume",), "ume"
            >>> b.fusion = FusionUnit.ume_only()
            >>> p = torch.tensor([[[0.75, 0.25], [0.25, 0.75]]])
            >>> enc = Encoded(p, {}, torch.tensor([[True, True]]), [], {})
            >>> b.fuse(enc, torch.tensor([[True, False]])).tolist()
            [[0.75, 0.25]]
        """
        mode = self.fusion_mode if mode is None else mode
        if mode not in self.fusion_modes:
            raise ModelError(f"fusion mode {mode!r} is not available in this bundle; available: "
                             f"{list(self.fusion_modes)}", getattr(self, "path", None))
        use = torch.as_tensor(use, dtype=torch.bool).cpu()
        if use.shape != enc.computed.shape:
            raise ModelError(f"use has shape {list(use.shape)}, the encoded batch {list(enc.computed.shape)}")
        use = use & enc.computed
        with torch.inference_mode():
            if mode == "quality":
                return quality(enc.modality_probs, use, self.calibration, self.modalities)
            if mode == "ume" or self.fusion.fusion is None:
                return ume(enc.modality_probs, use)
            feats = [enc.features[m] for m in self.modalities]
            return self.fusion.fusion.fuse(mode, enc.modality_probs, feats, use)

    def predict(self, samples: Sequence[Mapping[str, SensorEvent]]) -> FusedOutput:
        """Per-modality and fused probabilities (active fusion mode) for a batch of samples.

        A modality that is missing from a sample, or whose reading fails to decode, is
        left out of that sample's fusion. Modalities the bundle lacks are ignored.

        Args:
            samples: modality -> reading maps, e.g. ``[s.readings for s in samples]``.

        Returns:
            A :class:`FusedOutput` (tensors float32 / bool on the CPU).
        """
        enc = self.encode(samples)
        return FusedOutput(self.fuse(enc, enc.computed), enc.modality_probs, enc.computed, enc.errors)

    # ------------------------------------------------------------------ unit swaps

    def with_unit(self, unit: str, loaded: LoadedUnit) -> Bundle:
        """A new bundle with one unit replaced; this one is left untouched.

        Args:
            unit: one of :attr:`units`: a modality, an adapter (``lora_<modality>``) or ``"fusion"``.
            loaded: the unit (``Registry.load_unit``).

        Returns:
            The new :class:`Bundle` (same device). If its fusion mode cannot be used with
            the new encoders (``head`` reads features of specific versions), it serves
            ``"ume"`` and says so in ``fusion_note``.

        Raises:
            ModelError: an unknown unit, a mismatch between ``unit`` and ``loaded``, or
                other classes than this bundle's.
        """
        if unit not in self.units or loaded.unit != unit:
            raise ModelError(f"cannot put a {loaded.unit!r} unit in place of {unit!r}; units of this bundle: "
                             f"{list(self.units)}", self.path)
        man = copy.deepcopy(self.manifest)
        models, fusion, adapters = dict(self.base_models), self.fusion, dict(self.adapters)
        served = {m: self.models[m] for m in self.adapters}
        if unit == "fusion":
            if not isinstance(loaded.module, FusionUnit):
                raise ModelError(f"fusion unit {loaded.version} did not load as a fusion step", self.path)
            fusion, man["fusion"] = loaded.module, loaded.manifest.get("fusion", {"mode": "ume", "version": "ume"})
            man["baselines"]["fused"] = loaded.baseline
        elif unit not in self.modalities:  # an MMLoRA adapter
            adapter = loaded.module
            if not isinstance(adapter, Adapter) or adapter_unit(adapter.modality) != unit:
                raise ModelError(f"unit {unit} version {loaded.version} is not an adapter of it", self.path)
            adapters[adapter.modality] = adapter
            served.pop(adapter.modality, None)
            man.setdefault("adapters", {})[adapter.modality] = {**adapter.config(), "version": adapter.version,
                                                                "baseline": loaded.baseline}
        else:
            model = self._checked_model(unit, loaded)
            models[unit] = model.to(self.device).eval()
            served.pop(unit, None)
            man["configs"][unit] = model.sf_config.to_dict()
            man["weights"][unit] = loaded.manifest.get("weights", {})
            man["baselines"][unit] = loaded.baseline
        if unit == "fusion" and tuple(loaded.manifest.get("classes", self.classes)) != self.classes:
            raise ModelError(f"fusion version {loaded.version} has other classes than this bundle "
                             f"{list(self.classes)}", self.path)
        man.pop("version", None)  # derived from the new unit versions
        return Bundle(self.path, man, models, self.device, fusion, adapters, served)

    def _checked_model(self, unit: str, loaded: LoadedUnit) -> SensorModel:
        """The model of a modality unit, after checking it is one of that modality, with
        this bundle's classes."""
        model = loaded.module
        if not isinstance(model, SensorModel) or model.sf_config.modality != unit:
            raise ModelError(f"unit {unit} version {loaded.version} is not a {unit} model", self.path)
        if model.sf_config.classes != self.classes:
            raise ModelError(f"{unit} version {loaded.version} has classes {list(model.sf_config.classes)}, "
                             f"this bundle {list(self.classes)}; activate a version trained on the same "
                             "classes", self.path)
        return model


def _rows(rows: list[int]) -> slice | torch.Tensor:
    """An index for ``rows`` (ascending, distinct): a slice when they are consecutive, the
    common case of a batch whose readings all decoded (slices skip the index tensor).

    Examples:
        >>> _rows([3, 4, 5]), _rows([0, 2]).tolist()
        (slice(3, 6, None), [0, 2])
    """
    if rows[-1] - rows[0] + 1 == len(rows):
        return slice(rows[0], rows[-1] + 1)
    return torch.tensor(rows)
