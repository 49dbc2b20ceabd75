"""Light per-modality training augmentation, on the cached front-end outputs.

Training caches each modality's front-end output once (:mod:`streamfuse.models.splits`),
so augmentation acts there, per sample, from a seeded generator (the same seed gives the
same batches):

- image ``[B, 3, S, S]`` (normalized): a small random affine (rotation ±10°, scale
  0.9–1.1, shift ±10 %, border padding) and brightness / contrast jitter. No flips: they
  change the meaning of digits, text and oriented parts.
- audio ``[B, 1, mels, frames]`` (log-mel dB): a circular time shift of up to 20 %, a gain
  of ±6 dB and SpecAugment (one frequency and one time mask, filled with the clip's mean).
- series ``[B, C, L]``: per-channel scaling ×(1 ± 10 %), noise at 5 % of each channel's
  spread and a circular time shift of up to 10 %.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["augment"]


def _u(gen: torch.Generator, shape: tuple[int, ...], lo: float, hi: float, like: torch.Tensor) -> torch.Tensor:
    return (torch.rand(shape, generator=gen) * (hi - lo) + lo).to(device=like.device, dtype=like.dtype)


def _roll(x: torch.Tensor, max_frac: float, gen: torch.Generator) -> torch.Tensor:
    """Circular shift of the last axis, a different amount per sample."""
    n = x.shape[-1]
    shifts = (torch.rand(len(x), generator=gen) * 2 - 1) * max_frac * n
    idx = (torch.arange(n).unsqueeze(0) - shifts.round().long().unsqueeze(1)) % n
    idx = idx.to(x.device).view(len(x), *([1] * (x.dim() - 2)), n).expand_as(x)
    return x.gather(-1, idx)


def _image(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    b = len(x)
    angle = _u(gen, (b,), -10, 10, x) * math.pi / 180
    scale = _u(gen, (b,), 0.9, 1.1, x)
    shift = _u(gen, (b, 2), -0.2, 0.2, x)  # affine_grid units: the image spans [-1, 1]
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    contrast = _u(gen, (b, 1, 1, 1), 0.8, 1.2, x)
    bright = _u(gen, (b, 1, 1, 1), -0.2, 0.2, x)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * contrast + mean + bright


def _mask(x: torch.Tensor, axis: int, max_frac: float, gen: torch.Generator, fill: torch.Tensor) -> torch.Tensor:
    n = x.shape[axis]
    width = (torch.rand(len(x), generator=gen) * max_frac * n).long()
    start = (torch.rand(len(x), generator=gen) * (n - width + 1)).long()
    pos = torch.arange(n)
    hit = (pos >= start[:, None]) & (pos < (start + width)[:, None])  # [B, n]
    shape = [len(x)] + [1] * (x.dim() - 1)
    shape[axis] = n
    return torch.where(hit.view(shape).to(x.device), fill, x)


def _audio(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    x = _roll(x, 0.2, gen) + _u(gen, (len(x), 1, 1, 1), -6, 6, x)
    fill = x.mean(dim=(1, 2, 3), keepdim=True)
    x = _mask(x, 2, 0.125, gen, fill)
    return _mask(x, 3, 0.125, gen, fill)


def _series(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    b, c = x.shape[:2]
    spread = x.std(dim=-1, keepdim=True)
    noise = torch.randn(x.shape, generator=gen).to(device=x.device, dtype=x.dtype) * 0.05 * spread
    x = x * _u(gen, (b, c, 1), 0.9, 1.1, x) + noise
    return _roll(x, 0.1, gen)


def augment(modality: str, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A randomly perturbed copy of a batch of front-end outputs (see the module docstring).

    Args:
        modality: ``"image"``, ``"audio"`` or ``"series"``.
        x: the batch.
        gen: a CPU generator (seeded by the caller).

    Returns:
        A tensor of ``x``'s shape, device and dtype.

    Examples:
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.arange(8.0).view(1, 1, 8)
        >>> augment("series", x, g).shape
        torch.Size([1, 1, 8])
    """
    with torch.no_grad():
        if modality == "image":
            return _image(x, gen)
        if modality == "audio":
            return _audio(x, gen)
        return _series(x, gen)
