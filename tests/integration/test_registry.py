"""The model registry against the real Redis (127.0.0.1:6379), each test with its own key
prefix and model directory; bundles have random weights (no training)."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from streamfuse.config import Settings
from streamfuse.errors import ModelError
from streamfuse.models.bundle_io import load_bundle, save_bundle, weights_digest
from streamfuse.models.cli import models_app
from streamfuse.models.config import default_config
from streamfuse.models.encoders import create_model
from streamfuse.models.fusion import FusionConfig, FusionSet, fusion_version
from streamfuse.models.manifest import bundle_version
from streamfuse.models.registry import Registry, RegistryError
from streamfuse.sim.plant import CLASSES, Plant
from streamfuse.store import connect

pytestmark = pytest.mark.integration
ORDER = ("image", "audio", "series")


def make_bundle(path: Path, seed: int, classes=CLASSES, learned=("weighted", "head"), mode="head") -> Path:
    torch.manual_seed(seed)
    models = {m: create_model(default_config(m, classes)).eval() for m in ORDER}
    for m, model in models.items():
        model.set_version(f"{m}-{weights_digest(model)[:12]}")
    fs = FusionSet(FusionConfig(ORDER, tuple(classes), tuple(models[m].num_features for m in ORDER)), learned)
    trained_on = {m: models[m].sf_config.version for m in ORDER}
    scores = {u: {"top1": 0.6 + seed / 100 + k / 10, "macro_f1": 0.5 + k / 10, "n": 40}
              for k, u in enumerate((*ORDER, "fused"))}
    scores["image"]["spread"] = {"lo": 1.0, "hi": 50.0 + seed, "p_out": 0.01, "n": 40}
    versions = trained_on | {"fusion": fusion_version(mode, fs, trained_on)}
    save_bundle(path, models, {"version": bundle_version(versions, classes), "created_ms": 1_700_000_000_000 + seed,
                               "fusion": {"mode": mode, "version": fusion_version(mode, fs, trained_on),
                                          "trained_on": trained_on},
                               "baselines": scores}, fusion=fs)
    return path


@pytest.fixture
def settings(tmp_path):
    s = Settings(model_dir=tmp_path / "models", redis_prefix=f"streamfuse-test:{uuid.uuid4().hex[:8]}:")
    client = connect(s)
    yield s
    keys = list(client.scan_iter(match=f"{s.redis_prefix}*"))
    if keys:
        client.delete(*keys)


@pytest.fixture(scope="module")
def samples():
    return [s.readings for s, _ in Plant(run_id="reg").dataset(5, seed=9)]


def test_import_is_idempotent_and_load_active_matches_the_bundle(settings, tmp_path, samples):
    bundle = make_bundle(tmp_path / "a", 0)
    reg = Registry(settings)
    units = reg.import_bundle(bundle)
    assert set(units) == {*ORDER, "fusion"} and reg.active() == units
    assert reg.import_bundle(bundle) == units and all(len(reg.history(u)) == 1 for u in units)  # idempotent
    for u, v in units.items():
        assert reg.versions(u) == [v]
        assert (settings.model_dir / "units" / u / v / "unit.json").is_file()
    assert (settings.model_dir / "units" / "image" / units["image"] / "weights.safetensors").is_file()
    spread = {"lo": 1.0, "hi": 50.0, "p_out": 0.01, "n": 40}  # the signal-spread range travels with it
    assert reg.baselines() == {"image": {"top1": 0.6, "macro_f1": 0.5, "spread": spread}, "audio": {"top1": 0.7, "macro_f1": 0.6},
                               "series": {"top1": 0.8, "macro_f1": 0.7}, "fused": pytest.approx({"top1": 0.9,
                                                                                                  "macro_f1": 0.8})}
    served, direct = reg.load_active("cpu"), load_bundle(bundle)
    assert served.versions == direct.versions and served.version == direct.version
    assert served.fusion_mode == "head" and served.fusion_modes == direct.fusion_modes
    assert torch.equal(served.predict(samples).probs, direct.predict(samples).probs)  # bit-identical
    entry = reg.history("image")[0]
    assert entry["action"] == "activate" and entry["previous"] is None
    assert entry["reason"] == f"import of bundle {direct.version}"


def test_activate_rollback_history_and_atomic_swap(settings, tmp_path, samples):
    reg = Registry(settings)
    first = reg.import_bundle(make_bundle(tmp_path / "a", 0))
    second = reg.import_bundle(make_bundle(tmp_path / "b", 1), activate=False)
    imported = f"import of bundle {load_bundle(tmp_path / 'a').version}"
    assert reg.active() == first and reg.versions("audio") == [first["audio"], second["audio"]]
    reg.activate("audio", second["audio"], reason="better on line 2", actor="alice")
    reg.activate("audio", second["audio"])  # already active: no-op, no history entry
    assert reg.active()["audio"] == second["audio"] and reg.baselines()["audio"]["top1"] == pytest.approx(0.71)
    bundle = reg.load_active()
    assert bundle.versions["audio"] == second["audio"] and bundle.fusion_mode == "ume"  # head needs its encoders
    assert "head" not in bundle.fusion_modes and "weighted" in bundle.fusion_modes
    reg.activate("fusion", second["fusion"])
    assert reg.rollback("audio", reason="alert a-1", actor="monitor") == first["audio"]
    assert reg.active()["audio"] == first["audio"]
    with pytest.raises(RegistryError, match="no previous version") as err:
        reg.rollback("audio")
    assert err.value.unit == "audio"
    hist = reg.history("audio")
    assert [(h["action"], h["version"], h["previous"], h["actor"], h["reason"]) for h in hist] == [
        ("activate", first["audio"], None, "cli", imported),
        ("activate", second["audio"], first["audio"], "alice", "better on line 2"),
        ("rollback", first["audio"], second["audio"], "monitor", "alert a-1"),
    ]
    assert hist[0]["ts_ms"] <= hist[1]["ts_ms"] <= hist[2]["ts_ms"]
    # the worker's swap: a new bundle, the old one untouched
    old = reg.load_active()
    before = old.predict(samples).probs
    new = old.with_unit("audio", reg.load_unit("audio", second["audio"], "cpu"))
    assert new.versions["audio"] == second["audio"] and old.versions["audio"] == first["audio"]
    assert torch.equal(old.predict(samples).probs, before)
    assert reg.rollback("fusion") == first["fusion"]


def test_broken_versions_are_refused_and_nothing_switches(settings, tmp_path):
    reg = Registry(settings)
    first = reg.import_bundle(make_bundle(tmp_path / "a", 0))
    second = reg.import_bundle(make_bundle(tmp_path / "b", 1), activate=False)
    unit_dir = settings.model_dir / "units" / "series" / second["series"]
    weights, manifest = unit_dir / "weights.safetensors", unit_dir / "unit.json"
    good, man = weights.read_bytes(), json.loads(manifest.read_text())
    pickled = tmp_path / "w.pt"
    torch.save({"net.fc.weight": torch.zeros(4, 64)}, pickled)
    cases = [(pickled.read_bytes(), None, "zip archive", weights), (good[:-100], None, "truncated", weights),
             (good, {**man, "weights": {**man["weights"], "tensors": {
                 **man["weights"]["tensors"], "net.fc.weight": {"dtype": "F32", "shape": [4, 65]}}}},
              "does not match", manifest),
             (good[:200] + b"\x00" * (len(good) - 200), None, "not a safetensors|sha256|truncated", weights)]
    for data, new_man, problem, culprit in cases:
        weights.write_bytes(data)
        manifest.write_text(json.dumps(new_man or man))
        with pytest.raises(ModelError, match=problem) as err:
            reg.activate("series", second["series"])
        assert err.value.path == culprit and str(culprit) in str(err.value)
        assert reg.active()["series"] == first["series"] and len(reg.history("series")) == 1
    weights.write_bytes(good)
    manifest.write_text(json.dumps(man))
    reg.activate("series", second["series"])
    weights.write_bytes(good[:-8])  # the previous version breaks later: rollback refuses it too
    first_dir = settings.model_dir / "units" / "series" / first["series"] / "weights.safetensors"
    first_dir.write_bytes(first_dir.read_bytes()[:-8])
    with pytest.raises(ModelError, match="truncated"):
        reg.rollback("series")
    assert reg.active()["series"] == second["series"]


def test_unknown_units_versions_and_other_classes(settings, tmp_path):
    reg = Registry(settings)
    with pytest.raises(RegistryError, match="no active models"):
        reg.load_active()
    units = reg.import_bundle(make_bundle(tmp_path / "a", 0))
    with pytest.raises(RegistryError, match="unknown unit 'video'"):
        reg.activate("video", "v1")
    with pytest.raises(RegistryError, match="no version 'image-nope'.*versions"):
        reg.activate("image", "image-nope")
    with pytest.raises(RegistryError, match="no version"):
        reg.activate("image", "../audio")
    other = reg.import_bundle(make_bundle(tmp_path / "c", 2, classes=("ok", "bad")), activate=False)
    with pytest.raises(RegistryError, match="classes"):
        reg.activate("image", other["image"])
    assert reg.active() == units
    assert reg.import_bundle(tmp_path / "c") == other  # a whole bundle may change the classes
    assert reg.load_active().classes == ("ok", "bad")


def test_switches_are_published(settings, tmp_path):
    reg = Registry(settings)
    pubsub = connect(settings).pubsub()
    pubsub.subscribe(f"{settings.redis_prefix}registry:changes")
    deadline = time.monotonic() + 5
    while pubsub.get_message(timeout=0.5) is None and time.monotonic() < deadline:
        pass  # the subscribe confirmation
    reg.import_bundle(make_bundle(tmp_path / "a", 0))
    got = []
    while len(got) < 4 and time.monotonic() < deadline:
        msg = pubsub.get_message(timeout=0.5)
        if msg and msg["type"] == "message":
            got.append(json.loads(msg["data"]))
    pubsub.close()
    assert sorted(m["unit"] for m in got) == sorted([*ORDER, "fusion"])


def test_models_cli(settings, tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMFUSE_MODEL_DIR", str(settings.model_dir))
    monkeypatch.setenv("STREAMFUSE_REDIS_PREFIX", settings.redis_prefix)
    app = typer.Typer()
    app.add_typer(models_app, name="models")
    run = CliRunner().invoke
    res = run(app, ["models", "import", str(make_bundle(tmp_path / "a", 0))])
    assert res.exit_code == 0 and "imported and activated" in res.output
    second = json.loads(run(app, ["models", "import", str(make_bundle(tmp_path / "b", 1)), "--no-activate"])
                        .output.split("imported: ", 1)[1].replace("\n", ""))
    res = run(app, ["models", "activate", "image", second["image"], "--reason", "try it"])
    assert res.exit_code == 0 and second["image"] in res.output
    listed = json.loads(run(app, ["models", "list", "--json"]).output)
    assert len(listed) == 8 and [r["version"] for r in listed if r["active"] and r["unit"] == "image"] == [
        second["image"]]
    assert "model units under" in run(app, ["models", "list"], terminal_width=200).output
    res = run(app, ["models", "rollback", "image", "--reason", "worse"])
    assert res.exit_code == 0 and "rolled back" in res.output
    hist = json.loads(run(app, ["models", "history", "image", "--json"]).output)
    assert [h["action"] for h in hist] == ["activate", "activate", "rollback"] and hist[1]["reason"] == "try it"
    assert "rollback" in run(app, ["models", "history", "image"], terminal_width=200).output
    res = run(app, ["models", "rollback", "image"])
    assert res.exit_code == 2 and "no previous version" in res.output
    res = run(app, ["models", "activate", "image", "nope"])
    assert res.exit_code == 2 and "no version" in res.output


def test_ume_only_bundles_import_and_serve(settings, tmp_path, samples):
    reg = Registry(settings)
    units = reg.import_bundle(make_bundle(tmp_path / "u", 3, learned=(), mode="ume"))
    assert units["fusion"] == "ume"
    assert not (settings.model_dir / "units" / "fusion" / "ume" / "weights.safetensors").exists()
    bundle = reg.load_active()
    assert bundle.fusion_modes == ("ume",) and bundle.versions["fusion"] == "ume"
    assert torch.equal(bundle.predict(samples).probs, load_bundle(tmp_path / "u").predict(samples).probs)


def test_concurrent_switches_keep_one_consistent_history(settings, tmp_path):
    import threading

    first = Registry(settings).import_bundle(make_bundle(tmp_path / "a", 0))
    second = Registry(settings).import_bundle(make_bundle(tmp_path / "b", 1), activate=False)
    versions = [first["series"], second["series"]]

    def flip(k: int) -> None:
        reg = Registry(settings)  # its own connection, like another process
        for i in range(8):
            reg.activate("series", versions[(i + k) % 2], actor=f"t{k}")

    threads = [threading.Thread(target=flip, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    hist = Registry(settings).history("series")
    for before, after in zip(hist, hist[1:]):  # every switch starts where the previous one ended
        assert after["previous"] == before["version"] != after["version"]
    assert Registry(settings).active()["series"] == hist[-1]["version"]
    stack = connect(settings).lrange(f"{settings.redis_prefix}registry:previous:series", 0, -1)
    assert [v.decode() for v in stack] == [h["previous"] for h in hist[1:]]


def test_the_monitor_applies_a_new_versions_baseline_without_a_restart(settings, tmp_path):
    """Image right 45 % of the time: within the first version's margin (baseline 0.60), a
    degradation once a version with baseline 0.70 is activated: the monitor reads that
    version's baseline from the registry when predictions say it serves them."""
    from streamfuse.config import MonitorSettings
    from streamfuse.events import Label, Prediction
    from streamfuse.monitor.core import MonitorCore

    reg = Registry(settings)
    first = reg.import_bundle(make_bundle(tmp_path / "a", 0))
    second = reg.import_bundle(make_bundle(tmp_path / "b", 10), activate=False)
    assert reg.baselines_of({**first, "image": second["image"]})["image"]["top1"] == pytest.approx(0.7)
    monitor = MonitorSettings(kpi_window_ms=10_000, label_grace_ms=0, detect_scopes=("global",))
    core = MonitorCore(reg.baselines(), monitor, baselines_of=reg.baselines_of)

    def window(start_s: int, versions: dict[str, str]) -> list:
        alerts = []
        for i in range(200):  # 20 samples/s for 10 s
            ts, truth = start_s * 1000 + i * 50, CLASSES[i % len(CLASSES)]
            image = truth if i % 20 < 9 else CLASSES[(i + 1) % len(CLASSES)]
            probs = {m: tuple(0.85 if c == y else 0.05 for c in CLASSES)
                     for m, y in (("image", image), ("audio", truth), ("series", truth))}
            sid = f"s{start_s}-{i}"
            pred = Prediction(sid, "asset-0", ts, tuple(CLASSES), probs["audio"], truth, "ume", probs,
                              line_id="line-0", versions=versions)
            alerts += core.on_prediction(pred, "p0").alerts
            core.on_label(Label(sid, "asset-0", ts, truth, line_id="line-0"))
        return alerts

    assert [a for t in (0, 10, 20) for a in window(t, first)] == []
    reg.activate("image", second["image"], reason="test: a better image model")
    served = {**first, "image": second["image"]}
    fired = [a for t in (30, 40, 50) for a in window(t, served) if a.status == "firing"]
    assert [(a.kind, a.modality, a.scope) for a in fired] == [("degradation", "image", "global")], fired
    assert fired[0].threshold == pytest.approx(0.7 - monitor.degradation_margin)
    assert core.baselines["image"]["top1"] == pytest.approx(0.7)
    assert core.spread_ranges["image"].hi == 60.0  # the new version's signal-spread range too
