"""`streamfuse models import-unit`: a model trained elsewhere, validated before it is stored."""

from __future__ import annotations

import json
import uuid

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from streamfuse.cli import app
from streamfuse.config import Settings
from streamfuse.errors import ModelError
from streamfuse.models.bundle_io import write_weights
from streamfuse.models.config import default_config
from streamfuse.models.encoders import create_model
from streamfuse.models.preprocess import example_input
from streamfuse.models.registry import Registry

CLASSES = ["ok", "fault"]


@pytest.fixture
def registry(tmp_path):
    settings = Settings(model_dir=tmp_path / "models", redis_prefix=f"test-import-{uuid.uuid4().hex[:8]}:")
    reg = Registry(settings)
    yield reg
    for key in reg.redis.scan_iter(f"{settings.redis_prefix}*"):
        reg.redis.delete(key)


def _trained(tmp_path, arch="sf_series_cnn", channels=2, classes=CLASSES, name="w.safetensors"):
    """A 'model trained elsewhere': timm key layout (the net only), plus its preprocessing JSON."""
    torch.manual_seed(0)
    model = create_model(default_config("series", classes, arch=arch, in_channels=channels, series_len=64)).eval()
    weights = tmp_path / name
    save_file({k: v.contiguous() for k, v in model.net.state_dict().items()}, weights)
    pre = tmp_path / "pre.json"
    pre.write_text(json.dumps({"classes": classes, "in_channels": channels, "series_len": 64}))
    return model, weights, pre


def _nothing_written(registry):
    assert not (registry.root / "series").exists() or not any((registry.root / "series").iterdir())


def test_import_validates_stores_and_serves_the_same_outputs(tmp_path, registry):
    model, weights, pre = _trained(tmp_path)
    version = registry.import_unit("series", "sf_series_cnn", weights, pre, activate=True)
    assert registry.versions("series") == [version] and registry.active()["series"] == version
    loaded = registry.load_unit("series", version)
    x = example_input(loaded.module.sf_config)
    with torch.inference_mode():
        assert torch.equal(loaded.module(x), model(x))
    assert loaded.manifest["source"]["preprocessing"].endswith("pre.json")
    # the CLI says the same and exits 0
    res = CliRunner().invoke(app, ["models", "import-unit", "series", "--arch", "sf_series_cnn", "--weights",
                                   str(weights), "--preprocessing", str(pre)],
                             env={"STREAMFUSE_MODEL_DIR": str(registry.settings.model_dir)})
    assert res.exit_code == 0 and version in res.output, res.output


def test_a_pickle_passed_as_weights_is_refused_and_nothing_is_written(tmp_path, registry):
    model, _, pre = _trained(tmp_path)
    pickled = tmp_path / "model.safetensors"
    torch.save(model.net.state_dict(), pickled)  # a torch.save zip (holds a pickle), misnamed
    with pytest.raises(ModelError, match="pickles are never loaded") as err:
        registry.import_unit("series", "sf_series_cnn", pickled, pre)
    assert err.value.path == pickled and "safetensors.torch.save_file" in str(err.value)
    res = CliRunner().invoke(app, ["models", "import-unit", "series", "--arch", "sf_series_cnn", "--weights",
                                   str(pickled), "--preprocessing", str(pre)],
                             env={"STREAMFUSE_MODEL_DIR": str(registry.settings.model_dir)})
    assert res.exit_code == 2 and "model.safetensors" in res.output
    _nothing_written(registry)


def test_a_checkpoint_of_another_architecture_is_refused(tmp_path, registry):
    _, weights, pre = _trained(tmp_path, arch="sf_resnet1d_small")
    with pytest.raises(ModelError, match="is not a 'sf_series_cnn' checkpoint") as err:
        registry.import_unit("series", "sf_series_cnn", weights, pre)
    assert err.value.path == weights and "--arch" in str(err.value)
    _nothing_written(registry)


def test_a_wrong_class_count_is_refused(tmp_path, registry):
    _, weights, pre = _trained(tmp_path)
    pre.write_text(json.dumps({"classes": ["ok", "bearing", "gear"], "in_channels": 2, "series_len": 64}))
    with pytest.raises(ModelError, match="has a 2-class classifier .* lists 3 classes") as err:
        registry.import_unit("series", "sf_series_cnn", weights, pre)
    assert err.value.path == weights
    _nothing_written(registry)


def test_a_preprocessing_json_that_disagrees_with_the_weights_is_refused(tmp_path, registry):
    _, weights, pre = _trained(tmp_path)
    pre.write_text(json.dumps({"classes": CLASSES, "in_channels": 1, "series_len": 64}))  # weights: 2 channels
    with pytest.raises(ModelError, match="pre.json disagrees with .*w.safetensors") as err:
        registry.import_unit("series", "sf_series_cnn", weights, pre)
    assert err.value.path == pre and "fix the preprocessing JSON" in str(err.value)
    # a streamfuse-written file records its preprocessing: a different length is caught too
    model = create_model(default_config("series", CLASSES, in_channels=2, series_len=128))
    own = tmp_path / "own.safetensors"
    write_weights(own, model, {"config": json.dumps(model.sf_config.to_dict())})
    pre.write_text(json.dumps({"classes": CLASSES, "in_channels": 2, "series_len": 64}))
    with pytest.raises(ModelError, match="series_len 128 in the weights, 64 in the JSON"):
        registry.import_unit("series", "sf_series_cnn", own, pre)
    _nothing_written(registry)
