"""Low-rank adapters (LoRA) on a modality's model, for MMLoRA.

An adapter adds ``ΔW = (α / r) · B·A`` to the weight of every convolution and linear
layer of a :class:`~streamfuse.models.encoders.SensorModel`'s network (``A``: ``[r,
fan_in]``, ``B``: ``[out, r]``, B starts at zero so training starts from the base
model). While training, the base weights stay frozen and only ``A`` and ``B`` learn
(:func:`attach`); for serving, the adapter is merged into a copy of the base model
(:func:`merged`), so the served model costs exactly what the base model costs.

An :class:`Adapter` is its own registry unit (``lora_<modality>``): it names the base
version it was trained on and is applied only on top of that version.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from streamfuse.errors import ModelError
from streamfuse.models.encoders import SensorModel

__all__ = ["Adapter", "LoRADelta", "adapter_unit", "attach", "detach", "merged"]
TARGETS = (nn.Conv1d, nn.Conv2d, nn.Linear)


def adapter_unit(modality: str) -> str:
    """The registry unit of a modality's adapter.

    Examples:
        >>> adapter_unit("image")
        'lora_image'
    """
    return f"lora_{modality}"


class LoRADelta(nn.Module):
    """A parametrization ``W -> W + scale · (B @ A).view(W.shape)``."""

    def __init__(self, weight: torch.Tensor, rank: int, alpha: float) -> None:
        super().__init__()
        fan_in = weight[0].numel()
        self.scale = alpha / rank
        self.lora_A = nn.Parameter(torch.randn(rank, fan_in, device=weight.device) / fan_in**0.5)
        self.lora_B = nn.Parameter(torch.zeros(weight.shape[0], rank, device=weight.device))

    def delta(self, shape: torch.Size) -> torch.Tensor:
        return (self.lora_B @ self.lora_A).view(shape) * self.scale

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta(weight.shape).to(weight.dtype)


def _targets(model: SensorModel) -> list[tuple[str, nn.Module]]:
    return [(name, mod) for name, mod in model.net.named_modules() if isinstance(mod, TARGETS)]


def attach(model: SensorModel, rank: int, alpha: float) -> list[nn.Parameter]:
    """Freeze ``model`` and put a trainable adapter on each conv / linear layer.

    Returns:
        The adapter's parameters (the only ones that require grad).
    """
    if rank < 1:
        raise ModelError(f"LoRA rank must be >= 1, got {rank}")
    for p in model.parameters():
        p.requires_grad_(False)
    params = []
    for _, mod in _targets(model):
        delta = LoRADelta(mod.weight, rank, alpha)
        parametrize.register_parametrization(mod, "weight", delta)
        params += [delta.lora_A, delta.lora_B]
    return params


@dataclass(frozen=True)
class Adapter:
    """A trained adapter: ``tensors`` holds ``<layer>.lora_A`` / ``<layer>.lora_B``.

    Attributes:
        modality: whose model it adapts.
        base: the version of the model it was trained on (applied only to that one).
        rank, alpha: its shape and scale.
        tensors: layer name (in ``model.net``) + ``.lora_A`` / ``.lora_B`` -> tensor (CPU).
        version: ``lora_<modality>-<hex>``, a digest of the above.
    """

    modality: str
    base: str
    rank: int
    alpha: float
    tensors: Mapping[str, torch.Tensor]
    version: str = ""

    def config(self) -> dict[str, Any]:
        """The JSON-safe description stored next to the tensors."""
        return {"modality": self.modality, "base": self.base, "rank": self.rank, "alpha": self.alpha}

    def with_version(self) -> Adapter:
        h = hashlib.sha256(repr(sorted(self.config().items())).encode())
        for name, t in sorted(self.tensors.items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return Adapter(self.modality, self.base, self.rank, self.alpha, dict(self.tensors),
                       f"{adapter_unit(self.modality)}-{h.hexdigest()[:12]}")


def detach(model: SensorModel, rank: int, alpha: float) -> Adapter:
    """The adapter trained on ``model`` (by :func:`attach`), as an unversioned :class:`Adapter`."""
    tensors = {}
    for name, mod in _targets(model):
        plist = getattr(getattr(mod, "parametrizations", None), "weight", None)
        if plist is None:
            continue
        delta = plist[0]
        tensors[f"{name}.lora_A"] = delta.lora_A.detach().cpu().clone()
        tensors[f"{name}.lora_B"] = delta.lora_B.detach().cpu().clone()
    cfg = model.sf_config
    return Adapter(cfg.modality, cfg.version, rank, alpha, tensors).with_version()


def merged(base: SensorModel, adapter: Adapter) -> SensorModel:
    """A copy of ``base`` with ``adapter`` folded into its weights (eval mode).

    Raises:
        ModelError: the adapter belongs to another modality or version, or its tensors
            do not fit the model's layers.
    """
    cfg = base.sf_config
    if adapter.modality != cfg.modality or adapter.base != cfg.version:
        raise ModelError(f"adapter {adapter.version} was trained on {adapter.modality} {adapter.base}, "
                         f"not {cfg.modality} {cfg.version}; activate that version or retrain MMLoRA")
    model = copy.deepcopy(base)
    layers = dict(_targets(model))
    names = {k.rsplit(".", 1)[0] for k in adapter.tensors}
    if names - set(layers):
        raise ModelError(f"adapter {adapter.version} names layers {sorted(names - set(layers))[:3]} that "
                         f"{cfg.arch} does not have")
    with torch.no_grad():
        for name in names:
            w = layers[name].weight
            a, b = adapter.tensors[f"{name}.lora_A"], adapter.tensors[f"{name}.lora_B"]
            if a.shape != (adapter.rank, w[0].numel()) or b.shape != (w.shape[0], adapter.rank):
                raise ModelError(f"adapter {adapter.version}: {name} does not fit {cfg.arch}")
            w.add_(((b @ a) * (adapter.alpha / adapter.rank)).view(w.shape).to(w.dtype, copy=False).to(w.device))
    return model.eval()
