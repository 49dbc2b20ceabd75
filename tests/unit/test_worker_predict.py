"""The worker's batch pieces (streamfuse.inference.predict): non-finite outputs taken out,
the mask matrix, the explanation, and prediction records that are exactly what
``encode(Prediction(...))`` gives, built field by field."""

from __future__ import annotations

import zlib

import numpy as np
import torch

from streamfuse.events import Prediction, Sample, SensorEvent, decode, encode
from streamfuse.inference.commands import WorkerState
from streamfuse.inference.predict import BatchContext, assemble, drop_non_finite, explain, masked_matrix
from streamfuse.models.bundle import Bundle, Encoded
from streamfuse.models.fusion import FusionUnit

MODS = ("image", "audio", "series")
CLASSES = ("normal", "wear", "imbalance", "overheat")


def ume_bundle() -> Bundle:
    b = Bundle.__new__(Bundle)
    b.modalities, b.fusion_modes, b.fusion_mode = MODS, ("ume",), "ume"
    b.fusion = FusionUnit.ume_only()
    return b


def batch(n: int, seed: int) -> tuple[list[Sample], Encoded]:
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        readings = {m: SensorEvent(f"e{i}{m}", f"asset-{i % 3}", m, 1000 + i + j, bytes([i, j]) * 5, f"line-{i % 2}")
                    for j, m in enumerate(MODS) if (i + j) % 4}
        samples.append(Sample(f"s{i}", f"asset-{i % 3}", 1000 + i, readings, f"line-{i % 2}"))
    computed = torch.tensor([[m in s.readings for m in MODS] for s in samples])
    probs = torch.from_numpy(rng.dirichlet(np.ones(len(CLASSES)), size=(n, len(MODS))).astype(np.float32))
    probs[~computed] = 0.0
    std = torch.from_numpy(rng.random((n, len(MODS))).astype(np.float32))
    std[~computed] = float("nan")
    feats = {m: torch.from_numpy(rng.random((n, 8)).astype(np.float32)) for m in MODS}
    return samples, Encoded(probs, feats, computed, [], {}, std)


def reference(s: Sample, i: int, enc: Encoded, masked, ex, ctx: BatchContext) -> Prediction:
    """The prediction built field by field, as the worker did before it built records directly."""
    present = [(j, m) for j, m in enumerate(MODS) if enc.computed[i, j]]
    fused_in = [(j, m) for j, m in present if ex.players[i, j]]
    return Prediction(
        sample_id=s.sample_id, asset_id=s.asset_id, ts_ms=s.ts_ms, classes=CLASSES,
        fused_probs=tuple(ex.fused[i].tolist()), fused_label=CLASSES[ex.label[i]], fusion_mode=ctx.fusion_mode,
        modality_probs={m: tuple(enc.modality_probs[i, j].tolist()) for j, m in present}, line_id=s.line_id,
        missing=tuple(m for j, m in enumerate(MODS) if not enc.computed[i, j]),
        masked=tuple(m for j, m in present if masked[i, j]),
        contributions={m: float(ex.shares[i, j]) for j, m in fused_in},
        shapley={m: float(ex.shapley[i, j]) for j, m in fused_in},
        confidence={m: float(ex.confidence[i, j]) for j, m in present},
        entropy={m: float(ex.entropy[i, j]) for j, m in present},
        agreement={m: bool(ex.agreement[i, j]) for j, m in present},
        signal_std={m: float(enc.signal_std[i, j]) for j, m in present},
        digest={m: zlib.crc32(s.readings[m].payload) for _, m in present},
        skew_ms={m: s.readings[m].ts_ms - s.ts_ms for _, m in present},
        versions=ctx.versions, worker_id=ctx.worker_id, produced_ms=ctx.produced_ms, latency_ms=ctx.latency_ms)


def test_records_are_the_bytes_of_the_prediction_built_field_by_field():
    samples, enc = batch(24, seed=1)
    state = WorkerState(masks={("audio", "line", "line-1")})
    masked = masked_matrix(state, samples, MODS)
    ex = explain(ume_bundle(), enc, masked, "ume")
    ctx = BatchContext(CLASSES, MODS, "ume", {"image": "i1", "audio": "a1", "series": "s1", "fusion": "ume"},
                       "w1", 1_700_000_000_123, 12.5)
    records, unusable = assemble(samples, enc, masked, ex, ctx)
    expect_unusable = [i for i in range(24) if not (enc.computed[i] & ~masked[i]).any()]
    assert unusable == expect_unusable and len(records) + len(unusable) == 24
    for i, value in records:
        want = reference(samples[i], i, enc, masked, ex, ctx)
        assert value == encode(want)
        assert decode(value) == want


def test_non_finite_outputs_are_taken_out_before_the_fusion():
    samples, enc = batch(6, seed=2)
    enc.computed[:, :] = True
    enc.signal_std[torch.isnan(enc.signal_std)] = 0.5
    enc.signal_std[1, 2] = float("inf")  # a series with values near float32's limit
    enc.modality_probs[3, 0] = float("nan")
    enc.features["audio"][4, 5] = float("-inf")
    errors = drop_non_finite(enc, MODS)
    assert [(i, e.reason, e.modality) for i, e in errors] == [(1, "non_finite", "series"), (3, "non_finite", "image"),
                                                              (4, "non_finite", "audio")]
    assert not enc.computed[1, 2] and not enc.computed[3, 0] and not enc.computed[4, 1]
    ex = explain(ume_bundle(), enc, masked_matrix(WorkerState(), samples, MODS), "ume")
    assert np.isfinite(ex.fused).all() and np.isfinite(ex.shares).all()
    assert drop_non_finite(enc, MODS) == []  # nothing left to take out


def test_masks_apply_to_their_scope_only():
    samples, _ = batch(4, seed=3)
    state = WorkerState(masks={("image", "global", ""), ("series", "asset", "asset-1"), ("audio", "line", "line-0")})
    got = masked_matrix(state, samples, MODS).tolist()
    assert got == [[True, True, False], [True, False, True], [True, True, False], [True, False, False]]
    assert not masked_matrix(WorkerState(), samples, MODS).any()


def test_the_explanation_of_a_batch():
    samples, enc = batch(40, seed=4)
    masked = masked_matrix(WorkerState(masks={("image", "line", "line-0")}), samples, MODS)
    ex = explain(ume_bundle(), enc, masked, "ume")
    players = (enc.computed & ~masked).numpy()
    assert (ex.players == players).all()
    rows = players.any(axis=1)
    np.testing.assert_allclose(ex.shares[rows].sum(axis=1), 1.0)
    assert (ex.shares[~players] == 0).all()
    uniform = 1 / len(CLASSES)  # Shapley values add up to v(players) - v(nobody)
    np.testing.assert_allclose(ex.shapley[rows].sum(axis=1), ex.fused[rows, ex.label[rows]] - uniform, atol=1e-6)
    assert (ex.agreement == (enc.modality_probs.numpy().argmax(axis=2) == ex.label[:, None])).all()
