"""Two-stage training on simulator data, through the CLI: quality, comparison, determinism.

One module-scoped run (400 simulated samples exported to a dataset folder, then
``train --compare``) takes about 10 s on one CPU thread; the other tests are small.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from streamfuse.errors import ModelError
from streamfuse.models.bundle_io import load_bundle
from streamfuse.models.cli import dataset_app, train
from streamfuse.models.dataset import load_dataset
from streamfuse.models.stage2 import Candidate, FusionOptions, choose
from streamfuse.models.train import TrainConfig, TrainOptions, train_bundle

app = typer.Typer()
app.command()(train)
app.add_typer(dataset_app, name="dataset")
CHANCE = 0.25  # four balanced classes
ONE = TrainOptions(threads=1)  # robust on a shared 2-core host


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path, str]:
    root = tmp_path_factory.mktemp("train")
    runner = CliRunner()
    res = runner.invoke(app, ["dataset", "export-sim", "--out", str(root / "data"), "--samples", "400", "--seed", "3"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["train", "--data", str(root / "data"), "--out", str(root / "m"), "--compare",
                              "--threads", "1", "--seed", "0", "--device", "cpu", "--preset", "fast", "--epochs", "8",
                              "--no-mmlora"],
                        terminal_width=120)
    assert res.exit_code == 0, (res.output, res.exception)
    return root / "data", root / "m", res.output


def test_every_modality_and_the_fusion_beat_chance_on_test(trained):
    _, out, _ = trained
    man = json.loads((out / "manifest.json").read_text())
    assert man["modalities"] == ["image", "audio", "series"]
    for unit in ("image", "audio", "series"):
        assert man["test"][unit]["macro_f1"] > CHANCE + 0.25, (unit, man["test"])
        assert man["baselines"][unit]["n"] == 60 and man["test"][unit]["n"] == 60
    assert man["test"]["fused"]["macro_f1"] > 0.85, man["test"]
    assert man["test"]["fused"]["macro_f1"] >= max(man["test"][m]["macro_f1"] for m in man["modalities"])
    # auto: every candidate's validation metrics recorded; the choice follows the rule
    cands = man["fusion"]["candidates"]
    assert set(cands) == {"ume", "weighted", "head", "quality"} and all("macro_f1" in c["val"] for c in cands.values())
    best = max(cands, key=lambda m: (cands[m]["val"]["macro_f1"], m == "ume"))
    assert man["fusion"]["mode"] == (best if cands[best]["val"]["macro_f1"] > cands["ume"]["val"]["macro_f1"]
                                     else "ume")
    fused_base = {k: v for k, v in man["baselines"]["fused"].items() if k != "calibration"}
    assert fused_base == cands[man["fusion"]["mode"]]["val"]
    # the validation calibration travels with every unit's baseline
    assert all(man["baselines"][u]["calibration"] for u in ("image", "audio", "series", "fused"))
    # ... and each modality's healthy signal-spread range, fitted on the validation readings
    for m in ("image", "audio", "series"):
        spread = man["baselines"][m]["spread"]
        assert spread["n"] == 60 and 0 <= spread["lo"] < spread["hi"] and 0 < spread["p_out"] < 0.1, (m, spread)
    b = load_bundle(out)
    assert b.fusion_modes == ("ume", "weighted", "head", "quality") and b.versions["fusion"].startswith("fusion-")


def test_compare_prints_and_saves_the_table(trained):
    _, out, output = trained
    report = json.loads((out / "compare.json").read_text())
    kinds = [r["kind"] for r in report["rows"]]
    assert kinds == ["stage1"] * 3 + ["probe"] * 3 + ["joint", "ume", "candidate", "candidate", "candidate", "chosen"]
    assert all(0 <= r["top1"] <= 1 and 0 <= r["macro_f1"] <= 1 and r["n"] == 60 for r in report["rows"])
    md = (out / "compare.md").read_text()
    assert "| joint fused (end to end) |" in md and "| image branch in joint (linear probe) |" in md
    for text in ("image alone (stage 1)", "joint fused", "UME (stage-1 models)", "chosen fusion", "bundle written"):
        assert text in output
    assert json.loads((out / "manifest.json").read_text())["compare"]["rows"] == report["rows"]


def test_cli_refuses_bad_input_with_exit_code_2(trained, tmp_path):
    data, out, _ = trained
    runner = CliRunner()
    res = runner.invoke(app, ["train", "--data", str(tmp_path), "--out", str(tmp_path / "m")])
    assert res.exit_code == 2 and "metadata.csv" in res.output
    res = runner.invoke(app, ["train", "--data", str(data), "--out", str(out)])
    assert res.exit_code == 2 and "already exists" in res.output
    res = runner.invoke(app, ["train", "--data", str(data), "--out", str(tmp_path / "m"), "--fusion", "magic"])
    assert res.exit_code == 2 and "auto" in res.output
    res = runner.invoke(app, ["train", "--data", str(data), "--out", str(tmp_path / "m"), "-m", "video"])
    assert res.exit_code == 2 and "video" in res.output


@pytest.fixture(scope="module")
def small(trained):
    ds = load_dataset(trained[0], modalities=["audio", "series"])
    return ds.split("train")[:160], ds.split("val"), ds.split("test")


def test_same_seed_same_versions_and_ume_only_bundles(small, tmp_path):
    kw = dict(epochs=2, seed=4, device="cpu", options=ONE, created_ms=1, fusion_options=FusionOptions(epochs=3))
    a = train_bundle(*small, tmp_path / "a", TrainConfig(fusion="auto", **kw))
    b = train_bundle(*small, tmp_path / "b", TrainConfig(fusion="auto", **kw))
    assert a["version"] == b["version"] and a["fusion"]["version"] == b["fusion"]["version"]
    u = train_bundle(*small, tmp_path / "u", TrainConfig(fusion="ume", **kw))
    assert u["fusion"]["mode"] == u["fusion"]["version"] == "ume" and set(u["fusion"]["candidates"]) == {"ume"}
    assert not (tmp_path / "u" / "fusion.safetensors").exists() and load_bundle(tmp_path / "u").fusion_modes == ("ume", "quality")
    assert u["configs"] == a["configs"]  # stage 1 does not depend on the fusion asked for
    w = train_bundle(*small, tmp_path / "w", TrainConfig(fusion="weighted", **kw))
    assert w["fusion"]["mode"] == "weighted" and load_bundle(tmp_path / "w").fusion_modes == ("ume", "weighted", "quality")


def test_uni_modal_teacher_fine_tunes_the_encoders(small, tmp_path):
    kw = dict(epochs=2, seed=4, device="cpu", options=ONE, fusion="head")
    frozen = train_bundle(*small, tmp_path / "f", TrainConfig(fusion_options=FusionOptions(epochs=3), **kw))
    umt = train_bundle(*small, tmp_path / "t",
                       TrainConfig(umt_weight=1.0, fusion_options=FusionOptions(umt_epochs=2), **kw))
    assert umt["fusion"]["candidates"]["head"]["encoders"] == "umt" and umt["fusion"]["umt_weight"] == 1.0
    assert frozen["fusion"]["candidates"]["head"]["encoders"] == "stage1"
    for m in ("audio", "series"):  # new weights, new versions; the fusion was trained on exactly these
        assert umt["configs"][m]["version"] != frozen["configs"][m]["version"]
        assert umt["fusion"]["trained_on"][m] == umt["configs"][m]["version"]
    assert umt["training"]["stage1"] == frozen["training"]["stage1"]  # the teachers
    b = load_bundle(tmp_path / "t")
    assert b.fusion_mode == "head" and b.fusion_modes == ("ume", "head", "quality")
    assert umt["test"]["fused"]["macro_f1"] > CHANCE + 0.25
    with pytest.raises(ModelError, match="umt-weight"):
        train_bundle(*small, tmp_path / "x", TrainConfig(umt_weight=-1.0, **kw))


def test_auto_keeps_ume_unless_strictly_beaten():
    def cand(mode: str, f1: float) -> Candidate:
        return Candidate(mode, None, None, {"top1": f1, "macro_f1": f1, "n": 10}, {})

    assert choose([cand("ume", 0.9), cand("weighted", 0.9), cand("head", 0.85)], "auto").mode == "ume"
    assert choose([cand("ume", 0.9), cand("weighted", 0.91), cand("head", 0.95)], "auto").mode == "head"
    assert choose([cand("ume", 0.9), cand("weighted", 0.91), cand("head", 0.95)], "auto", 0.06).mode == "ume"
    assert choose([cand("ume", 0.9), cand("weighted", 0.95), cand("head", 0.95)], "auto", 0.02).mode == "weighted"
    assert choose([cand("ume", 0.9), cand("weighted", 0.5)], "weighted").mode == "weighted"
    with pytest.raises(ModelError, match="not trained"):
        choose([cand("ume", 0.9)], "head")
    with pytest.raises(ModelError, match="auto"):
        choose([cand("ume", 0.9)], "best")


def test_training_uses_the_device_it_is_given(small, tmp_path):
    man = train_bundle(small[0][:40], small[1][:20], None, tmp_path / "d",
                       TrainConfig(epochs=1, device="cpu", options=ONE))
    assert man["training"]["device"] == "cpu" and man["test"] == {}
    if torch.cuda.is_available():  # bf16 autocast path; only where a GPU exists
        man = train_bundle(small[0][:40], small[1][:20], None, tmp_path / "g", TrainConfig(epochs=1, device="cuda"))
        assert man["training"]["device"].startswith("cuda")


def test_a_bundle_with_a_bad_spread_range_does_not_load(trained, tmp_path):
    _, out, _ = trained
    shutil.copytree(out, tmp_path / "b")
    man = json.loads((tmp_path / "b" / "manifest.json").read_text())
    man["baselines"]["image"]["spread"] = {"lo": 3.0, "hi": 1.0, "p_out": 0.01, "n": 10}
    (tmp_path / "b" / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ModelError, match=r"baselines\.image\.spread: .*0 <= lo < hi.*retrain the bundle"):
        load_bundle(tmp_path / "b")
