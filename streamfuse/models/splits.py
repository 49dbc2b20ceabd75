"""Decoded training splits and scoring, shared by stage 1, stage 2 and the joint model.

A :class:`Split` holds, per modality, the front-end output (the log-mel for audio, the
input itself otherwise) of every sample whose reading decoded: the front ends have no
trainable parameters and there is no augmentation, so they are computed once and every
model trains on the cached tensors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from streamfuse.errors import ModelError
from streamfuse.events import Label, Sample
from streamfuse.models.config import ModalityConfig
from streamfuse.models.encoders import SensorModel, create_frontend
from streamfuse.models.fusion import ume
from streamfuse.models.metrics import macro_f1, top1
from streamfuse.models.preprocess import batch_tensor_checked
from streamfuse.models.runtime import autocast

Pair = tuple[Sample, Label]
CHUNK = 256


@dataclass
class Split:
    """One split, decoded.

    Attributes:
        name: ``train``, ``val`` or ``test``.
        y: ``[N]`` class ids (int64, on the training device).
        rows: modality -> ``[n_m]`` sample rows whose reading decoded (CPU int64).
        z: modality -> front-end output of those rows (on the training device).
        spread: modality -> ``[n_m]`` signal spread of those rows' raw readings (CPU float32,
            what a served prediction reports as ``signal_std``).
    """

    name: str
    y: torch.Tensor
    rows: dict[str, torch.Tensor]
    z: dict[str, torch.Tensor]
    spread: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.y)

    def present(self, order: Sequence[str]) -> torch.Tensor:
        """``[N, M]`` bool (CPU): which modalities each sample has."""
        out = torch.zeros(self.n, len(order), dtype=torch.bool)
        for j, m in enumerate(order):
            if m in self.rows:
                out[self.rows[m], j] = True
        return out

    def position(self, modality: str) -> torch.Tensor:
        """``[N]`` index of each sample's row in ``z[modality]``, -1 where it has none."""
        pos = torch.full((self.n,), -1, dtype=torch.long)
        rows = self.rows[modality]
        pos[rows] = torch.arange(len(rows))
        return pos


def label_ids(pairs: Sequence[Pair], classes: Sequence[str], split: str) -> np.ndarray:
    """Class ids of the labels; raises ModelError for a mismatched id or unknown label."""
    index = {c: i for i, c in enumerate(classes)}
    ids = []
    for sample, label in pairs:
        if label.sample_id != sample.sample_id:
            raise ModelError(f"{split}: label for {label.sample_id!r} paired with sample {sample.sample_id!r}")
        if label.label not in index:
            raise ModelError(f"{split}: label {label.label!r} is not one of the classes {list(classes)}")
        ids.append(index[label.label])
    return np.asarray(ids, dtype=np.int64)


def prepare_split(
    name: str, configs: Mapping[str, ModalityConfig], pairs: Sequence[Pair], y: np.ndarray, dev: torch.device
) -> Split:
    """Decode every modality's readings of ``pairs`` and run the front ends once."""
    rows: dict[str, torch.Tensor] = {}
    z: dict[str, torch.Tensor] = {}
    spread: dict[str, torch.Tensor] = {}
    for m, cfg in configs.items():
        have = [i for i, (sample, _) in enumerate(pairs) if m in sample.readings]
        batch = batch_tensor_checked(cfg, [pairs[i][0].readings[m] for i in have], dev)
        rows[m] = torch.as_tensor([have[k] for k in batch.indices], dtype=torch.long)
        spread[m] = batch.signal_std
        frontend = create_frontend(cfg).to(dev)
        x = batch.tensor if len(batch.tensor) else torch.zeros(1, *batch.tensor.shape[1:], device=dev)
        with torch.no_grad():  # an empty split still gets the right feature shape: [0, ...]
            z[m] = torch.cat([frontend(part) for part in x.split(CHUNK)])[: len(batch.tensor)]
    return Split(name, torch.as_tensor(y, dtype=torch.long, device=dev), rows, z, spread)


def branch_outputs(
    model: SensorModel, split: Split, modality: str, pos: torch.Tensor, idx: torch.Tensor, dev: torch.device,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """One branch on the samples ``idx`` of ``split`` (``pos`` = ``split.position(modality)``):
    features ``[len(idx), D]`` (zeros where the modality is absent), the logits of the rows
    that have it (None if none), and those rows (positions in ``idx``)."""
    p = pos[idx]
    have = (p >= 0).nonzero().squeeze(1)
    full = torch.zeros(len(idx), model.num_features, device=dev)
    logits = None
    if len(have):
        f, logits = model.head_outputs(split.z[modality][p[have]])
        full = full.index_put((have,), f.float())
    return full, logits, have


@dataclass
class Outputs:
    """Every modality's output on one split (CPU): probabilities, features, presence."""

    probs: torch.Tensor  # [N, M, C]
    features: list[torch.Tensor]  # M x [N, D_m], zeros where absent
    present: torch.Tensor  # [N, M] bool


def run_net(model: SensorModel, z: torch.Tensor, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and softmax probabilities (float32, CPU) of front-end outputs, eval mode."""
    model.eval()
    feats, probs = [], []
    with torch.inference_mode(), autocast(dev):
        for part in z.split(CHUNK) if len(z) else ():
            f, logits = model.head_outputs(part)
            feats.append(f.float().cpu())
            probs.append(logits.float().softmax(-1).cpu())
    if not feats:
        return torch.zeros(0, model.num_features), torch.zeros(0, model.num_classes)
    return torch.cat(feats), torch.cat(probs)


def run_models(models: Mapping[str, SensorModel], split: Split, order: Sequence[str], dev: torch.device) -> Outputs:
    """:class:`Outputs` of ``models`` (in ``order``) on ``split``."""
    n_classes = next(iter(models.values())).num_classes
    probs = torch.zeros(split.n, len(order), n_classes)
    features = []
    for j, m in enumerate(order):
        f, p = run_net(models[m], split.z[m], dev)
        full = torch.zeros(split.n, models[m].num_features)
        rows = split.rows[m]
        full[rows], probs[rows, j] = f, p
        features.append(full)
    return Outputs(probs, features, split.present(order))


def score(y: np.ndarray | torch.Tensor, pred: np.ndarray | torch.Tensor, n_classes: int) -> dict[str, Any]:
    """``{"top1", "macro_f1", "n"}`` of integer predictions."""
    y, pred = np.asarray(torch.as_tensor(y).cpu()), np.asarray(torch.as_tensor(pred).cpu())
    return {"top1": top1(y, pred), "macro_f1": macro_f1(y, pred, n_classes), "n": int(len(y))}


def score_fused(y: torch.Tensor, fused: torch.Tensor, present: torch.Tensor) -> dict[str, Any]:
    """Score fused probabilities over the samples that had any modality."""
    keep = present.any(1)
    return score(y.cpu()[keep], fused.argmax(-1)[keep], fused.shape[-1])


def unit_scores(out: Outputs, y: torch.Tensor, order: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per modality (over the samples that have it) and of the UME fusion (``"fused"``)."""
    y = y.cpu()
    scores: dict[str, dict[str, Any]] = {}
    for j, m in enumerate(order):
        have = out.present[:, j]
        if have.any():  # a unit without samples gets no score (rather than a made-up 0)
            scores[m] = score(y[have], out.probs[have, j].argmax(-1), out.probs.shape[-1])
    if out.present.any():
        scores["fused"] = score_fused(y, ume(out.probs, out.present), out.present)
    return scores
