"""Sensor faults applied to recorded readings (a dataset's images, clips and series).

The simulator's degradations (:mod:`streamfuse.sim.signals`) work on the generator's
arrays; a recorded reading arrives as wire payload bytes (JPEG/PNG, PCM16LE, float32LE)
of any size and level. :func:`degrade_reading` decodes it, applies the same degradation
and encodes it back, scaled to the reading's own level so that a fault is as severe on
real data as in the simulator:

- image (``fog``, ``blur``, ``occlude``, ``dark``): any size; grey or RGBA frames become
  RGB; encoded back in the reading's format (PNG stays PNG).
- audio ``noise`` / ``clip``: the noise (the hiss) follows the clip's RMS relative to the
  simulator's (:data:`~streamfuse.sim.signals.AUDIO_RMS`), so the signal-to-noise ratio is
  the simulator's; ``mute`` is absolute (a disconnected microphone does not know the
  level); any channel count (interleaved samples are degraded alike).
- series ``flatline`` / ``noise``: per channel, the stuck value lies within the
  channel's own range (mean ± its spread) and the noise follows its spread relative to
  the simulator's (:data:`~streamfuse.sim.signals.SERIES_SD`); shape ``(L,)`` or ``(C, L)``.
- ``dropout`` (any modality) is not a change of the reading: the plant leaves it out.

Pure logic (numpy and PIL in memory): no clock, no I/O.
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
from PIL import Image

from streamfuse.errors import ConfigError
from streamfuse.events import SensorEvent
from streamfuse.sim import signals

__all__ = ["degrade_reading", "reading_array"]

_TINY = 1e-9  # a silent clip or a constant channel has no level: treat it as the simulator's


def reading_array(ev: SensorEvent) -> np.ndarray:
    """The reading as an array: image ``(H, W, 3)`` uint8, audio int16 (interleaved),
    series float32 in its ``shape``.

    Raises:
        ConfigError: the payload does not decode (a dataset's rows are checked on load,
            so this means a reading that did not come from one).
    """
    try:
        if ev.modality == "image":
            with Image.open(io.BytesIO(ev.payload)) as img:
                return np.asarray(img.convert("RGB"))
        if ev.modality == "audio":
            return np.frombuffer(ev.payload, dtype="<i2").astype(np.int16)
        arr = np.frombuffer(ev.payload, dtype="<f4").astype(np.float32)
        return arr.reshape(ev.shape) if ev.shape else arr
    except (OSError, ValueError) as exc:
        raise ConfigError(f"reading {ev.event_id!r} ({ev.modality}) does not decode: {exc}") from None


def _levels(modality: str, kind: str, data: np.ndarray) -> dict:
    """The level arguments of a degradation for this reading (see the module docstring)."""
    if modality == "audio" and kind in ("noise", "clip"):
        rms = float(np.sqrt(np.mean(data.astype(np.float64) ** 2))) if data.size else 0.0
        return {"level": rms / signals.AUDIO_RMS if rms > _TINY else 1.0}
    if modality == "series":
        mean = data.mean(axis=-1, keepdims=True, dtype=np.float64)
        sd = data.std(axis=-1, keepdims=True, dtype=np.float64)
        scale = np.where(sd > _TINY, sd, signals.SERIES_SD) / signals.SERIES_SD
        return {"center": mean, "scale": scale} if kind == "flatline" else {"scale": scale}
    return {}


def _payload(ev: SensorEvent, data: np.ndarray) -> dict:
    if ev.modality == "image":
        if ev.encoding == "png":
            buf = io.BytesIO()
            Image.fromarray(data, "RGB").save(buf, format="PNG")
            return {"payload": buf.getvalue()}
        return {"payload": signals.encode_jpeg(data), "encoding": "jpeg"}
    if ev.modality == "audio":
        return {"payload": signals.encode_pcm16le(data)}
    return {"payload": signals.encode_float32le(data.astype(np.float32))}


def degrade_reading(ev: SensorEvent, kind: str, rng: np.random.Generator) -> SensorEvent:
    """The reading with one fault applied (see the module docstring for what each does).

    Args:
        ev: a recorded reading (any size, level and channel count of its modality).
        kind: a fault kind of ``ev.modality`` other than ``dropout``.
        rng: the source of the fault's randomness (seed it for reproducible runs).

    Returns:
        A new event with the degraded payload; every other field is kept.

    Raises:
        ConfigError: an unknown kind (``dropout`` included), or a payload that does not decode.

    Examples:
        >>> series = np.array([[10.0, 11.0, 9.0, 10.0]], dtype="<f4")
        >>> ev = SensorEvent("e", "asset-0", "series", 0, series.tobytes(), encoding="float32le", shape=(1, 4))
        >>> out = reading_array(degrade_reading(ev, "flatline", np.random.default_rng(0)))
        >>> out.shape, bool(np.all(out == out[0, 0])), bool(9.0 < out[0, 0] < 11.0)
        ((1, 4), True, True)
    """
    data = reading_array(ev)
    out = signals.degrade(ev.modality, kind, data, rng, **_levels(ev.modality, kind, data))
    return dataclasses.replace(ev, **_payload(ev, out))
