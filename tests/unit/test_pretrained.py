"""Pretrained weights, offline: pretrain on one dataset, fine-tune on another (--weights)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from streamfuse.errors import ModelError
from streamfuse.events import Label, Sample, SensorEvent
from streamfuse.models.config import default_config
from streamfuse.models.encoders import create_model, read_checkpoint
from streamfuse.models.train import TrainConfig, TrainOptions, train_bundle

OPTS = TrainOptions(threads=1, batch_size=8, patience=10)


def tones(freqs, n, seed, noise):
    """Series whose class is the frequency of a tone (random phase and amplitude) in noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(128) / 128
    pairs = []
    for i in range(n):
        k = i % len(freqs)
        x = rng.uniform(0.5, 1.5) * np.sin(2 * np.pi * (freqs[k] * t + rng.uniform())) + rng.normal(0, noise, 128)
        ev = SensorEvent(f"e{seed}-{i}", "a", "series", i, x.astype("<f4").tobytes(), shape=(128,))
        pairs.append((Sample(f"s{seed}-{i}", "a", i, {"series": ev}), Label(f"s{seed}-{i}", "a", i, f"f{freqs[k]}")))
    return pairs


def test_fine_tuning_a_pretrained_checkpoint_beats_from_scratch_at_equal_epochs(tmp_path):
    # pretrain: 8 tone frequencies, plenty of data
    source = [3, 5, 7, 9, 11, 13, 15, 17]
    train_bundle(tones(source, 320, 1, 0.3), tones(source, 64, 2, 0.3), None, tmp_path / "pre",
                 TrainConfig(epochs=6, seed=0, device="cpu", options=OPTS))
    checkpoint = tmp_path / "pre" / "series.safetensors"  # a streamfuse weights file is a checkpoint too
    # target: 3 other frequencies, 12 noisy training samples, 3 epochs either way
    target = [4, 8, 12]
    data = tones(target, 12, 3, 0.8), tones(target, 60, 4, 0.8), tones(target, 90, 5, 0.8)
    kw = dict(epochs=3, seed=0, device="cpu", options=OPTS)
    scratch = train_bundle(*data, tmp_path / "scratch", TrainConfig(**kw))
    tuned = train_bundle(*data, tmp_path / "tuned", TrainConfig(weights={"series": checkpoint}, **kw))
    assert tuned["training"]["modalities"]["series"]["pretrained"] == str(checkpoint)
    f1_tuned, f1_scratch = tuned["test"]["series"]["macro_f1"], scratch["test"]["series"]["macro_f1"]
    assert f1_tuned > f1_scratch + 0.1, (f1_tuned, f1_scratch)


def test_weights_only_torch_checkpoints_load_and_pickled_objects_do_not(tmp_path):
    torch.manual_seed(0)
    donor = create_model(default_config("series", ["a", "b", "c"], series_len=32))
    pth = tmp_path / "torchvision_style.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in donor.net.state_dict().items()}}, pth)
    model = create_model(default_config("series", ["x", "y"], series_len=32), weights=pth)  # classifier dropped
    assert torch.equal(model.net.features[1].weight, donor.net.features[1].weight)
    evil = tmp_path / "evil.pt"
    torch.save({"weights": donor.net.state_dict(), "hook": Label("s", "a", 0, "x")}, evil)  # an arbitrary object
    with pytest.raises(ModelError, match="only safetensors or weights-only state dicts load") as err:
        read_checkpoint(evil)
    assert err.value.path == evil
    with pytest.raises(ModelError, match="weights given for \\['image'\\]"):
        train_bundle(tones([3, 5], 8, 1, 0.1), tones([3, 5], 4, 2, 0.1), None, tmp_path / "x",
                     TrainConfig(epochs=1, device="cpu", options=OPTS, weights={"image": pth}))
