"""The simulated plant: assets with hidden machine states, seen by three sensors.

Each asset's state (:data:`CLASSES`) follows a Markov chain in *event time*: it holds
for an exponential dwell (mean ``mean_state_s``) and then jumps; a machine is normal
about 40 % of the time and in each fault state about 20 %. The modalities see the state
with different strengths, which is what makes fusion worth monitoring:

==========  ==============  ==============  ===============
state       image           audio           series
==========  ==============  ==============  ===============
imbalance   moderate        moderate        strong
bearing     weak            strong          moderate
overheat    strong          moderate (fan)  weak
==========  ==============  ==============  ===============

A "weak" cue shows in about half of the readings of that state, "moderate" in 85-90 %,
"strong" in 98 %; a reading without its cue looks normal. So one modality alone reaches
75-94 % accuracy on balanced classes, the three together are near perfect, and any two
stay within a few points of all three (the cooling fan is heard when a machine
overheats), so masking one broken sensor costs little.

Pure logic: the caller supplies event time; no clock, no Kafka.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from streamfuse.config import SimSettings
from streamfuse.errors import ConfigError, StreamfuseError
from streamfuse.events import MODALITIES, Label, Sample, SensorEvent
from streamfuse.sim import signals
from streamfuse.sim.faults import FaultSpec, parse_fault

_SIM = SimSettings.model_fields  # one source for the plant's shape defaults: the simulator's settings
CLASSES: tuple[str, ...] = ("normal", "imbalance", "bearing", "overheat")

# modality -> state -> (the generator's cue argument, probability that a reading shows it)
CUES: dict[str, dict[str, tuple[str, float]]] = {
    "image": {"imbalance": ("shake", 0.85), "bearing": ("leak", 0.5), "overheat": ("hot", 0.98)},
    "audio": {"imbalance": ("thump", 0.85), "bearing": ("clicks", 0.98), "overheat": ("fan", 0.9)},
    "series": {"imbalance": ("unbalance", 0.98), "bearing": ("impacts", 0.85), "overheat": ("drift", 0.5)},
}

# Transition probabilities of the jump chain. Its stationary law is 40 % normal and 20 %
# per fault; with the same mean dwell in every state that is also the share of time.
_TRANSITIONS = np.array(
    [
        [0.0, 1 / 3, 1 / 3, 1 / 3],  # a normal machine develops one of the faults
        [2 / 3, 0.0, 1 / 6, 1 / 6],  # a faulty one is mostly repaired
        [2 / 3, 1 / 6, 0.0, 1 / 6],
        [2 / 3, 1 / 6, 1 / 6, 0.0],
    ]
)
_STATIONARY = np.array([0.4, 0.2, 0.2, 0.2])
_MAX_DWELLS = 1_000  # a longer gap in event time restarts the chain (it has mixed by then)
# first word of every seed: the streams of the chain, the live samples and dataset() never overlap
_CHAIN, _LIVE, _DATASET = 0x5F1, 0x5F2, 0x5F3


class SimulationError(StreamfuseError):
    """The plant was called in a way it cannot honour (unknown asset, time going back)."""


@dataclass(frozen=True)
class PlantConfig:
    """Shape of the simulated plant.

    Args:
        assets: number of assets, ``asset-0`` .. ``asset-{assets-1}``.
        lines: production lines; asset ``i`` is on ``line-{i % lines}``.
        rate_hz: samples per second per asset (the caller's schedule: see ``Plant.period_ms``).
        seed: seeds the state chains and every reading.
        image_size: camera frames are ``image_size`` x ``image_size`` RGB.
        audio_rate: audio clips are one second at this rate.
        series_len: values per vibration window.
        faults: sensor faults, as :class:`FaultSpec` or spec strings (parsed here).
        mean_state_s: mean time a machine stays in one state, seconds of event time.

    Raises:
        ConfigError: for an out-of-range value or a bad fault spec; the message says which.
    """

    assets: int = _SIM["assets"].default
    lines: int = _SIM["lines"].default
    rate_hz: float = _SIM["rate_hz"].default
    seed: int = _SIM["seed"].default
    image_size: int = 32
    audio_rate: int = 8000
    series_len: int = 256
    faults: tuple[FaultSpec, ...] = ()
    mean_state_s: float = 8.0

    def __post_init__(self) -> None:
        limits = {
            "assets": (1, 100_000),
            "lines": (1, 100_000),
            "image_size": (16, 1024),
            "audio_rate": (1_000, 48_000),
            "series_len": (16, 1 << 20),
        }
        for name, (lo, hi) in limits.items():
            value = getattr(self, name)
            if not _is_int(value) or not lo <= value <= hi:
                raise ConfigError(f"PlantConfig.{name}={value!r}: expected an integer in {lo}..{hi}")
        for name in ("rate_hz", "mean_state_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise ConfigError(f"PlantConfig.{name}={value!r}: expected a positive number")
        if not _is_int(self.seed) or self.seed < 0:
            raise ConfigError(f"PlantConfig.seed={self.seed!r}: expected a non-negative integer")
        given = (self.faults,) if isinstance(self.faults, (str, FaultSpec)) else self.faults
        faults = tuple(parse_fault(f) if isinstance(f, str) else f for f in given)
        for f in faults:
            if not isinstance(f, FaultSpec):
                raise ConfigError(f"PlantConfig.faults: {f!r} is neither a FaultSpec nor a spec string")
            if f.asset_id is not None and not _asset_index_ok(f.asset_id, self.assets):
                raise ConfigError(
                    f"fault {str(f)!r} names asset {f.asset_id!r}, but the plant has asset-0.."
                    f"asset-{self.assets - 1}; fix the asset id or raise assets"
                )
        object.__setattr__(self, "faults", faults)  # frozen: normalize strings once, here


def _is_int(x: object) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _asset_index_ok(asset_id: str, assets: int) -> bool:
    prefix, _, index = asset_id.partition("-")
    return prefix == "asset" and index.isdigit() and str(int(index)) == index and int(index) < assets


class _StateChain:
    """One asset's hidden state, advanced in event time."""

    def __init__(self, rng: np.random.Generator, mean_ms: float) -> None:
        self._rng, self._mean_ms = rng, mean_ms
        self.now_ms: int | None = None
        self.state = 0
        self._next_ms = 0.0

    def _restart(self, ts_ms: int) -> None:
        self.state = int(self._rng.choice(4, p=_STATIONARY))
        self._next_ms = ts_ms + self._rng.exponential(self._mean_ms)

    def advance(self, ts_ms: int) -> int:
        if self.now_ms is None or ts_ms - self.now_ms > _MAX_DWELLS * self._mean_ms:
            self._restart(ts_ms)
        while self._next_ms <= ts_ms:
            self.state = int(self._rng.choice(4, p=_TRANSITIONS[self.state]))
            self._next_ms += self._rng.exponential(self._mean_ms)
        self.now_ms = ts_ms
        return self.state


class Plant:
    """Assets, their hidden states and their sensors; builds synchronized samples.

    Args:
        config: the plant's shape, seed and faults.
        start_ms: event time (ms) at which fault times start counting (``t = 0``).
        run_id: prefix of every sample and event id, so that runs never collide.

    Examples:
        >>> plant = Plant(PlantConfig(assets=2, faults=("series:dropout@1",)), start_ms=0)
        >>> sample, label = plant.sample(1, seq=3, ts_ms=1500)
        >>> sample.sample_id, sample.line_id, sorted(sample.readings), sample.missing
        ('sim-asset-1-3', 'line-1', ['audio', 'image'], ('series',))
        >>> label.label in CLASSES
        True
    """

    def __init__(self, config: PlantConfig | None = None, *, start_ms: int = 0, run_id: str = "sim") -> None:
        self.config = config if config is not None else PlantConfig()
        self.start_ms = start_ms
        self.run_id = run_id
        self.asset_ids = tuple(f"asset-{i}" for i in range(self.config.assets))
        self.line_ids = tuple(f"line-{i % self.config.lines}" for i in range(self.config.assets))
        mean_ms = self.config.mean_state_s * 1000.0
        self._chains = [
            _StateChain(np.random.default_rng([_CHAIN, self.config.seed, i]), mean_ms)
            for i in range(self.config.assets)
        ]

    @property
    def period_ms(self) -> int:
        """Milliseconds between two samples of one asset (``1000 / rate_hz``)."""
        return max(1, round(1000.0 / self.config.rate_hz))

    def state_at(self, asset_index: int, ts_ms: int) -> str:
        """Advance an asset's state chain to ``ts_ms`` and return its state.

        Args:
            asset_index: 0 .. ``assets - 1``.
            ts_ms: event time; never earlier than the previous call for this asset.

        Returns:
            One of :data:`CLASSES`.

        Raises:
            SimulationError: for an unknown asset or a time earlier than the last one.
        """
        if not _is_int(asset_index) or not 0 <= asset_index < len(self._chains):
            raise SimulationError(f"asset index {asset_index!r} outside 0..{len(self._chains) - 1}")
        chain = self._chains[asset_index]
        if chain.now_ms is not None and ts_ms < chain.now_ms:
            raise SimulationError(
                f"asset-{asset_index}: ts_ms {ts_ms} is before the last call ({chain.now_ms}); "
                "the state chain only moves forward in event time"
            )
        return CLASSES[chain.advance(int(ts_ms))]

    def sample(self, asset_index: int, seq: int, ts_ms: int) -> tuple[Sample, Label]:
        """One synchronized sample of one asset at ``ts_ms``, with its ground truth.

        Faults in ``config.faults`` apply at ``t_s = (ts_ms - start_ms) / 1000``.

        Args:
            asset_index: 0 .. ``assets - 1``.
            seq: the asset's sample number; with ``run_id`` it makes the ids unique.
            ts_ms: event time, non-decreasing per asset.

        Returns:
            The :class:`~streamfuse.events.Sample` (a dropped-out reading is absent and
            listed in ``missing``) and its :class:`~streamfuse.events.Label`.

        Raises:
            SimulationError: for an unknown asset, a negative ``seq`` or a time earlier
                than the last one for this asset.
        """
        if not _is_int(seq) or seq < 0:
            raise SimulationError(f"seq {seq!r}: expected a non-negative integer")
        state = self.state_at(asset_index, ts_ms)
        asset_id = self.asset_ids[asset_index]
        t_s = (ts_ms - self.start_ms) / 1000.0
        faults = [f for f in self.config.faults if f.active(t_s, asset_id)]
        return self._build(
            f"{self.run_id}-{asset_id}-{seq}", asset_index, int(ts_ms), state, faults,
            seed=(_LIVE, self.config.seed, asset_index, int(seq)),
        )

    def dataset(
        self, n: int, seed: int, *, degrade: Mapping[str, str] | None = None
    ) -> list[tuple[Sample, Label]]:
        """``n`` independent samples with balanced classes, for training and evaluation.

        States are drawn per sample (not from the chains), each class ``n // 4`` or
        ``n // 4 + 1`` times, in shuffled order; config faults are ignored.

        Args:
            n: number of samples.
            seed: seeds the classes and readings (independent of ``config.seed``).
            degrade: modality -> fault kind applied to every sample (e.g. ``{"image": "fog"}``)
                to measure how a model copes; default: clean.

        Returns:
            ``(sample, label)`` pairs; ids are ``{run_id}-ds{seed}-{i}``.

        Raises:
            ConfigError: for a negative ``n`` or an unknown modality or fault kind.
        """
        if not _is_int(n) or n < 0 or not _is_int(seed) or seed < 0:
            raise ConfigError(f"dataset(n={n!r}, seed={seed!r}): both must be non-negative integers")
        faults = [parse_fault(f"{m}:{k}@0") for m, k in (degrade or {}).items()]
        rng = np.random.default_rng([_DATASET, seed])
        states = np.concatenate([np.arange(n // 4 * 4) % 4, rng.permutation(4)[: n % 4]])
        rng.shuffle(states)
        out = []
        for i, c in enumerate(states):
            ts = self.start_ms + i * self.period_ms
            sample_id = f"{self.run_id}-ds{seed}-{i}"
            out.append(self._build(sample_id, i % self.config.assets, ts, CLASSES[c], faults, (_DATASET, seed, i)))
        return out

    def _build(
        self, sample_id: str, asset_index: int, ts_ms: int, state: str, faults: list[FaultSpec], seed: tuple
    ) -> tuple[Sample, Label]:
        asset_id, line_id = self.asset_ids[asset_index], self.line_ids[asset_index]
        readings: dict[str, SensorEvent] = {}
        missing = []
        for m_index, modality in enumerate(MODALITIES):
            # one stream per modality: a fault on one sensor leaves the others byte-identical
            rng = np.random.default_rng([*seed, m_index])
            data = self._render(modality, state, rng)
            kinds = [f.kind for f in faults if f.modality == modality]
            if "dropout" in kinds:
                missing.append(modality)
                continue
            for kind in kinds:
                data = signals.degrade(modality, kind, data, rng)
            readings[modality] = SensorEvent(
                event_id=f"{sample_id}-{modality}", asset_id=asset_id, modality=modality, ts_ms=ts_ms,
                line_id=line_id, **self._payload(modality, data),
            )
        sample = Sample(sample_id, asset_id, ts_ms, readings, line_id=line_id, missing=tuple(missing))
        return sample, Label(sample_id, asset_id, ts_ms, state, line_id=line_id)

    def _render(self, modality: str, state: str, rng: np.random.Generator) -> np.ndarray:
        cfg = self.config
        cue = CUES[modality].get(state)
        # drawn even for "normal", so that every state consumes the stream alike
        shown, strength = rng.random(), rng.uniform(0.6, 1.0)
        cues = {cue[0]: strength} if cue is not None and shown < cue[1] else {}
        if modality == "image":
            return signals.machine_image(rng, cfg.image_size, **cues)
        if modality == "audio":
            return signals.machine_audio(rng, cfg.audio_rate, **cues)
        return signals.machine_vibration(rng, cfg.series_len, **cues)

    def _payload(self, modality: str, data: np.ndarray) -> dict:
        if modality == "image":
            return {"payload": signals.encode_jpeg(data), "encoding": "jpeg"}
        if modality == "audio":
            return {"payload": signals.encode_pcm16le(data), "encoding": "pcm16le",
                    "sample_rate": self.config.audio_rate, "channels": 1}
        return {"payload": signals.encode_float32le(data), "encoding": "float32le", "shape": (data.size,)}
