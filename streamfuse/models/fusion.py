"""Fusion of per-modality outputs: ``ume``, ``weighted`` and ``head``. Pure torch, no I/O.

Every mode takes the per-modality class probabilities ``[B, M, C]``, the per-modality
pre-logit features (``M`` tensors ``[B, D_m]``) and a mask ``use [B, M]`` of the
modalities that take part, and returns fused probabilities ``[B, C]``:

- ``ume`` (:func:`ume`): the mean of the used modalities' probabilities. No parameters;
  the default, and the fallback every learned mode must beat on validation.
- ``weighted`` (:class:`WeightedFusion`): one learned logit per modality; the weights are
  the softmax of the logits *over the used modalities only*, so they always sum to 1.
  Zero logits are exactly UME.
- ``head`` (:class:`HeadFusion`): a small MLP over the concatenated, layer-normalized
  features; an unused modality's features are zeroed and a presence indicator is
  appended, so the head knows what is missing (it is trained with modality dropout).
- ``quality`` (:func:`quality`): quality-aware, no weights: per sample, the odd one out
  (the others agree without it) is weighted by its label-free probability of being right
  given its confidence and how often a healthy vs a broken unit ends up there (calibrated on the validation split, :mod:`streamfuse.monitor.evidence`). A
  fogged camera that is the odd one out weighs little in that very sample, before any
  alert or mask command.
- ``mmlora``: the same head over the features of encoders carrying low-rank adapters,
  trained jointly with them (:mod:`streamfuse.models.mmlora`); usable only with the
  encoder and adapter versions it was trained with.

A row with no modality in use gets the uniform distribution in every mode.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from streamfuse.errors import ModelError
from streamfuse.events import MODALITIES
from streamfuse.models.config import CALIBRATED_MODES, FUSION_MODES

__all__ = [
    "FUSION_MODES", "LEARNED_MODES", "FusionConfig", "FusionSet", "FusionUnit", "HeadFusion", "WeightedFusion",
    "fusion_version", "quality", "ume",
]
LEARNED_MODES: tuple[str, ...] = tuple(m for m in FUSION_MODES if m != "ume" and m not in CALIBRATED_MODES)
MIN_WEIGHT = 0.02  # a modality is down-weighted, never silenced by one sample's evidence


def quality(probs: torch.Tensor, use: torch.Tensor, calibration: Any, modalities: Sequence[str]) -> torch.Tensor:
    """Quality-aware fusion: the used modalities' probabilities, each weighted by its
    calibrated probability of being right in this sample's agreement category.

    Args:
        probs: ``[B, M, C]`` per-modality probabilities.
        use: ``[B, M]`` bool, the modalities that take part.
        calibration: a :class:`~streamfuse.monitor.evidence.Calibration`.
        modalities: the names along ``M``.

    Returns:
        ``[B, C]`` float32; uniform where nothing is used; UME where every modality agrees.

    Examples:
        >>> from streamfuse.monitor.evidence import Calibration
        >>> rows = [({"image": y, "audio": y, "series": y}, y) for y in "abab"] * 10
        >>> rows += [({"image": "a", "audio": "b", "series": "b"}, "b")] * 4
        >>> cal = Calibration.fit(rows)
        >>> p = torch.tensor([[[1.0, 0.0], [0.3, 0.7], [0.4, 0.6]]])   # the camera is the odd one out
        >>> ume(p, torch.ones(1, 3, dtype=torch.bool)).argmax(1).item()
        0
        >>> [round(x, 2) for x in quality(p, torch.ones(1, 3, dtype=torch.bool), cal,
        ...                                ("image", "audio", "series"))[0].tolist()]
        [0.36, 0.64]
    """
    _check_shapes(probs, use)
    use = use.to(device=probs.device, dtype=torch.bool)
    conf_t, labels_t = probs.float().max(dim=-1)
    weights = torch.ones(use.shape, dtype=torch.float32)
    # Only the odd one out of a sample (its label differs while at least two others agree)
    # is judged: when all differ, one sample cannot say which is broken, and UME's equal
    # weights are the safe answer. Most rows have none, so the rows are found on the whole
    # batch and only the odd ones are looked up.
    rows, cols = odd_ones_out(labels_t, use).nonzero(as_tuple=True)
    if rows.numel():
        others = (use.sum(dim=1) - 1)[rows].tolist()
        for i, j, k, conf in zip(rows.tolist(), cols.tolist(), others, conf_t[rows, cols].tolist()):
            p = calibration.reliability(modalities[j], k, "odd", conf)
            weights[i, j] = max(MIN_WEIGHT, p if p is not None else 1.0)
    return _weighted(probs, use, weights)


def odd_ones_out(labels: torch.Tensor, use: torch.Tensor) -> torch.Tensor:
    """``[B, M]`` bool: the used modality whose label differs from the other used ones'
    while those (at least two) agree: the ``odd`` category of
    :func:`streamfuse.monitor.evidence.categories`, on a whole batch.

    Examples:
        >>> labels = torch.tensor([[0, 1, 1], [0, 1, 2], [0, 1, 1]])
        >>> use = torch.tensor([[True, True, True], [True, True, True], [True, True, False]])
        >>> odd_ones_out(labels, use).int().tolist()
        [[1, 0, 0], [0, 0, 0], [0, 0, 0]]
    """
    out = torch.zeros_like(use)
    if not labels.numel():
        return out
    beyond = int(labels.max()) + 1
    for j in range(use.shape[1]):
        others = use.clone()
        others[:, j] = False
        hi = torch.where(others, labels, -1).max(dim=1).values
        lo = torch.where(others, labels, beyond).min(dim=1).values
        out[:, j] = use[:, j] & (others.sum(dim=1) >= 2) & (hi == lo) & (labels[:, j] != hi)
    return out


def _weighted(probs: torch.Tensor, use: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    w = weights.to(probs.device).unsqueeze(-1)
    fused = (torch.where(use.unsqueeze(-1), probs.float(), 0.0) * w).sum(dim=1)
    fused = fused / fused.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return _uniform_where_empty(fused, use)


def ume(probs: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Uni-Modal Ensemble: average the probabilities of the modalities present.

    Absent modalities (missing, undecodable or masked) are left out and the mean is
    taken over the others, then renormalized to sum to 1. Their rows of ``probs`` are
    ignored entirely, so they may hold anything (zeros, NaN). A row with *no* modality
    present gets the uniform distribution ``1 / C``: "no evidence", never a made-up
    class; callers that must not predict in that case check ``present.any(1)``.

    Args:
        probs: ``[B, M, C]`` per-modality class probabilities.
        present: ``[B, M]`` bool, True where modality ``m`` of sample ``b`` counts.

    Returns:
        ``[B, C]`` fused probabilities, in ``probs``' dtype (computed in float32).

    Raises:
        ModelError: if the shapes do not match.

    Examples:
        >>> p = torch.tensor([[[0.75, 0.25], [0.5, 0.5]], [[0.75, 0.25], [0.5, 0.5]]])
        >>> ume(p, torch.tensor([[True, True], [False, True]])).tolist()
        [[0.625, 0.375], [0.5, 0.5]]
        >>> ume(p[:1], torch.tensor([[False, False]])).tolist()
        [[0.5, 0.5]]
    """
    _check_shapes(probs, present)
    mask = present.to(device=probs.device, dtype=torch.bool).unsqueeze(-1)
    p = torch.where(mask, probs.float(), torch.zeros((), device=probs.device))
    total = p.sum(dim=1)  # [B, C]
    norm = total.sum(dim=-1, keepdim=True)
    uniform = torch.full_like(total, 1.0 / probs.shape[-1])
    fused = torch.where(norm > 0, total / norm.clamp_min(torch.finfo(torch.float32).tiny), uniform)
    return fused.to(probs.dtype)


def _check_shapes(probs: torch.Tensor, use: torch.Tensor) -> None:
    if probs.dim() != 3 or use.shape != probs.shape[:2]:
        shapes = f"{list(probs.shape)} and {list(use.shape)}"
        raise ModelError(f"fusion needs probs [B, M, C] and a mask [B, M]; got {shapes}")


def _uniform_where_empty(fused: torch.Tensor, use: torch.Tensor) -> torch.Tensor:
    empty = ~use.any(dim=1, keepdim=True)
    return torch.where(empty, torch.full_like(fused, 1.0 / fused.shape[-1]), fused)


@dataclass(frozen=True)
class FusionConfig:
    """Shapes of a bundle's learned fusion modes (saved with their weights).

    Attributes:
        modalities: the modalities, in the order of the ``M`` axis.
        classes: class names, in probability order.
        feature_dims: ``D_m`` of each modality's features (the ``head`` input).
        hidden: width of the ``head`` MLP's hidden layer.
        dropout: dropout in the ``head`` MLP while training.

    Raises:
        ModelError: unknown or repeated modalities, fewer than two classes, or
            ``feature_dims`` not one positive integer per modality.

    Examples:
        >>> cfg = FusionConfig(("image", "series"), ("ok", "bad"), (64, 32))
        >>> FusionConfig.from_dict(cfg.to_dict()) == cfg
        True
    """

    modalities: tuple[str, ...]
    classes: tuple[str, ...]
    feature_dims: tuple[int, ...]
    hidden: int = 64
    dropout: float = 0.1

    def __post_init__(self) -> None:
        for name in ("modalities", "classes", "feature_dims"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        mods = self.modalities
        if not mods or len(set(mods)) != len(mods) or set(mods) - set(MODALITIES):
            raise ModelError(f"fusion modalities {list(mods)} must be distinct values of {list(MODALITIES)}")
        if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
            raise ModelError(f"fusion needs at least two distinct classes, got {list(self.classes)}")
        dims = self.feature_dims
        if len(dims) != len(mods) or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in dims):
            raise ModelError(f"feature_dims {list(dims)} must be one positive integer per modality {list(mods)}")
        if isinstance(self.hidden, bool) or not isinstance(self.hidden, int) or self.hidden < 1:
            raise ModelError(f"fusion hidden must be a positive integer, got {self.hidden!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ModelError(f"fusion dropout must be in [0, 1), got {self.dropout!r}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
                for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FusionConfig:
        """Inverse of :meth:`to_dict`.

        Raises:
            ModelError: on unknown or missing keys, or invalid values.
        """
        if not isinstance(data, Mapping):
            raise ModelError(f"a fusion config must be a map, got {type(data).__name__}")
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ModelError(f"unknown fusion config keys {unknown}; upgrade streamfuse or re-train")
        try:
            return cls(**data)
        except TypeError as exc:
            raise ModelError(f"invalid fusion config: {exc}") from None


class WeightedFusion(nn.Module):
    """Learned per-modality weights, softmax-normalized over the modalities in use.

    Examples:
        >>> f = WeightedFusion(2)
        >>> p = torch.tensor([[[0.75, 0.25], [0.25, 0.75]]])
        >>> f(p, [], torch.tensor([[True, True]])).tolist()  # zero logits: UME
        [[0.5, 0.5]]
        >>> f(p, [], torch.tensor([[True, False]])).tolist()  # renormalized
        [[0.75, 0.25]]
    """

    def __init__(self, n_modalities: int) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(n_modalities))

    def weights(self, use: torch.Tensor) -> torch.Tensor:
        """``[B, M]`` weights: 0 for unused modalities, summing to 1 where any is used."""
        logits = self.logits.float().expand(use.shape).masked_fill(~use, float("-inf"))
        return torch.nan_to_num(logits.softmax(dim=1), nan=0.0)  # an all-unused row is NaN: zero it

    def forward(self, probs: torch.Tensor, features: Sequence[torch.Tensor], use: torch.Tensor) -> torch.Tensor:
        del features  # weights act on probabilities only
        use = use.to(device=probs.device, dtype=torch.bool)
        _check_shapes(probs, use)
        w = self.weights(use).unsqueeze(-1)
        fused = (torch.where(use.unsqueeze(-1), probs.float(), 0.0) * w).sum(dim=1)
        return _uniform_where_empty(fused, use)


class HeadFusion(nn.Module):
    """A small MLP over concatenated per-modality features plus presence indicators.

    Each modality's features are layer-normalized (their scales differ), multiplied by
    its presence (so an absent modality contributes exactly zero), concatenated with the
    ``[B, M]`` presence indicators and mapped to class logits.
    """

    def __init__(self, cfg: FusionConfig) -> None:
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(d) for d in cfg.feature_dims)
        n_in = sum(cfg.feature_dims) + len(cfg.feature_dims)
        self.mlp = nn.Sequential(
            nn.Linear(n_in, cfg.hidden), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(cfg.hidden, len(cfg.classes))
        )

    def logits(self, features: Sequence[torch.Tensor], use: torch.Tensor) -> torch.Tensor:
        """``[B, C]`` logits (rows with nothing in use are meaningless; see :meth:`forward`)."""
        if len(features) != len(self.norms):
            raise ModelError(f"head fusion needs {len(self.norms)} feature tensors, got {len(features)}")
        w = use.float()
        parts = [norm(h.float()) * w[:, j : j + 1] for j, (norm, h) in enumerate(zip(self.norms, features))]
        return self.mlp(torch.cat([*parts, w], dim=1))

    def forward(self, probs: torch.Tensor, features: Sequence[torch.Tensor], use: torch.Tensor) -> torch.Tensor:
        use = use.to(device=probs.device, dtype=torch.bool)
        _check_shapes(probs, use)
        return _uniform_where_empty(self.logits(features, use).float().softmax(dim=-1), use)


class FusionSet(nn.Module):
    """UME plus a bundle's learned fusion modes (a module per mode; keys ``<mode>.<param>``).

    Args:
        cfg: the shapes shared by every mode.
        modes: the learned modes to build (a subset of :data:`LEARNED_MODES`).

    Raises:
        ModelError: on an unknown mode.

    Examples:
        >>> fs = FusionSet(FusionConfig(("image", "audio"), ("a", "b"), (4, 4)), ["weighted", "head"])
        >>> fs.modes
        ('ume', 'weighted', 'head')
        >>> p = torch.tensor([[[0.75, 0.25], [0.25, 0.75]]])
        >>> h = [torch.zeros(1, 4), torch.zeros(1, 4)]
        >>> [fs.fuse(m, p, h, torch.tensor([[False, False]])).tolist() for m in fs.modes]
        [[[0.5, 0.5]], [[0.5, 0.5]], [[0.5, 0.5]]]
    """

    def __init__(self, cfg: FusionConfig, modes: Sequence[str] = ()) -> None:
        super().__init__()
        bad = [m for m in modes if m not in LEARNED_MODES]
        if bad:
            raise ModelError(f"unknown learned fusion mode(s) {bad}; valid: {list(LEARNED_MODES)}")
        self.cfg = cfg
        self.learned = nn.ModuleDict()
        for mode in LEARNED_MODES:  # fixed order: the same modes give the same keys
            if mode in modes:
                self.learned[mode] = WeightedFusion(len(cfg.modalities)) if mode == "weighted" else HeadFusion(cfg)

    @property
    def modes(self) -> tuple[str, ...]:
        return ("ume", *self.learned.keys())

    def fuse(
        self, mode: str, probs: torch.Tensor, features: Sequence[torch.Tensor], use: torch.Tensor
    ) -> torch.Tensor:
        """Fused probabilities ``[B, C]`` (float32) of one mode; see the module docstring.

        Raises:
            ModelError: ``mode`` is not one of :attr:`modes`, or the shapes do not fit.
        """
        if mode == "ume":
            return ume(probs.float(), use.to(device=probs.device, dtype=torch.bool))
        if mode not in self.learned:
            raise ModelError(f"fusion mode {mode!r} is not in this bundle; available: {list(self.modes)}")
        return self.learned[mode](probs, features, use)


@dataclass(frozen=True)
class FusionUnit:
    """The fusion step of a bundle: the learned modes, the active one and provenance.

    Attributes:
        fusion: the :class:`FusionSet` (eval mode, on the CPU), or None for UME only.
        mode: the active mode.
        version: ``"ume"`` for UME without learned weights, else ``fusion-<hex>``.
        trained_on: modality -> encoder version the learned modes were trained on;
            ``head`` is only usable with exactly these encoders.
    """

    fusion: FusionSet | None
    mode: str
    version: str
    trained_on: Mapping[str, str]

    @classmethod
    def ume_only(cls) -> FusionUnit:
        return cls(None, "ume", "ume", {})

    def available(self, modalities: Sequence[str], versions: Mapping[str, str],
                  calibrated: bool = False) -> tuple[str, ...]:
        """Modes usable with these modalities (in order) and encoder versions; ``quality``
        too when the bundle carries a calibration (``calibrated``)."""
        extra = CALIBRATED_MODES if calibrated else ()
        if self.fusion is None or tuple(modalities) != self.fusion.cfg.modalities:
            return ("ume", *extra)
        same = all(versions.get(m) == self.trained_on.get(m) for m in modalities)
        # weighted acts on probabilities, which keep their meaning across encoder versions;
        # head reads features, which do not.
        modes = (*(m for m in self.fusion.modes if m != "head" or same), *extra)
        # mmlora reads the features of the adapted encoders: every encoder and adapter as trained.
        adapted = all(versions.get(u) == v for u, v in self.trained_on.items())
        return tuple(m for m in modes if m != "mmlora" or adapted)


def fusion_version(mode: str, fusion: FusionSet | None, trained_on: Mapping[str, str]) -> str:
    """A content-derived fusion version: the active mode, the weights and their encoders.

    Examples:
        >>> fusion_version("ume", None, {})
        'ume'
    """
    if fusion is None or not len(fusion.learned):
        return mode if mode in CALIBRATED_MODES else "ume"
    h = hashlib.sha256(f"{mode}|{sorted(trained_on.items())}|{fusion.cfg.to_dict()}|".encode())
    for name, t in sorted(fusion.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return "fusion-" + h.hexdigest()[:12]
