"""Models: factory, preprocessing, UME fusion, bundles, stage-1 training, metrics.

Random weights on the CPU, tiny synthetic readings (class-dependent colour, tone and
sinusoid), no simulator. Regenerate the golden outputs (only after a deliberate change
to an architecture or preprocessing) with::

    python tests/unit/test_models.py --regen-golden
"""

from __future__ import annotations

import io
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from streamfuse.errors import InvalidEvent, ModelError
from streamfuse.events import Label, Sample, SensorEvent
from streamfuse.models import bundle, encoders, runtime
from streamfuse.models.bundle_io import load_bundle, read_manifest, save_bundle
from streamfuse.models.config import ModalityConfig, default_config
from streamfuse.models.encoders import create_model
from streamfuse.models.fusion import ume
from streamfuse.models import preprocess
from streamfuse.models.preprocess import batch_tensor, batch_tensor_checked
from streamfuse.models.train import TrainConfig, TrainOptions, train_bundle

CLASSES = ("normal", "imbalance", "bearing", "overheat")
GOLDEN = Path(__file__).parent / "golden" / "models_golden.json"
COLOURS = [(40, 160, 60), (200, 60, 60), (60, 60, 200), (220, 200, 40)]
TONES = [300.0, 900.0, 1700.0, 2900.0]
SERIES_FREQ = [2.0, 7.0, 15.0, 30.0]


# ------------------------------------------------------------------ synthetic readings


def image_event(k: int, rng: np.random.Generator, fmt: str = "JPEG", size: int = 32) -> SensorEvent:
    px = np.clip(np.array(COLOURS[k]) + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(px).save(buf, fmt)
    return SensorEvent("e", "a", "image", 0, buf.getvalue(), encoding=fmt.lower())


def audio_event(k: int, rng: np.random.Generator, rate: int = 8000, channels: int = 1) -> SensorEvent:
    t = np.arange(rate) / rate
    wave = 0.3 * np.sin(2 * np.pi * TONES[k] * t + rng.uniform(0, 6)) + rng.normal(0, 0.1, rate)
    pcm = np.repeat((np.clip(wave, -1, 1) * 32767).astype("<i2")[:, None], channels, axis=1)
    return SensorEvent("e", "a", "audio", 0, pcm.tobytes(), encoding="pcm16le", sample_rate=rate, channels=channels)


def series_event(k: int, rng: np.random.Generator, n: int = 256) -> SensorEvent:
    t = np.arange(n) / n
    x = np.sin(2 * np.pi * SERIES_FREQ[k] * t + rng.uniform(0, 6)) + rng.normal(0, 0.5, n)
    return SensorEvent("e", "a", "series", 0, x.astype("<f4").tobytes(), encoding="float32le", shape=(n,))


MAKERS = {"image": image_event, "audio": audio_event, "series": series_event}


def dataset(n: int, seed: int, modalities=("image", "audio", "series")) -> list[tuple[Sample, Label]]:
    rng = np.random.default_rng(seed)
    pairs = []
    for i in range(n):
        k = i % len(CLASSES)
        readings = {m: MAKERS[m](k, rng) for m in modalities}
        sid = f"s{seed}-{i}"
        pairs.append((Sample(sid, "a", i, readings), Label(sid, "a", i, CLASSES[k])))
    return pairs


def cfg(modality: str, **kw) -> ModalityConfig:
    return default_config(modality, CLASSES, **kw)


# ------------------------------------------------------------------ factory


@pytest.mark.parametrize("modality", ["image", "audio", "series"])
def test_factory_shapes_and_config(modality):
    c = cfg(modality)
    model = create_model(c).eval()
    x = batch_tensor(c, [MAKERS[modality](k, np.random.default_rng(k)) for k in range(3)])
    assert model.sf_config == c
    with torch.no_grad():
        assert model(x).shape == (3, 4)
        assert model.forward_features(x).shape == (3, model.num_features)
    with pytest.raises(AttributeError):
        model.sf_config = c  # read-only
    with pytest.raises(Exception):
        c.arch = "other"  # frozen


def test_package_exports_lazily():
    import streamfuse.models as sfm

    assert sfm.create_model is create_model and sfm.ume is ume and "train_bundle" in sfm.__all__


def test_config_round_trip_and_validation():
    c = cfg("audio", n_mels=16)
    assert ModalityConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    with pytest.raises(ModelError, match="unknown modality"):
        ModalityConfig("video", "x", CLASSES)
    with pytest.raises(ModelError, match="unknown config keys"):
        ModalityConfig.from_dict({**c.to_dict(), "future": 1})
    with pytest.raises(ModelError, match="distinct classes"):
        cfg("image").__class__("image", "test_resnet", ("a", "a"))
    with pytest.raises(ModelError, match="timm"):
        create_model(cfg("image", arch="no_such_arch"))
    with pytest.raises(ModelError, match="sf_series_cnn"):
        create_model(cfg("series", arch="resnet18"))


def test_missing_pretrained_file_names_path(tmp_path):
    missing = tmp_path / "resnet.safetensors"
    with pytest.raises(ModelError) as err:
        create_model(cfg("image"), weights=missing)
    assert err.value.path == missing and str(missing) in str(err.value) and "download" in str(err.value)
    with pytest.raises(ModelError, match="must be one of .safetensors, .pt, .pth"):
        create_model(cfg("image"), weights=tmp_path / "model.pkl")


def test_pretrained_timm_checkpoint_loads_and_drops_other_classifier(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    donor = create_model(default_config("image", [f"c{i}" for i in range(10)]))  # 10-class head
    path = tmp_path / "ckpt.safetensors"
    save_file({k: v.contiguous() for k, v in donor.net.state_dict().items()}, path)  # timm key layout
    model = create_model(cfg("image"), weights=path)
    assert torch.equal(model.net.conv1[0].weight, donor.net.conv1[0].weight)
    save_file({"conv1.0.weight": torch.zeros(1)}, path)
    with pytest.raises(ModelError, match="do not fit"):
        create_model(cfg("image"), weights=path)


def test_pretrained_from_a_bundle_weights_file(tmp_path):
    save_bundle(tmp_path / "b", _models(), _manifest())
    three = default_config("series", ["a", "b", "c"])  # fine-tune to other classes: new head
    model = create_model(three, weights=tmp_path / "b" / "series.safetensors")
    assert model.num_classes == 3
    saved = load_bundle(tmp_path / "b").models["series"]
    assert torch.equal(model.net.features[1].weight, saved.net.features[1].weight)


# ------------------------------------------------------------------ preprocessing


def test_preprocess_image_resizes_png_and_jpeg():
    c = cfg("image", image_size=24)
    rng = np.random.default_rng(0)
    readings = [image_event(0, rng, "PNG", size=40), image_event(1, rng, size=16), image_event(2, rng, size=24)]
    x = batch_tensor(c, readings)
    assert x.shape == (3, 3, 24, 24) and x.dtype == torch.float32
    mean = torch.tensor(c.mean).view(3, 1, 1)
    std = torch.tensor(c.std).view(3, 1, 1)
    rgb = (x[0] * std + mean).mean((1, 2)) * 255  # un-normalized: about the class colour
    assert torch.allclose(rgb, torch.tensor(COLOURS[0], dtype=torch.float32), atol=12)


def test_preprocess_audio_mixes_resamples_and_fits():
    c = cfg("audio")
    rng = np.random.default_rng(0)
    stereo16k = audio_event(1, rng, rate=16000, channels=2)
    short = SensorEvent("e", "a", "audio", 0, (np.ones(100, "<i2") * 16384).tobytes(), sample_rate=8000, channels=1)
    x = batch_tensor(c, [stereo16k, short])
    assert x.shape == (2, 8000)
    assert torch.allclose(x[1, :100], torch.full((100,), 0.5)) and not x[1, 100:].any()
    spectrum = torch.fft.rfft(x[0]).abs()
    assert abs(int(spectrum.argmax()) - TONES[1]) <= 2  # tone survived resampling (1 Hz bins)


def test_preprocess_checked_isolates_bad_readings():
    c = cfg("series", series_len=8)
    good = SensorEvent("e", "a", "series", 0, np.arange(10, dtype="<f4").tobytes())
    nan = SensorEvent("e", "a", "series", 0, np.array([1, np.nan], "<f4").tobytes())
    odd = SensorEvent("e", "a", "series", 0, b"\x00" * 5)
    wrong = image_event(0, np.random.default_rng(0))
    out = batch_tensor_checked(c, [nan, good, odd, wrong])
    assert out.indices == [1] and out.tensor.shape == (1, 1, 8)
    assert [(i, e.reason, e.modality) for i, e in out.errors] == [
        (0, "non_finite", "series"), (2, "bad_series", "series"), (3, "bad_field", "series")]
    with pytest.raises(InvalidEvent) as err:
        batch_tensor(cfg("image"), [SensorEvent("e", "a", "image", 0, b"\xff\xd8\xff garbage")])
    assert err.value.reason == "bad_image" and err.value.modality == "image"
    bad_audio = SensorEvent("e", "a", "audio", 0, b"\x00" * 3, sample_rate=8000)
    assert batch_tensor_checked(cfg("audio"), [bad_audio]).errors[0][1].reason == "bad_audio"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("modality", ["image", "audio", "series"])
def test_preprocess_on_cuda_matches_the_cpu(modality):
    rng = np.random.default_rng(2)
    readings = [MAKERS[modality](k % 4, rng) for k in range(6)]
    c = cfg(modality)
    on_gpu, on_cpu = batch_tensor(c, readings, "cuda"), batch_tensor(c, readings, "cpu")
    assert on_gpu.device.type == "cuda"
    assert torch.allclose(on_gpu.cpu(), on_cpu, atol=2 / 255 if modality == "image" else 1e-6)


def test_preprocess_reports_signal_spread_for_sensor_health():
    """A flat signal has spread 0 in every modality; a live one has the spread of its raw values."""
    rng = np.random.default_rng(5)
    flat_px = np.full((32, 32, 3), 90, np.uint8)
    buf = io.BytesIO()
    Image.fromarray(flat_px).save(buf, "PNG")
    flat_image = SensorEvent("e", "a", "image", 0, buf.getvalue(), encoding="png")
    img = batch_tensor_checked(cfg("image", image_size=32), [flat_image, image_event(1, rng)])
    assert img.signal_std[0] == 0 and img.signal_std[1] > 20  # grey levels, 0..255
    live = audio_event(2, rng)
    silent = SensorEvent("e", "a", "audio", 0, bytes(1600), sample_rate=8000, channels=1)
    aud = batch_tensor_checked(cfg("audio"), [silent, live, audio_event(2, rng, rate=16000, channels=2)])
    raw = np.frombuffer(live.payload, "<i2") / 32768.0
    assert aud.signal_std[0] == 0 and aud.signal_std[1] == pytest.approx(raw.std(), rel=1e-5)
    assert aud.signal_std[2] == pytest.approx(raw.std(), rel=0.2)  # the same kind of signal, stereo
    ser = series_event(0, rng)
    out = batch_tensor_checked(cfg("series"), [SensorEvent("e", "a", "series", 0, bytes(64)), ser])
    assert out.signal_std.tolist() == pytest.approx([0.0, np.frombuffer(ser.payload, "<f4").std()], rel=1e-6)


def test_grey_spread_is_the_float32_std_of_the_luma():
    """The two-pass float64 spread gives the very float32 values of ``std(correction=0)``
    (the worker publishes them; a flat or frozen camera is judged on them)."""
    gen = torch.Generator().manual_seed(1)
    weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    for k in range(12):
        x = torch.randint(0, 256, (128, 3, 32, 32), dtype=torch.uint8, generator=gen)
        x = [x, (x // 50) * 3 + 100, x.clamp(120, 124)][k % 3]
        expected = (x.float() * weights).sum(dim=1).flatten(1).std(dim=1, correction=0)
        assert torch.equal(preprocess._grey_std(x), expected)


@pytest.mark.parametrize("modality", ["image", "audio", "series"])
def test_models_are_served_traced_with_eager_outputs(modality):
    model = create_model(cfg(modality)).eval()
    rng = np.random.default_rng(1)
    x = batch_tensor(model.sf_config, [MAKERS[modality](k % 4, rng) for k in range(5)])
    fwd = runtime.traced_forward(model, x)
    assert isinstance(fwd, torch.ScriptMethod)  # traced, so one call holds the GIL only at its ends
    with torch.inference_mode():
        for batch in (x, x[:1], torch.cat([x, x])):  # other batch sizes than the trace's
            for a, b in zip(model.forward_both(batch), fwd(batch)):
                assert torch.equal(a, b)


def test_a_models_served_form_is_built_once_and_can_be_built_ahead():
    model = create_model(cfg("series")).eval()
    bundle.warm_up(model)  # as the loader thread does for a new version
    x = batch_tensor(model.sf_config, [series_event(1, np.random.default_rng(3))])
    fwd = runtime.served_forward(model, x)
    assert isinstance(fwd, torch.ScriptMethod) and runtime.served_forward(model, x) is fwd
    other = create_model(cfg("series")).eval()
    assert runtime.served_forward(other, x) is not fwd  # per model object, not per config


def test_a_model_that_does_not_trace_faithfully_is_served_eagerly(caplog):
    class Noisy(torch.nn.Module):
        def forward_both(self, x):
            return x + torch.rand_like(x), x

    model = Noisy()
    assert runtime.traced_forward(model, torch.zeros(3, 4)) == model.forward_both
    assert "does not trace" in caplog.text


# ------------------------------------------------------------------ fusion


def test_ume_renormalizes_over_present_modalities():
    probs = torch.tensor([
        [[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]],
        [[0.7, 0.2, 0.1], [float("nan")] * 3, [0.2, 0.2, 0.6]],
        [[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]],
    ])
    present = torch.tensor([[True, True, True], [True, False, True], [False, False, False]])
    fused = ume(probs, present)
    assert torch.allclose(fused[0], probs[0].mean(0))
    assert torch.allclose(fused[1], (probs[1, 0] + probs[1, 2]) / 2)  # NaN row ignored
    assert torch.allclose(fused[2], torch.full((3,), 1 / 3))  # nothing present: uniform
    assert torch.allclose(fused.sum(-1), torch.ones(3))
    unnormalized = torch.tensor([[[2.0, 2.0], [1.0, 3.0]]])
    assert torch.allclose(ume(unnormalized, torch.tensor([[True, True]])), torch.tensor([[0.375, 0.625]]))
    with pytest.raises(ModelError, match="B, M, C"):
        ume(probs, present[:, :2])


# ------------------------------------------------------------------ bundles


def _models(seed: int = 0) -> dict[str, encoders.SensorModel]:
    torch.manual_seed(seed)
    models = {m: create_model(cfg(m)).eval() for m in ("image", "audio", "series")}
    for m, model in models.items():
        model.set_version(f"{m}-v{seed}")
    return models


def _manifest() -> dict:
    score = {"top1": 0.5, "macro_f1": 0.5, "n": 10}
    return {"version": "b-test", "created_ms": 1_700_000_000_000,
            "baselines": {"image": score, "audio": score, "series": score, "fused": score}}


def test_bundle_round_trip_identical_outputs(tmp_path):
    models = _models()
    written = save_bundle(tmp_path / "b", models, _manifest())
    loaded = load_bundle(tmp_path / "b")
    assert loaded.classes == CLASSES and loaded.modalities == ("image", "audio", "series")
    assert loaded.versions == {"image": "image-v0", "audio": "audio-v0", "series": "series-v0", "fusion": "ume"}
    assert loaded.fusion_mode == "ume" and loaded.baselines["fused"]["top1"] == 0.5
    assert read_manifest(tmp_path / "b") == written
    samples = [s.readings for s, _ in dataset(5, seed=3)]
    for m in loaded.modalities:
        readings = [r[m] for r in samples]
        with torch.inference_mode():
            want = models[m](batch_tensor(models[m].sf_config, readings)).softmax(-1)
        got = loaded.modality_probs(m, readings)
        assert got.dtype == torch.float32 and got.device.type == "cpu"
        assert torch.equal(got, want)
    samples[1] = {"image": samples[1]["image"]}  # only one modality present
    samples[2] = {**samples[2], "series": SensorEvent("e", "a", "series", 0, b"\x00")}  # undecodable
    out = loaded.predict(samples)
    assert out.present[1].tolist() == [True, False, False] and out.present[2].tolist() == [True, True, False]
    assert torch.allclose(out.probs[1], out.modality_probs[1, 0])
    assert [(i, e.reason) for i, e in out.errors] == [(2, "bad_series")]
    with pytest.raises(ModelError, match="already exists"):
        save_bundle(tmp_path / "b", models, _manifest())
    save_bundle(tmp_path / "b", models, _manifest(), overwrite=True)


def test_bundle_load_errors_name_the_path(tmp_path):
    with pytest.raises(ModelError, match="streamfuse train") as err:
        load_bundle(tmp_path / "nope")
    assert err.value.path == tmp_path / "nope"
    path = tmp_path / "b"
    save_bundle(path, _models(), _manifest())
    (path / "audio.safetensors").unlink()
    with pytest.raises(ModelError, match="audio.safetensors is missing") as err:
        load_bundle(path)
    assert err.value.path == path / "audio.safetensors"
    (path / "manifest.json").unlink()
    with pytest.raises(ModelError, match="manifest.json is missing") as err:
        load_bundle(path)
    assert err.value.path == path / "manifest.json"


def test_bundle_rejects_inconsistent_manifest_and_tampered_weights(tmp_path):
    path = tmp_path / "b"
    written = save_bundle(path, _models(), _manifest())
    for change, match in [
        ({"classes": ["a", "b", "c", "d"]}, "does not match"),
        ({"modalities": ["image", "audio"]}, "modalities are"),
        ({"fusion": {"mode": "magic", "version": "1"}}, "fusion"),
        ({"format": "other/9"}, "format"),
    ]:
        (path / "manifest.json").write_text(json.dumps({**written, **change}))
        with pytest.raises(ModelError, match=match):
            load_bundle(path)
    (path / "manifest.json").write_text(json.dumps(written))
    with (path / "series.safetensors").open("r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(ModelError, match="sha256"):
        load_bundle(path)
    with pytest.raises(ModelError, match="do not match"):
        save_bundle(tmp_path / "c", _models(), {**_manifest(), "classes": ["x", "y"]})


# ------------------------------------------------------------------ golden outputs


def _golden_outputs() -> dict[str, list[list[float]]]:
    out = {}
    for i, m in enumerate(("image", "audio", "series")):
        torch.manual_seed(100 + i)
        model = create_model(cfg(m)).eval()
        x = batch_tensor(model.sf_config, [MAKERS[m](k, np.random.default_rng(k)) for k in range(2)])
        with torch.no_grad():
            out[m] = model(x).tolist()
    return out


def test_tiny_models_match_golden_outputs():
    golden = json.loads(GOLDEN.read_text())
    for m, got in _golden_outputs().items():
        np.testing.assert_allclose(got, golden[m], rtol=1e-4, atol=1e-4, err_msg=m)


# ------------------------------------------------------------------ training


def test_training_beats_chance_and_is_deterministic(tmp_path):
    train, val, test = dataset(40, seed=1), dataset(20, seed=2), dataset(12, seed=3)
    train[0] = (Sample(train[0][0].sample_id, "a", 0, {"image": train[0][0].readings["image"]}), train[0][1])
    reports = []
    config = TrainConfig(epochs=2, seed=0, device="cpu", options=TrainOptions(batch_size=8, threads=1), created_ms=1)
    man = train_bundle(train, val, test, tmp_path / "a", config, progress=reports.append)
    assert man["classes"] == sorted(CLASSES) and man["modalities"] == ["image", "audio", "series"]
    assert man["training"]["modalities"]["audio"]["n_train"] == 39  # sample 0 lacks audio
    assert {(r.modality, r.epoch) for r in reports} == {(m, e) for m in man["modalities"] for e in (1, 2)}
    for unit in ("image", "audio", "series", "fused"):
        assert man["baselines"][unit]["macro_f1"] > 0.5, (unit, man["baselines"])  # chance: 0.25
        assert man["test"][unit]["n"] == 12
    assert load_bundle(tmp_path / "a").version == man["version"]
    # Same seed, same data: same weights. Each modality is seeded on its own, so training
    # the series model alone reproduces it exactly.
    series = {"series": default_config("series", sorted(CLASSES))}
    again = train_bundle(train, val, None, tmp_path / "b", replace(config, configs=series))
    assert again["configs"]["series"] == man["configs"]["series"]
    # (the label-free calibration is not compared: it depends on the other modalities trained beside it)
    strip = lambda b: {k: v for k, v in b.items() if k != "calibration"}  # noqa: E731
    assert strip(again["baselines"]["series"]) == strip(man["baselines"]["series"])
    bad = [(s, Label(s.sample_id, "a", 0, "unknown")) for s, _ in val]
    with pytest.raises(ModelError, match="not one of the classes"):
        train_bundle(train, bad, None, tmp_path / "c", config)
    with pytest.raises(ModelError, match="already exists"):
        train_bundle(train, val, None, tmp_path / "a", config)


if __name__ == "__main__" and "--regen-golden" in sys.argv:
    GOLDEN.write_text(json.dumps(_golden_outputs(), indent=1) + "\n")
    print(f"wrote {GOLDEN}")
