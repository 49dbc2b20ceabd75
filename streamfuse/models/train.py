"""The two-stage recipe end to end: :func:`train_bundle`, configured by :class:`TrainConfig`.

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
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import timm
import torch

from streamfuse.clock import now_ms
from streamfuse.errors import ModelError
from streamfuse.events import MODALITIES
from streamfuse.models.bundle_io import save_bundle, weights_digest
from streamfuse.models.calibration import attach_calibration, class_recall, fit_calibration, fit_spread
from streamfuse.models.config import ModalityConfig, default_config
from streamfuse.models.encoders import SensorModel
from streamfuse.models.fusion import FusionSet, fusion_version
from streamfuse.models.lora import Adapter, adapter_unit
from streamfuse.models.manifest import bundle_version
from streamfuse.models.mmlora import MMLoRAOptions
from streamfuse.models.runtime import resolve_device
from streamfuse.models.splits import Pair, Split, label_ids, prepare_split
from streamfuse.models.stage1 import EpochReport, Progress, TrainOptions, fit_modality, training_mode
from streamfuse.models.stage2 import CHOICES, Candidate, FusionOptions, choose, train_stage2

__all__ = ["EpochReport", "FusionOptions", "PRESET_OPTIONS", "TrainConfig", "TrainOptions", "preset_options",
           "train_bundle"]
# The training loop of each preset (see streamfuse.models.config.PRESETS for the models).
PRESET_OPTIONS: dict[str, TrainOptions] = {
    "fast": TrainOptions(),
    "accurate": TrainOptions(augment=True, class_weights=True, label_smoothing=0.1, patience=10, min_steps=20),
}
MODES_FOR = {"ume": (), "mmlora": (), "weighted": ("weighted",), "head": ("head",), "quality": ("quality",),
             "auto": ("weighted", "head", "quality")}


@dataclass(frozen=True)
class TrainConfig:
    """What :func:`train_bundle` trains, and how: every setting but the data and the output.

    Attributes:
        epochs: maximum epochs per modality (early stopping may end sooner); also of the
            joint model.
        seed: the same seed and data give the same weights and version ids (on the same
            device type, thread count and library versions: float reductions differ).
        device: ``"auto"`` (CUDA + bf16 autocast when available), ``"cpu"``, ``"cuda"``.
        preset: ``"fast"`` (the demo's) or ``"accurate"`` (see :data:`PRESETS`).
        configs: modality -> config; default: :func:`default_config` of ``preset`` for
            every modality seen in the training data, classes = the sorted label names,
            series channels and length from the data, then ``overrides``.
        overrides: modality -> config fields (e.g. ``{"image": {"arch": "resnet18"}}``).
        weights: modality -> pretrained checkpoint to fine-tune from (``.safetensors``,
            or a weights-only ``.pt`` / ``.pth``; see :func:`load_pretrained`).
        options: stage-1 optimizer settings (:class:`TrainOptions`; see :func:`preset_options`).
        fusion: ``"ume"``, ``"weighted"``, ``"head"``, ``"quality"``, ``"mmlora"`` or
            ``"auto"`` (train the learned modes, keep UME unless one beats it on
            validation macro-F1).
        umt_weight: λ of the Uni-Modal-Teacher loss; > 0 fine-tunes the encoders in stage 2.
        fusion_options: stage-2 settings (:class:`FusionOptions`).
        mmlora: also train MMLoRA (adapters on the frozen stage-1 encoders + a fusion head,
            :mod:`streamfuse.models.mmlora`); implied by ``fusion="mmlora"``. When it is the
            chosen fusion, the adapters are saved as units of their own (``lora_<modality>``).
        mmlora_options: :class:`~streamfuse.models.mmlora.MMLoRAOptions`.
        compare: also train the joint model and probes; the table goes into the
            manifest (``compare``) and to ``compare.json`` / ``compare.md`` in the bundle.
        created_ms: the manifest's creation time (epoch ms); default: now.
        overwrite: replace an existing bundle at the output directory.

    Raises:
        ModelError: ``epochs`` < 1, an unknown ``fusion`` mode, or a negative ``umt_weight``.

    Examples:
        >>> TrainConfig(epochs=2, fusion="mmlora").trains_mmlora
        True
        >>> TrainConfig(fusion="best")
        Traceback (most recent call last):
        ...
        streamfuse.errors.ModelError: fusion 'best' is not one of [...]
    """

    epochs: int = 8
    seed: int = 0
    device: str = "auto"
    preset: str = "fast"
    configs: Mapping[str, ModalityConfig] | None = None
    overrides: Mapping[str, Mapping[str, Any]] | None = None
    weights: Mapping[str, str | Path] | None = None
    options: TrainOptions = field(default_factory=TrainOptions)
    fusion: str = "ume"
    umt_weight: float = 0.0
    fusion_options: FusionOptions = field(default_factory=FusionOptions)
    mmlora: bool = False
    mmlora_options: MMLoRAOptions = field(default_factory=MMLoRAOptions)
    compare: bool = False
    created_ms: int | None = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ModelError(f"epochs must be >= 1, got {self.epochs}")
        if self.fusion not in CHOICES:
            raise ModelError(f"fusion {self.fusion!r} is not one of {list(CHOICES)}")
        if self.umt_weight < 0:
            raise ModelError(f"--umt-weight must be >= 0, got {self.umt_weight}")

    @property
    def trains_mmlora(self) -> bool:
        """Whether MMLoRA is trained: asked for, or the requested fusion."""
        return self.mmlora or self.fusion == "mmlora"


def train_bundle(
    train: Sequence[Pair],
    val: Sequence[Pair],
    test: Sequence[Pair] | None,
    out: str | Path,
    config: TrainConfig | None = None,
    *,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Train the models and the fusion, score them, save a bundle.

    Args:
        train, val, test: ``(Sample, Label)`` pairs; ``test`` may be None (not with
            ``config.compare``). A sample that lacks a modality (or whose reading fails to
            decode) is skipped for it.
        out: the bundle directory to write.
        config: the settings (:class:`TrainConfig`); default: ``TrainConfig()``.
        progress: called with an :class:`EpochReport` after each epoch of every stage.

    Returns:
        The manifest that was written (baselines = validation metrics of the units served).

    Raises:
        ModelError: no usable data for a modality, labels outside the classes,
            mismatched sample/label ids, ``weights`` for a modality not trained,
            ``compare`` without a test split, or ``out`` exists and ``config.overwrite``
            is False. (Invalid settings are refused by :class:`TrainConfig` itself.)
    """
    cfg = config or TrainConfig()
    out, dev = Path(out), resolve_device(cfg.device)
    _check_target(out, cfg, test)
    configs, weights = _model_configs(train, cfg)
    deadline = time.perf_counter() + cfg.options.time_budget_s if cfg.options.time_budget_s else None
    classes = _shared_classes(configs)
    order = [m for m in MODALITIES if m in configs]
    pairs = {"train": train, "val": val, "test": test or []}
    labels = {name: label_ids(p, classes, name) for name, p in pairs.items()}
    with training_mode(cfg.options.threads, dev):
        run = _run_stages(configs, pairs, labels, order, classes, weights, cfg, dev, progress, deadline)
    return _save_run(out, cfg, run, classes, bool(test), dev)


@dataclass
class _Trained:
    """What the stages of one training run produced."""

    stage1: dict[str, SensorModel]
    info: dict[str, Any]  # modality -> stage-1 summary
    cands: list[Candidate]  # UME first
    chosen: Candidate
    calibration: tuple[Any, Any, Any]  # of the served units, their per-class recall and spread ranges
    report: dict[str, Any] | None  # the comparison table (``compare``)
    seconds: dict[str, float]


def _run_stages(
    configs: Mapping[str, ModalityConfig], pairs: Mapping[str, Sequence[Pair]], labels: Mapping[str, Any],
    order: list[str], classes: tuple[str, ...], weights: Mapping[str, str | Path], cfg: TrainConfig,
    dev: torch.device, progress: Progress | None, deadline: float | None,
) -> _Trained:
    """Decode, stage 1, stage 2 (and the comparison), timing each."""
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    splits = _decode(configs, pairs, labels, order, dev)
    seconds["decode"] = time.perf_counter() - t0
    stage1, info = _train_stage1(configs, splits, order, weights, cfg, dev, progress, deadline)
    seconds["stage1"] = sum(i["seconds"] for i in info.values())
    t0 = time.perf_counter()
    cands, chosen, calibration = _train_fusion(stage1, splits, order, classes, cfg, dev, progress, deadline)
    seconds["stage2"] = time.perf_counter() - t0
    report = None
    if cfg.compare:
        from streamfuse.models.compare import run_comparison

        t0 = time.perf_counter()
        report = run_comparison(configs, splits, order, cands, chosen, cfg.epochs, cfg.seed, cfg.options, dev,
                                progress)
        seconds["compare"] = time.perf_counter() - t0
    return _Trained(stage1, info, cands, chosen, calibration, report, seconds)


def _save_run(out: Path, cfg: TrainConfig, run: _Trained, classes: tuple[str, ...], tested: bool,
              dev: torch.device) -> dict[str, Any]:
    """Write the bundle of the units served (and the comparison files); returns its manifest."""
    models, adapters, stored = _served_units(run.chosen, run.cands, run.stage1)
    manifest = _manifest(cfg, run, models, adapters, stored, classes, tested, dev)
    attach_calibration(manifest["baselines"], *run.calibration)
    if run.report is not None:
        manifest["compare"] = run.report
    if adapters:
        from streamfuse.models.mmlora import adapter_records

        manifest["adapters"] = adapter_records(run.chosen)
    written = save_bundle(out, models, manifest, fusion=stored, overwrite=cfg.overwrite, adapters=adapters)
    if run.report is not None:
        from streamfuse.models.compare import write_comparison

        write_comparison(out, run.report)
    return written


def _check_target(out: Path, cfg: TrainConfig, test: Sequence[Pair] | None) -> None:
    """Refuse to overwrite a bundle by accident, and a comparison without a test split."""
    if out.exists() and not cfg.overwrite:
        raise ModelError(f"{out} already exists; choose a new directory or pass overwrite=True", out)
    if cfg.compare and not test:
        raise ModelError("compare needs a test split; add rows with split=test")


def _model_configs(train: Sequence[Pair],
                   cfg: TrainConfig) -> tuple[dict[str, ModalityConfig], dict[str, str | Path]]:
    """The modality configs to train (given, or from the preset and the data) and the
    pretrained checkpoints to start from, checked against each other."""
    configs = dict(cfg.configs or _default_configs(train, cfg.preset, cfg.overrides or {}))
    weights = {m: w for m, w in (cfg.weights or {}).items() if w}
    unknown = sorted(set(weights) - set(configs))
    if unknown:
        raise ModelError(f"weights given for {unknown}, but the modalities trained are {sorted(configs)}")
    return configs, weights


def _shared_classes(configs: Mapping[str, ModalityConfig]) -> tuple[str, ...]:
    """The classes every config agrees on (each config must be of its own modality)."""
    classes = next(iter(configs.values())).classes
    for m, cfg in configs.items():
        if cfg.modality != m or cfg.classes != classes:
            raise ModelError(f"configs[{m!r}] must be a {m} config with classes {list(classes)}")
    return classes


def _decode(configs: Mapping[str, ModalityConfig], pairs: Mapping[str, Sequence[Pair]],
            labels: Mapping[str, Any], order: Sequence[str], dev: torch.device) -> dict[str, Split]:
    """Every split decoded for every modality; train and val need two readings of each."""
    splits = {name: prepare_split(name, configs, p, labels[name], dev) for name, p in pairs.items()}
    for m in order:
        for name in ("train", "val"):
            if len(splits[name].rows[m]) < 2:
                n = len(splits[name].rows[m])
                raise ModelError(f"{m}: only {n} {name} samples carry a decodable {m} reading; need >= 2")
    return splits


def _train_stage1(
    configs: Mapping[str, ModalityConfig], splits: Mapping[str, Split], order: Sequence[str],
    weights: Mapping[str, str | Path], cfg: TrainConfig, dev: torch.device, progress: Progress | None,
    deadline: float | None,
) -> tuple[dict[str, SensorModel], dict[str, Any]]:
    """Stage 1: each modality alone, within 70 % of the time budget; its model versioned
    by its weights, its summary with the split sizes and the seconds it took."""
    stage1: dict[str, SensorModel] = {}
    info: dict[str, Any] = {}
    for m in order:
        t0 = time.perf_counter()
        share = _share(deadline, 0.7 * (order.index(m) + 1) / len(order), cfg.options)
        stage1[m], info[m] = fit_modality(configs[m], splits["train"], splits["val"], cfg.epochs, cfg.seed,
                                          cfg.options, dev, progress, weights=weights.get(m), deadline=share)
        stage1[m].set_version(f"{m}-{weights_digest(stage1[m])[:12]}")
        n = {f"n_{name}": len(s.rows[m]) for name, s in splits.items()}
        info[m].update(n, seconds=round(time.perf_counter() - t0, 3))
    return stage1, info


def _train_fusion(
    stage1: Mapping[str, SensorModel], splits: Mapping[str, Split], order: list[str], classes: tuple[str, ...],
    cfg: TrainConfig, dev: torch.device, progress: Progress | None, deadline: float | None,
) -> tuple[list[Candidate], Candidate, Any]:
    """Stage 2: the fusion candidates (UME first, then the learned modes and MMLoRA), the
    one chosen, and its calibration, per-class recall and spread ranges."""
    fopts = cfg.fusion_options
    cands, outs = train_stage2(stage1, splits, order, MODES_FOR[cfg.fusion], cfg.umt_weight, fopts, cfg.seed, dev,
                               progress)
    if cfg.trains_mmlora:
        from streamfuse.models.mmlora import train_mmlora

        cands.append(train_mmlora(stage1, splits, order, fopts, cfg.mmlora_options, cfg.seed + 977, dev, progress,
                                  deadline))
    chosen = choose(cands, cfg.fusion, fopts.min_gain)
    return cands, chosen, _calibrate(chosen, outs, splits, order, classes, dev)


def _served_units(chosen: Candidate, cands: Sequence[Candidate], stage1: dict[str, SensorModel]) -> tuple[
        dict[str, SensorModel], dict[str, Adapter], FusionSet | None]:
    """The encoders, MMLoRA adapters and learned fusion the bundle serves for ``chosen``.

    The stored fusion is the chosen one when it brings its own encoders or adapters;
    otherwise the learned modes trained on the stage-1 models (if any), so that the
    registry can switch to them later.
    """
    models = chosen.encoders or stage1
    for m, model in models.items():
        if chosen.encoders:  # fine-tuned under the UMT loss: new weights, new version
            model.set_version(f"{m}-{weights_digest(model)[:12]}")
    adapters = chosen.adapters or {}
    stored = chosen.fusion if chosen.encoders or adapters else next(
        (c.fusion for c in cands if c.fusion is not None and not c.adapters), None)
    return models, adapters, stored


def _manifest(
    cfg: TrainConfig, run: _Trained, models: Mapping[str, SensorModel], adapters: Mapping[str, Adapter],
    stored: FusionSet | None, classes: tuple[str, ...], tested: bool, dev: torch.device,
) -> dict[str, Any]:
    """The bundle manifest: versions, fusion, validation baselines, test scores and how it
    was trained (before calibration, comparison and adapters are attached)."""
    chosen, cands = run.chosen, run.cands
    adapter_versions = {adapter_unit(m): a.version for m, a in adapters.items()}
    trained_on = {m: model.sf_config.version for m, model in models.items()} if stored is not None else {}
    trained_on |= adapter_versions
    fusion_section = {
        "mode": chosen.mode, "version": fusion_version(chosen.mode, stored, trained_on), "trained_on": trained_on,
        "requested": cfg.fusion, "umt_weight": cfg.umt_weight, "candidates": {c.mode: c.record() for c in cands},
    }
    versions = {m: model.sf_config.version for m, model in models.items()} | {"fusion": fusion_section["version"]}
    versions |= adapter_versions
    base = cands[0]  # UME over the stage-1 models
    units_val, units_test = (base.units_val, base.units_test) if adapters else (chosen.units_val, chosen.units_test)
    return {
        "version": bundle_version(versions, classes),
        "created_ms": cfg.created_ms if cfg.created_ms is not None else now_ms(),
        "fusion": fusion_section,
        "baselines": {**units_val, "fused": chosen.val},
        "test": {**units_test, "fused": chosen.test} if tested else {},
        "training": {
            "seed": cfg.seed, "max_epochs": cfg.epochs, "preset": cfg.preset, "options": asdict(cfg.options),
            "fusion_options": asdict(cfg.fusion_options),
            "device": str(dev), "torch": torch.__version__, "timm": timm.__version__, "modalities": run.info,
            "stage1": {"val": base.units_val, "test": base.units_test},
            "seconds": {k: round(v, 3) for k, v in run.seconds.items()},
        },
    }


def _calibrate(chosen: Any, outs: dict[str, Any], splits: dict[str, Any], order: list[str],
               classes: tuple[str, ...], dev: torch.device) -> Any:
    """The label-free calibration of the served units, their per-class recall and each
    modality's signal-spread range, on the validation split."""
    from streamfuse.models.fusion import ume
    from streamfuse.models.splits import run_models
    from streamfuse.models.stage2 import _fused

    val = run_models(chosen.encoders, splits["val"], order, dev) if chosen.encoders else outs["val"]
    fused = (_fused(chosen.fusion, chosen.mode, val) if chosen.fusion is not None and chosen.mode in chosen.fusion.modes
             else ume(val.probs, val.present))
    return (fit_calibration(val.probs, val.present, splits["val"].y, fused, order, classes),
            class_recall(val.probs, val.present, splits["val"].y, order, classes),
            fit_spread(splits["val"].spread))


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
