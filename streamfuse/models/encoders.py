"""One factory for every modality's model: :func:`create_model`.

Every model is a :class:`SensorModel`: an optional signal front end (the log-mel
spectrogram for audio) feeding a network with timm's API (``forward_features``,
``forward_head(x, pre_logits)``, ``get_classifier()``, ``num_features``). Images use any
timm architecture; audio uses a small 2-D CNN (or any timm architecture with one input
channel) behind the mel front end; series use a small 1-D CNN.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import timm
import torch
import torchaudio
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from streamfuse.errors import ModelError
from streamfuse.models.backbones import OWN_ARCHS, ConvNet
from streamfuse.models.config import ModalityConfig

__all__ = ["OWN_ARCHS", "ConvNet", "LogMel", "SensorModel", "count_params", "create_frontend", "create_model",
           "load_pretrained"]



class SensorModel(nn.Module):
    """A modality's classifier: ``forward(x) -> logits [B, C]``.

    Build it with :func:`create_model`; its :class:`ModalityConfig` is the read-only
    attribute ``sf_config``, from which :mod:`streamfuse.models.preprocess` derives the
    input ``x``: images ``[B, 3, S, S]`` normalized, audio ``[B, clip_samples]`` mono in
    [-1, 1], series ``[B, in_channels, series_len]``.
    """

    def __init__(self, cfg: ModalityConfig, net: nn.Module, frontend: nn.Module | None = None) -> None:
        super().__init__()
        self._sf_config = cfg
        self.frontend = frontend if frontend is not None else nn.Identity()
        self.net = net
        self.num_features: int = net.num_features
        self.num_classes: int = cfg.num_classes

    @property
    def sf_config(self) -> ModalityConfig:
        return self._sf_config

    def set_version(self, version: str) -> None:
        """Record the version id of the final weights (the only field that may change)."""
        self._sf_config = ModalityConfig.from_dict({**self._sf_config.to_dict(), "version": version})

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled pre-logit features ``[B, num_features]`` (input of a fusion head)."""
        return self.net.forward_head(self.net.forward_features(self.frontend(x)), pre_logits=True)

    def head_outputs(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled features ``[B, num_features]`` and logits ``[B, num_classes]`` of the
        front end's output ``z``, from one pass through the backbone."""
        fmap = self.net.forward_features(z)
        return self.net.forward_head(fmap, pre_logits=True), self.net.forward_head(fmap)

    def forward_both(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features and logits of the input ``x`` (see :meth:`head_outputs`)."""
        return self.head_outputs(self.frontend(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``[B, num_classes]``."""
        return self.net(self.frontend(x))


class LogMel(nn.Module):
    """Waveform ``[B, T]`` -> log-mel power spectrogram ``[B, 1, n_mels, frames]`` in dB."""

    def __init__(self, cfg: ModalityConfig) -> None:
        super().__init__()
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=cfg.sample_rate, n_fft=cfg.n_fft, hop_length=cfg.hop_length, n_mels=cfg.n_mels
        )
        # top_db=None on purpose: torchaudio applies top_db relative to the max of the
        # whole 3-D batch, which would make one clip's features depend on its batch-mates.
        # amin=1e-10 gives a fixed -100 dB floor instead (a muted microphone stays visible).
        self.to_db = torchaudio.transforms.AmplitudeToDB(stype="power", top_db=None)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        # STFT and log in fp32 even under bf16 autocast: bf16 would flatten quiet bands.
        with torch.autocast(device_type=wave.device.type, enabled=False):
            return self.to_db(self.mel(wave.float())).unsqueeze(1)


def create_frontend(cfg: ModalityConfig) -> nn.Module:
    """The parameter-free signal front end of ``cfg``'s model (log-mel for audio)."""
    return LogMel(cfg) if cfg.modality == "audio" else nn.Identity()


def create_model(cfg: ModalityConfig, *, weights: str | Path | None = None) -> SensorModel:
    """Build the model that ``cfg`` describes, randomly initialized or from local weights.

    Args:
        cfg: the modality config; attached to the model as ``model.sf_config``.
        weights: optional ``.safetensors`` file to start from: a timm checkpoint of
            ``cfg.arch`` (keys without prefix) or a streamfuse weights file (keys under
            ``net.``). A classifier of a different size is dropped (re-initialized);
            every other parameter must be in the file.

    Returns:
        The model in train mode, on the CPU.

    Raises:
        ModelError: unknown architecture, or a weights file that is missing, not
            safetensors, unreadable or incompatible (the error carries the path).

    Examples:
        >>> from streamfuse.models.config import default_config
        >>> m = create_model(default_config("series", ["ok", "bad"]))
        >>> m(torch.zeros(2, 1, 256)).shape, m.sf_config.modality
        (torch.Size([2, 2]), 'series')
    """
    arch, n = cfg.arch, cfg.num_classes
    if arch in OWN_ARCHS:
        modality, build = OWN_ARCHS[arch]
        if modality != cfg.modality:
            raise ModelError(f"arch {arch!r} is for {modality}, not {cfg.modality}")
        in_chans = {"image": 3, "audio": 1, "series": cfg.in_channels}[modality]
        model = SensorModel(cfg, build(in_chans, n), create_frontend(cfg))
    elif cfg.modality == "series":
        own = [a for a, (mod, _) in OWN_ARCHS.items() if mod == "series"]
        raise ModelError(f"series arch {arch!r} unknown; valid: {', '.join(own)}")
    else:
        in_chans = 3 if cfg.modality == "image" else 1
        try:
            net = timm.create_model(arch, pretrained=False, num_classes=n, in_chans=in_chans)
        except RuntimeError as exc:
            hint = "see timm.list_models()"
            raise ModelError(f"{cfg.modality}: cannot build timm arch {arch!r} ({exc}); {hint}") from None
        model = SensorModel(cfg, net, create_frontend(cfg))
    if weights is not None:
        load_pretrained(model, weights)
    return model


CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
_WRAPPERS = ("state_dict", "model", "model_state_dict", "module")


def read_checkpoint(path: str | Path, arch: str = "ARCH") -> dict[str, torch.Tensor]:
    """The tensors of a pretrained checkpoint: safetensors, or a *weights-only* torch file.

    ``.pt`` / ``.pth`` / ``.bin`` files (timm checkpoints, torchvision state dicts) are
    read with ``torch.load(weights_only=True)``, which refuses any pickled object other
    than tensors and plain containers, so a checkpoint cannot run code. A dict wrapping
    the state (``{"state_dict": ...}``, ``{"model": ...}``) is unwrapped and a DDP
    ``module.`` prefix dropped.

    Raises:
        ModelError: missing, another suffix, unreadable, or not a weights-only state dict.
    """
    path = Path(path)
    if path.suffix not in CHECKPOINT_SUFFIXES:
        raise ModelError(f"pretrained weights {path} must be one of {', '.join(CHECKPOINT_SUFFIXES)} "
                         "(safetensors, or a weights-only torch state dict)", path)
    if not path.is_file():
        raise ModelError(
            f"pretrained weights file {path} not found; download a {arch!r} checkpoint there on a connected "
            f"machine (e.g. `hf download timm/{arch} model.safetensors --local-dir {path.parent}`) "
            "or leave weights unset to train from scratch", path)
    try:
        if path.suffix == ".safetensors":
            return load_file(path)
        state: Any = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise ModelError(f"cannot read pretrained weights {path} ({str(exc).splitlines()[0][:200]}); only "
                         "safetensors or weights-only state dicts load: on the machine that made it, run "
                         "`safetensors.torch.save_file(model.state_dict(), 'w.safetensors')`", path) from None
    while isinstance(state, dict) and len(state) >= 1 and any(k in state for k in _WRAPPERS) \
            and not all(isinstance(v, torch.Tensor) for v in state.values()):
        state = state[next(k for k in _WRAPPERS if k in state)]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"pretrained weights {path} hold no state dict of tensors; save `model.state_dict()`", path)
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_pretrained(model: SensorModel, path: str | Path) -> None:
    """Load a pretrained checkpoint (:func:`read_checkpoint`) into ``model``.

    A timm / torchvision checkpoint holds the network (keys without prefix), a
    streamfuse weights file the whole model (keys under ``net.``; its parameter-free
    front end is rebuilt from the config, not loaded). A classifier of another size is
    dropped (re-initialized); every other parameter must be in the file.

    Raises:
        ModelError: the file is missing, not loadable safely, or does not fit the arch.
    """
    path = Path(path)
    arch = model.sf_config.arch
    state = read_checkpoint(path, arch)
    if any(k.startswith("net.") for k in state):
        state = {k[4:]: v for k, v in state.items() if k.startswith("net.")}
    target = model.net
    clf = {id(p) for p in target.get_classifier().parameters()}
    clf_keys = {k for k, p in target.named_parameters() if id(p) in clf}
    own = target.state_dict()
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    bad = [k for k in mismatched if k not in clf_keys]
    if bad:
        raise ModelError(f"pretrained weights {path} do not fit arch {arch!r}: shape mismatch at {bad[:3]} "
                         "(a checkpoint of another architecture, or other input channels?)", path)
    state = {k: v for k, v in state.items() if k not in mismatched}
    result = target.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k not in clf_keys]
    if missing or len(state) == 0:
        raise ModelError(
            f"pretrained weights {path} do not fit arch {arch!r}: {len(missing)} parameters missing, "
            f"e.g. {missing[:3]} (a checkpoint of another architecture?)", path)


def count_params(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
