"""Real datasets shipped by installed packages, converted to the metadata.csv layout."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from streamfuse.models.dataset import DatasetError, load_dataset
from streamfuse.models.realdata import export_real, package_file, read_ts


def _have(dist: str, rel: str) -> bool:
    try:
        package_file(dist, rel, "")
    except DatasetError:
        return False
    return True


HAVE_AEON = _have("aeon", "datasets/data/GunPoint/GunPoint_TRAIN.ts")
HAVE_DIGITS = _have("sklearn", "datasets/data/digits.csv.gz") and shutil.which("espeak-ng") is not None


@pytest.mark.skipif(not HAVE_AEON, reason="aeon's data is not installed (pip install --no-deps aeon==1.6.0)")
def test_ucr_series_round_trip_with_the_archive_test_split_kept(tmp_path):
    meta = export_real("gunpoint", tmp_path / "gp", seed=3)
    ds = load_dataset(meta.parent, require=("train", "val", "test"))
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 38, "val": 12, "test": 150}
    x, y = read_ts(package_file("aeon", "datasets/data/GunPoint/GunPoint_TEST.ts", ""))
    sample, label = ds.split("test")[0]
    got = np.frombuffer(sample.readings["series"].payload, dtype="<f4")
    assert np.array_equal(got, x[0, 0]) and label.label == y[0]


@pytest.mark.skipif(not HAVE_DIGITS, reason="needs scikit-learn and espeak-ng")
def test_digits_pair_each_image_with_a_spoken_name_of_its_class(tmp_path):
    from streamfuse.models.realdata import export_digits

    meta = export_digits(tmp_path / "d", samples=50, seed=1)
    ds = load_dataset(meta.parent, require=("train", "val", "test"))
    assert ds.modalities == ("image", "audio") and len(ds.classes) == 10
    assert sum(len(v) for v in ds.splits.values()) == 50
    again = export_digits(tmp_path / "d2", samples=50, seed=1).parent
    assert (again / "metadata.csv").read_text() == (meta.parent / "metadata.csv").read_text()
    first = sorted((meta.parent / "audio").iterdir())[0]
    assert first.read_bytes() == (again / "audio" / first.name).read_bytes()  # seeded voices and noise


def test_unknown_dataset_and_non_empty_folder_are_refused(tmp_path):
    with pytest.raises(DatasetError, match="unknown real dataset 'mnist'; valid: digits"):
        export_real("mnist", tmp_path / "x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    if HAVE_AEON:
        with pytest.raises(DatasetError, match="not empty"):
            export_real("gunpoint", tmp_path / "full")
