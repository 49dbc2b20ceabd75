"""Batched decoding of :class:`~streamfuse.events.SensorEvent` payloads into model inputs.

Everything is derived from the model's :class:`~streamfuse.models.config.ModalityConfig`:

- image: JPEG/PNG -> RGB (JPEGs decoded on the GPU in one call when ``device`` is CUDA)
  -> resized to ``image_size`` (bilinear, antialiased) -> [0, 1] -> ``(x - mean) / std``;
  ``[B, 3, S, S]``.
- audio: PCM16LE -> float in [-1, 1) -> mean over channels -> resampled to
  ``sample_rate`` -> zero-padded / cropped to ``clip_samples``; ``[B, clip_samples]``.
- series: float32LE -> ``[in_channels, L]`` -> zero-padded / cropped to ``series_len``;
  ``[B, in_channels, series_len]``.

Audio and series batches are built on the CPU and copied to CUDA in one asynchronous
transfer from pinned memory; the log-mel spectrogram is the audio model's first layer, so
it runs on the device.

Readings are validated upstream (:func:`streamfuse.events.check_reading`); one that still
fails here raises :class:`~streamfuse.errors.InvalidEvent`, and
:func:`batch_tensor_checked` sets it aside so that the rest of the batch goes on.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
import torchaudio.functional as AF
from torchvision.io import ImageReadMode, decode_image, decode_jpeg

from streamfuse.errors import InvalidEvent
from streamfuse.events import SensorEvent
from streamfuse.models.config import ModalityConfig

log = logging.getLogger(__name__)
JPEG_MAGIC = b"\xff\xd8\xff"
CPU = torch.device("cpu")


class CheckedBatch(NamedTuple):
    """Model input for the readings that decoded, and why the others did not.

    Attributes:
        tensor: input for the good readings, in order (first dimension may be 0).
        indices: positions of the good readings in the input list.
        errors: ``(position, error)`` for each reading that failed, ``modality`` set.
        signal_std: ``[len(indices)]`` float32 on the CPU: each good reading's signal
            spread, a by-product of decoding for the monitor's sensor-health checks —
            grey levels (0..255) of the image at model size, the mono audio in [-1, 1),
            the raw series values.
    """

    tensor: torch.Tensor
    indices: list[int]
    errors: list[tuple[int, InvalidEvent]]
    signal_std: torch.Tensor


def batch_tensor(
    cfg: ModalityConfig, readings: Sequence[SensorEvent], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Decode ``readings`` into one input batch for the model ``cfg`` describes.

    Args:
        cfg: the model's config (``model.sf_config``).
        readings: readings of ``cfg.modality``.
        device: where the batch goes (and where JPEGs are decoded, on CUDA).

    Returns:
        A float32 tensor with ``len(readings)`` rows on ``device``.

    Raises:
        InvalidEvent: the first reading that does not decode (``bad_image``,
            ``bad_audio``, ``bad_series``, ``non_finite`` or ``bad_field``).

    Examples:
        >>> import numpy as np
        >>> from streamfuse.models.config import default_config
        >>> cfg = default_config("series", ["ok", "bad"], series_len=4)
        >>> ev = SensorEvent("e1", "a1", "series", 0, np.arange(3, dtype="<f4").tobytes())
        >>> batch_tensor(cfg, [ev]).tolist()
        [[[0.0, 1.0, 2.0, 0.0]]]
    """
    batch = batch_tensor_checked(cfg, readings, device)
    if batch.errors:
        raise batch.errors[0][1]
    return batch.tensor


def batch_tensor_checked(
    cfg: ModalityConfig, readings: Sequence[SensorEvent], device: torch.device | str = "cpu"
) -> CheckedBatch:
    """Like :func:`batch_tensor`, but readings that fail are returned as errors.

    Returns:
        A :class:`CheckedBatch`; one bad reading does not sink the others.
    """
    device = torch.device(device)
    items: dict[int, torch.Tensor] = {}
    stds: dict[int, float] = {}
    errors: list[tuple[int, InvalidEvent]] = []
    todo = []
    for i, ev in enumerate(readings):
        if ev.modality != cfg.modality:
            detail = f"a {ev.modality} reading sent to the {cfg.modality} model"
            errors.append((i, InvalidEvent("bad_field", detail, cfg.modality)))
        else:
            todo.append(i)
    decode = {"image": _decode_images, "audio": _decode_audio, "series": _decode_series}[cfg.modality]
    # Images decode where they run (nvJPEG on CUDA); audio and series are built on the CPU
    # and go to the device as one batch from pinned memory (an asynchronous copy).
    done, spread, failed = decode(cfg, [readings[i] for i in todo], device if cfg.modality == "image" else CPU)
    items.update({todo[j]: t for j, t in done.items()})
    stds.update({todo[j]: v for j, v in spread.items()})
    errors.extend((todo[j], e) for j, e in failed)
    errors.sort(key=lambda pair: pair[0])
    indices = sorted(items)
    if indices:
        tensor = torch.stack([items[i] for i in indices])
        if tensor.device != device:
            tensor = _to_device(tensor, device)
    else:
        tensor = torch.empty((0, *_item_shape(cfg)), device=device)
    if cfg.modality == "image":
        pixels = tensor.float()  # RGB 0..255, before normalization
        signal_std = _grey_std(pixels).cpu()
        tensor = _normalize_image(cfg, pixels)
    else:
        signal_std = torch.tensor([stds[i] for i in indices], dtype=torch.float32)
    return CheckedBatch(tensor, indices, errors, signal_std)


def _to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU batch on ``device``: through pinned (page-locked) memory to CUDA, so the copy
    is asynchronous and DMA-driven."""
    if device.type == "cuda":
        return batch.pin_memory().to(device, non_blocking=True)
    return batch.to(device)


def example_input(cfg: ModalityConfig, device: torch.device | str = "cpu", rows: int = 2) -> torch.Tensor:
    """A fixed random input batch of ``rows`` for the model ``cfg`` describes (for warm-ups
    and trace checks: unlike zeros, it takes every value path a real batch takes).

    Examples:
        >>> from streamfuse.models.config import default_config
        >>> example_input(default_config("series", ["ok", "bad"], series_len=4)).shape
        torch.Size([2, 1, 4])
    """
    gen = torch.Generator().manual_seed(0)
    return torch.randn((rows, *_item_shape(cfg)), generator=gen).to(device)


def _item_shape(cfg: ModalityConfig) -> tuple[int, ...]:
    if cfg.modality == "image":
        return (3, cfg.image_size, cfg.image_size)
    if cfg.modality == "audio":
        return (cfg.clip_samples,)
    return (cfg.in_channels, cfg.series_len)


# (position -> model input, position -> signal std (images: computed on the batch), errors)
Decoded = tuple[dict[int, torch.Tensor], dict[int, float], list[tuple[int, InvalidEvent]]]


def _bytes_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)  # a copy: payloads are immutable


def _decode_images(cfg: ModalityConfig, readings: list[SensorEvent], device: torch.device) -> Decoded:
    """uint8 RGB images resized to ``image_size`` (normalized later, batched)."""
    decoded: dict[int, torch.Tensor] = {}
    errors: list[tuple[int, InvalidEvent]] = []
    jpegs = [i for i, ev in enumerate(readings) if ev.payload.startswith(JPEG_MAGIC)]
    if device.type == "cuda" and len(jpegs) > 1:
        try:  # nvJPEG batch decode; on any failure fall back to one-by-one to find the culprit
            data = [_bytes_tensor(readings[i].payload) for i in jpegs]
            out = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
            decoded.update(zip(jpegs, out))
        except RuntimeError as exc:
            log.warning("GPU batch decode of %d JPEGs failed (%s); decoding them one by one to find the bad ones",
                        len(jpegs), exc)
    for i, ev in enumerate(readings):
        if i in decoded:
            continue
        try:
            # decode_image rejects anything that is not JPEG/PNG/WebP/GIF by its magic bytes
            img = decode_image(_bytes_tensor(ev.payload), mode=ImageReadMode.RGB)
        except RuntimeError as exc:
            errors.append((i, InvalidEvent("bad_image", f"image does not decode: {exc}", "image")))
            continue
        decoded[i] = img.to(device, non_blocking=True)
    size = (cfg.image_size, cfg.image_size)
    for i, img in decoded.items():
        if img.shape[-2:] != size:
            x = img.unsqueeze(0).float()
            img = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)[0]
            img = img.round_().clamp_(0, 255).to(torch.uint8)  # as if the image had been stored at this size
        decoded[i] = img
    return decoded, {}, errors


def _grey_std(batch: torch.Tensor) -> torch.Tensor:
    """Per image, the standard deviation of its grey levels (ITU-R 601 luma, 0..255).

    Two passes in float64 (mean, then the mean square deviation): the same float32 values
    as ``std(correction=0)``, whose CPU reduction took 8x longer on a batch of 32 small
    images.

    Examples:
        >>> _grey_std(torch.tensor([[[[0, 255]], [[0, 255]], [[0, 255]]]], dtype=torch.uint8)).tolist()
        [127.5]
    """
    if not batch.shape[0]:
        return torch.empty(0)
    weights = torch.tensor([0.299, 0.587, 0.114], device=batch.device).view(1, 3, 1, 1)
    grey = (batch.float() * weights).sum(dim=1).flatten(1).double()
    deviation = grey - grey.mean(dim=1, keepdim=True)
    return (deviation * deviation).mean(dim=1).sqrt().float()


def _normalize_image(cfg: ModalityConfig, batch: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(cfg.mean, device=batch.device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std, device=batch.device).view(1, 3, 1, 1)
    return (batch.float() / 255.0 - mean) / std


def _decode_audio(cfg: ModalityConfig, readings: list[SensorEvent], device: torch.device) -> Decoded:
    decoded: dict[int, torch.Tensor] = {}
    stds: dict[int, float] = {}
    errors: list[tuple[int, InvalidEvent]] = []
    same: dict[tuple[int, int, int], list[int]] = {}  # (rate, channels, bytes) -> positions
    for i, ev in enumerate(readings):
        ch = ev.channels or 1
        if not ev.sample_rate or ev.sample_rate <= 0 or not ev.payload or len(ev.payload) % (2 * ch):
            detail = f"{len(ev.payload)} bytes at {ev.sample_rate} Hz is not {ch}-channel PCM16"
            errors.append((i, InvalidEvent("bad_audio", detail, "audio")))
            continue
        same.setdefault((ev.sample_rate, ch, len(ev.payload)), []).append(i)
    by_rate: dict[int, list[tuple[int, torch.Tensor]]] = {}
    for (rate, ch, _), rows in same.items():  # readings of one shape: one array
        pcm = np.frombuffer(b"".join(readings[i].payload for i in rows), dtype="<i2").reshape(len(rows), -1, ch)
        mono = pcm.astype(np.float32).mean(axis=2) / 32768.0 if ch > 1 else pcm[:, :, 0] / np.float32(32768.0)
        stds.update(zip(rows, mono.std(axis=1).tolist()))
        by_rate.setdefault(rate, []).extend(zip(rows, torch.from_numpy(mono)))
    for rate, group in by_rate.items():
        if rate == cfg.sample_rate:
            decoded.update((i, _fit(wave.to(device), cfg.clip_samples)) for i, wave in group)
            continue
        # One resample call per input rate; only the part that survives the crop is resampled.
        need = -(-cfg.clip_samples * rate // cfg.sample_rate) + 64
        waves = torch.stack([_fit(wave, need) for _, wave in group]).to(device)
        out = AF.resample(waves, rate, cfg.sample_rate)
        decoded.update((i, _fit(out[j], cfg.clip_samples)) for j, (i, _) in enumerate(group))
    return decoded, stds, errors


def _decode_series(cfg: ModalityConfig, readings: list[SensorEvent], device: torch.device) -> Decoded:
    decoded: dict[int, torch.Tensor] = {}
    stds: dict[int, float] = {}
    errors: list[tuple[int, InvalidEvent]] = []
    same: dict[tuple[int, int], list[int]] = {}  # shape -> positions
    for i, ev in enumerate(readings):
        shape = _series_shape(cfg, ev)
        if isinstance(shape, InvalidEvent):
            errors.append((i, shape))
        else:
            same.setdefault(shape, []).append(i)
    for shape, rows in same.items():  # readings of one shape: one array
        arr = np.frombuffer(b"".join(readings[i].payload for i in rows), dtype="<f4").reshape(len(rows), *shape)
        finite = np.isfinite(arr).all(axis=(1, 2)).tolist()
        with np.errstate(invalid="ignore", over="ignore"):  # the spreads of non-finite rows are dropped
            spread = arr.reshape(len(rows), -1).std(axis=1).tolist()
        batch = _fit(torch.from_numpy(arr.copy()).to(device), cfg.series_len)
        for k, i in enumerate(rows):
            if not finite[k]:
                errors.append((i, InvalidEvent("non_finite", "series has NaN/inf values", "series")))
                continue
            stds[i] = spread[k]
            decoded[i] = batch[k]
    return decoded, stds, errors


def _series_shape(cfg: ModalityConfig, ev: SensorEvent) -> tuple[int, int] | InvalidEvent:
    """``(channels, length)`` of a series reading, or why it has none the model takes."""
    if not ev.payload or len(ev.payload) % 4:
        return InvalidEvent("bad_series", f"{len(ev.payload)} bytes is not a float32 array", "series")
    size = len(ev.payload) // 4
    shape = tuple(ev.shape) if ev.shape else (size,)
    if len(shape) == 1:
        shape = (1, shape[0])
    if len(shape) != 2 or shape[0] != cfg.in_channels or shape[0] * shape[1] != size:
        detail = f"shape {list(ev.shape or [size])} does not fit {cfg.in_channels} channel(s) x L"
        return InvalidEvent("bad_series", detail, "series")
    return shape


def _fit(x: torch.Tensor, length: int) -> torch.Tensor:
    """Crop or zero-pad the last dimension to ``length`` (keeps the start)."""
    n = x.shape[-1]
    if n >= length:
        return x[..., :length]
    return F.pad(x, (0, length - n))
