"""Synthetic sensor signals of a rotating machine, and the ways sensors degrade.

Each generator takes a seeded :class:`numpy.random.Generator` and *cue intensities* in
``[0, 1]`` (0 = the cue is absent); the plant decides which cue a machine state drives.
Every reading also carries nuisance variation (lighting, camera position, rpm, levels,
background noise) so that a cue is something a model has to learn, not a constant.

Pure numpy (and PIL for JPEG): no clock, no I/O.
"""

from __future__ import annotations

import io
from functools import lru_cache

import numpy as np
from PIL import Image

from streamfuse.errors import ConfigError

TAU = 2.0 * np.pi
VIBRATION_RATE_HZ = 1024.0  # sample rate of the vibration window (256 values = 0.25 s)
# Typical levels of the simulated readings (medians over 400 samples): recorded readings
# are degraded relative to these, so a fault is as severe on real data as in the simulator.
AUDIO_RMS = 1500.0  # PCM16 units
SERIES_SD = 0.43


# ---------------------------------------------------------------------------- image


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    return yy, xx


def _disc(xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    # anti-aliased edge: a hard disc on 32 px would flicker between readings
    return np.clip(r - np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2) + 0.5, 0.0, 1.0)


def machine_image(
    rng: np.random.Generator, size: int = 32,
    *,
    hot: float = 0.0,
    shake: float = 0.0,
    leak: float = 0.0,
) -> np.ndarray:
    """A camera frame of the machine: a body, a rotor in its housing, a motor on the right.

    Args:
        rng: the source of all randomness.
        size: the frame is ``size`` x ``size`` pixels.
        hot: hot-spot glow on the motor housing (overheating).
        shake: the rotor is smeared sideways (it vibrates: imbalance).
        leak: an oil streak under the rotor housing (a failing bearing).

    Returns:
        ``(size, size, 3)`` uint8 RGB.
    """
    s = float(size)
    yy, xx = _grid(size)
    img = np.empty((size, size, 3), np.float32)
    img[:] = rng.uniform(95, 165) + rng.normal(0, 10, 3)  # wall behind, random tint
    if rng.random() < 0.25:  # an orange sign on the wall: red pixels alone do not mean "hot"
        x0, y0 = int(rng.uniform(0, 0.15) * s), int(rng.choice([0.02, 0.85]) * s)
        img[y0 : y0 + max(2, size // 10), x0 : x0 + max(2, size // 10)] = (220, 130, 40)
    cx, cy = s / 2 + rng.uniform(-0.07, 0.07) * s, s / 2 + rng.uniform(-0.07, 0.07) * s
    w, h = rng.uniform(0.56, 0.66) * s, rng.uniform(0.44, 0.54) * s
    body = (np.abs(xx - cx) < w / 2) & (np.abs(yy - cy) < h / 2)
    img[body] = np.array((70, 85, 110)) + rng.normal(0, 8, 3)
    hx, hy, r = cx - 0.2 * w, cy, 0.15 * s
    housing = _disc(xx, yy, hx, hy, 1.3 * r)[..., None]
    img = img * (1 - housing) + housing * (np.array((165, 165, 160)) + rng.normal(0, 6, 3))
    if leak > 0:
        streak = (np.abs(xx - hx) < 0.05 * s) & (yy > hy + 1.2 * r) & (yy < hy + 1.2 * r + 0.16 * s)
        img[streak] = img[streak] * (1 - 0.85 * leak) + 0.85 * leak * np.array((45, 32, 15))
    off = shake * rng.uniform(0.08, 0.13) * s
    rotor = (0.5 * (_disc(xx, yy, hx - off, hy, r) + _disc(xx, yy, hx + off, hy, r)))[..., None]
    img = img * (1 - rotor) + rotor * np.array((35, 35, 42))
    if hot > 0:
        mx, my, sd = cx + 0.22 * w, cy + rng.uniform(-0.05, 0.05) * s, 0.08 * s
        glow = hot * np.exp(-((xx - mx) ** 2 + (yy - my) ** 2) / (2 * sd * sd))
        img += glow[..., None] * np.array((170.0, 70.0, -50.0))
    # exposure and a side light: the same machine never looks the same twice
    light = rng.uniform(0.7, 1.25) * (1 + rng.uniform(-0.3, 0.3) * (xx / s - 0.5))
    img = img * light[..., None] + rng.normal(0, rng.uniform(2, 6), img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _box_blur(img: np.ndarray, k: int) -> np.ndarray:
    """Mean over a ``k`` x ``k`` window of an (H, W, C) array, edges repeated."""
    lo, hi = k // 2, k - 1 - k // 2
    for axis in (0, 1):
        pad = [(0, 0)] * img.ndim
        pad[axis] = (lo + 1, hi)
        c = np.cumsum(np.pad(img, pad, mode="edge"), axis=axis, dtype=np.float32)
        c = np.moveaxis(c, axis, 0)
        img = np.moveaxis((c[k:] - c[:-k]) / k, 0, axis)
    return img


def fog(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Dense fog (or steam) in front of the lens: light gray, washed-out colour, soft."""
    x = img.astype(np.float32)
    x = 0.3 * x + 0.7 * x.mean(axis=2, keepdims=True)  # scattered light desaturates
    a = rng.uniform(0.88, 0.95)
    x = a * rng.uniform(190, 225) + (1 - a) * _box_blur(x, 3)
    return np.clip(x + rng.normal(0, 2.5, x.shape), 0, 255).astype(np.uint8)


def blur(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Lens far out of focus (or smeared with grease): only a colour wash remains."""
    k = max(3, int(img.shape[0] * rng.uniform(0.4, 0.55)))
    x = _box_blur(_box_blur(img.astype(np.float32), k), k)
    x = 0.5 * x + 0.5 * x.mean(axis=(0, 1))  # smeared grease also lowers contrast
    return np.clip(x + rng.normal(0, 3, x.shape), 0, 255).astype(np.uint8)


def occlude(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Something (a tarp, a person) stands in front of the machine."""
    (h, w), x = img.shape[:2], img.copy()
    lo, hi = rng.uniform(0.04, 0.08), rng.uniform(0.92, 0.96)  # shares of each side: any aspect ratio
    rows, cols = slice(int(h * lo), int(np.ceil(h * hi))), slice(int(w * lo), int(np.ceil(w * hi)))
    x[rows, cols] = np.clip(rng.uniform(30, 90) + rng.normal(0, 8, 3), 0, 255).astype(np.uint8)
    return x


def dark(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Lights off: almost no signal left above the sensor's read noise."""
    x = img.astype(np.float32) * rng.uniform(0.015, 0.035)
    return np.clip(x + rng.normal(0, 2.0, x.shape), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------- audio


@lru_cache(maxsize=8)
def _time(n: int, rate: float) -> np.ndarray:
    return np.arange(n) / rate


def machine_audio(
    rng: np.random.Generator, rate: int = 8000,
    *,
    clicks: float = 0.0,
    thump: float = 0.0,
    fan: float = 0.0,
) -> np.ndarray:
    """One second of the machine's sound from a microphone next to it.

    Args:
        rng: the source of all randomness.
        rate: sample rate in Hz.
        clicks: bearing-defect clicks: short high-frequency rings (a failing bearing).
        thump: a low thump at the shaft rate (imbalance).
        fan: the cooling fan runs flat out (overheating).

    Returns:
        ``(rate,)`` int16 mono PCM.
    """
    t = _time(rate, float(rate))
    f0 = rng.uniform(22, 28)  # shaft rotation, Hz: rpm varies with load
    mains = 50.0 if rng.random() < 0.5 else 60.0
    x = np.zeros(rate)
    for k in (2, 4, 6):  # electrical hum of the motor
        x += rng.uniform(0.01, 0.06) * 2 / k * np.sin(TAU * k * mains * t + rng.uniform(0, TAU))
    machine = rng.normal(0, rng.uniform(0.01, 0.03), rate)
    if thump > 0:
        machine *= 1 + 0.8 * thump * np.sin(TAU * f0 * t)
        x += thump * rng.uniform(0.06, 0.12) * np.sin(TAU * f0 * t + rng.uniform(0, TAU))
    x += machine
    level = rng.uniform(0, 0.015) + fan * rng.uniform(0.04, 0.07)
    x += level * np.sin(TAU * rng.uniform(280, 420) * t + rng.uniform(0, TAU))
    if rng.random() < 0.3:  # other machinery in the hall
        x += rng.uniform(0.005, 0.03) * np.sin(TAU * rng.uniform(500, 2000) * t + rng.uniform(0, TAU))
    if clicks > 0:
        period = 1.0 / (f0 * rng.uniform(3.3, 3.8))  # outer-race defect frequency
        at = np.arange(rng.uniform(0, period), 1.0, period)
        idx = (at * rate + rng.normal(0, 2, at.size)).astype(int).clip(0, rate - 1)
        amp = clicks * rng.uniform(0.15, 0.3) * rng.uniform(0.7, 1.0, idx.size)
        tk = np.arange(int(0.006 * rate)) / rate
        ring = np.exp(-tk / 0.0012) * np.sin(TAU * rng.uniform(2400, 3400) * tk)
        where = idx[:, None] + np.arange(tk.size)  # each click rings for 6 ms
        keep = where < rate
        np.add.at(x, where[keep], (amp[:, None] * ring)[keep])
    x *= rng.uniform(0.6, 1.4)  # microphone distance
    return np.clip(np.round(x * 32767), -32768, 32767).astype(np.int16)


def noise(pcm: np.ndarray, rng: np.random.Generator, level: float = 1.0) -> np.ndarray:
    """A loud broadband source (compressed air, a grinder) drowns the machine.

    ``level`` scales the noise with the clip's loudness relative to the simulator's
    (:data:`AUDIO_RMS`), so a recorded clip is drowned as deeply as a simulated one.
    """
    x = pcm.astype(np.float64) + rng.normal(0, rng.uniform(0.2, 0.35) * 32767 * level, pcm.shape)
    return np.clip(np.round(x), -32768, 32767).astype(np.int16)


def clip(pcm: np.ndarray, rng: np.random.Generator, level: float = 1.0) -> np.ndarray:
    """Preamp gain far too high: its own hiss, amplified, pins the output to the rails.

    ``level``: the clip's loudness relative to the simulator's; the hiss follows it.
    """
    # the hiss must dominate the sign of the input, or the clipped wave is 1-bit audio
    x = pcm / 32767.0 + rng.normal(0, rng.uniform(0.2, 0.35) * level, pcm.shape)
    level = rng.uniform(0.02, 0.05)
    x = np.clip(x * rng.uniform(15, 30), -level, level)
    return np.round(x * 32767).astype(np.int16)


def mute(pcm: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Microphone disconnected: the input floats, picking up a little mains hum and noise."""
    t = np.arange(pcm.size) / 8000.0  # the exact rate does not matter for a few LSBs of hum
    hum = rng.uniform(0.5, 3.0) * np.sin(TAU * rng.choice((50.0, 60.0)) * t + rng.uniform(0, TAU))
    return np.round(hum + rng.normal(0, 1.0, pcm.shape)).astype(np.int16)


# ---------------------------------------------------------------------------- series


def machine_vibration(
    rng: np.random.Generator, length: int = 256,
    *,
    unbalance: float = 0.0,
    impacts: float = 0.0,
    drift: float = 0.0,
) -> np.ndarray:
    """A window of an accelerometer on the bearing housing, sampled at 1024 Hz.

    Args:
        rng: the source of all randomness.
        length: number of values.
        unbalance: large vibration at the shaft rate (1x): imbalance.
        impacts: periodic impacts ringing the housing: a failing bearing.
        drift: slow thermal drift of the sensor's offset: overheating.

    Returns:
        ``(length,)`` float32.
    """
    t = _time(length, VIBRATION_RATE_HZ)
    f0 = rng.uniform(22, 28)
    a1 = rng.uniform(0.3, 0.7) * (1 + unbalance * rng.uniform(1.8, 3.0))
    x = a1 * np.sin(TAU * f0 * t + rng.uniform(0, TAU))
    x += rng.uniform(0.05, 0.2) * np.sin(2 * TAU * f0 * t + rng.uniform(0, TAU))
    x += rng.normal(0, rng.uniform(0.05, 0.15), length) + rng.normal(0, 0.05)
    if impacts > 0:
        period = 1.0 / (f0 * rng.uniform(3.3, 3.8))
        amp = impacts * rng.uniform(0.5, 0.9)
        since = (t - rng.uniform(0, period)) % period  # time since the last impact
        x += amp * np.exp(-since / 0.004) * np.sin(TAU * rng.uniform(250, 380) * since)
    if drift > 0:
        x += drift * (rng.uniform(0.3, 0.6) + rng.uniform(0.4, 0.8) * t / t[-1])
    return x.astype(np.float32)


def flatline(x: np.ndarray, rng: np.random.Generator, center: float | np.ndarray = 0.0,
             scale: float | np.ndarray = 1.0) -> np.ndarray:
    """The sensor is stuck at one reading, unrelated to the machine (a frozen ADC code).

    ``center`` and ``scale`` (per channel, broadcast against ``x``) place the stuck value
    within a recorded series' own range: ``center + u * scale``, ``u`` in [-1, 1).
    """
    return np.full_like(x, center + rng.uniform(-1.0, 1.0) * scale)


def series_noise(x: np.ndarray, rng: np.random.Generator, scale: float | np.ndarray = 1.0) -> np.ndarray:
    """A loose cable or EMI: noise far above the vibration (``scale``: a recorded series'
    spread relative to the simulator's, :data:`SERIES_SD`)."""
    return (x + rng.normal(0, rng.uniform(1.5, 3.0) * scale, x.shape)).astype(np.float32)


# ---------------------------------------------------------------------------- dispatch

# dropout is not a transformation: the reading is not emitted at all (see the plant)
DEGRADATIONS = {
    "image": {"fog": fog, "blur": blur, "occlude": occlude, "dark": dark},
    "audio": {"noise": noise, "clip": clip, "mute": mute},
    "series": {"flatline": flatline, "noise": series_noise},
}


def degrade(modality: str, kind: str, data: np.ndarray, rng: np.random.Generator, **levels) -> np.ndarray:
    """Apply one fault to one reading.

    Args:
        modality: ``image``, ``audio`` or ``series``.
        kind: a fault kind of that modality other than ``dropout``.
        data: the clean reading, as returned by the generator.
        rng: the source of the fault's randomness.
        levels: the kind's level arguments for a recorded reading (``level``, ``center``,
            ``scale``); none for simulated readings.

    Returns:
        The degraded reading, same shape and dtype.

    Raises:
        ConfigError: for an unknown modality or kind (``dropout`` included: it removes the
            reading instead of changing it).
    """
    fn = DEGRADATIONS.get(modality, {}).get(kind)
    if fn is None:
        valid = "; ".join(f"{m}: {'|'.join(k)}" for m, k in DEGRADATIONS.items())
        raise ConfigError(f"no {modality} degradation {kind!r}; valid: {valid}")
    return fn(data, rng, **levels)


def encode_jpeg(img: np.ndarray, quality: int = 85) -> bytes:
    """JPEG bytes of an (H, W, 3) uint8 frame."""
    buf = io.BytesIO()
    Image.fromarray(img, "RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def encode_pcm16le(pcm: np.ndarray) -> bytes:
    """Little-endian PCM16 bytes."""
    return pcm.astype("<i2").tobytes()


def encode_float32le(x: np.ndarray) -> bytes:
    """Little-endian float32 bytes."""
    return x.astype("<f4").tobytes()
