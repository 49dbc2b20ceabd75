"""Fusion modes, the Bundle inference API (encode / fuse / with_unit) and load refusals.

Random weights on the CPU and a few simulator samples; no training. Regenerate the
fusion golden outputs (only after a deliberate change to a fusion module) with::

    python tests/unit/test_models_fusion.py --regen-golden
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from streamfuse.errors import ModelError
from streamfuse.events import SensorEvent
from streamfuse.models.bundle import LoadedUnit
from streamfuse.models.bundle_io import load_bundle, save_bundle, weights_digest
from streamfuse.models.config import default_config
from streamfuse.models.encoders import create_model
from streamfuse.models.fusion import (MIN_WEIGHT, FusionConfig, FusionSet, FusionUnit, fusion_version, odd_ones_out,
                                      quality)
from streamfuse.models.units import bundle_units, load_unit_dir, write_unit
from streamfuse.monitor.evidence import Calibration, categories
from streamfuse.sim.plant import CLASSES, Plant

GOLDEN = Path(__file__).parent / "golden" / "fusion_golden.json"
ORDER = ("image", "audio", "series")


def make_models(seed: int) -> dict:
    torch.manual_seed(seed)
    models = {m: create_model(default_config(m, CLASSES)).eval() for m in ORDER}
    for m, model in models.items():
        model.set_version(f"{m}-{weights_digest(model)[:12]}")
    return models


def make_fusion(models: dict, seed: int = 0) -> FusionSet:
    torch.manual_seed(seed)
    cfg = FusionConfig(ORDER, CLASSES, tuple(models[m].num_features for m in ORDER))
    fs = FusionSet(cfg, ["weighted", "head"]).eval()
    with torch.no_grad():
        fs.learned["weighted"].logits.copy_(torch.tensor([0.5, -0.25, 1.0]))
    return fs


def make_bundle(path: Path, seed: int = 0, mode: str = "head") -> dict:
    models = make_models(seed)
    fs = make_fusion(models, seed)
    trained_on = {m: models[m].sf_config.version for m in ORDER}
    score = {"top1": 0.5 + seed / 100, "macro_f1": 0.5, "n": 10}
    manifest = {"version": f"b-{seed}", "created_ms": 1_700_000_000_000 + seed,
                "fusion": {"mode": mode, "version": fusion_version(mode, fs, trained_on), "trained_on": trained_on},
                "baselines": {m: score for m in (*ORDER, "fused")}, "test": {m: score for m in (*ORDER, "fused")}}
    return save_bundle(path, models, manifest, fusion=fs)


@pytest.fixture(scope="module")
def samples() -> list[dict]:
    return [s.readings for s, _ in Plant(run_id="t").dataset(6, seed=5)]


# ------------------------------------------------------------------ fusion modes


def test_every_mode_renormalizes_over_the_modalities_in_use():
    models = make_models(0)
    fs = make_fusion(models)
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(5, 3, 4, generator=g).softmax(-1)
    feats = [torch.randn(5, models[m].num_features, generator=g) for m in ORDER]
    use = torch.tensor([[1, 1, 1], [1, 0, 1], [0, 1, 0], [0, 0, 0], [1, 1, 0]], dtype=torch.bool)
    for mode in fs.modes:
        out = fs.fuse(mode, probs, feats, use)
        assert out.shape == (5, 4) and torch.allclose(out.sum(-1), torch.ones(5)), mode
        assert torch.allclose(out[3], torch.full((4,), 0.25)), mode  # nothing in use: uniform
        # A modality out of use does not matter at all, whatever its outputs hold.
        junk_p, junk_f = probs.clone(), [f.clone() for f in feats]
        junk_p[1, 1], junk_f[1][1] = float("nan"), 1e6
        assert torch.equal(fs.fuse(mode, junk_p, junk_f, use)[1], out[1]), mode
    w = fs.learned["weighted"].weights(use)
    assert torch.allclose(w.sum(1), torch.tensor([1.0, 1, 1, 0, 1])) and (w[~use] == 0).all()
    one = fs.fuse("weighted", probs, feats, torch.tensor([[False, True, False]] * 5))
    assert torch.allclose(one, probs[:, 1])  # a single modality in use is passed through
    uniform = FusionSet(fs.cfg, ["weighted"])  # zero logits: exactly UME
    assert torch.allclose(uniform.fuse("weighted", probs, feats, use), fs.fuse("ume", probs, feats, use))
    with pytest.raises(ModelError, match="available"):
        FusionSet(fs.cfg, ["weighted"]).fuse("head", probs, feats, use)
    with pytest.raises(ModelError, match="unknown learned fusion"):
        FusionSet(fs.cfg, ["magic"])
    with pytest.raises(ModelError, match="feature_dims"):
        FusionConfig(ORDER, CLASSES, (1, 2))


def _golden_outputs() -> dict:
    torch.manual_seed(7)
    cfg = FusionConfig(("image", "series"), ("a", "b", "c"), (5, 3), hidden=8)
    fs = FusionSet(cfg, ["weighted", "head"]).eval()
    g = torch.Generator().manual_seed(3)
    probs = torch.rand(2, 2, 3, generator=g).softmax(-1)
    feats = [torch.randn(2, 5, generator=g), torch.randn(2, 3, generator=g)]
    use = torch.tensor([[True, True], [False, True]])
    return {m: fs.fuse(m, probs, feats, use).tolist() for m in fs.modes}


def test_tiny_fusion_matches_golden_outputs():
    golden = json.loads(GOLDEN.read_text())
    for mode, got in _golden_outputs().items():
        torch.testing.assert_close(torch.tensor(got), torch.tensor(golden[mode]), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ bundle inference API


def test_saved_bundle_gives_bit_identical_outputs(tmp_path, samples):
    models, written = make_models(0), make_bundle(tmp_path / "b")
    fs = make_fusion(models)
    b = load_bundle(tmp_path / "b")
    assert b.fusion_modes == ("ume", "weighted", "head") and b.fusion_mode == "head"
    assert b.versions["fusion"] == written["fusion"]["version"] != "ume"
    enc = b.encode(samples)
    assert enc.modality_probs.shape == (6, 3, 4) and enc.computed.all() and not enc.errors
    assert set(enc.seconds) == set(ORDER) and all(t >= 0 for t in enc.seconds.values())
    for j, m in enumerate(ORDER):
        want_f, want_logits = _direct(models[m], [s[m] for s in samples])
        assert torch.equal(enc.features[m], want_f) and torch.equal(enc.modality_probs[:, j], want_logits.softmax(-1))
    feats = [enc.features[m] for m in ORDER]
    for mode in b.fusion_modes:
        assert torch.equal(b.fuse(enc, enc.computed, mode), fs.fuse(mode, enc.modality_probs, feats, enc.computed))
    assert torch.equal(b.predict(samples).probs, b.fuse(enc, enc.computed))
    again = load_bundle(tmp_path / "b")
    assert torch.equal(again.predict(samples).probs, b.predict(samples).probs)


def _direct(model, readings):
    from streamfuse.models.preprocess import batch_tensor

    with torch.inference_mode():
        return model.forward_both(batch_tensor(model.sf_config, readings))


def test_encode_and_fuse_handle_missing_bad_and_masked_readings(tmp_path, samples):
    make_bundle(tmp_path / "b")
    b = load_bundle(tmp_path / "b")
    rows = [dict(s) for s in samples]
    del rows[0]["audio"]
    rows[1]["series"] = SensorEvent("e", "a", "series", 0, b"\x00")
    rows[2] = {}
    enc = b.encode(rows)
    assert enc.computed[:3].tolist() == [[True, False, True], [True, True, False], [False, False, False]]
    assert [(i, e.reason) for i, e in enc.errors] == [(1, "bad_series")]
    assert not enc.features["audio"][0].any() and not enc.modality_probs[0, 1].any()
    for mode in b.fusion_modes:
        fused = b.fuse(enc, torch.ones_like(enc.computed), mode)  # use is cut down to what was computed
        assert torch.allclose(fused[2], torch.full((4,), 0.25))
        only_image = torch.zeros_like(enc.computed)
        only_image[:, 0] = True
        assert torch.allclose(b.fuse(enc, only_image, mode).sum(-1), torch.ones(6))
    assert torch.equal(b.fuse(enc, only_image, "ume")[:2], enc.modality_probs[:2, 0])
    with pytest.raises(ModelError, match="not available"):
        b.fuse(enc, enc.computed, "magic")
    with pytest.raises(ModelError, match="shape"):
        b.fuse(enc, enc.computed[:, :2], "ume")


def test_with_unit_swaps_atomically_and_guards_the_head(tmp_path, samples):
    make_bundle(tmp_path / "a", seed=0)
    make_bundle(tmp_path / "b", seed=1, mode="weighted")
    a, other = load_bundle(tmp_path / "a"), load_bundle(tmp_path / "b")
    before = a.predict(samples).probs
    unit = LoadedUnit("audio", other.versions["audio"], other.models["audio"], {"top1": 0.9, "macro_f1": 0.8}, {})
    swapped = a.with_unit("audio", unit)
    assert swapped is not a and a.versions["audio"] != swapped.versions["audio"] == other.versions["audio"]
    assert torch.equal(a.predict(samples).probs, before)  # the old bundle is untouched
    assert swapped.fusion_mode == "ume" and "head" not in swapped.fusion_modes and "trained on" in swapped.fusion_note
    assert "weighted" in swapped.fusion_modes and swapped.baselines["audio"]["top1"] == 0.9
    assert swapped.version != a.version
    fus = LoadedUnit("fusion", other.fusion.version, other.fusion, {"top1": 0.7, "macro_f1": 0.7},
                     other.manifest | {"fusion": other.manifest["fusion"]})
    both = swapped.with_unit("fusion", fus)
    assert both.fusion_mode == "weighted" and both.versions["fusion"] == other.versions["fusion"]
    with pytest.raises(ModelError, match="in place of"):
        a.with_unit("image", unit)
    wrong = create_model(default_config("audio", ["x", "y"]))
    with pytest.raises(ModelError, match="classes"):
        a.with_unit("audio", LoadedUnit("audio", "v", wrong, {}, {}))


# ------------------------------------------------------------------ refusals


def _cases(weights: Path) -> list:
    data = weights.read_bytes()
    pickled = weights.with_suffix(".pt")
    torch.save({"w": torch.zeros(2)}, pickled)
    legacy = weights.with_suffix(".legacy")
    torch.save({"w": torch.zeros(2)}, legacy, _use_new_zipfile_serialization=False)
    return [
        (pickled.read_bytes(), "zip archive"),
        (legacy.read_bytes(), "pickle file"),
        (data[: len(data) // 2], "truncated"),
        (data[:5], "truncated"),
        (b"\xff" * 64, "not a safetensors file"),
    ]


def test_bundle_loading_refuses_pickles_truncation_and_shape_mismatch(tmp_path):
    path = tmp_path / "b"
    written = make_bundle(path)
    for target in (path / "series.safetensors", path / "fusion.safetensors"):
        good = target.read_bytes()
        for data, problem in _cases(target):
            target.write_bytes(data)
            with pytest.raises(ModelError, match=problem) as err:
                load_bundle(path)
            assert err.value.path == target and str(target) in str(err.value)
        target.write_bytes(good)
    load_bundle(path)
    # a manifest whose declared shapes differ from the weights
    bad = json.loads(json.dumps(written))
    bad["weights"]["series"]["tensors"]["net.fc.weight"]["shape"] = [5, 64]
    (path / "manifest.json").write_text(json.dumps(bad))
    with pytest.raises(ModelError, match=r"net.fc.weight.*\[4, 64\].*\[5, 64\]") as err:
        load_bundle(path)
    assert err.value.path == path / "manifest.json"
    # a config that builds other shapes than the weights have
    bad = json.loads(json.dumps(written))
    bad["configs"]["series"]["in_channels"] = 2
    (path / "manifest.json").write_text(json.dumps(bad))
    with pytest.raises(ModelError, match="does not fit its series config") as err:
        load_bundle(path)
    assert err.value.path == path / "series.safetensors"


def test_unit_loading_refuses_pickles_truncation_shapes_and_other_manifests(tmp_path):
    make_bundle(tmp_path / "b")
    root = tmp_path / "units"
    dirs = {man["unit"]: write_unit(root, man, w) for man, w in bundle_units(tmp_path / "b")}
    assert write_unit(root, *bundle_units(tmp_path / "b")[0]) == dirs["image"]  # idempotent
    # the same weights imported again with a newer baseline (recalibrated): the newest is kept
    man, w = bundle_units(tmp_path / "b")[0]
    newer = {**man, "baseline": {**man["baseline"], "spread": {"lo": 1.0, "hi": 9.0, "p_out": 0.01, "n": 10}}}
    write_unit(root, newer, w)
    assert load_unit_dir(dirs["image"]).baseline["spread"]["hi"] == 9.0
    assert write_unit(root, man, w) == dirs["image"] and "spread" not in load_unit_dir(dirs["image"]).baseline
    assert isinstance(load_unit_dir(dirs["fusion"]).module, FusionUnit)
    unit = load_unit_dir(dirs["series"])
    assert unit.version == unit.module.sf_config.version and unit.baseline["n"] == 10
    weights, man_file = dirs["series"] / "weights.safetensors", dirs["series"] / "unit.json"
    good, man = weights.read_bytes(), json.loads(man_file.read_text())
    for data, problem in _cases(weights):
        weights.write_bytes(data)
        with pytest.raises(ModelError, match=problem) as err:
            load_unit_dir(dirs["series"])
        assert err.value.path == weights
    weights.write_bytes(good)
    man["weights"]["tensors"]["net.fc.bias"]["shape"] = [3]
    man_file.write_text(json.dumps(man))
    with pytest.raises(ModelError, match="does not match") as err:
        load_unit_dir(dirs["series"])
    assert err.value.path == man_file
    man["weights"]["file"] = "weights.pt"
    man_file.write_text(json.dumps(man))
    with pytest.raises(ModelError, match="weights.safetensors"):
        load_unit_dir(dirs["series"])
    man_file.unlink()
    (dirs["series"] / "unit.pkl").write_bytes(b"\x80\x04.")
    with pytest.raises(ModelError, match="unit.json is missing.*unit.pkl"):
        load_unit_dir(dirs["series"])
    man_file.write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(ModelError, match="not a JSON unit manifest"):
        load_unit_dir(dirs["series"])


if __name__ == "__main__" and "--regen-golden" in sys.argv:
    GOLDEN.write_text(json.dumps(_golden_outputs(), indent=1) + "\n")
    print(f"wrote {GOLDEN}")


def test_quality_fusion_judges_each_row_alone_and_leaves_agreeing_rows_at_ume():
    from streamfuse.models.fusion import quality, ume
    from streamfuse.monitor.evidence import Calibration

    mods = ("image", "audio", "series")
    rows = [({m: y for m in mods}, y) for y in "abab"] * 10 + [({"image": "a", "audio": "b", "series": "b"}, "b")] * 4
    cal = Calibration.fit(rows)
    odd = [[1.0, 0.0], [0.3, 0.7], [0.4, 0.6]]  # the camera is the odd one out
    agree = [[0.9, 0.1], [0.6, 0.4], [0.8, 0.2]]
    p = torch.tensor([agree, odd, agree, odd])
    use = torch.ones(4, 3, dtype=torch.bool)
    use[3, 2] = False  # two answers left that differ: no odd one out, UME
    fused = quality(p, use, cal, mods)
    assert torch.equal(fused[0], ume(p[:1], use[:1])[0]) and torch.equal(fused[2], fused[0])
    assert torch.equal(fused[1], quality(p[1:2], use[1:2], cal, mods)[0])
    assert fused[1].argmax().item() == 1 and ume(p[1:2], use[1:2]).argmax().item() == 0
    assert torch.allclose(fused[3], ume(p[3:], use[3:])[0])


def _quality_one_by_one(probs, use, cal, modalities, classes):
    """The quality fusion as its definition reads: each sample's categories
    (:func:`categories`), the odd one out weighted by its calibrated reliability."""
    conf, labels = probs.max(dim=-1)
    weights = torch.ones(use.shape)
    for i in range(use.shape[0]):
        cats = categories({modalities[j]: classes[labels[i, j]] for j in range(use.shape[1]) if use[i, j]})
        for j in range(use.shape[1]):
            k_cat = cats.get(modalities[j])
            if use[i, j] and k_cat is not None and k_cat[1] == "odd":
                p = cal.reliability(modalities[j], *k_cat, conf[i, j].item())
                weights[i, j] = max(MIN_WEIGHT, p if p is not None else 1.0)
    fused = (torch.where(use.unsqueeze(-1), probs, 0.0) * weights.unsqueeze(-1)).sum(dim=1)
    fused = fused / fused.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return torch.where(use.any(dim=1, keepdim=True), fused, 1.0 / probs.shape[-1])


@pytest.mark.parametrize("m", [2, 3, 4])
def test_batched_quality_fusion_judges_exactly_the_odd_ones_out(m: int) -> None:
    """The batch finds the odd ones out on whole tensors; the result must be the one the
    per-sample definition gives, bit for bit, on every pattern of labels and presence."""
    gen = torch.Generator().manual_seed(m)
    modalities, classes = ("image", "audio", "series", "vibration")[:m], ("a", "b", "c")
    rows = [({mod: y for mod in modalities}, y) for y in "abcab"] * 8
    rows += [({**{mod: "b" for mod in modalities}, modalities[0]: "a"}, "b")] * 5
    cal = Calibration.fit(rows)
    probs = torch.rand(400, m, 3, generator=gen)
    probs[::3, :, 0] += 2.0  # many rows in which every modality agrees
    probs = probs / probs.sum(dim=-1, keepdim=True)
    use = torch.rand(400, m, generator=gen) > 0.2
    labels = probs.argmax(dim=-1)
    expected_odd = torch.tensor([[categories({modalities[j]: classes[labels[i, j]] for j in range(m) if use[i, j]})
                                  .get(modalities[j], (0, ""))[1] == "odd" and bool(use[i, j]) for j in range(m)]
                                 for i in range(400)])
    assert torch.equal(odd_ones_out(labels, use), expected_odd)
    assert expected_odd.any() or m == 2
    assert torch.equal(quality(probs, use, cal, modalities), _quality_one_by_one(probs, use, cal, modalities, classes))

