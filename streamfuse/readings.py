"""What a sensor reading may be: the modalities, the payload limits, and the checks.

A reading's payload is JPEG/PNG (image), PCM16LE (audio) or float32LE (series). The
checks run wherever readings enter or are used: the codec (:func:`streamfuse.events.decode`
checks a sensor event), the synchronizer and the worker (:func:`split_bad_readings` sets
one bad reading aside without rejecting its sample), the gateways and the dataset loader.

Pure logic: no Kafka, no clock.
"""

from __future__ import annotations

import dataclasses
import io
import math
from typing import TYPE_CHECKING

import numpy as np

from streamfuse.errors import InvalidEvent

if TYPE_CHECKING:
    from streamfuse.events import Sample, SensorEvent

MODALITIES: tuple[str, ...] = ("image", "audio", "series")
MAX_IMAGE_SIDE = 8192
SAMPLE_RATE_RANGE = (1_000, 384_000)
MAX_CHANNELS = 32
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_FRAMES = frozenset((0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF))


def check_reading(ev: SensorEvent, max_bytes: int | None = None, decode: bool = True) -> None:
    """Validate a reading's payload against its modality.

    Args:
        ev: the reading.
        max_bytes: payloads larger than this are ``oversize``.
        decode: decode image bodies (catches truncated and corrupt ones). A consumer that
            decodes every image anyway (the worker, in one batch) checks headers only and
            sets aside the bodies that fail there, so each image is decoded once.

    Raises:
        InvalidEvent: ``unknown_modality``, ``oversize``, ``bad_image``, ``bad_audio``,
            ``bad_series`` or ``non_finite``, with ``modality`` set.
    """
    m = ev.modality
    if m not in MODALITIES:
        raise InvalidEvent("unknown_modality", f"{m!r}; known: {', '.join(MODALITIES)}", m)
    if max_bytes is not None and len(ev.payload) > max_bytes:
        raise InvalidEvent("oversize", f"{m} payload {len(ev.payload)} bytes > {max_bytes}", m)
    if m == "image":
        _check_image(ev) if decode else _check_image_header(ev.payload)
    elif m == "audio":
        _check_audio(ev)
    else:
        _check_series(ev)


def image_size(data: bytes) -> tuple[int, int] | None:
    r"""``(width, height)`` from a JPEG's frame header or a PNG's IHDR; None if there is none.

    Reads headers only (microseconds), for a check before anything is decoded.

    Examples:
        >>> png = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\x0dIHDR" + (640).to_bytes(4, "big") + (480).to_bytes(4, "big")
        >>> image_size(png)
        (640, 480)
        >>> sof = b"\xff\xc0\x00\x11\x08" + (480).to_bytes(2, "big") + (640).to_bytes(2, "big")
        >>> image_size(b"\xff\xd8" + b"\xff\xe0\x00\x04ab" + sof)
        (640, 480)
        >>> image_size(b"\xff\xd8\xff\xda\x00\x02") is None  # scan data before any frame header
        True
    """
    if data.startswith(PNG_MAGIC):
        if len(data) < 24 or data[12:16] != b"IHDR":
            return None
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if not data.startswith(b"\xff\xd8"):
        return None
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length
            i += 2
            continue
        if marker in _JPEG_FRAMES:
            if i + 9 > n:
                return None
            return int.from_bytes(data[i + 7 : i + 9], "big"), int.from_bytes(data[i + 5 : i + 7], "big")
        if marker in (0xD9, 0xDA):  # end of image, start of scan: no frame header came first
            return None
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return None


def _check_image_header(data: bytes) -> None:
    if not (data.startswith(b"\xff\xd8\xff") or data.startswith(PNG_MAGIC)):
        raise InvalidEvent("bad_image", f"payload ({len(data)} bytes) is neither JPEG nor PNG", "image")
    size = image_size(data)
    if size is None:
        raise InvalidEvent("bad_image", f"image does not decode: no frame header in {len(data)} bytes", "image")
    w, h = size
    if not (0 < w <= MAX_IMAGE_SIDE and 0 < h <= MAX_IMAGE_SIDE):
        raise InvalidEvent("bad_image", f"image size {w}x{h} outside 1..{MAX_IMAGE_SIDE}", "image")


def _check_image(ev: SensorEvent) -> None:
    from PIL import Image, UnidentifiedImageError

    data = ev.payload
    _check_image_header(data)  # before decoding: a tiny file can claim a huge image
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # decodes fully: catches truncated and corrupt bodies
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as exc:
        raise InvalidEvent("bad_image", f"image does not decode: {exc}", "image") from None


def _check_audio(ev: SensorEvent) -> None:
    lo, hi = SAMPLE_RATE_RANGE
    if ev.sample_rate is None or not lo <= ev.sample_rate <= hi:
        raise InvalidEvent("bad_audio", f"sample_rate {ev.sample_rate} outside {lo}..{hi} Hz", "audio")
    ch = ev.channels if ev.channels is not None else 1
    if not 1 <= ch <= MAX_CHANNELS:
        raise InvalidEvent("bad_audio", f"channels {ch} outside 1..{MAX_CHANNELS}", "audio")
    if ev.encoding not in ("", "pcm16le"):
        raise InvalidEvent("bad_audio", f"encoding {ev.encoding!r}; only pcm16le", "audio")
    if not ev.payload or len(ev.payload) % (2 * ch):
        raise InvalidEvent(
            "bad_audio", f"{len(ev.payload)} bytes is not a whole number of {ch}-channel PCM16 frames", "audio"
        )


def _check_series(ev: SensorEvent) -> None:
    if ev.encoding not in ("", "float32le"):
        raise InvalidEvent("bad_series", f"encoding {ev.encoding!r}; only float32le", "series")
    n = len(ev.payload) // 4
    if not ev.payload or len(ev.payload) % 4:
        raise InvalidEvent("bad_series", f"{len(ev.payload)} bytes is not a float32 array", "series")
    if ev.shape is not None and (any(d <= 0 for d in ev.shape) or math.prod(ev.shape) != n):
        raise InvalidEvent("bad_series", f"shape {list(ev.shape)} does not match {n} values", "series")
    arr = np.frombuffer(ev.payload, dtype="<f4")
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        raise InvalidEvent("non_finite", f"series has {bad} NaN/inf values", "series")


def split_bad_readings(sample: Sample, max_bytes: int | None = None,
                       decode: bool = True) -> tuple[Sample, list[InvalidEvent]]:
    """Check every reading; bad ones are removed and marked missing.

    Args:
        sample: the sample.
        max_bytes: payloads larger than this are ``oversize``.
        decode: see :func:`check_reading`.

    Returns:
        The sample with only valid readings (bad modalities added to ``missing``) and the
        errors, each with ``modality`` set, for the dead-letter topic.
    """
    errors: list[InvalidEvent] = []
    good: dict[str, SensorEvent] = {}
    for name, ev in sample.readings.items():
        try:
            if name != ev.modality:
                raise InvalidEvent("bad_field", f"reading under {name!r} has modality {ev.modality!r}", name)
            check_reading(ev, max_bytes, decode)
        except InvalidEvent as exc:
            exc.modality = exc.modality or name
            errors.append(exc)
        else:
            good[name] = ev
    if not errors:
        return sample, errors
    missing = tuple(sorted(set(sample.missing) | (set(sample.readings) - set(good))))
    return dataclasses.replace(sample, readings=good, missing=missing), errors
