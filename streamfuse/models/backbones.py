"""streamfuse's own backbones, with timm's classifier API (``forward_features``,
``forward_head(x, pre_logits)``, ``get_classifier()``, ``num_features``).

- :class:`ConvNet`: a small 1-D or 2-D CNN (``sf_series_cnn``, ``sf_audio_cnn``,
  ``sf_image_cnn``).
- :class:`ResNet1D`: the fully convolutional residual network of Wang et al. (2017),
  a strong baseline on the UCR/UEA archive (``sf_resnet1d``).
- :class:`InceptionTime`: Fawaz et al. (2020), multi-scale 1-D inception modules with
  residual shortcuts (``sf_inception_time``).

:data:`OWN_ARCHS` maps each name to its modality and builder.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class _Head(nn.Module):
    """Global average pooling + a linear classifier, timm-style."""

    num_features: int
    fc: nn.Linear

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.flatten(2).mean(-1)  # global average pool over time (and frequency)
        return x if pre_logits else self.fc(x)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - overridden
        raise NotImplementedError


class ConvNet(_Head):
    """A small 1-D or 2-D CNN; input batch-norm learns the scale."""

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


def _conv_bn(c_in: int, c_out: int, k: int, relu: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv1d(c_in, c_out, k, padding="same", bias=False), nn.BatchNorm1d(c_out)]
    return nn.Sequential(*layers, nn.ReLU(inplace=True)) if relu else nn.Sequential(*layers)


class _ResBlock1D(nn.Module):
    def __init__(self, c_in: int, c_out: int, kernels: tuple[int, ...]) -> None:
        super().__init__()
        last = len(kernels) - 1
        convs = [_conv_bn(c_in if i == 0 else c_out, c_out, k, relu=i < last) for i, k in enumerate(kernels)]
        self.body = nn.Sequential(*convs)
        self.short = _conv_bn(c_in, c_out, 1, relu=False) if c_in != c_out else nn.Identity()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.short(x))


class ResNet1D(_Head):
    """Three residual blocks of kernels 7-5-3 (Wang et al., 2017, use 8-5-3; odd kernels
    pad symmetrically); input batch-norm."""

    def __init__(self, in_chans: int, num_classes: int, widths: tuple[int, ...] = (64, 128, 128)) -> None:
        super().__init__()
        blocks: list[nn.Module] = [nn.BatchNorm1d(in_chans)]
        prev = in_chans
        for w in widths:
            blocks.append(_ResBlock1D(prev, w, (7, 5, 3)))
            prev = w
        self.features = nn.Sequential(*blocks)
        self.num_features = prev
        self.fc = nn.Linear(prev, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


class _Inception(nn.Module):
    def __init__(self, c_in: int, filters: int, kernels: tuple[int, ...], bottleneck: int) -> None:
        super().__init__()
        self.bottleneck = nn.Conv1d(c_in, bottleneck, 1, bias=False) if c_in > 1 else nn.Identity()
        width = bottleneck if c_in > 1 else c_in
        self.convs = nn.ModuleList(nn.Conv1d(width, filters, k, padding="same", bias=False) for k in kernels)
        self.pool = nn.Sequential(nn.MaxPool1d(3, stride=1, padding=1), nn.Conv1d(c_in, filters, 1, bias=False))
        self.bn = nn.BatchNorm1d(filters * (len(kernels) + 1))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.bottleneck(x)
        return self.act(self.bn(torch.cat([*(c(z) for c in self.convs), self.pool(x)], 1)))


class InceptionTime(_Head):
    """``depth`` inception modules (kernels 39 / 19 / 9 + max-pool branch), a residual
    shortcut every third module (Fawaz et al., 2020); input batch-norm."""

    def __init__(self, in_chans: int, num_classes: int, depth: int = 6, filters: int = 32,
                 kernels: tuple[int, ...] = (39, 19, 9), bottleneck: int = 32) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(in_chans)
        width = filters * (len(kernels) + 1)
        self.blocks = nn.ModuleList(
            _Inception(in_chans if i == 0 else width, filters, kernels, bottleneck) for i in range(depth))
        self.shorts = nn.ModuleList(
            _conv_bn(in_chans if i == 0 else width, width, 1, relu=False) for i in range(depth // 3))
        self.act = nn.ReLU(inplace=True)
        self.num_features = width
        self.fc = nn.Linear(width, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        res = x
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i % 3 == 2:
                x = self.act(x + self.shorts[i // 3](res))
                res = x
        return x


Builder = Callable[[int, int], nn.Module]  # (in_chans, num_classes) -> backbone
OWN_ARCHS: dict[str, tuple[str, Builder]] = {
    "sf_series_cnn": ("series", lambda c, n: ConvNet(1, c, n, (32, 64, 64), 5)),
    "sf_resnet1d": ("series", lambda c, n: ResNet1D(c, n)),
    "sf_resnet1d_small": ("series", lambda c, n: ResNet1D(c, n, (32, 64, 64))),
    "sf_inception_time": ("series", lambda c, n: InceptionTime(c, n)),
    "sf_audio_cnn": ("audio", lambda c, n: ConvNet(2, c, n, (16, 32, 64, 64), 3)),
    "sf_audio_cnn_wide": ("audio", lambda c, n: ConvNet(2, c, n, (32, 64, 128, 128), 3)),
    "sf_image_cnn": ("image", lambda c, n: ConvNet(2, c, n, (32, 64, 128, 128), 3)),
}
