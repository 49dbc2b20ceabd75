"""A labelled dataset as the plant: row cycling, labels, every fault kind on recorded
readings of any size and level, and the bad inputs (each error names the row and the fix)."""

from __future__ import annotations

import io
import re
import wave
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from streamfuse.errors import ConfigError
from streamfuse.models.dataset import (BadFileError, DatasetError, EmptySplitError, MissingFileError,
                                       UnknownLabelError)
from streamfuse.readings import check_reading
from streamfuse.sim.dataset_plant import DatasetPlant, load_rows
from streamfuse.sim.faults import FAULT_KINDS
from streamfuse.sim.readings import reading_array

CLASSES = ("bearing", "normal")


def write_dataset(root: Path, n_test: int = 5, *, n_train: int = 2, label=None, image=None) -> Path:
    """Readings unlike the simulator's: 48x32 grey PNGs, 16 kHz stereo WAVs of a loud tone,
    (2, 64) series around 1000; ``label`` / ``image`` replace the first test row's."""
    rng = np.random.default_rng(0)
    for m in ("image", "audio", "series"):
        (root / m).mkdir(parents=True, exist_ok=True)
    lines = ["sample_id,split,label,image,audio,series"]
    for i in range(n_train + n_test):
        sid, split = f"r{i}", "train" if i < n_train else "test"
        lab = CLASSES[i % 2]
        Image.fromarray(rng.integers(0, 255, (32, 48), dtype=np.uint8), "L").save(root / "image" / f"{sid}.png")
        tone = 12000 * np.sin(np.arange(1600) / 16000 * 2 * np.pi * 440)
        with wave.open(str(root / "audio" / f"{sid}.wav"), "wb") as w:
            w.setnchannels(2)
            w.setsampwidth(2)
            w.setframerate(16000)
            w.writeframes(np.repeat(tone, 2).astype("<i2").tobytes())
        np.save(root / "series" / f"{sid}.npy", (1000 + 5 * rng.normal(size=(2, 64))).astype(np.float32))
        if i == n_train:
            lab = label or lab
            if image is not None:
                (root / "image" / f"{sid}.png").write_bytes(image)
        lines.append(f"{sid},{split},{lab},image/{sid}.png,audio/{sid}.wav,series/{sid}.npy")
    (root / "metadata.csv").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("ds"))


def test_rows_cycle_across_assets_once_per_pass(data):
    plant = DatasetPlant(data, assets=3, lines=2, seed=4)
    ids = [plant.row_at(i, seq).sample_id for seq in range(5) for i in range(3)]  # 15 draws = 3 passes of 5
    passes = [ids[k:k + 5] for k in (0, 5, 10)]
    assert all(sorted(p) == ["r2", "r3", "r4", "r5", "r6"] for p in passes)  # only the test split, each once
    assert len({tuple(p) for p in passes}) > 1  # every pass draws a new order
    again = DatasetPlant(data, assets=3, seed=4)
    assert [again.row_at(i, seq).sample_id for seq in range(5) for i in range(3)] == ids
    other = DatasetPlant(data, assets=3, seed=5)
    assert [other.row_at(i, seq).sample_id for seq in range(5) for i in range(3)] != ids


def test_samples_carry_the_rows_readings_and_labels(data):
    rows = load_rows(data)
    assert rows.classes == CLASSES and rows.split == "test" and len(rows.rows) == 5
    plant = DatasetPlant(rows, assets=3, lines=2, start_ms=1_000, run_id="u")
    sample, label = plant.sample(1, 4, 3_000)
    row = plant.row_at(1, 4)
    assert (sample.sample_id, sample.asset_id, sample.line_id, sample.ts_ms) == ("u-asset-1-4", "asset-1", "line-1",
                                                                                  3_000)
    assert (label.sample_id, label.asset_id, label.label, label.line_id) == ("u-asset-1-4", "asset-1", row.label,
                                                                             "line-1")
    assert sample.missing == ()
    for m, ev in sample.readings.items():
        assert ev.payload == row.readings[m].payload  # clean readings are the files' bytes
        assert (ev.event_id, ev.asset_id, ev.ts_ms, ev.line_id) == (f"u-asset-1-4-{m}", "asset-1", 3_000, "line-1")
    assert plant.period_ms == 500 and plant.asset_ids == ("asset-0", "asset-1", "asset-2")


@pytest.mark.parametrize("spec", [f"{m}:{k}" for m, kinds in FAULT_KINDS.items() for k in kinds])
def test_every_fault_kind_changes_only_its_reading_in_its_window(data, spec):
    modality, kind = spec.split(":")
    clean = DatasetPlant(data, assets=2, seed=1)
    plant = DatasetPlant(data, assets=2, seed=1, faults=(f"{spec}@1-2/asset-1",))
    for asset, t_ms, hit in ((1, 1_500, True), (1, 500, False), (1, 2_000, False), (0, 1_500, False)):
        got, want = plant.sample(asset, 3, t_ms)[0], clean.sample(asset, 3, t_ms)[0]
        others = [m for m in want.readings if m != modality]
        assert all(got.readings[m] == want.readings[m] for m in others)
        if not hit:
            assert got == want
        elif kind == "dropout":
            assert modality not in got.readings and got.missing == (modality,)
        else:
            ev, before = got.readings[modality], want.readings[modality]
            check_reading(ev)  # a valid reading the worker decodes
            assert ev.payload != before.payload and ev.encoding == before.encoding
            assert reading_array(ev).shape == reading_array(before).shape
            assert (ev.sample_rate, ev.channels, ev.shape) == (before.sample_rate, before.channels, before.shape)
    again = DatasetPlant(data, assets=2, seed=1, faults=(f"{spec}@1-2/asset-1",))
    assert again.sample(1, 3, 1_500) == plant.sample(1, 3, 1_500)  # seeded: reproducible


def _faulty(data, spec: str):
    clean = DatasetPlant(data, assets=1).sample(0, 0, 0)[0]
    faulty = DatasetPlant(data, assets=1, faults=(f"{spec}@0",)).sample(0, 0, 0)[0]
    m = spec.split(":")[0]
    return reading_array(clean.readings[m]).astype(np.float64), reading_array(faulty.readings[m]).astype(np.float64)


def test_faults_follow_the_recorded_readings_level(data):
    # series around 1000 with spread 5: stuck within the channel's range, not at the simulator's 0
    before, after = _faulty(data, "series:flatline")
    assert np.all(after == after[:, :1]) and np.all(np.abs(after[:, 0] - before.mean(axis=1)) < 3 * 5 / 0.43 * 1.1)
    before, after = _faulty(data, "series:noise")
    assert 1.5 * 5 / 0.43 * 0.7 < (after - before).std() < 3.0 * 5 / 0.43 * 1.3  # noise scaled to the spread
    # a loud tone (rms 8500): the simulator's absolute noise (std <= 0.35 * 32767) would leave
    # it audible (ratio <= 1.35); noise that follows the level drowns it (to the int16 rails)
    before, after = _faulty(data, "audio:noise")
    assert (after - before).std() / np.sqrt(np.mean(before ** 2)) > 2.5
    before, after = _faulty(data, "audio:mute")
    assert np.abs(after).max() < 10  # a disconnected microphone, whatever the level
    before, after = _faulty(data, "image:fog")
    assert after.std() < before.std() / 4 and after.mean() > 150  # grey 48x32 frame: washed out


def test_fault_on_a_modality_the_dataset_lacks_is_refused(tmp_path):
    root = write_dataset(tmp_path)
    meta = root / "metadata.csv"
    meta.write_text("\n".join(",".join(c for c in line.split(",")[:4]) for line in meta.read_text().splitlines()))
    with pytest.raises(ConfigError, match=r"audio:noise@3.*has no column.*\['image'\]"):
        DatasetPlant(root, faults=("audio:noise@3",))


def _png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize(("change", "error", "pattern"), [
    ("missing_file", MissingFileError, r"r2\.wav not found \(.*line 4, audio of 'r2'\).*fix the path"),
    ("bad_label", UnknownLabelError, r"line 4: label 'broken' of 'r2' \(test\) is not one of.*fix the label"),
    ("bad_image", BadFileError, r"line 4, image of 'r2'\) is not a valid image file.*replace the file"),
    ("truncated_image", BadFileError, r"line 4, image of 'r2'\) is not a valid image.*replace the file"),
    ("no_metadata", MissingFileError, r"metadata\.csv not found.*export-sim"),
    ("empty_split", EmptySplitError, r"the test split is empty; mark some rows split=test"),
    ("unknown_split", DatasetError, r"split 'holdout' does not exist; choose one of train, val, test"),
])
def test_bad_dataset_names_the_row_and_the_fix(tmp_path, change, error, pattern):
    kwargs = {"label": "broken"} if change == "bad_label" else {}
    if change in ("bad_image", "truncated_image"):
        kwargs["image"] = b"\x89PNG\r\n\x1a\n not an image" if change == "bad_image" else _png_bytes()[:40]
    root = write_dataset(tmp_path, n_test=0 if change == "empty_split" else 3, **kwargs)
    if change == "missing_file":
        (root / "audio" / "r2.wav").unlink()
    if change == "no_metadata":
        (root / "metadata.csv").unlink()
    with pytest.raises(error, match=pattern) as info:
        load_rows(root, "holdout" if change == "unknown_split" else "test")
    if change in ("missing_file", "bad_label", "bad_image", "truncated_image"):
        assert info.value.row == 4


def test_rows_outside_the_served_classes_and_oversize_readings_are_named(data):
    rows = load_rows(data)
    rows.check_classes(CLASSES, "the served models'")
    with pytest.raises(UnknownLabelError, match=r"line \d+: label 'normal' of 'r\d' \(test\) is not one of the "
                                                r"served models' classes \['bearing'\].*--models M"):
        rows.check_classes(["bearing"], "the served models'")
    with pytest.raises(DatasetError, match=r"line \d+: the \w+ reading of 'r\d' has \d+ bytes, over the pipeline's "
                                           r"limit of 100.*STREAMFUSE_MAX_PAYLOAD_BYTES"):
        load_rows(data, max_payload_bytes=100)


def test_other_splits_files_are_not_read(tmp_path):
    root = write_dataset(tmp_path)
    (root / "image" / "r0.png").unlink()  # a train row's file: not needed to stream the test split
    assert Counter(r.label for r in load_rows(root).rows) == Counter({"bearing": 3, "normal": 2})
    with pytest.raises(MissingFileError, match=re.escape("r0.png")):
        load_rows(root, "train")
