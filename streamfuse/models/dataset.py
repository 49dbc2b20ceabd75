"""Users' data on disk: a folder with ``metadata.csv`` and one file per reading.

``metadata.csv`` has the columns ``sample_id``, ``split`` (``train`` / ``val`` /
``test``), ``label``, then one column per modality (any subset of ``image``, ``audio``,
``series``) holding a path relative to the folder: ``image`` .png / .jpg / .jpeg,
``audio`` .wav (PCM16, any rate and channel count), ``series`` .npy (float, shape
``(L,)`` or ``(channels, L)``; read with ``allow_pickle=False``). An empty cell means the
sample has no reading of that modality. :func:`load_dataset` returns ``(Sample, Label)``
pairs per split; :func:`export_sim` writes simulator data in this format.

Example ``metadata.csv``::

    sample_id,split,label,image,audio,series
    s0,train,normal,image/s0.jpg,audio/s0.wav,series/s0.npy
    s1,val,bearing,image/s1.png,,series/s1.npy
"""

from __future__ import annotations

import csv
import io
import wave
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from streamfuse.errors import InvalidEvent, StreamfuseError
from streamfuse.events import MODALITIES, Label, Sample, SensorEvent, check_reading

__all__ = [
    "BadColumnsError", "BadFileError", "Dataset", "DatasetError", "EmptySplitError", "MissingFileError",
    "UnknownLabelError", "export_sim", "load_dataset",
]
METADATA = "metadata.csv"
SPLITS = ("train", "val", "test")
REQUIRED = ("sample_id", "split", "label")
SUFFIXES = {"image": (".png", ".jpg", ".jpeg"), "audio": (".wav",), "series": (".npy",)}
FORMAT_HELP = (f"columns {', '.join(REQUIRED)}, then any of {', '.join(MODALITIES)} "
               "(paths relative to the dataset folder); see `streamfuse dataset export-sim` for an example")
Pair = tuple[Sample, Label]


class DatasetError(StreamfuseError):
    """A dataset folder is unusable; ``path`` is the file at fault, ``row`` its CSV line."""

    def __init__(self, message: str, path: Path | None = None, row: int | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.row = row


class BadColumnsError(DatasetError):
    """``metadata.csv`` lacks a required column, has an unknown one, or repeats one."""


class MissingFileError(DatasetError):
    """``metadata.csv`` (or a file it names) does not exist."""


class BadFileError(DatasetError):
    """A reading's file exists but is not a valid file of its modality (or a bad cell)."""


class UnknownLabelError(DatasetError):
    """A label is empty or outside the classes (those of the train split, or given)."""


class EmptySplitError(DatasetError):
    """A split that is needed has no rows."""


@dataclass(frozen=True)
class Dataset:
    """A loaded dataset.

    Attributes:
        root: the folder.
        classes: class names (sorted train labels unless given).
        modalities: the modality columns, in :data:`~streamfuse.events.MODALITIES` order.
        splits: split name -> ``(Sample, Label)`` pairs, in file order.
    """

    root: Path
    classes: tuple[str, ...]
    modalities: tuple[str, ...]
    splits: dict[str, list[Pair]]

    def split(self, name: str) -> list[Pair]:
        """The pairs of one split (``[]`` if it has none)."""
        return self.splits.get(name, [])


def load_dataset(
    root: str | Path, *, modalities: Sequence[str] | None = None, classes: Sequence[str] | None = None,
    require: Sequence[str] = ("train", "val"), files: Sequence[str] = SPLITS,
) -> Dataset:
    """Read ``root/metadata.csv`` and every file it names.

    Args:
        root: the dataset folder.
        modalities: the modality columns to read (default: all present in the CSV).
        classes: the allowed labels (default: the sorted labels of the train split, or of
            every row when there is no train split).
        require: splits that must not be empty.
        files: the splits whose files are read and checked; the other splits' rows count
            for the classes only and come back without readings.

    Returns:
        The :class:`Dataset`.

    Raises:
        MissingFileError, BadColumnsError, BadFileError, UnknownLabelError,
        EmptySplitError: each naming the file (and CSV line) and the fix.
    """
    root = Path(root)
    meta = root / METADATA
    if not meta.is_file():
        raise MissingFileError(f"{meta} not found: a dataset folder needs {METADATA} with {FORMAT_HELP}", meta)
    header, rows = _read_csv(meta)
    cols = _columns(meta, header, modalities)
    data = _rows_by_split(root, meta, header, rows, cols, files)
    for name in require:
        if not data[name]:
            raise EmptySplitError(f"{meta}: the {name} split is empty; mark some rows split={name}", meta)
    given = bool(classes)
    known = data["train"] or [item for items in data.values() for item in items]
    classes = tuple(classes) if classes else tuple(sorted({lab for _, _, lab, _ in known}))
    return Dataset(root, classes, cols, _pairs(meta, data, classes, given, cols))


# One CSV row: (line, sample_id, label, modality -> reading).
_Row = tuple[int, str, str, dict[str, SensorEvent]]


def _read_csv(meta: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The header and the non-blank rows (with their line numbers) of ``metadata.csv``."""
    with meta.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        rows = [(reader.line_num, r) for r in reader if any(c.strip() for c in r)]
    return header, rows


def _rows_by_split(root: Path, meta: Path, header: list[str], rows: list[tuple[int, list[str]]],
                   cols: Sequence[str], files: Sequence[str]) -> dict[str, list[_Row]]:
    """Every row checked (cell count, unique sample id, split, a label) and, in the splits
    of ``files``, its readings read; split -> rows, in file order."""
    data: dict[str, list[_Row]] = {s: [] for s in SPLITS}
    seen: set[str] = set()
    for line, r in rows:
        if len(r) != len(header):
            raise BadColumnsError(f"{meta} line {line}: {len(r)} cells for {len(header)} columns", meta, line)
        cell = dict(zip(header, (c.strip() for c in r)))
        sid, split, label = cell["sample_id"], cell["split"], cell["label"]
        if not sid or sid in seen:
            raise BadFileError(f"{meta} line {line}: sample_id {sid!r} is empty or repeated", meta, line)
        seen.add(sid)
        if split not in SPLITS:
            raise BadFileError(f"{meta} line {line}: split {split!r} is not one of {list(SPLITS)}", meta, line)
        if not label:
            raise UnknownLabelError(f"{meta} line {line}: the label of {sid!r} is empty", meta, line)
        readings = {m: _read(root, meta, line, sid, m, cell[m]) for m in cols if cell[m] and split in files}
        data[split].append((line, sid, label, readings))
    return data


def _pairs(meta: Path, data: dict[str, list[_Row]], classes: tuple[str, ...], given: bool,
           cols: Sequence[str]) -> dict[str, list[Pair]]:
    """The ``(Sample, Label)`` pairs of every non-empty split, after checking each label is
    one of ``classes`` (``given`` by the caller, or those of the train split)."""
    out: dict[str, list[Pair]] = {}
    for name, items in data.items():
        for line, sid, label, readings in items:
            if label not in classes:
                fix = ("fix the label, or use models trained on this dataset" if given else
                       "add training rows with it or fix the label")
                raise UnknownLabelError(f"{meta} line {line}: label {label!r} of {sid!r} ({name}) is not one of the "
                                        f"classes {list(classes)} ({'given' if given else 'the train split labels'});"
                                        f" {fix}", meta, line)
            missing = tuple(m for m in cols if m not in readings)
            out.setdefault(name, []).append((Sample(sid, "dataset", line, readings, missing=missing),
                                             Label(sid, "dataset", line, label)))
    return out


def _columns(meta: Path, header: list[str], wanted: Sequence[str] | None) -> tuple[str, ...]:
    dupes = sorted({h for h in header if header.count(h) > 1})
    missing = [c for c in REQUIRED if c not in header]
    unknown = [h for h in header if h not in REQUIRED and h not in MODALITIES]
    if dupes or missing or unknown:
        raise BadColumnsError(f"{meta}: bad header {header}: missing {missing}, unknown {unknown}, repeated {dupes}; "
                              f"expected {FORMAT_HELP}", meta, 1)
    have = tuple(m for m in MODALITIES if m in header)
    if wanted:
        absent = [m for m in wanted if m not in have]
        if absent:
            raise BadColumnsError(f"{meta} has no column for {absent}; it has {list(have)}", meta, 1)
        have = tuple(m for m in MODALITIES if m in wanted)
    if not have:
        raise BadColumnsError(f"{meta}: no modality column; expected {FORMAT_HELP}", meta, 1)
    return have


def _read(root: Path, meta: Path, line: int, sid: str, modality: str, rel: str) -> SensorEvent:
    path = (root / rel).resolve()
    if Path(rel).is_absolute() or not path.is_relative_to(root.resolve()):
        raise BadFileError(f"{meta} line {line}: {modality} path {rel!r} must be relative and inside {root}",
                           meta, line)
    if path.suffix.lower() not in SUFFIXES[modality]:
        raise BadFileError(f"{meta} line {line}: {modality} file {rel!r} must end in {SUFFIXES[modality]}", path, line)
    if not path.is_file():
        raise MissingFileError(f"{path} not found ({meta} line {line}, {modality} of {sid!r}); "
                               "fix the path or leave the cell empty if the reading is missing", path, line)
    try:
        ev = _event(path, sid, modality)
        check_reading(ev)
    except (InvalidEvent, OSError, ValueError, EOFError, wave.Error) as exc:
        raise BadFileError(f"{path} ({meta} line {line}, {modality} of {sid!r}) is not a valid {modality} file: "
                           f"{exc}; replace the file, or leave the cell empty if the reading is missing",
                           path, line) from None
    return ev


def _event(path: Path, sid: str, modality: str) -> SensorEvent:
    eid = f"{sid}-{modality}"
    if modality == "image":
        data = path.read_bytes()
        return SensorEvent(eid, "dataset", "image", 0, data, encoding="png" if data[:4] == b"\x89PNG" else "jpeg")
    if modality == "audio":
        with wave.open(str(path), "rb") as w:
            if w.getcomptype() != "NONE" or w.getsampwidth() != 2:
                raise ValueError(f"need 16-bit PCM, got {8 * w.getsampwidth()}-bit {w.getcomptype()}")
            frames = w.readframes(w.getnframes())  # WAV PCM16 is little-endian, like the wire format
            return SensorEvent(eid, "dataset", "audio", 0, frames, encoding="pcm16le",
                               sample_rate=w.getframerate(), channels=w.getnchannels())
    arr = np.load(path, allow_pickle=False)
    if arr.dtype.kind not in "fiu" or arr.ndim not in (1, 2) or arr.size == 0:
        raise ValueError(f"need a non-empty numeric array of shape (L,) or (channels, L), got {arr.dtype} {arr.shape}")
    arr = np.ascontiguousarray(arr, dtype="<f4")
    return SensorEvent(eid, "dataset", "series", 0, arr.tobytes(), encoding="float32le", shape=tuple(arr.shape))


def export_sim(out_dir: str | Path, n_samples: int, seed: int = 0, *, val_frac: float = 0.15,
               test_frac: float = 0.15) -> Path:
    """Write simulated plant data as a dataset folder (balanced classes in every split).

    Args:
        out_dir: the folder to create (must not exist, or be empty).
        n_samples: total samples, split into train / val / test.
        seed: seeds the plant; the same seed writes the same files.
        val_frac, test_frac: shares of the val and test splits.

    Returns:
        The path of ``metadata.csv``.

    Raises:
        DatasetError: ``out_dir`` is not empty, or ``n_samples`` is too small.

    Examples:
        >>> import tempfile
        >>> meta = export_sim(Path(tempfile.mkdtemp()) / "sim", 12, seed=1)
        >>> ds = load_dataset(meta.parent)
        >>> {k: len(v) for k, v in ds.splits.items()}, ds.modalities
        ({'train': 8, 'val': 2, 'test': 2}, ('image', 'audio', 'series'))
    """
    from streamfuse.sim.plant import Plant, PlantConfig

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise DatasetError(f"{out} exists and is not empty; choose a new folder", out)
    n_val, n_test = round(n_samples * val_frac), round(n_samples * test_frac)
    sizes = {"train": n_samples - n_val - n_test, "val": n_val, "test": n_test}
    if min(sizes.values()) < 1:
        raise DatasetError(f"{n_samples} samples leave an empty split ({sizes}); ask for more", out)
    plant = Plant(PlantConfig(seed=seed), run_id="sim")
    for m in MODALITIES:
        (out / m).mkdir(parents=True, exist_ok=True)
    lines = [["sample_id", "split", "label", *MODALITIES]]
    for k, (split, n) in enumerate(sizes.items()):
        for sample, label in plant.dataset(n, seed=seed * 3 + k):
            lines.append([sample.sample_id, split, label.label, *_write_readings(out, sample)])
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(lines)
    (out / METADATA).write_text(buf.getvalue())
    return out / METADATA


def _write_readings(out: Path, sample: Sample) -> list[str]:
    """Write a simulated sample's readings as files (jpg, 16-bit wav, float32 npy) under
    ``out``; returns their paths relative to it, in :data:`MODALITIES` order."""
    sid, r = sample.sample_id, sample.readings
    (out / "image" / f"{sid}.jpg").write_bytes(r["image"].payload)
    with wave.open(str(out / "audio" / f"{sid}.wav"), "wb") as w:
        w.setnchannels(r["audio"].channels or 1)
        w.setsampwidth(2)
        w.setframerate(r["audio"].sample_rate)
        w.writeframes(r["audio"].payload)
    np.save(out / "series" / f"{sid}.npy", np.frombuffer(r["series"].payload, dtype="<f4"))
    return [f"image/{sid}.jpg", f"audio/{sid}.wav", f"series/{sid}.npy"]
