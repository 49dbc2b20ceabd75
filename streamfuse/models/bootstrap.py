"""Models to serve at start-up: the demo bundle (trained on simulator data at first run)
and a model registry with active versions."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from streamfuse.config import Settings

log = logging.getLogger(__name__)

DEMO_TRAIN, DEMO_VAL, DEMO_TEST = 800, 240, 240


def ensure_demo_bundle(settings: Settings, console=None, epochs: int = 6,
                       sizes: tuple[int, int, int] = (DEMO_TRAIN, DEMO_VAL, DEMO_TEST)) -> Path:
    """The demo bundle at ``settings.bundle_dir``, trained on simulator data if absent.

    The models are produced by the project's own training code (stage 1 per modality,
    UME fusion) on clean simulated data, so they are meaningful, not random.
    """
    from streamfuse.models.bundle import MANIFEST

    out = settings.bundle_dir
    if (out / MANIFEST).is_file():
        return out
    from streamfuse.models.stage2 import FusionOptions
    from streamfuse.models.train import TrainConfig, train_bundle
    from streamfuse.sim.plant import Plant, PlantConfig

    say = console.print if console is not None else log.info
    plant = Plant(PlantConfig(seed=settings.sim.seed), run_id="train")
    n_train, n_val, n_test = sizes
    t0 = time.monotonic()
    say(f"training the demo bundle on {n_train} simulated samples (first run only) ...")
    config = TrainConfig(epochs=epochs, seed=settings.sim.seed, device=settings.worker.device,
                         # quality-aware: a fogged camera counts little before any mask
                         fusion="quality", fusion_options=FusionOptions(min_gain=0.01))
    manifest = train_bundle(plant.dataset(n_train, seed=1), plant.dataset(n_val, seed=2),
                            plant.dataset(n_test, seed=3), out, config)
    base = ", ".join(f"{m} {v['top1']:.2f}" for m, v in manifest["baselines"].items())
    say(f"demo bundle ready in {time.monotonic() - t0:.0f} s at {out} (validation top-1: {base})")
    return out


def ensure_models(settings: Settings, console=None, *, fresh: bool = False):
    """The model registry, with active versions: imports ``settings.bundle_dir`` when the
    registry has none, or always with ``fresh`` (training the demo bundle first when the
    bundle is ``demo``).

    Raises:
        ModelError: nothing is active and there is no bundle to import.
    """
    from streamfuse.errors import ModelError
    from streamfuse.models.registry import Registry

    registry = Registry(settings)
    if registry.active() and not fresh:
        return registry
    if settings.bundle == "demo":
        ensure_demo_bundle(settings, console)
    if not (settings.bundle_dir / "manifest.json").is_file():
        raise ModelError(f"the model registry has no active versions and there is no bundle at "
                         f"{settings.bundle_dir}: run `streamfuse train --data DIR --out MODELS` and "
                         "`streamfuse models import MODELS`", settings.bundle_dir)
    registry.import_bundle(settings.bundle_dir, actor="startup")
    return registry
