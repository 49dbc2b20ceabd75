"""Device placement, mixed precision (CUDA + bf16 autocast when available, else fp32 CPU)
and the compiled form a model is served in."""

from __future__ import annotations

import contextlib
import logging
import threading
import warnings
import weakref
from typing import Callable

import torch
from torch import nn

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


log = logging.getLogger(__name__)
Forward = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
_SERVED: weakref.WeakKeyDictionary[nn.Module, Forward] = weakref.WeakKeyDictionary()
# The worker's thread and its model-loading thread both build served forms; a weak dict is
# not safe to write from two threads (its clean-up of dead keys runs inside either write).
_SERVED_LOCK = threading.Lock()


def served_forward(model: nn.Module, example: torch.Tensor) -> Forward:
    """The form ``model`` is served in (:func:`traced_forward`), built once per model
    object — a bundle that swaps one unit keeps the others' traces — on ``example``.
    Thread-safe: the trace is built outside the lock, and the first one stored wins."""
    with _SERVED_LOCK:
        fwd = _SERVED.get(model)
    if fwd is None:
        traced = traced_forward(model, example)
        with _SERVED_LOCK:
            fwd = _SERVED.setdefault(model, traced)
    return fwd


def traced_forward(model: nn.Module, example: torch.Tensor) -> Forward:
    """``model.forward_both`` as a TorchScript trace, if it reproduces the eager outputs.

    A traced call runs the whole graph in C++ and holds Python's GIL only to enter and
    leave it; eager mode takes the GIL back after every operator, so a thread that does
    Kafka I/O beside it slows it down many times over (measured: a batch of the demo
    models at 1/20 of its speed next to one busy Python thread eagerly, 1/2 traced).
    The trace is checked bit for bit against eager mode on ``example`` and on a batch of
    another size; if tracing fails or differs, the eager method is returned (and logged).
    CPU only: on CUDA the kernels run asynchronously anyway and autocast stays eager.

    Args:
        model: a :class:`~streamfuse.models.encoders.SensorModel` in eval mode.
        example: a real input batch on the model's device.

    Returns:
        A function ``x -> (features, logits)``; call it under ``torch.inference_mode()``.
    """
    if example.device.type != "cpu":
        return model.forward_both
    try:
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            traced = torch.jit.trace_module(model, {"forward_both": (example,)}, check_trace=False)
            for x in (example, torch.cat([example[:1], example])):
                if not all(torch.equal(a, b) for a, b in zip(model.forward_both(x), traced.forward_both(x))):
                    raise ValueError("the trace's outputs differ from eager mode")
    except Exception as exc:  # any tracing failure: serve eagerly, as before
        log.warning("serving %s eagerly: it does not trace (%s)", type(model).__name__, exc)
        return model.forward_both
    return traced.forward_both
