"""Model outputs for bench/detection.py: every fault kind applied to the same samples,
run once through the served bundle, so that streams of any length can be drawn from them.

A *pool* is the bundle's per-modality probabilities on N samples. The pools of one plant
are index-aligned: entry ``i`` of the ``image:fog`` pool is entry ``i`` of the clean pool
with only the camera's reading fogged (the simulator draws each modality from its own
random stream, and a dataset row keeps its other readings), so a stream can switch a
sample between clean and faulty per modality, which is how the partial severities are made.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from streamfuse.models.fusion import quality, ume
from streamfuse.monitor.evidence import sample_evidence
from streamfuse.sim.faults import FAULT_KINDS

CHUNK = 128


@dataclass
class Pool:
    """Outputs of the bundle on N samples under one condition."""

    truth: np.ndarray  # [N] class ids
    probs: np.ndarray  # [N, M, C]
    present: np.ndarray  # [N, M] bool
    signal_std: np.ndarray  # [N, M]
    fused: dict[str, dict[tuple[bool, ...], np.ndarray]] = field(default_factory=dict)  # mode -> use -> [N, C]
    evidence: list[dict[str, tuple[float | None, float | None]]] = field(default_factory=list)


def conditions(modalities: tuple[str, ...]) -> list[tuple[str, str]]:
    """Every (modality, fault kind) of the simulator for these modalities."""
    return [(m, k) for m in modalities for k in FAULT_KINDS.get(m, ())]


def encode_pool(bundle, samples, truth: list[int]) -> Pool:
    probs, present, std = [], [], []
    for i in range(0, len(samples), CHUNK):
        enc = bundle.encode([s.readings for s in samples[i:i + CHUNK]])
        probs.append(enc.modality_probs.numpy())
        present.append(enc.computed.numpy())
        std.append(enc.signal_std.numpy())
    return Pool(np.asarray(truth), np.concatenate(probs), np.concatenate(present), np.concatenate(std))


def finish(pool: Pool, bundle) -> Pool:
    """Fused probabilities for every subset of modalities (UME and quality) and each entry's
    label-free evidence."""
    m = len(bundle.modalities)
    probs = torch.from_numpy(pool.probs)
    pool.fused = {"ume": {}, "quality": {}}
    for use in itertools.product((False, True), repeat=m):
        mask = torch.from_numpy(pool.present) & torch.tensor(use).expand(len(probs), m)
        pool.fused["ume"][use] = ume(probs, mask).numpy()
        pool.fused["quality"][use] = quality(probs, mask, bundle.calibration, bundle.modalities).numpy()
    labels, conf = pool.probs.argmax(-1), pool.probs.max(-1)
    for i in range(len(probs)):
        present = {mod: bundle.classes[labels[i, j]] for j, mod in enumerate(bundle.modalities) if pool.present[i, j]}
        sure = {mod: float(conf[i, j]) for j, mod in enumerate(bundle.modalities) if pool.present[i, j]}
        pool.evidence.append(sample_evidence(bundle.calibration, present, conf=sure))
    return pool


def sim_pools(bundle, n: int, seed: int) -> dict[tuple[str, str] | str, Pool]:
    """The demo plant: ``n`` balanced samples, clean and under every fault kind."""
    from streamfuse.sim.plant import Plant, PlantConfig

    plant = Plant(PlantConfig(seed=0), run_id="bench")
    out: dict = {}
    clean = plant.dataset(n, seed)
    truth = [bundle.classes.index(lab.label) for _, lab in clean]
    out["clean"] = finish(encode_pool(bundle, [s for s, _ in clean], truth), bundle)
    for m, kind in conditions(bundle.modalities):
        if kind == "dropout":
            out[(m, kind)] = _dropped(out["clean"], bundle, m)
            continue
        pairs = plant.dataset(n, seed, degrade={m: kind})
        out[(m, kind)] = finish(encode_pool(bundle, [s for s, _ in pairs], truth), bundle)
    return out


def dataset_pools(bundle, root: Path, seed: int) -> dict[tuple[str, str] | str, Pool]:
    """A real dataset's test split: every row, clean and under every fault kind of its modalities."""
    from streamfuse.sim.dataset_plant import load_rows
    from streamfuse.sim.readings import degrade_reading

    data = load_rows(root, "test", classes=bundle.classes)
    rows = [r for r in data.rows if set(r.readings) >= set(bundle.modalities)]
    truth = [bundle.classes.index(r.label) for r in rows]
    samples = [_sample(r.readings) for r in rows]
    out: dict = {"clean": finish(encode_pool(bundle, samples, truth), bundle)}
    rng = np.random.default_rng(seed)
    for m, kind in conditions(bundle.modalities):
        if kind == "dropout":
            out[(m, kind)] = _dropped(out["clean"], bundle, m)
            continue
        faulty = [_sample({**r.readings, m: degrade_reading(r.readings[m], kind, rng)}) for r in rows]
        out[(m, kind)] = finish(encode_pool(bundle, faulty, truth), bundle)
    return out


def _dropped(clean: Pool, bundle, modality: str) -> Pool:
    """The clean pool with one modality's readings missing (a dropout)."""
    present = clean.present.copy()
    present[:, bundle.modalities.index(modality)] = False
    return finish(Pool(clean.truth, clean.probs, present, clean.signal_std), bundle)


@dataclass
class _Readings:
    readings: dict


def _sample(readings: dict) -> _Readings:
    return _Readings(readings)
