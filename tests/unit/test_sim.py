"""Simulated plant: fault specs, determinism, payload validity, fault effects, and that
the signals carry (and faults destroy) the information a model needs."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from streamfuse.errors import ConfigError, StreamfuseError
from streamfuse.events import MODALITIES, Sample, decode, encode, encode_json
from streamfuse.readings import check_reading
from streamfuse.sim import CLASSES, FAULT_KINDS, FaultSpec, Plant, PlantConfig, SimulationError, parse_fault

# ---------------------------------------------------------------------------- fault specs


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("image:fog@40-90", FaultSpec("image", "fog", 40.0, 90.0)),
        ("audio:mute@30/asset-3", FaultSpec("audio", "mute", 30.0, None, "asset-3")),
        ("series:flatline@5", FaultSpec("series", "flatline", 5.0)),
        ("image:dark@1.5-2.25/asset-0", FaultSpec("image", "dark", 1.5, 2.25, "asset-0")),
        ("  series:dropout@0  ", FaultSpec("series", "dropout", 0.0)),
    ],
)
def test_parse_fault_good(spec: str, expected: FaultSpec) -> None:
    fault = parse_fault(spec)
    assert fault == expected
    assert parse_fault(str(fault)) == fault
    assert str(fault) == spec.strip()


def test_fault_active_window_and_asset() -> None:
    f = parse_fault("image:fog@40-90/asset-1")
    assert not f.active(39.999, "asset-1")
    assert f.active(40.0, "asset-1")  # start inclusive
    assert f.active(89.999, "asset-1")
    assert not f.active(90.0, "asset-1")  # end exclusive
    assert not f.active(50.0, "asset-2")
    forever = parse_fault("audio:noise@3")
    assert forever.active(1e9, "asset-7") and not forever.active(2.9, "asset-7")


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("", "empty"),
        ("image:fog", "missing '@START'"),
        ("imagefog@3", "missing ':'"),
        ("video:fog@3", "unknown modality 'video'"),
        ("image:mute@3", "unknown image fault kind 'mute'"),
        ("image:fog@soon", "'soon' is not a number"),
        ("image:fog@nan", "not a finite number"),
        ("image:fog@-5", "negative"),
        ("image:fog@5-3", "end 3 s is not after start 5 s"),
        ("image:fog@5-5", "not after start"),
        ("image:fog@5-", "end time is empty"),
        ("image:fog@5/", "empty asset id"),
    ],
)
def test_parse_fault_bad(spec: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_fault(spec)
    msg = str(info.value)
    assert repr(spec) in msg  # quotes the user's text
    assert problem in msg  # says what is wrong
    assert "MODALITY:KIND@START[-END][/ASSET]" in msg
    for modality, kinds in FAULT_KINDS.items():  # lists what is valid
        assert f"{modality}: {'|'.join(kinds)}" in msg
    assert "example: image:fog@40-90" in msg
    assert isinstance(info.value, StreamfuseError)


def test_faultspec_constructor_validates() -> None:
    with pytest.raises(ConfigError, match="unknown series fault kind 'fog'"):
        FaultSpec("series", "fog", 1.0)
    with pytest.raises(ConfigError, match="not after start"):
        FaultSpec("image", "fog", 2.0, 1.0)


def test_plant_config_validates() -> None:
    assert PlantConfig(faults=("image:fog@1",)).faults == (FaultSpec("image", "fog", 1.0),)
    with pytest.raises(ConfigError, match="'image:fogg@1'"):
        PlantConfig(faults=("image:fogg@1",))
    with pytest.raises(ConfigError, match="asset-0..asset-3"):
        PlantConfig(assets=4, faults=("image:fog@1/asset-4",))
    with pytest.raises(ConfigError, match="assets"):
        PlantConfig(assets=0)
    with pytest.raises(ConfigError, match="rate_hz"):
        PlantConfig(rate_hz=0)


# ---------------------------------------------------------------------------- plant


def _run(plant: Plant, steps: int = 12) -> list[tuple[Sample, object]]:
    return [
        plant.sample(a, seq, plant.start_ms + seq * plant.period_ms)
        for seq in range(steps)
        for a in range(plant.config.assets)
    ]


def test_same_seed_same_bytes_other_seed_other_bytes() -> None:
    cfg = PlantConfig(faults=("image:fog@1-3", "series:dropout@4/asset-2"))
    a = _run(Plant(cfg, start_ms=1_700_000_000_000, run_id="r1"))
    b = _run(Plant(cfg, start_ms=1_700_000_000_000, run_id="r1"))
    assert [encode(s) + encode(lab) for s, lab in a] == [encode(s) + encode(lab) for s, lab in b]
    c = _run(Plant(PlantConfig(seed=1), start_ms=1_700_000_000_000, run_id="r1"))
    assert [encode(s) for s, _ in a] != [encode(s) for s, _ in c]


def test_samples_are_valid_and_round_trip() -> None:
    plant = Plant(PlantConfig(assets=3, lines=2), start_ms=1_000, run_id="t")
    out = _run(plant, steps=4)
    ids = [s.sample_id for s, _ in out]
    assert len(set(ids)) == len(ids) and ids[1] == "t-asset-1-0"
    event_ids = [ev.event_id for s, _ in out for ev in s.readings.values()]
    assert len(set(event_ids)) == len(event_ids)
    for sample, label in out:
        assert set(sample.readings) == set(MODALITIES) and sample.missing == ()
        assert label.sample_id == sample.sample_id and label.label in CLASSES
        assert (label.asset_id, label.line_id, label.ts_ms) == (sample.asset_id, sample.line_id, sample.ts_ms)
        assert sample.line_id == f"line-{int(sample.asset_id.split('-')[1]) % 2}"
        for name, ev in sample.readings.items():
            check_reading(ev)
            assert (ev.modality, ev.asset_id, ev.line_id, ev.ts_ms) == (name, sample.asset_id, sample.line_id, sample.ts_ms)
        img, aud, ser = (sample.readings[m] for m in MODALITIES)
        assert img.encoding == "jpeg" and Image.open(io.BytesIO(img.payload)).size == (32, 32)
        assert (aud.encoding, aud.sample_rate, aud.channels, len(aud.payload)) == ("pcm16le", 8000, 1, 16000)
        assert (ser.encoding, ser.shape, len(ser.payload)) == ("float32le", (256,), 1024)
        assert decode(encode(sample), expect=Sample) == sample
        assert decode(encode_json(sample)) == sample


def test_fault_changes_only_its_modality_asset_and_window() -> None:
    start = 5_000
    clean = _run(Plant(PlantConfig(rate_hz=2.0), start_ms=start), steps=12)
    faulty = _run(Plant(PlantConfig(rate_hz=2.0, faults=("image:fog@2-4/asset-1",)), start_ms=start), steps=12)
    changed = set()
    for (s0, l0), (s1, l1) in zip(clean, faulty):
        assert l0 == l1  # faults hit the sensors, never the machine
        for m in MODALITIES:
            if s0.readings[m].payload != s1.readings[m].payload:
                changed.add((s0.asset_id, m, (s0.ts_ms - start) / 1000))
    assert changed == {("asset-1", "image", t) for t in (2.0, 2.5, 3.0, 3.5)}


def test_dropout_marks_series_missing() -> None:
    plant = Plant(PlantConfig(faults=("series:dropout@1-2",)), start_ms=0)
    before, _ = plant.sample(0, 0, 500)
    during, _ = plant.sample(0, 1, 1_000)
    after, _ = plant.sample(0, 2, 2_000)
    assert during.missing == ("series",) and set(during.readings) == {"image", "audio"}
    assert before.missing == after.missing == () and "series" in after.readings
    assert decode(encode(during)) == during


def test_state_chain_shares_and_order() -> None:
    plant = Plant(PlantConfig(assets=1, mean_state_s=8.0, seed=3))
    step_ms = 1_000
    states = [plant.state_at(0, t * step_ms) for t in range(100_000)]
    shares = {c: states.count(c) / len(states) for c in CLASSES}
    assert shares["normal"] == pytest.approx(0.4, abs=0.04)
    for c in CLASSES[1:]:
        assert shares[c] == pytest.approx(0.2, abs=0.03)
    changes = sum(a != b for a, b in zip(states, states[1:]))
    assert len(states) / changes == pytest.approx(8.0 * 1.05, rel=0.15)  # ~5 % of jumps are hidden by 1 s steps
    with pytest.raises(SimulationError, match="before the last call"):
        plant.state_at(0, 5)
    with pytest.raises(SimulationError, match="outside 0..0"):
        plant.sample(1, 0, 200_000_000)


def test_dataset_is_balanced_clean_and_deterministic() -> None:
    plant = Plant(PlantConfig(faults=("image:fog@0",)), run_id="x")
    ds = plant.dataset(103, seed=7)
    counts = {c: sum(lab.label == c for _, lab in ds) for c in CLASSES}
    assert sorted(counts.values()) == [25, 26, 26, 26]
    assert len({s.sample_id for s, _ in ds}) == 103 and ds[0][0].sample_id == "x-ds7-0"
    again = Plant(PlantConfig(), run_id="x").dataset(103, seed=7)  # config faults do not apply
    assert [encode(s) for s, _ in ds] == [encode(s) for s, _ in again]
    with pytest.raises(ConfigError, match="unknown audio fault kind 'fog'"):
        plant.dataset(4, seed=1, degrade={"audio": "fog"})


# ---------------------------------------------------------------------------- information


def _image_features(ev) -> np.ndarray:
    x = np.asarray(Image.open(io.BytesIO(ev.payload)).convert("RGB"), np.float32) / 255
    k = x.shape[0] // 8
    return x.reshape(8, k, 8, k, 3).mean(axis=(1, 3)).ravel()  # 8x8 thumbnail


def _audio_features(ev) -> np.ndarray:
    x = np.frombuffer(ev.payload, "<i2") / 32768.0
    power = np.abs(np.fft.rfft(x)) ** 2
    edges = np.geomspace(10, ev.sample_rate / 2, 49)  # log-spaced bands
    band = np.searchsorted(edges, np.fft.rfftfreq(x.size, 1 / ev.sample_rate))
    return np.log(np.bincount(band, power, minlength=50)[1:49] + 1e-6)


def _series_features(ev) -> np.ndarray:
    x = np.frombuffer(ev.payload, "<f4").astype(np.float64)
    return np.concatenate([np.log(np.abs(np.fft.rfft(x)) + 1e-3), [x.mean(), x.std()]])


FEATURES = {"image": _image_features, "audio": _audio_features, "series": _series_features}


def _xy(ds, modality: str) -> tuple[np.ndarray, np.ndarray]:
    x = np.stack([FEATURES[modality](s.readings[modality]) for s, _ in ds])
    return x, np.array([CLASSES.index(lab.label) for _, lab in ds])


def _softmax(a: np.ndarray) -> np.ndarray:
    e = np.exp(a - a.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _fit_logistic(x: np.ndarray, y: np.ndarray, iters: int = 300, lr: float = 0.5, l2: float = 1e-3):
    mu, sd = x.mean(0), x.std(0) + 1e-6
    z, onehot = (x - mu) / sd, np.eye(len(CLASSES))[y]
    w, b = np.zeros((x.shape[1], len(CLASSES))), np.zeros(len(CLASSES))
    for _ in range(iters):
        g = (_softmax(z @ w + b) - onehot) / len(y)
        w -= lr * (z.T @ g + l2 * w)
        b -= lr * g.sum(0)
    return lambda x_new: _softmax(((x_new - mu) / sd) @ w + b)


@pytest.fixture(scope="module")
def trained():
    plant = Plant()
    train, test = plant.dataset(800, seed=1), plant.dataset(400, seed=2)
    models = {m: _fit_logistic(*_xy(train, m)) for m in MODALITIES}
    return plant, models, test


def test_each_clean_modality_is_informative_and_fusion_is_better(trained) -> None:
    _, models, test = trained
    probs, acc = {}, {}
    for m in MODALITIES:
        x, y = _xy(test, m)
        probs[m] = models[m](x)
        acc[m] = (probs[m].argmax(1) == y).mean()
    fused = (sum(probs.values()).argmax(1) == y).mean()  # uni-modal ensemble
    assert all(a > 0.55 for a in acc.values()), acc  # chance is 0.25
    assert fused > max(acc.values()) + 0.03, (fused, acc)  # audio is strong alone; fusion still adds


@pytest.mark.parametrize(("modality", "kind"), [("image", "fog"), ("audio", "mute"), ("series", "flatline")])
def test_fault_destroys_the_modality(trained, modality: str, kind: str) -> None:
    plant, models, _ = trained
    x, y = _xy(plant.dataset(400, seed=3, degrade={modality: kind}), modality)
    acc = (models[modality](x).argmax(1) == y).mean()
    assert acc < 0.4, acc
