"""One factory for every modality's model: :func:`create_model`.

Every model is a :class:`SensorModel`: an optional signal front end (the log-mel
spectrogram for audio) feeding a network with timm's API (``forward_features``,
``forward_head(x, pre_logits)``, ``get_classifier()``, ``num_features``). Images use any
timm architecture; audio uses a small 2-D CNN (or any timm architecture with one input
channel) behind the mel front end; series use a small 1-D CNN.
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
import torchaudio
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from streamfuse.errors import ModelError
from streamfuse.models.config import ModalityConfig

OWN_ARCHS = {"sf_audio_cnn": "audio", "sf_series_cnn": "series"}


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


class ConvNet(nn.Module):
    """A small 1-D or 2-D CNN with timm's classifier API; input batch-norm learns the scale."""

    def __init__(self, dims: int, in_chans: int, num_classes: int, widths: tuple[int, ...], kernel: int) -> None:
        super().__init__()
        if dims == 1:
            conv, bn, pool = nn.Conv1d, nn.BatchNorm1d, nn.MaxPool1d
        else:
            conv, bn, pool = nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d
        layers: list[nn.Module] = [bn(in_chans)]
        prev = in_chans
        for i, width in enumerate(widths):
            layers += [conv(prev, width, kernel, padding=kernel // 2, bias=False), bn(width), nn.ReLU(inplace=True)]
            if i < len(widths) - 1:
                layers.append(pool(2))
            prev = width
        self.features = nn.Sequential(*layers)
        self.num_features = prev
        self.fc = nn.Linear(prev, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.flatten(2).mean(-1)  # global average pool over time (and frequency)
        return x if pre_logits else self.fc(x)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


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
        if OWN_ARCHS[arch] != cfg.modality:
            raise ModelError(f"arch {arch!r} is for {OWN_ARCHS[arch]}, not {cfg.modality}")
        if arch == "sf_audio_cnn":
            model = SensorModel(cfg, ConvNet(2, 1, n, (16, 32, 64, 64), 3), LogMel(cfg))
        else:
            model = SensorModel(cfg, ConvNet(1, cfg.in_channels, n, (32, 64, 64), 5))
    elif cfg.modality == "series":
        raise ModelError(f"series arch {arch!r} unknown; valid: sf_series_cnn")
    else:
        in_chans = 3 if cfg.modality == "image" else 1
        try:
            net = timm.create_model(arch, pretrained=False, num_classes=n, in_chans=in_chans)
        except RuntimeError as exc:
            hint = "see timm.list_models()"
            raise ModelError(f"{cfg.modality}: cannot build timm arch {arch!r} ({exc}); {hint}") from None
        model = SensorModel(cfg, net, LogMel(cfg) if cfg.modality == "audio" else None)
    if weights is not None:
        load_pretrained(model, weights)
    return model


def load_pretrained(model: SensorModel, path: str | Path) -> None:
    """Load a ``.safetensors`` checkpoint into ``model`` (see :func:`create_model`).

    Raises:
        ModelError: the file is missing, not safetensors, unreadable or incompatible.
    """
    path = Path(path)
    arch = model.sf_config.arch
    if path.suffix != ".safetensors":
        raise ModelError(
            f"pretrained weights {path} must be a .safetensors file (pickle checkpoints are "
            "never loaded); convert it with safetensors.torch.save_file",
            path,
        )
    if not path.is_file():
        raise ModelError(
            f"pretrained weights file {path} not found; download a {arch!r} checkpoint there "
            f"(e.g. `hf download timm/{arch} model.safetensors --local-dir {path.parent}`) "
            "or leave weights unset to train from scratch",
            path,
        )
    try:
        state = load_file(path)
    except (SafetensorError, OSError) as exc:
        raise ModelError(f"cannot read pretrained weights {path}: {exc}", path) from None
    # A streamfuse weights file holds the whole SensorModel; a timm checkpoint just the net.
    target: nn.Module = model if any(k.startswith("net.") for k in state) else model.net
    prefix = "net." if target is model else ""
    clf = {id(p) for p in model.net.get_classifier().parameters()}
    clf_keys = {prefix + k for k, p in model.net.named_parameters() if id(p) in clf}
    own = target.state_dict()
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    bad = [k for k in mismatched if k not in clf_keys]
    if bad:
        raise ModelError(f"pretrained weights {path} do not fit arch {arch!r}: shape mismatch at {bad[:3]}", path)
    state = {k: v for k, v in state.items() if k not in mismatched}
    result = target.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k not in clf_keys and not k.startswith("frontend.")]
    if missing:
        raise ModelError(
            f"pretrained weights {path} do not fit arch {arch!r}: {len(missing)} parameters missing, "
            f"e.g. {missing[:3]} (a checkpoint of another architecture?)",
            path,
        )


def count_params(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
