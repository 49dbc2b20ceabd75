"""A labelled dataset as the plant: its rows stream as the assets' sensor readings.

:class:`DatasetPlant` offers what :class:`~streamfuse.sim.plant.Plant` offers to the
publisher, the demo and the benches (``asset_ids``, ``line_ids``, ``period_ms``,
``config``, ``sample(asset_index, seq, ts_ms) -> (Sample, Label)``), so everything
downstream is unchanged::

    plant = DatasetPlant("data", split="test", assets=4, lines=2, rate_hz=2.0, seed=0,
                         faults=("image:fog@20",), start_ms=0, run_id="ds")
    sample, label = plant.sample(asset_index, seq, ts_ms)

The folder is in the ``metadata.csv`` layout of :mod:`streamfuse.models.dataset`
(``streamfuse dataset export-sim`` writes one). :func:`load_rows` reads the split's
files once, at start, and checks every row (a missing file, a bad label, an unreadable
image: the error names the CSV line, the row id and the fix); after that the plant is
pure logic, with no clock and no I/O.

Rows are cycled across the assets: at tick ``seq`` asset ``i`` gets the row at position
``seq * assets + i`` of the stream, which runs through the split in a seeded random order
and starts a new random order every pass, so every row is used once per pass and a long
run does not repeat one sequence. The label of a sample is its row's label (the
publisher sends it after the label delay). Every fault kind of
:data:`~streamfuse.sim.faults.FAULT_KINDS` applies to the recorded readings
(:mod:`streamfuse.sim.readings`); ``dropout`` and a row's empty cell leave the reading
out and list it in ``Sample.missing``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from streamfuse.errors import ConfigError
from streamfuse.events import MODALITIES, Label, Sample, SensorEvent
from streamfuse.models.dataset import METADATA, SPLITS, DatasetError, UnknownLabelError, load_dataset
from streamfuse.sim.faults import FaultSpec
from streamfuse.sim.plant import Plant, PlantConfig, SimulationError
from streamfuse.sim.readings import degrade_reading

__all__ = ["DatasetPlant", "DatasetRows", "Row", "load_rows"]

_ORDER, _FAULT = 0x5D1, 0x5D2  # first word of the seeds: row order and fault draws never overlap


@dataclass(frozen=True)
class Row:
    """One dataset row: its CSV line, id, label and readings (by modality)."""

    line: int
    sample_id: str
    label: str
    readings: dict[str, SensorEvent]


@dataclass(frozen=True)
class DatasetRows:
    """The rows of one split, checked, in file order.

    Attributes:
        root: the dataset folder.
        split: ``train``, ``val`` or ``test``.
        classes: the allowed labels (the train split's, or those given to :func:`load_rows`).
        modalities: the modality columns.
        rows: the split's rows.
    """

    root: Path
    split: str
    classes: tuple[str, ...]
    modalities: tuple[str, ...]
    rows: tuple[Row, ...]

    def check_faults(self, faults: Sequence[FaultSpec]) -> None:
        """Check that every fault names a modality the dataset has.

        Raises:
            ConfigError: naming the faults and the dataset's modalities.
        """
        absent = [str(f) for f in faults if f.modality not in self.modalities]
        if absent:
            raise ConfigError(f"faults {absent} name a modality the dataset {self.root} has no column for; "
                              f"it has {list(self.modalities)}: drop them or add that column")

    def check_classes(self, classes: Sequence[str], whose: str) -> None:
        """Check that every row's label is one of ``classes`` (e.g. the served models').

        Raises:
            UnknownLabelError: naming the first row whose label is not, and the fix.
        """
        for r in self.rows:
            if r.label not in classes:
                meta = self.root / METADATA
                raise UnknownLabelError(
                    f"{meta} line {r.line}: label {r.label!r} of {r.sample_id!r} ({self.split}) is not one of "
                    f"{whose} classes {list(classes)}; serve models trained on this dataset "
                    "(`streamfuse train --data DIR --out M`, then --models M) or fix the label", meta, r.line)


def load_rows(root: str | Path, split: str = "test", *, classes: Sequence[str] | None = None,
              max_payload_bytes: int | None = None) -> DatasetRows:
    """Read and check one split of a dataset folder (the only I/O of a dataset plant).

    Args:
        root: the folder with ``metadata.csv``.
        split: ``train``, ``val`` or ``test``.
        classes: the allowed labels (default: the train split's labels, or every row's
            when there is no train split).
        max_payload_bytes: refuse a reading larger than this (the pipeline's
            ``STREAMFUSE_MAX_PAYLOAD_BYTES``: it would be dead-lettered).

    Returns:
        The split's rows.

    Raises:
        DatasetError: (a :class:`~streamfuse.errors.StreamfuseError`) a split name that does
            not exist, no ``metadata.csv``, an empty split, a missing or unreadable file, a
            label outside the classes, an oversize reading; the message names the CSV line,
            the row id and the fix.
    """
    if split not in SPLITS:
        raise DatasetError(f"split {split!r} does not exist; choose one of {', '.join(SPLITS)} (--split)")
    ds = load_dataset(root, classes=classes, require=(split,), files=(split,))
    rows = tuple(Row(s.ts_ms, s.sample_id, lab.label, s.readings) for s, lab in ds.split(split))
    for r in rows:
        for m, ev in r.readings.items():
            if max_payload_bytes is not None and len(ev.payload) > max_payload_bytes:
                raise DatasetError(
                    f"{ds.root / METADATA} line {r.line}: the {m} reading of {r.sample_id!r} has "
                    f"{len(ev.payload)} bytes, over the pipeline's limit of {max_payload_bytes}; shrink the file "
                    "or raise STREAMFUSE_MAX_PAYLOAD_BYTES", ds.root / METADATA, r.line)
    return DatasetRows(ds.root, split, ds.classes, ds.modalities, rows)


class DatasetPlant:
    """The rows of a dataset split, streamed as the readings of a plant's assets.

    Args:
        source: the dataset folder (read here with :func:`load_rows`) or rows already loaded.
        split: the split to stream when ``source`` is a folder (default ``test``).
        assets, lines, rate_hz, seed: as in :class:`~streamfuse.sim.plant.PlantConfig`;
            ``seed`` seeds the row order and the fault draws.
        faults: sensor faults (specs or :class:`~streamfuse.sim.faults.FaultSpec`), timed
            from ``start_ms``; each must name a modality the dataset has.
        start_ms: event time (ms) of ``t = 0`` for the faults.
        run_id: prefix of every sample and event id.
        config: a whole :class:`~streamfuse.sim.plant.PlantConfig` instead of the five
            arguments above (what the publisher passes).

    Raises:
        DatasetError: the folder or a row is unusable (see :func:`load_rows`).
        ConfigError: a bad plant setting, or a fault on a modality the dataset lacks.

    Examples:
        >>> import tempfile
        >>> from streamfuse.models.dataset import export_sim
        >>> root = export_sim(Path(tempfile.mkdtemp()) / "d", 20, seed=1).parent
        >>> plant = DatasetPlant(root, assets=2, faults=("series:dropout@1",))
        >>> sample, label = plant.sample(1, seq=3, ts_ms=1500)
        >>> sample.sample_id, sample.line_id, sorted(sample.readings), sample.missing
        ('ds-asset-1-3', 'line-1', ['audio', 'image'], ('series',))
        >>> label.label == plant.row_at(1, 3).label
        True
    """

    def __init__(self, source: str | Path | DatasetRows, split: str = "test", *, assets: int = PlantConfig.assets,
                 lines: int = PlantConfig.lines, rate_hz: float = PlantConfig.rate_hz, seed: int = PlantConfig.seed,
                 faults: Sequence[str | FaultSpec] = (), start_ms: int = 0, run_id: str = "ds",
                 config: PlantConfig | None = None) -> None:
        self.config = config or PlantConfig(assets=assets, lines=lines, rate_hz=rate_hz, seed=seed,
                                            faults=tuple(faults))
        self.data = source if isinstance(source, DatasetRows) else load_rows(source, split)
        self.data.check_faults(self.config.faults)
        self.start_ms, self.run_id = start_ms, run_id
        shape = Plant(self.config)  # the same asset and line ids and period as the simulated plant
        self.asset_ids, self.line_ids, self.period_ms = shape.asset_ids, shape.line_ids, shape.period_ms
        self._order: tuple[int, np.ndarray] | None = None  # (pass, row order) of the last pass used

    def row_at(self, asset_index: int, seq: int) -> Row:
        """The row that asset ``asset_index`` streams at tick ``seq``."""
        if not 0 <= asset_index < len(self.asset_ids) or seq < 0:
            raise SimulationError(f"asset index {asset_index!r} outside 0..{len(self.asset_ids) - 1} "
                                  f"or seq {seq!r} negative")
        n = len(self.data.rows)
        position = seq * len(self.asset_ids) + asset_index
        rnd, offset = divmod(position, n)
        if self._order is None or self._order[0] != rnd:
            self._order = (rnd, np.random.default_rng([_ORDER, self.config.seed, rnd]).permutation(n))
        return self.data.rows[int(self._order[1][offset])]

    def sample(self, asset_index: int, seq: int, ts_ms: int) -> tuple[Sample, Label]:
        """The sample of asset ``asset_index`` at tick ``seq`` (event time ``ts_ms``) and its label.

        Faults apply at ``t_s = (ts_ms - start_ms) / 1000`` as in the simulated plant.

        Raises:
            SimulationError: an unknown asset or a negative ``seq``.
        """
        row = self.row_at(asset_index, seq)
        asset_id, line_id = self.asset_ids[asset_index], self.line_ids[asset_index]
        sample_id = f"{self.run_id}-{asset_id}-{seq}"
        t_s = (ts_ms - self.start_ms) / 1000.0
        faults = [f for f in self.config.faults if f.active(t_s, asset_id)]
        readings: dict[str, SensorEvent] = {}
        for m_index, m in enumerate(MODALITIES):
            ev = row.readings.get(m)
            kinds = [f.kind for f in faults if f.modality == m]
            if ev is None or "dropout" in kinds:
                continue
            ev = dataclasses.replace(ev, event_id=f"{sample_id}-{m}", asset_id=asset_id, ts_ms=int(ts_ms),
                                     line_id=line_id)
            rng = np.random.default_rng([_FAULT, self.config.seed, asset_index, seq, m_index])
            for kind in kinds:
                ev = degrade_reading(ev, kind, rng)
            readings[m] = ev
        missing = tuple(m for m in self.data.modalities if m not in readings)
        sample = Sample(sample_id, asset_id, int(ts_ms), readings, line_id=line_id, missing=missing)
        return sample, Label(sample_id, asset_id, int(ts_ms), row.label, line_id=line_id)
