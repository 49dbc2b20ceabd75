"""The paper's reference point: a jointly trained end-to-end model, and linear probes.

:func:`train_joint` trains fresh encoders for every modality together with a concat
head (:class:`~streamfuse.models.fusion.HeadFusion`) on one cross-entropy loss. That is
the set-up in which one modality tends to win and the others stop learning (modality
competition / laziness); :func:`probe_branches` measures how much each branch learned by
fitting a linear classifier on its frozen features, to compare with the same modality
trained alone in stage 1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from streamfuse.models.config import ModalityConfig
from streamfuse.models.encoders import SensorModel, create_model
from streamfuse.models.fusion import FusionConfig, HeadFusion
from streamfuse.models.runtime import autocast
from streamfuse.models.splits import Split, branch_outputs, run_net, score, score_fused
from streamfuse.models.stage1 import Progress, TrainOptions, fit_loop

PROBE_OPTIONS = TrainOptions(lr=1e-2, weight_decay=1e-3, batch_size=64, patience=8)
PROBE_EPOCHS = 40


def _joint_logits(
    encoders: Mapping[str, SensorModel], head: HeadFusion, split: Split, idx: torch.Tensor, order: Sequence[str],
    present: torch.Tensor, pos: Sequence[torch.Tensor], dev: torch.device,
) -> torch.Tensor:
    feats = [branch_outputs(encoders[m], split, m, pos[j], idx, dev)[0] for j, m in enumerate(order)]
    return head.logits(feats, present[idx])


def train_joint(
    configs: Mapping[str, ModalityConfig], splits: Mapping[str, Split], order: Sequence[str], epochs: int,
    seed: int, opts: TrainOptions, dev: torch.device, progress: Progress | None,
) -> tuple[dict[str, SensorModel], HeadFusion, dict[str, Any]]:
    """Train all encoders and a concat head end to end (one loss, no modality dropout).

    Returns:
        The encoders and head (eval mode) and ``{"val", "test", "training"}`` fused scores.
    """
    torch.manual_seed(seed)
    encoders = {m: create_model(configs[m]).to(dev) for m in order}
    classes = configs[order[0]].classes
    head = HeadFusion(FusionConfig(tuple(order), classes, tuple(encoders[m].num_features for m in order))).to(dev)
    modules: list[nn.Module] = [*encoders.values(), head]
    state = {}
    for name, s in splits.items():
        state[name] = (s.present(order).to(dev), [s.position(m).to(dev) for m in order])
    present, pos = state["train"]
    rows = present.any(1).nonzero().squeeze(1)
    train = splits["train"]

    def loss_fn(i: torch.Tensor) -> torch.Tensor:
        idx = rows[i.to(dev)]
        with autocast(dev):
            logits = _joint_logits(encoders, head, train, idx, order, present, pos, dev)
        return F.cross_entropy(logits.float(), train.y[idx])

    def fused(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        for module in modules:
            module.eval()
        split, (pres, ps) = splits[name], state[name]
        out = []
        with torch.inference_mode(), autocast(dev):
            for idx in torch.arange(split.n, device=dev).split(256):
                out.append(_joint_logits(encoders, head, split, idx, order, pres, ps, dev).float().softmax(-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, len(classes)), pres.cpu()

    def evaluate() -> tuple[float, float]:
        s = score_fused(splits["val"].y.cpu(), *fused("val"))
        return s["top1"], s["macro_f1"]

    info = fit_loop(name="joint", stage="joint", n=len(rows), params=[p for m in modules for p in m.parameters()],
                    loss_fn=loss_fn, evaluate=evaluate, train_modules=modules, state_modules=modules,
                    epochs=epochs, seed=seed, opts=opts, progress=progress)
    scores = {"val": score_fused(splits["val"].y.cpu(), *fused("val")), "training": info}
    scores["test"] = score_fused(splits["test"].y.cpu(), *fused("test")) if splits["test"].n else {}
    return encoders, head.eval(), scores


def probe_branches(
    encoders: Mapping[str, SensorModel], splits: Mapping[str, Split], order: Sequence[str], seed: int,
    dev: torch.device, progress: Progress | None,
) -> dict[str, dict[str, Any]]:
    """Linear probe on each frozen branch of the joint model.

    Returns:
        modality -> ``{"val": score, "test": score}`` (over the samples with that modality).
    """
    out: dict[str, dict[str, Any]] = {}
    for k, m in enumerate(order):
        feats = {name: run_net(encoders[m], s.z[m], dev)[0].to(dev) for name, s in splits.items()}
        ys = {name: s.y[s.rows[m].to(s.y.device)].to(dev) for name, s in splits.items()}
        mean, std = feats["train"].mean(0), feats["train"].std(0).clamp_min(1e-6)
        feats = {name: (f - mean) / std for name, f in feats.items()}
        probe = _fit_probe(m, feats, ys, encoders[m].num_classes, seed + k, dev, progress)
        with torch.inference_mode():
            out[m] = {name: score(ys[name].cpu(), probe(feats[name]).argmax(-1).cpu(), encoders[m].num_classes)
                      for name in ("val", "test") if len(ys[name])}
    return out


def _fit_probe(
    modality: str, feats: Mapping[str, torch.Tensor], ys: Mapping[str, torch.Tensor], n_classes: int, seed: int,
    dev: torch.device, progress: Progress | None,
) -> nn.Linear:
    """A linear classifier on standardized frozen features, early-stopped on validation."""
    torch.manual_seed(seed)
    probe = nn.Linear(feats["train"].shape[1], n_classes).to(dev)
    x, y = feats["train"], ys["train"]

    def loss_fn(idx: torch.Tensor) -> torch.Tensor:
        idx = idx.to(dev)
        return F.cross_entropy(probe(x[idx]), y[idx])

    def evaluate() -> tuple[float, float]:
        with torch.inference_mode():
            s = score(ys["val"].cpu(), probe(feats["val"]).argmax(-1).cpu(), n_classes)
        return s["top1"], s["macro_f1"]

    fit_loop(name=modality, stage="probe", n=len(x), params=probe.parameters(), loss_fn=loss_fn, evaluate=evaluate,
             train_modules=[probe], state_modules=[probe], epochs=PROBE_EPOCHS, seed=seed, opts=PROBE_OPTIONS,
             progress=progress)
    return probe.eval()
