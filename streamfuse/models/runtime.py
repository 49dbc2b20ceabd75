"""Device placement and mixed precision: CUDA + bf16 autocast when available, else fp32 CPU."""

from __future__ import annotations

import contextlib

import torch

from streamfuse.errors import ModelError


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """The torch device for ``"auto"`` (CUDA if available, else CPU) or an explicit name.

    Raises:
        ModelError: if the name is invalid, or CUDA is asked for but unavailable.

    Examples:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if isinstance(device, torch.device):
        dev = device
    elif device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ModelError(f"invalid device {device!r} ({exc}); use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {device!r} asked for but CUDA is not available; use device=auto or cpu")
    return dev


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; a no-op elsewhere (bf16 on CPU is slower and less exact)."""
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
