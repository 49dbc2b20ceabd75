"""The two-stage recipe end to end: :func:`train_bundle`.

Stage 1 trains each modality alone (:mod:`streamfuse.models.stage1`; its validation
Top-1 / macro-F1 become that modality's baseline). Stage 2 (:mod:`streamfuse.models.stage2`)
trains the requested learned fusion modes on top and keeps UME unless one beats it on
validation (``fusion="auto"``). With ``compare=True`` a jointly trained end-to-end model
and linear probes of its branches are trained as well, and the paper's comparison table
is saved next to the weights (:mod:`streamfuse.models.compare`). Training is
deterministic for a seed: each modality is seeded on its own, so adding a modality does
not change the others.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import timm
import torch

from streamfuse.clock import now_ms
from streamfuse.errors import ModelError
from streamfuse.events import MODALITIES
from streamfuse.models.bundle_io import save_bundle, weights_digest
from streamfuse.models.calibration import attach_calibration, class_recall, fit_calibration
from streamfuse.models.config import ModalityConfig, default_config
from streamfuse.models.encoders import SensorModel
from streamfuse.models.fusion import fusion_version
from streamfuse.models.lora import adapter_unit
from streamfuse.models.manifest import bundle_version
from streamfuse.models.runtime import resolve_device
from streamfuse.models.splits import Pair, label_ids, prepare_split
from streamfuse.models.stage1 import EpochReport, Progress, TrainOptions, fit_modality, training_mode
from streamfuse.models.stage2 import CHOICES, FusionOptions, choose, train_stage2

__all__ = ["EpochReport", "FusionOptions", "PRESET_OPTIONS", "TrainOptions", "preset_options", "train_bundle"]
# The training loop of each preset (see streamfuse.models.config.PRESETS for the models).
PRESET_OPTIONS: dict[str, TrainOptions] = {
    "fast": TrainOptions(),
    "accurate": TrainOptions(augment=True, class_weights=True, label_smoothing=0.1, patience=10, min_steps=20),
}
MODES_FOR = {"ume": (), "mmlora": (), "weighted": ("weighted",), "head": ("head",), "quality": ("quality",),
             "auto": ("weighted", "head", "quality")}


def train_bundle(
    train: Sequence[Pair],
    val: Sequence[Pair],
    test: Sequence[Pair] | None,
    out: str | Path,
    *,
    epochs: int = 8,
    seed: int = 0,
    device: str = "auto",
    configs: dict[str, ModalityConfig] | None = None,
    progress: Progress | None = None,
    options: TrainOptions | None = None,
    created_ms: int | None = None,
    overwrite: bool = False,
    fusion: str = "ume",
    umt_weight: float = 0.0,
    fusion_options: FusionOptions | None = None,
    compare: bool = False,
    preset: str = "fast",
    overrides: dict[str, dict[str, Any]] | None = None,
    weights: dict[str, str | Path] | None = None,
    mmlora: bool = False,
    mmlora_options: Any = None,
) -> dict[str, Any]:
    """Train the models and the fusion, score them, save a bundle.

    Args:
        train, val, test: ``(Sample, Label)`` pairs; ``test`` may be None (not with
            ``compare``). A sample that lacks a modality (or whose reading fails to
            decode) is skipped for it.
        out: the bundle directory to write.
        epochs: maximum epochs per modality (early stopping may end sooner); also of the
            joint model.
        seed: the same seed and data give the same weights and version ids (on the same
            device type, thread count and library versions: float reductions differ).
        device: ``"auto"`` (CUDA + bf16 autocast when available), ``"cpu"``, ``"cuda"``.
        configs: modality -> config; default: :func:`default_config` of ``preset`` for
            every modality seen in ``train``, classes = the sorted label names, series
            channels and length from the data, then ``overrides``.
        progress: called with an :class:`EpochReport` after each epoch of every stage.
        options: stage-1 optimizer settings (:class:`TrainOptions`).
        created_ms: the manifest's creation time (epoch ms); default: now.
        overwrite: replace an existing bundle at ``out``.
        fusion: ``"ume"``, ``"weighted"``, ``"head"`` or ``"auto"`` (train both learned
            modes, keep UME unless one beats it on validation macro-F1).
        umt_weight: λ of the Uni-Modal-Teacher loss; > 0 fine-tunes the encoders in stage 2.
        fusion_options: stage-2 settings (:class:`FusionOptions`).
        compare: also train the joint model and probes; the table goes into the
            manifest (``compare``) and to ``compare.json`` / ``compare.md`` in ``out``.
        preset: ``"fast"`` (the demo's) or ``"accurate"`` (see :data:`PRESETS`).
        overrides: modality -> config fields (e.g. ``{"image": {"arch": "resnet18"}}``).
        weights: modality -> pretrained checkpoint to fine-tune from (``.safetensors``,
            or a weights-only ``.pt`` / ``.pth``; see :func:`load_pretrained`).
        mmlora: also train MMLoRA (adapters on the frozen stage-1 encoders + a fusion head,
            :mod:`streamfuse.models.mmlora`); implied by ``fusion="mmlora"``. When it is the
            chosen fusion, the adapters are saved as units of their own (``lora_<modality>``).
        mmlora_options: :class:`~streamfuse.models.mmlora.MMLoRAOptions`.

    Returns:
        The manifest that was written (baselines = validation metrics of the units served).

    Raises:
        ModelError: no usable data for a modality, labels outside the classes,
            mismatched sample/label ids, an unknown fusion mode, or ``out`` exists and
            ``overwrite`` is False.
    """
    out, opts, dev = Path(out), options or TrainOptions(), resolve_device(device)
    if out.exists() and not overwrite:
        raise ModelError(f"{out} already exists; choose a new directory or pass overwrite=True", out)
    if epochs < 1:
        raise ModelError(f"epochs must be >= 1, got {epochs}")
    if fusion not in CHOICES:
        raise ModelError(f"fusion {fusion!r} is not one of {list(CHOICES)}")
    if umt_weight < 0:
        raise ModelError(f"--umt-weight must be >= 0, got {umt_weight}")
    if compare and not test:
        raise ModelError("compare needs a test split; add rows with split=test")
    configs = configs or _default_configs(train, preset, overrides or {})
    weights = {m: w for m, w in (weights or {}).items() if w}
    unknown = sorted(set(weights) - set(configs))
    if unknown:
        raise ModelError(f"weights given for {unknown}, but the modalities trained are {sorted(configs)}")
    deadline = time.perf_counter() + opts.time_budget_s if opts.time_budget_s else None
    classes = next(iter(configs.values())).classes
    for m, cfg in configs.items():
        if cfg.modality != m or cfg.classes != classes:
            raise ModelError(f"configs[{m!r}] must be a {m} config with classes {list(classes)}")
    order = [m for m in MODALITIES if m in configs]
    pairs = {"train": train, "val": val, "test": test or []}
    labels = {name: label_ids(p, classes, name) for name, p in pairs.items()}
    seconds: dict[str, float] = {}
    with training_mode(opts.threads, dev):
        t0 = time.perf_counter()
        splits = {name: prepare_split(name, configs, p, labels[name], dev) for name, p in pairs.items()}
        for m in order:
            for name in ("train", "val"):
                if len(splits[name].rows[m]) < 2:
                    n = len(splits[name].rows[m])
                    raise ModelError(f"{m}: only {n} {name} samples carry a decodable {m} reading; need >= 2")
        seconds["decode"] = time.perf_counter() - t0
        stage1: dict[str, SensorModel] = {}
        info: dict[str, Any] = {}
        for m in order:
            t0 = time.perf_counter()
            share = _share(deadline, 0.7 * (order.index(m) + 1) / len(order), opts)
            stage1[m], info[m] = fit_modality(configs[m], splits["train"], splits["val"], epochs, seed, opts, dev,
                                              progress, weights=weights.get(m), deadline=share)
            stage1[m].set_version(f"{m}-{weights_digest(stage1[m])[:12]}")
            n = {f"n_{name}": len(s.rows[m]) for name, s in splits.items()}
            info[m].update(n, seconds=round(time.perf_counter() - t0, 3))
        seconds["stage1"] = sum(i["seconds"] for i in info.values())
        t0 = time.perf_counter()
        fopts = fusion_options or FusionOptions()
        cands, outs = train_stage2(stage1, splits, order, MODES_FOR[fusion], umt_weight, fopts, seed, dev, progress)
        if mmlora or fusion == "mmlora":
            from streamfuse.models.mmlora import MMLoRAOptions, train_mmlora

            cands.append(train_mmlora(stage1, splits, order, fopts, mmlora_options or MMLoRAOptions(), seed + 977,
                                      dev, progress, deadline))
        chosen = choose(cands, fusion, fopts.min_gain)
        calibration, recall = _calibrate(chosen, outs, splits, order, classes, dev)
        seconds["stage2"] = time.perf_counter() - t0
        report = None
        if compare:
            from streamfuse.models.compare import run_comparison

            t0 = time.perf_counter()
            report = run_comparison(configs, splits, order, cands, chosen, epochs, seed, opts, dev, progress)
            seconds["compare"] = time.perf_counter() - t0
    models = chosen.encoders or stage1
    for m, model in models.items():
        if chosen.encoders:  # fine-tuned under the UMT loss: new weights, new version
            model.set_version(f"{m}-{weights_digest(model)[:12]}")
    adapters = chosen.adapters or {}
    stored = chosen.fusion if chosen.encoders or adapters else next(
        (c.fusion for c in cands if c.fusion is not None and not c.adapters), None)
    trained_on = {m: model.sf_config.version for m, model in models.items()} if stored is not None else {}
    trained_on |= {adapter_unit(m): a.version for m, a in adapters.items()}
    fusion_section = {
        "mode": chosen.mode, "version": fusion_version(chosen.mode, stored, trained_on), "trained_on": trained_on,
        "requested": fusion, "umt_weight": umt_weight, "candidates": {c.mode: c.record() for c in cands},
    }
    versions = {m: model.sf_config.version for m, model in models.items()} | {"fusion": fusion_section["version"]}
    versions |= {adapter_unit(m): a.version for m, a in adapters.items()}
    base = cands[0]  # UME over the stage-1 models
    units_val, units_test = (base.units_val, base.units_test) if adapters else (chosen.units_val, chosen.units_test)
    manifest = {
        "version": bundle_version(versions, classes),
        "created_ms": created_ms if created_ms is not None else now_ms(),
        "fusion": fusion_section,
        "baselines": {**units_val, "fused": chosen.val},
        "test": {**units_test, "fused": chosen.test} if test else {},
        "training": {
            "seed": seed, "max_epochs": epochs, "preset": preset, "options": asdict(opts),
            "fusion_options": asdict(fopts),
            "device": str(dev), "torch": torch.__version__, "timm": timm.__version__, "modalities": info,
            "stage1": {"val": base.units_val, "test": base.units_test},
            "seconds": {k: round(v, 3) for k, v in seconds.items()},
        },
    }
    attach_calibration(manifest["baselines"], calibration, recall)
    if report is not None:
        manifest["compare"] = report
    if adapters:
        from streamfuse.models.mmlora import adapter_records

        manifest["adapters"] = adapter_records(chosen)
    written = save_bundle(out, models, manifest, fusion=stored, overwrite=overwrite, adapters=adapters)
    if report is not None:
        from streamfuse.models.compare import write_comparison

        write_comparison(out, report)
    return written


def _calibrate(chosen: Any, outs: dict[str, Any], splits: dict[str, Any], order: list[str],
               classes: tuple[str, ...], dev: torch.device) -> Any:
    """The label-free calibration of the served units and their per-class recall, on the
    validation split."""
    from streamfuse.models.fusion import ume
    from streamfuse.models.splits import run_models
    from streamfuse.models.stage2 import _fused

    val = run_models(chosen.encoders, splits["val"], order, dev) if chosen.encoders else outs["val"]
    fused = (_fused(chosen.fusion, chosen.mode, val) if chosen.fusion is not None and chosen.mode in chosen.fusion.modes
             else ume(val.probs, val.present))
    return (fit_calibration(val.probs, val.present, splits["val"].y, fused, order, classes),
            class_recall(val.probs, val.present, splits["val"].y, order, classes))


def preset_options(preset: str, **changes: Any) -> TrainOptions:
    """The :class:`TrainOptions` of a preset with the non-None ``changes`` applied.

    Examples:
        >>> preset_options("accurate", patience=4, threads=None).patience
        4
    """
    if preset not in PRESET_OPTIONS:
        raise ModelError(f"unknown preset {preset!r}; valid: {', '.join(PRESET_OPTIONS)}")
    return replace(PRESET_OPTIONS[preset], **{k: v for k, v in changes.items() if v is not None})


def _share(deadline: float | None, frac: float, opts: TrainOptions) -> float | None:
    """The point in time by which ``frac`` of the time budget is used."""
    if deadline is None or not opts.time_budget_s:
        return None
    return deadline - (1 - frac) * opts.time_budget_s


def _default_configs(train: Sequence[Pair], preset: str = "fast",
                     overrides: dict[str, dict[str, Any]] | None = None) -> dict[str, ModalityConfig]:
    classes = tuple(sorted({label.label for _, label in train}))
    seen = {m for sample, _ in train for m in sample.readings}
    if len(classes) < 2 or not seen & set(MODALITIES):
        raise ModelError(f"training data needs >= 2 classes and a known modality; got classes {list(classes)}")
    overrides = overrides or {}
    bad = sorted(set(overrides) - seen)
    if bad:
        raise ModelError(f"settings given for {bad}, but the training data has only {sorted(seen & set(MODALITIES))}")
    configs = {}
    for m in (m for m in MODALITIES if m in seen):
        fields = {**_from_data(m, train), **overrides.get(m, {})}
        configs[m] = default_config(m, classes, preset, **fields)
    return configs


def _from_data(modality: str, train: Sequence[Pair]) -> dict[str, Any]:
    """Series channels and length (the longest, up to 4096) from the training readings."""
    if modality != "series":
        return {}
    shapes = [tuple(s.readings["series"].shape or ()) for s, _ in train if "series" in s.readings]
    shapes = [(1, sh[0]) if len(sh) == 1 else sh for sh in shapes if len(sh) in (1, 2)]
    if not shapes:
        return {}
    channels = max(set(c for c, _ in shapes), key=[c for c, _ in shapes].count)
    return {"in_channels": int(channels), "series_len": int(min(4096, max(n for _, n in shapes)))}
