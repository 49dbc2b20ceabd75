"""Stage 2: learn a fusion on top of the stage-1 models, and keep it only if it beats UME.

With the Uni-Modal Teacher weight ``λ = 0`` the stage-1 encoders are frozen: their
outputs are computed once and only the fusion trains. With ``λ > 0`` each learned mode
fine-tunes copies of the encoders (batch-norm statistics and uni-modal classifiers
frozen) with ``CE(fused, y) + λ·Σ_m MSE(h_m, h_m_teacher)``, the teacher features being
the frozen stage-1 ones. Every learned mode trains with modality dropout, so that it
copes with any subset of modalities (the worker fuses every subset for contributions).

:func:`choose` implements ``--fusion``: ``auto`` keeps UME unless a learned mode has a
strictly higher validation macro-F1.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from streamfuse.errors import ModelError
from streamfuse.models.config import FUSION_MODES
from streamfuse.models.encoders import SensorModel
from streamfuse.models.fusion import LEARNED_MODES, FusionConfig, FusionSet, ume
from streamfuse.models.runtime import autocast
from streamfuse.models.splits import Outputs, Split, run_models, score_fused, unit_scores
from streamfuse.models.stage1 import Progress, TrainOptions, fit_loop

CHOICES: tuple[str, ...] = ("auto", *FUSION_MODES)


@dataclass(frozen=True)
class FusionOptions:
    """Stage-2 settings.

    Attributes:
        epochs: maximum epochs of a learned fusion on frozen encoders.
        umt_epochs: maximum epochs when fine-tuning encoders with the UMT loss.
        lr: AdamW learning rate of the fusion's parameters.
        encoder_lr: AdamW learning rate of the encoders under the UMT loss.
        weight_decay, batch_size, patience: as in :class:`TrainOptions`.
        hidden, dropout: the ``head`` MLP.
        modality_dropout: while training, each present modality is hidden with this
            probability (at least one is kept).
        min_gain: ``auto`` takes a learned mode only if its validation macro-F1 exceeds
            UME's by more than this (0: any strict improvement).
    """

    epochs: int = 30
    umt_epochs: int = 8
    lr: float = 1e-2
    encoder_lr: float = 3e-4
    weight_decay: float = 1e-4
    batch_size: int = 64
    patience: int = 6
    hidden: int = 64
    dropout: float = 0.1
    modality_dropout: float = 0.3
    min_gain: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.modality_dropout < 1.0:
            raise ModelError(f"modality_dropout must be in [0, 1), got {self.modality_dropout}")
        for name in ("epochs", "umt_epochs", "batch_size", "patience", "hidden"):
            if getattr(self, name) < 1:
                raise ModelError(f"FusionOptions.{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class Candidate:
    """One fusion candidate with its scores.

    Attributes:
        mode: the fusion mode.
        fusion: the :class:`FusionSet` holding it (None for UME).
        encoders: fine-tuned encoders (UMT), or None when it uses the stage-1 models.
        val, test: fused Top-1 / macro-F1 (``test`` empty without a test split).
        units_val, units_test: per-modality scores of its encoders.
        info: training summary.
    """

    mode: str
    fusion: FusionSet | None
    encoders: dict[str, SensorModel] | None
    val: dict[str, Any]
    test: dict[str, Any]
    units_val: dict[str, Any] = field(default_factory=dict)
    units_test: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    adapters: dict[str, Any] | None = None  # MMLoRA: modality -> lora.Adapter

    def record(self) -> dict[str, Any]:
        """The manifest entry: scores and how it was trained."""
        kind = "umt" if self.encoders else "mmlora" if self.adapters else "stage1"
        return {"val": self.val, "test": self.test, "encoders": kind, **self.info}


def _dropout(present: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
    """Hide each present modality with probability ``p``; a row never loses all of them."""
    if p <= 0:
        return present
    keep = torch.rand(present.shape, generator=gen) >= p
    use = present & keep.to(present.device)
    return torch.where(use.any(1, keepdim=True), use, present)


def _fused(fusion: FusionSet, mode: str, out: Outputs) -> torch.Tensor:
    fusion.eval()
    with torch.inference_mode():
        return fusion.fuse(mode, out.probs, out.features, out.present)


def train_stage2(
    models: Mapping[str, SensorModel], splits: Mapping[str, Split], order: Sequence[str], modes: Sequence[str],
    umt_weight: float, opts: FusionOptions, seed: int, dev: torch.device, progress: Progress | None,
) -> tuple[list[Candidate], dict[str, Outputs]]:
    """Train every learned mode in ``modes``; returns the candidates (UME first) and the
    stage-1 models' outputs per split (reused by reports)."""
    if umt_weight < 0:
        raise ModelError(f"--umt-weight must be >= 0, got {umt_weight}")
    outs = {name: run_models(models, s, order, dev) for name, s in splits.items() if s.n}
    y = {name: s.y.cpu() for name, s in splits.items()}

    def scored(name: str, fused_of) -> dict[str, Any]:
        return score_fused(y[name], fused_of(outs[name]), outs[name].present) if name in outs else {}

    base = Candidate("ume", None, None, scored("val", lambda o: ume(o.probs, o.present)),
                     scored("test", lambda o: ume(o.probs, o.present)))
    base.units_val = unit_scores(outs["val"], y["val"], order)
    base.units_test = unit_scores(outs["test"], y["test"], order) if "test" in outs else {}
    cands = [base]
    if "quality" in modes:
        cands.append(_quality_candidate(outs, y, order, models[order[0]].sf_config.classes))
    learned = [m for m in LEARNED_MODES if m in modes]
    cfg = FusionConfig(tuple(order), models[order[0]].sf_config.classes,
                       tuple(models[m].num_features for m in order), opts.hidden, opts.dropout)
    torch.manual_seed(seed)
    shared = FusionSet(cfg, learned)
    for k, mode in enumerate(learned):
        fusion = shared if umt_weight == 0 else FusionSet(cfg, [mode])
        fusion.learned[mode].to(dev)
        if umt_weight == 0:
            info = _train_frozen(fusion, mode, outs, splits, opts, seed + 101 * (k + 1), dev, progress)
            encoders = None
            val_out, test_out = outs.get("val"), outs.get("test")
        else:
            encoders, info = _train_umt(fusion, mode, models, outs, splits, order, umt_weight, opts,
                                        seed + 101 * (k + 1), dev, progress)
            val_out = run_models(encoders, splits["val"], order, dev)
            test_out = run_models(encoders, splits["test"], order, dev) if splits["test"].n else None
        fusion.cpu().eval()
        cand = Candidate(mode, fusion, encoders, {}, {}, info=info)
        cand.val = score_fused(y["val"], _fused(fusion, mode, val_out), val_out.present)
        cand.units_val = unit_scores(val_out, y["val"], order)
        if test_out is not None:
            cand.test = score_fused(y["test"], _fused(fusion, mode, test_out), test_out.present)
            cand.units_test = unit_scores(test_out, y["test"], order)
        cands.append(cand)
    return cands, outs


def _quality_candidate(outs: Mapping[str, Outputs], y: Mapping[str, torch.Tensor], order: Sequence[str],
                       classes: Sequence[str]) -> Candidate:
    """Quality-aware fusion over the stage-1 models, with the calibration fitted on validation
    (no weights to train; scored like every candidate)."""
    from streamfuse.models.calibration import fit_calibration
    from streamfuse.models.fusion import quality

    val = outs["val"]
    cal = fit_calibration(val.probs, val.present, y["val"], ume(val.probs, val.present), order, classes)

    def scored(name: str) -> dict[str, Any]:
        if name not in outs:
            return {}
        o = outs[name]
        return score_fused(y[name], quality(o.probs, o.present, cal, order), o.present)

    cand = Candidate("quality", None, None, scored("val"), scored("test"), info={"calibration": "validation"})
    cand.units_val = unit_scores(val, y["val"], order)
    cand.units_test = unit_scores(outs["test"], y["test"], order) if "test" in outs else {}
    return cand


def choose(cands: Sequence[Candidate], requested: str, min_gain: float = 0.0) -> Candidate:
    """The candidate ``--fusion`` asks for; ``auto``: UME unless a learned one beats its
    validation macro-F1 by more than ``min_gain``, then the best of those (the simpler
    mode on a tie)."""
    if requested not in CHOICES:
        raise ModelError(f"--fusion {requested!r} is not one of {list(CHOICES)}")
    by_mode = {c.mode: c for c in cands}
    if requested != "auto":
        if requested not in by_mode:
            raise ModelError(f"fusion mode {requested!r} was not trained; candidates: {list(by_mode)}")
        return by_mode[requested]
    ume_f1 = by_mode["ume"].val.get("macro_f1", -1.0)
    best = by_mode["ume"]
    for c in cands:
        f1 = c.val.get("macro_f1", -1.0)
        if f1 > ume_f1 + min_gain and f1 > best.val.get("macro_f1", -1.0):
            best = c
    return best


def _train_frozen(
    fusion: FusionSet, mode: str, outs: Mapping[str, Outputs], splits: Mapping[str, Split], opts: FusionOptions,
    seed: int, dev: torch.device, progress: Progress | None,
) -> dict[str, Any]:
    tr, va = outs["train"], outs["val"]
    rows = tr.present.any(1).nonzero().squeeze(1)  # samples with nothing present teach nothing
    probs, present = tr.probs[rows].to(dev), tr.present[rows].to(dev)
    feats = [f[rows].to(dev) for f in tr.features]
    y = splits["train"].y[rows.to(splits["train"].y.device)].to(dev)
    gen = torch.Generator().manual_seed(seed)

    def loss_fn(idx: torch.Tensor) -> torch.Tensor:
        idx = idx.to(dev)
        use = _dropout(present[idx], opts.modality_dropout, gen)
        with autocast(dev):
            fused = fusion.fuse(mode, probs[idx], [f[idx] for f in feats], use)
        return F.nll_loss(fused.float().clamp_min(1e-8).log(), y[idx])

    def evaluate() -> tuple[float, float]:
        cpu = fusion.cpu()
        s = score_fused(splits["val"].y.cpu(), _fused(cpu, mode, va), va.present)
        fusion.to(dev)
        return s["top1"], s["macro_f1"]

    train_opts = _loop_options(opts)
    module = fusion.learned[mode]
    return fit_loop(name=mode, stage="fusion", n=len(rows), params=module.parameters(), loss_fn=loss_fn,
                    evaluate=evaluate, train_modules=[module], state_modules=[module], epochs=opts.epochs,
                    seed=seed, opts=train_opts, progress=progress)


def _train_umt(
    fusion: FusionSet, mode: str, models: Mapping[str, SensorModel], outs: Mapping[str, Outputs],
    splits: Mapping[str, Split], order: Sequence[str], lam: float, opts: FusionOptions, seed: int,
    dev: torch.device, progress: Progress | None,
) -> tuple[dict[str, SensorModel], dict[str, Any]]:
    train = splits["train"]
    students = _students(models, order, dev)
    teacher = [f.to(dev) for f in outs["train"].features]
    present = train.present(order).to(dev)
    pos = [train.position(m).to(dev) for m in order]
    rows = present.any(1).nonzero().squeeze(1)
    gen = torch.Generator().manual_seed(seed)
    n_classes = len(fusion.cfg.classes)

    def loss_fn(i: torch.Tensor) -> torch.Tensor:
        idx = rows[i.to(dev)]
        use = _dropout(present[idx], opts.modality_dropout, gen)
        with autocast(dev):
            feats, probs, mse = _student_outputs(students, train, order, pos, idx, n_classes, teacher, dev)
            fused = fusion.fuse(mode, probs, feats, use)
        return F.nll_loss(fused.float().clamp_min(1e-8).log(), train.y[idx]) + lam * mse

    def evaluate() -> tuple[float, float]:
        out = run_models(students, splits["val"], order, dev)
        s = score_fused(splits["val"].y.cpu(), _fused(fusion.cpu(), mode, out), out.present)
        fusion.to(dev)
        for st in students.values():
            st.eval()
        return s["top1"], s["macro_f1"]

    module = fusion.learned[mode]
    enc_params = [p for s in students.values() for p in s.parameters() if p.requires_grad]
    groups = [{"params": list(module.parameters()), "lr": opts.lr}, {"params": enc_params, "lr": opts.encoder_lr}]
    train_opts = _loop_options(opts)
    info = fit_loop(name=f"{mode}+umt", stage="fusion", n=len(rows), params=groups, loss_fn=loss_fn,
                    evaluate=evaluate, train_modules=[module], state_modules=[module, *students.values()],
                    epochs=opts.umt_epochs, seed=seed, opts=train_opts, progress=progress)
    for s in students.values():  # trained: every parameter trainable again, as stage 1 left it
        for p in s.parameters():
            p.requires_grad_(True)
        s.eval()
    return students, {**info, "umt_weight": lam}


def _loop_options(opts: FusionOptions) -> TrainOptions:
    """The :func:`fit_loop` settings of a fusion's training."""
    return TrainOptions(lr=opts.lr, weight_decay=opts.weight_decay, batch_size=opts.batch_size,
                        patience=opts.patience)


def _students(models: Mapping[str, SensorModel], order: Sequence[str], dev: torch.device) -> dict[str, SensorModel]:
    """Copies of the stage-1 encoders to fine-tune (in eval mode, so that batch-norm keeps
    its statistics), their uni-modal classifiers frozen: they stay the stage-1 ones."""
    students = {m: copy.deepcopy(models[m]).to(dev).eval() for m in order}
    for s in students.values():
        for p in s.net.get_classifier().parameters():
            p.requires_grad_(False)
    return students


def _student_outputs(
    students: Mapping[str, SensorModel], train: Split, order: Sequence[str], pos: Sequence[torch.Tensor],
    idx: torch.Tensor, n_classes: int, teacher: Sequence[torch.Tensor], dev: torch.device,
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """The students' features and probabilities for the training rows ``idx`` (zeros where
    a modality is absent), and the UMT distillation term ``Σ_m MSE(h_m, h_m_teacher)``.

    Returns:
        ``(features per modality [B, D_m], probabilities [B, M, C], mse)``.
    """
    feats, probs, mse = [], [], torch.zeros((), device=dev)
    for j, m in enumerate(order):
        p = pos[j][idx]
        have = (p >= 0).nonzero().squeeze(1)
        f_full = torch.zeros(len(idx), students[m].num_features, device=dev)
        p_full = torch.zeros(len(idx), n_classes, device=dev)
        if len(have):
            f, logits = students[m].head_outputs(train.z[m][p[have]])
            f_full = f_full.index_put((have,), f.float())
            p_full = p_full.index_put((have,), logits.float().softmax(-1))
            mse = mse + F.mse_loss(f.float(), teacher[j][idx[have]])
        feats.append(f_full)
        probs.append(p_full)
    return feats, torch.stack(probs, 1), mse
