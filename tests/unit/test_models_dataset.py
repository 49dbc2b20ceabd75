"""The dataset folder format: export-sim round trip and every error it reports."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from streamfuse.errors import StreamfuseError
from streamfuse.models.cli import dataset_app
from streamfuse.models.dataset import (
    BadColumnsError, BadFileError, DatasetError, EmptySplitError, MissingFileError, UnknownLabelError, export_sim,
    load_dataset,
)
from streamfuse.sim.plant import CLASSES, Plant, PlantConfig


@pytest.fixture(scope="module")
def sim(tmp_path_factory) -> Path:
    return export_sim(tmp_path_factory.mktemp("ds") / "sim", 20, seed=2).parent


def test_export_sim_then_load_round_trips_every_reading(sim):
    ds = load_dataset(sim)
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 14, "val": 3, "test": 3}
    assert ds.classes == tuple(sorted(CLASSES)) and ds.modalities == ("image", "audio", "series")
    plant = Plant(PlantConfig(seed=2), run_id="sim")
    for k, split in enumerate(("train", "val", "test")):
        want = plant.dataset(len(ds.split(split)), seed=2 * 3 + k)
        for (sample, label), (ws, wl) in zip(ds.split(split), want):
            assert sample.sample_id == ws.sample_id and label.label == wl.label
            for m in ("image", "audio", "series"):
                got, exp = sample.readings[m], ws.readings[m]
                assert got.payload == exp.payload, m  # byte-identical
                assert (got.sample_rate, got.channels) == (exp.sample_rate, exp.channels)
    only = load_dataset(sim, modalities=["series"])
    assert only.modalities == ("series",) and set(only.split("val")[0][0].readings) == {"series"}
    with pytest.raises(DatasetError, match="not empty"):
        export_sim(sim, 20)


def test_export_sim_cli(tmp_path):
    app = typer.Typer()
    app.add_typer(dataset_app, name="dataset")
    res = CliRunner().invoke(app, ["dataset", "export-sim", "--out", str(tmp_path / "d"), "--samples", "8"])
    assert res.exit_code == 0 and "wrote 8 samples" in res.output
    assert len(load_dataset(tmp_path / "d").split("train")) == 6
    res = CliRunner().invoke(app, ["dataset", "export-sim", "--out", str(tmp_path / "e"), "--samples", "2"])
    assert res.exit_code == 2 and "empty split" in res.output


def write(root: Path, rows: list[str], header: str = "sample_id,split,label,image,audio,series") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "metadata.csv").write_text("\n".join([header, *rows]) + "\n")
    return root


def test_missing_and_partial_readings(sim, tmp_path):
    import shutil

    root = tmp_path / "d"
    shutil.copytree(sim, root)
    lines = (root / "metadata.csv").read_text().splitlines()
    first = lines[1].split(",")
    lines[1] = ",".join([*first[:4], "", first[5]])  # no audio for the first sample
    (root / "metadata.csv").write_text("\n".join(lines) + "\n")
    sample, _ = load_dataset(root).split("train")[0]
    assert sorted(sample.readings) == ["image", "series"] and sample.missing == ("audio",)
    (root / first[5]).unlink()
    with pytest.raises(MissingFileError, match="line 2") as err:
        load_dataset(root)
    assert err.value.path == (root / first[5]).resolve() and err.value.row == 2


@pytest.mark.parametrize("header, rows, error, match", [
    ("sample_id,split,image", [], BadColumnsError, "missing \\['label'\\]"),
    ("sample_id,split,label,video", [], BadColumnsError, "unknown \\['video'\\]"),
    ("sample_id,split,label,image,image", [], BadColumnsError, "repeated"),
    ("sample_id,split,label", ["a,train,x"], BadColumnsError, "no modality column"),
    (None, ["a,train,x,,,", "a,val,x,,,"], BadFileError, "repeated"),
    (None, ["a,train,x,,,", "b,holdout,x,,,"], BadFileError, "holdout"),
    (None, ["a,train,x,,,", "b,val,x,,"], BadColumnsError, "5 cells for 6 columns"),
    (None, ["a,train,x,,,", "b,val,y,,,"], UnknownLabelError, "'y'.*classes \\['x'\\]"),
    (None, ["a,train,,,,"], UnknownLabelError, "empty"),
    (None, ["a,train,x,,,"], EmptySplitError, "val split is empty"),
    (None, ["a,train,x,../../etc/passwd.png,,", "b,val,x,,,"], BadFileError, "inside"),
    (None, ["a,train,x,img.gif,,", "b,val,x,,,"], BadFileError, "must end in"),
    (None, ["a,train,x,img.png,,", "b,val,x,,,"], MissingFileError, "img.png not found"),
])
def test_dataset_errors_name_the_problem(tmp_path, header, rows, error, match):
    root = write(tmp_path / "d", rows, header or "sample_id,split,label,image,audio,series")
    with pytest.raises(error, match=match) as err:
        load_dataset(root)
    assert isinstance(err.value, StreamfuseError) and err.value.path is not None


def test_bad_files_are_refused_with_their_path(tmp_path):
    root = write(tmp_path / "d", ["a,train,x,,a.wav,", "b,val,x,,,s.npy"])
    with wave.open(str(root / "a.wav"), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(1)  # 8-bit: not PCM16
        w.setframerate(8000)
        w.writeframes(b"\x80" * 100)
    with pytest.raises(BadFileError, match="16-bit PCM") as err:
        load_dataset(root)
    assert err.value.path == (root / "a.wav").resolve()
    with wave.open(str(root / "a.wav"), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(np.zeros(200, "<i2").tobytes())
    np.save(root / "s.npy", np.array([{"pickled": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(BadFileError, match="s.npy.*not a valid series file"):
        load_dataset(root)
    np.save(root / "s.npy", np.array([1.0, np.nan]))
    with pytest.raises(BadFileError, match="NaN"):
        load_dataset(root)
    np.save(root / "s.npy", np.ones((2, 8)))
    ds = load_dataset(root)
    assert ds.split("train")[0][0].readings["audio"].channels == 2
    assert ds.split("val")[0][0].readings["series"].shape == (2, 8)
    (root / "i.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    write(root, ["a,train,x,i.png,,", "b,val,x,,,"])
    with pytest.raises(BadFileError, match="i.png.*image"):
        load_dataset(root)
    (root / "metadata.csv").unlink()
    with pytest.raises(MissingFileError, match="metadata.csv not found"):
        load_dataset(root)


def test_classes_can_be_given_and_test_can_be_required(tmp_path):
    root = write(tmp_path / "d", ["a,train,x,", "b,val,y,"], "sample_id,split,label,series")
    assert load_dataset(root, classes=["x", "y"]).classes == ("x", "y")
    with pytest.raises(EmptySplitError, match="test split"):
        load_dataset(root, classes=["x", "y"], require=("train", "val", "test"))

