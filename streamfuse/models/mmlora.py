"""MMLoRA: low-rank adapters on the frozen stage-1 encoders, trained jointly with the fusion.

Each stage-1 model gets a LoRA adapter (:mod:`streamfuse.models.lora`) on every
convolution and linear layer; its base weights and batch-norm statistics stay frozen.
The adapters and a fusion head over the adapted features (the ``mmlora`` mode, a
:class:`~streamfuse.models.fusion.HeadFusion`) train together on
``CE(fused, y) + Σ_m CE(adapted logits_m, y)``: the uni-modal terms keep every branch
learning on its own, so no modality goes lazy in the joint training, and the adapted
models stay good uni-modal classifiers (they are what the worker serves per modality).
Training uses modality dropout like every learned fusion, and early stopping on the
fused validation macro-F1.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from streamfuse.models.encoders import SensorModel
from streamfuse.models.fusion import FusionConfig, FusionSet
from streamfuse.models.lora import Adapter, attach, detach
from streamfuse.models.runtime import autocast
from streamfuse.models.splits import Split, branch_outputs, run_models, score_fused, unit_scores
from streamfuse.models.stage1 import Progress, TrainOptions, fit_loop
from streamfuse.models.stage2 import Candidate, FusionOptions, _dropout, _fused

__all__ = ["MMLoRAOptions", "train_mmlora"]


@dataclass(frozen=True)
class MMLoRAOptions:
    """MMLoRA settings.

    Attributes:
        rank, alpha: of every adapter (``ΔW = α / r · B·A``).
        epochs, patience: of the joint training (early stopping on fused val macro-F1).
        lr: AdamW learning rate of the adapters and the head.
        unimodal_weight: weight of the per-modality cross-entropy terms.
        min_steps: optimizer steps per epoch at least (small training sets).
    """

    rank: int = 4
    alpha: float = 8.0
    epochs: int = 20
    patience: int = 5
    lr: float = 2e-3
    unimodal_weight: float = 1.0
    min_steps: int = 10


def train_mmlora(
    models: Mapping[str, SensorModel], splits: Mapping[str, Split], order: Sequence[str], fopts: FusionOptions,
    opts: MMLoRAOptions, seed: int, dev: torch.device, progress: Progress | None, deadline: float | None = None,
) -> Candidate:
    """Train the adapters and the ``mmlora`` head; returns the candidate (``adapters`` set).

    The candidate's ``units_val`` / ``units_test`` are the adapted models' scores.
    """
    torch.manual_seed(seed)
    students = {m: copy.deepcopy(models[m]).to(dev).eval() for m in order}
    lora_params = [p for m in order for p in attach(students[m], opts.rank, opts.alpha)]
    fusion = _head_fusion(models, order, fopts)
    head = fusion.learned["mmlora"].to(dev)
    train = splits["train"]
    present = train.present(order).to(dev)
    pos = [train.position(m).to(dev) for m in order]
    rows = present.any(1).nonzero().squeeze(1)
    gen = torch.Generator().manual_seed(seed)

    def loss_fn(i: torch.Tensor) -> torch.Tensor:
        idx = rows[i.to(dev)]
        use = _dropout(present[idx], fopts.modality_dropout, gen)
        feats, uni = [], torch.zeros((), device=dev)
        with autocast(dev):
            for j, m in enumerate(order):
                full, logits, have = branch_outputs(students[m], train, m, pos[j], idx, dev)
                if logits is not None:
                    uni = uni + F.cross_entropy(logits.float(), train.y[idx[have]])
                feats.append(full)
            logits = head.logits(feats, use)
        return F.cross_entropy(logits.float(), train.y[idx]) + opts.unimodal_weight * uni

    def evaluate() -> tuple[float, float]:
        out = run_models(students, splits["val"], order, dev)
        s = score_fused(splits["val"].y.cpu(), _fused(fusion.cpu(), "mmlora", out), out.present)
        fusion.to(dev)
        for st in students.values():
            st.eval()
        return s["top1"], s["macro_f1"]

    info = fit_loop(name="mmlora", stage="fusion", n=len(rows), params=[*lora_params, *head.parameters()],
                    loss_fn=loss_fn, evaluate=evaluate, train_modules=[head], state_modules=[head, *students.values()],
                    epochs=opts.epochs, seed=seed, opts=_loop_options(opts, fopts), progress=progress,
                    deadline=deadline)
    adapters: dict[str, Adapter] = {m: detach(students[m], opts.rank, opts.alpha) for m in order}
    fusion.cpu().eval()
    cand = Candidate("mmlora", fusion, None, {}, {}, info={**info, "rank": opts.rank, "alpha": opts.alpha},
                     adapters=adapters)
    _score(cand, students, splits, order, dev)
    return cand


def _loop_options(opts: MMLoRAOptions, fopts: FusionOptions) -> TrainOptions:
    """The :func:`fit_loop` settings: MMLoRA's own rate, patience and steps; the fusion's
    weight decay and batch size."""
    return TrainOptions(lr=opts.lr, weight_decay=fopts.weight_decay, batch_size=fopts.batch_size,
                        patience=opts.patience, min_steps=opts.min_steps)


def _head_fusion(models: Mapping[str, SensorModel], order: Sequence[str], fopts: FusionOptions) -> FusionSet:
    """A fusion set holding only a new ``mmlora`` head over the models' features."""
    cfg = FusionConfig(tuple(order), models[order[0]].sf_config.classes,
                       tuple(models[m].num_features for m in order), fopts.hidden, fopts.dropout)
    return FusionSet(cfg, ["mmlora"])


def _score(cand: Candidate, students: Mapping[str, SensorModel], splits: Mapping[str, Split], order: Sequence[str],
           dev: torch.device) -> None:
    """Fill in the candidate's fused and per-modality (adapted models) scores on the
    validation split and, when there is one, the test split."""
    y = {name: s.y.cpu() for name, s in splits.items()}
    for name in ("val", "test"):
        if not splits[name].n:
            continue
        out = run_models(students, splits[name], order, dev)
        fused = score_fused(y[name], _fused(cand.fusion, "mmlora", out), out.present)
        units = unit_scores(out, y[name], order)
        units.pop("fused", None)
        if name == "val":
            cand.val, cand.units_val = fused, units
        else:
            cand.test, cand.units_test = fused, units


def adapter_records(cand: Candidate) -> dict[str, dict[str, Any]]:
    """Per modality: the adapter's version, base, shape and its adapted model's scores."""
    return {m: {**a.config(), "version": a.version, "baseline": cand.units_val.get(m, {}),
                "test": cand.units_test.get(m, {})} for m, a in (cand.adapters or {}).items()}
