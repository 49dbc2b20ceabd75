"""The frozen per-modality model config: architecture, classes and preprocessing.

A :class:`ModalityConfig` travels with the weights (it is written into the bundle
manifest and into each weights file's metadata) and is attached to every model built by
:func:`streamfuse.models.encoders.create_model` as ``model.sf_config``. Preprocessing
(:mod:`streamfuse.models.preprocess`) reads everything it needs from it, so a model and
its input pipeline cannot drift apart.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from streamfuse.errors import ModelError
from streamfuse.events import MODALITIES

# Defaults chosen to train from scratch on a 2-core CPU in seconds (see the README of
# streamfuse.models for the measurements); any timm name works for images.
DEFAULT_ARCHS: dict[str, str] = {
    "image": "test_resnet",
    "audio": "sf_audio_cnn",
    "series": "sf_series_cnn",
}
# Opt-in presets: "fast" is the demo's (seconds on 2 cores); "accurate" is what
# `streamfuse train` uses by default (stronger backbones, larger inputs). Any field can
# still be overridden per modality (`--arch image=resnet18 --image-size 96`).
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "fast": {m: {"arch": a} for m, a in DEFAULT_ARCHS.items()},
    "accurate": {
        "image": {"arch": "sf_image_cnn", "image_size": 64},
        "audio": {"arch": "sf_audio_cnn_wide", "sample_rate": 16000, "n_fft": 512, "hop_length": 256, "n_mels": 64,
                  "clip_samples": 16000},
        "series": {"arch": "sf_resnet1d_small"},
    },
}
FUSION_MODES: tuple[str, ...] = ("ume", "weighted", "head", "mmlora")  # learned modes must beat UME on validation first
# Modes without weights that need the bundle's validation calibration (streamfuse.models.fusion.quality).
CALIBRATED_MODES: tuple[str, ...] = ("quality",)
FUSION_MODES += CALIBRATED_MODES
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModalityConfig:
    """Everything a modality's model and its preprocessing need.

    Only the fields of the config's own modality matter; the others keep their
    defaults so that one flat, JSON-safe record describes every modality.

    Attributes:
        modality: ``"image"``, ``"audio"`` or ``"series"``.
        arch: architecture name: any timm model for images (and for audio, behind the
            mel front end), or ``"sf_audio_cnn"`` / ``"sf_series_cnn"``.
        classes: class names, in the order of the model's logits.
        version: version id of the trained weights ("" before training).
        image_size: images are resized to ``image_size`` x ``image_size``.
        mean, std: per-channel RGB normalization applied after scaling to [0, 1].
        sample_rate: audio is resampled to this rate (Hz).
        n_fft, hop_length, n_mels: the log-mel front end.
        clip_samples: audio is padded / cropped to this many samples.
        series_len: series are padded / cropped to this many steps.
        in_channels: channels of a series (a shape ``(L,)`` series has one).

    Raises:
        ModelError: on an unknown modality, empty or duplicate classes, or
            non-positive sizes.

    Examples:
        >>> cfg = ModalityConfig("series", "sf_series_cnn", ("ok", "bad"))
        >>> ModalityConfig.from_dict(cfg.to_dict()) == cfg
        True
    """

    modality: str
    arch: str
    classes: tuple[str, ...]
    version: str = ""
    image_size: int = 32
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    sample_rate: int = 8000
    n_fft: int = 256
    hop_length: int = 128
    n_mels: int = 32
    clip_samples: int = 8000
    series_len: int = 256
    in_channels: int = 1

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise ModelError(f"unknown modality {self.modality!r}; valid: {', '.join(MODALITIES)}")
        if not self.arch:
            raise ModelError(f"{self.modality}: arch is empty; e.g. {DEFAULT_ARCHS[self.modality]!r}")
        # Normalize JSON lists / generators to tuples so that equality and hashing work.
        for name in ("classes", "mean", "std"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
            raise ModelError(f"{self.modality}: need at least two distinct classes, got {list(self.classes)}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ModelError(f"{self.modality}: mean/std need 3 values each, std > 0")
        sizes = ("image_size", "sample_rate", "n_fft", "hop_length", "n_mels", "clip_samples")
        for name in sizes + ("series_len", "in_channels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ModelError(f"{self.modality}: {name} must be a positive integer, got {value!r}")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (tuples become lists)."""
        return {
            f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
            for f in dataclasses.fields(self)
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModalityConfig:
        """Inverse of :meth:`to_dict`.

        Raises:
            ModelError: on unknown or missing keys, or invalid values.
        """
        if not isinstance(data, dict):
            raise ModelError(f"a modality config must be a map, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            # A newer writer may have changed preprocessing: refuse rather than guess.
            raise ModelError(f"unknown config keys {unknown}; upgrade streamfuse or re-train")
        try:
            return cls(**data)
        except TypeError as exc:
            raise ModelError(f"invalid modality config: {exc}") from None


def default_config(modality: str, classes: tuple[str, ...] | list[str], preset: str = "fast",
                   **overrides: Any) -> ModalityConfig:
    """The default config of ``modality`` in a preset (:data:`PRESETS`).

    Args:
        modality: ``"image"``, ``"audio"`` or ``"series"``.
        classes: class names, in logit order.
        preset: ``"fast"`` (arch from :data:`DEFAULT_ARCHS`) or ``"accurate"``.
        **overrides: any other :class:`ModalityConfig` field.

    Raises:
        ModelError: on an unknown modality or preset, or invalid values.

    Examples:
        >>> default_config("image", ["a", "b"]).arch
        'test_resnet'
        >>> default_config("image", ["a", "b"], "accurate", image_size=96).image_size
        96
    """
    if modality not in DEFAULT_ARCHS:
        raise ModelError(f"unknown modality {modality!r}; valid: {', '.join(MODALITIES)}")
    if preset not in PRESETS:
        raise ModelError(f"unknown preset {preset!r}; valid: {', '.join(PRESETS)}")
    fields = {**PRESETS[preset][modality], **overrides}
    return ModalityConfig(modality=modality, classes=tuple(classes), **fields)
