"""Public real datasets that installed packages ship, written in the ``metadata.csv`` layout.

Nothing is downloaded: each converter reads files that a package from PyPI or Debian
installs, so the data is there offline once the package is.

- ``digits`` (:func:`export_digits`): image + audio, 10 classes. The images are the UCI
  handwritten digits bundled with scikit-learn (``sklearn/datasets/data/digits.csv.gz``,
  8x8 grey levels, 1797 writers' digits). Each is paired, as in AV-MNIST, with a spoken
  name of the same digit made by the Debian package ``espeak-ng`` with a random voice,
  variant, speed and pitch, shifted in time and mixed with noise at a random SNR.
- UCR/UEA series (:func:`export_ucr`, e.g. ``basicmotions``, ``gunpoint``): the ``.ts``
  files bundled in aeon's wheel (``aeon/datasets/data/<Name>/<Name>_TRAIN.ts``; install
  the data only with ``pip install --no-deps aeon==1.6.0``). The archive's train split is
  cut into train / val (stratified), its test split is kept as test.

:func:`export_real` writes one of :data:`REAL_DATASETS` by name (``streamfuse dataset
export-real NAME --out DIR``).
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import io
import shutil
import subprocess
import wave
from collections.abc import Callable
from pathlib import Path

import numpy as np

from streamfuse.models.dataset import METADATA, DatasetError

__all__ = ["REAL_DATASETS", "export_digits", "export_real", "export_ucr", "package_file", "read_ts"]

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
VOICES = ("en", "en-us", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-gb-x-gbclan")
VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5", "croak", "klatt", "klatt2")
AUDIO_RATE = 16000
CLIP_S = 1.0


def package_file(dist: str, rel: str, install: str) -> Path:
    """A data file inside an installed package, located without importing it.

    Raises:
        DatasetError: the package or the file is not installed; says what to install.
    """
    spec = importlib.util.find_spec(dist)
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    for root in roots:
        path = Path(root) / rel
        if path.is_file():
            return path
    raise DatasetError(f"{dist}/{rel} is not installed; install it with `{install}`")


def _split_indices(y: np.ndarray, fracs: tuple[float, ...], seed: int) -> list[np.ndarray]:
    """Stratified split of ``range(len(y))`` into ``len(fracs)`` parts (shuffled per class)."""
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in fracs]
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        bounds = np.round(np.cumsum(fracs) / sum(fracs) * len(idx)).astype(int)
        for k, (lo, hi) in enumerate(zip([0, *bounds[:-1]], bounds)):
            parts[k] += idx[lo:hi].tolist()
    return [np.array(sorted(p), dtype=np.int64) for p in parts]


def _start(out: Path, modalities: tuple[str, ...]) -> None:
    if out.exists() and any(out.iterdir()):
        raise DatasetError(f"{out} exists and is not empty; choose a new folder", out)
    for m in modalities:
        (out / m).mkdir(parents=True, exist_ok=True)


def _write_meta(out: Path, rows: list[list[str]], modalities: tuple[str, ...]) -> Path:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([["sample_id", "split", "label", *modalities], *rows])
    (out / METADATA).write_text(buf.getvalue())
    return out / METADATA


# ---------------------------------------------------------------------------- digits


def _digits() -> tuple[np.ndarray, np.ndarray]:
    path = package_file("sklearn", "datasets/data/digits.csv.gz", "pip install scikit-learn==1.9.1")
    with gzip.open(path, "rt") as f:
        data = np.loadtxt(f, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64)


def _speak(word: str, rng: np.random.Generator) -> np.ndarray:
    """One spoken ``word`` (float32 mono at :data:`AUDIO_RATE`, :data:`CLIP_S` long, noisy)."""
    voice = f"{VOICES[rng.integers(len(VOICES))]}+{VARIANTS[rng.integers(len(VARIANTS))]}"
    cmd = ["espeak-ng", "-v", voice, "-s", str(int(rng.integers(110, 230))), "-p", str(int(rng.integers(20, 80))),
           "--stdout", word]
    raw = subprocess.run(cmd, capture_output=True, check=True, timeout=30).stdout
    with wave.open(io.BytesIO(raw)) as w:
        rate, pcm = w.getframerate(), np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    speech = pcm.astype(np.float32) / 32768.0
    n_out = int(len(speech) * AUDIO_RATE / rate)
    speech = np.interp(np.linspace(0, len(speech) - 1, n_out), np.arange(len(speech)), speech).astype(np.float32)
    n = int(CLIP_S * AUDIO_RATE)
    speech = speech[np.flatnonzero(np.abs(speech) > 1e-3).min(initial=0):][:n]  # espeak's leading silence
    clip = np.zeros(n, dtype=np.float32)
    start = int(rng.integers(0, max(1, n - len(speech)) + 1)) if len(speech) < n else 0
    clip[start : start + len(speech)] = speech
    power = float(np.mean(speech**2)) or 1e-6
    snr_db = rng.uniform(-5.0, 15.0)
    clip += rng.normal(0, np.sqrt(power / 10 ** (snr_db / 10)), n).astype(np.float32)
    return clip / max(1.0, float(np.abs(clip).max()))


def _write_wav(path: Path, clip: np.ndarray) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(AUDIO_RATE)
        w.writeframes((np.clip(clip, -1, 1) * 32767).astype("<i2").tobytes())


def export_digits(out_dir: str | Path, samples: int = 600, seed: int = 0) -> Path:
    """Write ``samples`` handwritten digits with a spoken name each (60 / 20 / 20 %).

    Args:
        out_dir: the folder to create (must not exist, or be empty).
        samples: how many of the 1797 digits (stratified by class).
        seed: picks the digits, the voices and the noise; the same seed writes the same data.

    Returns:
        The path of ``metadata.csv``.

    Raises:
        DatasetError: scikit-learn or espeak-ng is missing, or ``out_dir`` is not empty.
    """
    from PIL import Image

    if shutil.which("espeak-ng") is None:
        raise DatasetError("espeak-ng is not installed; `apt-get install -y --no-install-recommends espeak-ng`")
    images, y = _digits()
    if not 20 <= samples <= len(y):
        raise DatasetError(f"samples must be in 20..{len(y)}, got {samples}")
    out = Path(out_dir)
    keep = np.sort(_split_indices(y, (samples, len(y) - samples), seed)[0]) if samples < len(y) else np.arange(len(y))
    splits = _split_indices(y[keep], (0.6, 0.2, 0.2), seed + 1)
    _start(out, ("image", "audio"))
    rng = np.random.default_rng(seed + 2)
    rows = []
    for name, part in zip(("train", "val", "test"), splits):
        for i in keep[part]:
            sid = f"d{i:04d}"
            grey = (images[i] * (255 / 16)).round().astype(np.uint8)
            Image.fromarray(grey, mode="L").save(out / "image" / f"{sid}.png")
            _write_wav(out / "audio" / f"{sid}.wav", _speak(DIGIT_WORDS[y[i]], rng))
            rows.append([sid, name, DIGIT_WORDS[y[i]], f"image/{sid}.png", f"audio/{sid}.wav"])
    return _write_meta(out, rows, ("image", "audio"))


# ---------------------------------------------------------------------------- UCR / UEA


def read_ts(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read an equal-length ``.ts`` file (sktime/aeon format): ``X [N, channels, L]``, labels.

    Raises:
        DatasetError: unequal lengths, missing values or a malformed line (naming it).
    """
    xs, labels = [], []
    with path.open(encoding="utf-8") as f:
        in_data = False
        for line_no, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if not in_data:
                in_data = line.lower() == "@data"
                continue
            *dims, label = line.split(":")
            try:
                xs.append([[float(v) for v in d.split(",")] for d in dims])
            except ValueError:
                raise DatasetError(f"{path} line {line_no}: not numbers (missing values are not supported)",
                                   path) from None
            labels.append(label.strip())
    try:
        x = np.asarray(xs, dtype=np.float32)
    except ValueError:
        raise DatasetError(f"{path}: series of unequal length; choose an equal-length dataset", path) from None
    if x.ndim != 3 or not np.isfinite(x).all():
        raise DatasetError(f"{path}: expected equal-length, finite series", path)
    return x, np.asarray(labels)


def export_ucr(out_dir: str | Path, name: str = "BasicMotions", seed: int = 0, val_frac: float = 0.25) -> Path:
    """Write a UCR/UEA dataset bundled in aeon's wheel as a ``series`` dataset.

    Args:
        out_dir: the folder to create.
        name: the archive name, e.g. ``BasicMotions``, ``GunPoint``, ``ArrowHead``.
        seed: the train / val cut.
        val_frac: share of the archive's train split held out for validation.

    Returns:
        The path of ``metadata.csv``.

    Raises:
        DatasetError: aeon's data is not installed, or ``out_dir`` is not empty.
    """
    install = "pip install --no-deps aeon==1.6.0"
    x_tr, y_tr = read_ts(package_file("aeon", f"datasets/data/{name}/{name}_TRAIN.ts", install))
    x_te, y_te = read_ts(package_file("aeon", f"datasets/data/{name}/{name}_TEST.ts", install))
    out = Path(out_dir)
    _start(out, ("series",))
    _, codes = np.unique(y_tr, return_inverse=True)
    train, val = _split_indices(codes, (1 - val_frac, val_frac), seed)
    rows = []
    for split, x, y, idx in (("train", x_tr, y_tr, train), ("val", x_tr, y_tr, val),
                             ("test", x_te, y_te, np.arange(len(y_te)))):
        for i in idx:
            sid = f"{split}{i:04d}"
            arr = x[i] if x.shape[1] > 1 else x[i, 0]
            np.save(out / "series" / f"{sid}.npy", arr.astype(np.float32))
            rows.append([sid, split, y[i], f"series/{sid}.npy"])
    return _write_meta(out, rows, ("series",))


REAL_DATASETS: dict[str, Callable[..., Path]] = {
    "digits": export_digits,
    "basicmotions": lambda out, seed=0: export_ucr(out, "BasicMotions", seed),
    "gunpoint": lambda out, seed=0: export_ucr(out, "GunPoint", seed),
    "arrowhead": lambda out, seed=0: export_ucr(out, "ArrowHead", seed),
}


def export_real(name: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Write the real dataset ``name`` (one of :data:`REAL_DATASETS`); see the module docstring.

    Raises:
        DatasetError: an unknown name, a package that is missing, or a non-empty ``out_dir``.
    """
    if name not in REAL_DATASETS:
        raise DatasetError(f"unknown real dataset {name!r}; valid: {', '.join(REAL_DATASETS)}")
    return REAL_DATASETS[name](out_dir, seed=seed)
