"""MMLoRA: adapters on frozen stage-1 encoders, trained with the fusion, served as their own units."""

from __future__ import annotations

import uuid

import pytest
import torch

from streamfuse.config import Settings
from streamfuse.models.bundle_io import load_bundle
from streamfuse.models.lora import adapter_unit, attach, detach, merged
from streamfuse.models.config import default_config
from streamfuse.models.encoders import create_model
from streamfuse.models.mmlora import MMLoRAOptions
from streamfuse.models.preprocess import example_input
from streamfuse.models.stage2 import FusionOptions
from streamfuse.models.train import TrainConfig, TrainOptions, train_bundle
from streamfuse.models.registry import Registry

from test_models import dataset  # noqa: E402  (tests/unit is on sys.path under pytest)

MODS = ("audio", "series")


def test_merged_adapter_equals_the_parametrized_model_and_the_base_is_untouched():
    torch.manual_seed(0)
    base = create_model(default_config("series", ["a", "b"], series_len=32)).eval()
    base.set_version("series-base")
    student = create_model(base.sf_config)
    student.load_state_dict(base.state_dict())
    student.eval()
    params = attach(student, rank=2, alpha=4.0)
    frozen = [p for n, p in student.named_parameters() if "lora_" not in n]
    assert all(p.requires_grad for p in params) and frozen and not any(p.requires_grad for p in frozen)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * 0.1)  # as if trained
    adapter = detach(student, 2, 4.0)
    x = example_input(base.sf_config)
    served = merged(base, adapter)
    with torch.inference_mode():
        torch.testing.assert_close(served(x), student(x), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(served(x), base(x))
    assert adapter.version.startswith("lora_series-") and adapter.base == "series-base"


@pytest.fixture(scope="module")
def mmlora_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("mm") / "b"
    train, val, test = dataset(40, 1, MODS), dataset(20, 2, MODS), dataset(12, 3, MODS)
    config = TrainConfig(epochs=2, seed=0, device="cpu", fusion="mmlora", options=TrainOptions(batch_size=8, threads=1),
                         fusion_options=FusionOptions(epochs=2), mmlora_options=MMLoRAOptions(epochs=2, min_steps=2))
    man = train_bundle(train, val, test, out, config)
    return out, man


def test_mmlora_bundle_serves_adapted_encoders_and_the_mmlora_head(mmlora_bundle):
    out, man = mmlora_bundle
    assert man["fusion"]["mode"] == "mmlora" and set(man["adapters"]) == set(MODS)
    assert man["fusion"]["candidates"]["mmlora"]["encoders"] == "mmlora"
    assert man["fusion"]["trained_on"][adapter_unit("audio")] == man["adapters"]["audio"]["version"]
    b = load_bundle(out)
    assert b.fusion_mode == "mmlora" and b.versions[adapter_unit("series")] == man["adapters"]["series"]["version"]
    assert b.baselines["series"] == man["adapters"]["series"]["baseline"]  # the adapted model is what is served
    samples = [s.readings for s, _ in dataset(6, 9, MODS)]
    fused = b.predict(samples).probs
    assert fused.shape == (6, 4) and torch.allclose(fused.sum(-1), torch.ones(6))
    # the served series model is the base with its adapter merged, not the base
    x = example_input(b.configs["series"])
    with torch.inference_mode():
        assert not torch.allclose(b.models["series"](x), b.base_models["series"](x))


def test_adapters_are_registry_units_with_their_own_rollback(mmlora_bundle, tmp_path):
    out, man = mmlora_bundle
    settings = Settings(model_dir=tmp_path / "models", redis_prefix=f"test-mmlora_{uuid.uuid4().hex[:8]}:")
    reg = Registry(settings)
    try:
        units = reg.import_bundle(out)
        assert units[adapter_unit("audio")] == man["adapters"]["audio"]["version"]
        live = reg.load_active()
        assert live.fusion_mode == "mmlora" and live.units[-1] == "fusion"
        loaded = reg.load_unit(adapter_unit("audio"), units[adapter_unit("audio")])
        # a swap of the adapter goes through with_unit like any unit; a base the adapter was not
        # trained on is served without it, and the mmlora head falls back to UME
        swapped = live.with_unit(adapter_unit("audio"), loaded)
        assert swapped.versions == live.versions and swapped.models["series"] is live.models["series"]
        other = reg.load_unit("audio", units["audio"])
        assert live.with_unit("audio", other).fusion_mode == "mmlora"
        want = man["adapters"]["audio"]["baseline"]
        assert reg.baselines()["audio"] == {k: want[k] for k in ("top1", "macro_f1")}
    finally:
        for key in reg.redis.scan_iter(f"{settings.redis_prefix}*"):
            reg.redis.delete(key)
