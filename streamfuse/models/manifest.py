"""The bundle manifest (``manifest.json``): format, validation, version ids. No torch.

Format ``streamfuse.bundle/1``::

    {"format": "streamfuse.bundle/1", "version": "b-…", "created_ms": 1700000000000,
     "classes": ["normal", …], "modalities": ["image", "audio", "series"],
     "configs": {"image": {ModalityConfig.to_dict(), incl. "version"}, …},
     "weights": {"image": {"sha256": "…", "bytes": 123}, …},
     "fusion": {"mode": "head", "version": "fusion-…", "modes": ["ume", "weighted", "head"],
                "config": {FusionConfig.to_dict()}, "trained_on": {"image": "image-…", …},
                "weights": {"sha256": "…", "bytes": 123, "tensors": {…}},
                "candidates": {"ume": {"val": {…}, "test": {…}, "encoders": "stage1"}, …}},
     "baselines": {"image": {"top1": 0.9, "macro_f1": 0.9, "n": 120}, …, "fused": {…}},
     "test": {same shape as baselines, or {}}, "training": {…}}

``baselines`` are validation metrics (what the monitor compares live KPIs with); each
unit's entry may carry a ``calibration`` (:class:`streamfuse.monitor.evidence.Calibration`
tables of that unit, from the validation split): the label-free accuracy estimate, the
sequential detectors' evidence and the ``quality`` fusion mode read it. It lives with
the baseline so that it travels with each unit through the registry.
``test`` are held-out metrics for reports. Weights live next to the manifest as
``<modality>.safetensors`` (and ``fusion.safetensors`` when there are learned fusion
modes); their sha256 is checked on load. A UME-only fusion is just
``{"mode": "ume", "version": "ume"}``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from streamfuse.errors import ModelError
from streamfuse.events import MODALITIES
from streamfuse.models.config import CALIBRATED_MODES, FUSION_MODES, ModalityConfig
from streamfuse.models.fusion import FusionConfig

FORMAT = "streamfuse.bundle/1"
MANIFEST = "manifest.json"
FUSION_FILE = "fusion.safetensors"
HOW_TO_FIX = "run `streamfuse train --data DIR --out MODELS` to create a bundle, or point the model directory at one"
REQUIRED = ("version", "created_ms", "classes", "modalities", "configs", "weights", "fusion", "baselines")


def weights_file(bundle_dir: Path, modality: str) -> Path:
    """Where a modality's weights live (fixed names: the manifest holds no paths)."""
    return bundle_dir / f"{modality}.safetensors"


def adapter_file(bundle_dir: Path, modality: str) -> Path:
    """Where a modality's MMLoRA adapter lives in a bundle."""
    return bundle_dir / f"lora_{modality}.safetensors"


def bundle_version(versions: Mapping[str, str], classes: Sequence[str]) -> str:
    """A content-derived bundle id: the same unit versions and classes give the same id.

    Examples:
        >>> bundle_version({"image": "image-1", "fusion": "ume"}, ["a", "b"])
        'b-1389633a0314'
    """
    blob = json.dumps({"versions": dict(sorted(versions.items())), "classes": list(classes)}, sort_keys=True)
    return "b-" + hashlib.sha256(blob.encode()).hexdigest()[:12]


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Read and validate a bundle's manifest without loading any weights.

    Args:
        path: the bundle directory.

    Returns:
        The manifest.

    Raises:
        ModelError: the directory or manifest is missing, unreadable or inconsistent;
            ``path`` on the error is the file or directory at fault.
    """
    path = Path(path)
    if not path.is_dir():
        raise ModelError(f"model bundle {path} does not exist; {HOW_TO_FIX}", path)
    file = path / MANIFEST
    if not file.is_file():
        raise ModelError(f"{file} is missing, so {path} is not a model bundle; {HOW_TO_FIX}", file)
    try:
        manifest = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"cannot read {file}: {exc}; {HOW_TO_FIX}", file) from None
    check_manifest(manifest, file)
    return manifest


def check_manifest(man: Any, where: Path) -> None:
    """Validate a manifest's structure and its internal consistency.

    Raises:
        ModelError: naming ``where`` and the first problem found.
    """

    def fail(msg: str) -> ModelError:
        return ModelError(f"{where}: {msg}; re-export the bundle or {HOW_TO_FIX}", where)

    if not isinstance(man, dict) or man.get("format") != FORMAT:
        raise fail(f"format must be {FORMAT!r}")
    for key in REQUIRED:
        if key not in man:
            raise fail(f"manifest field {key!r} is missing")
    if not isinstance(man["version"], str) or not man["version"] or not isinstance(man["created_ms"], int):
        raise fail("version must be a non-empty string and created_ms an integer (epoch ms)")
    mods, classes = man["modalities"], man["classes"]
    if not isinstance(mods, list) or not mods or len(set(mods)) != len(mods) or set(mods) - set(MODALITIES):
        raise fail(f"modalities {mods!r} must be distinct values of {list(MODALITIES)}")
    for key in ("configs", "weights"):
        if not isinstance(man[key], dict) or sorted(man[key]) != sorted(mods):
            have = sorted(man[key]) if isinstance(man[key], dict) else man[key]
            raise fail(f"{key} cover {have!r}, modalities are {mods}")
    for m in mods:
        try:
            cfg = ModalityConfig.from_dict(man["configs"][m])
        except ModelError as exc:
            raise fail(f"configs.{m}: {exc}") from None
        if cfg.modality != m or list(cfg.classes) != classes:
            raise fail(f"the {m} config does not match modality {m!r} and classes {classes}")
        if not isinstance(man["weights"][m], dict) or not isinstance(man["weights"][m].get("sha256"), str):
            raise fail(f"weights.{m}.sha256 is missing")
    fusion = man["fusion"]
    if not (isinstance(fusion, dict) and fusion.get("mode") in FUSION_MODES and isinstance(fusion.get("version"), str)):
        raise fail(f"fusion must be {{'mode': one of {list(FUSION_MODES)}, 'version': str}}")
    _check_fusion(fusion, mods, classes, fail)
    _check_adapters(man, mods, fail)
    for section in ("baselines", "test"):
        _check_scores(section, man.get(section) or {}, fail)
    if fusion["mode"] in CALIBRATED_MODES and not any(
            isinstance(v, dict) and v.get("calibration") for v in man["baselines"].values()):
        raise fail(f"fusion.mode {fusion['mode']!r} needs a calibration in the baselines; retrain the bundle")


def _check_scores(section: str, scores: Any, fail: Any) -> None:
    """``baselines`` / ``test``: per unit, Top-1 and macro-F1 in [0, 1], and optionally a
    calibration, a per-class recall in [0, 1] and a signal-spread range."""
    if not isinstance(scores, dict):
        raise fail(f"{section} must be a map")
    for unit, values in scores.items():
        ok = isinstance(values, dict) and all(
            isinstance(values.get(k), (int, float)) and 0 <= values[k] <= 1 for k in ("top1", "macro_f1")
        )
        if not ok:
            raise fail(f"{section}.{unit} needs top1 and macro_f1 in [0, 1]")
        if values.get("calibration") is not None:
            _check_calibration(unit, values["calibration"], fail)
        if values.get("spread") is not None:
            _check_spread(section, unit, values["spread"], fail)
        recall = values.get("recall")
        if recall is not None and not (isinstance(recall, dict) and all(
                isinstance(v, (int, float)) and 0 <= v <= 1 for v in recall.values())):
            raise fail(f"{section}.{unit}.recall must map each class to a value in [0, 1]")


def _check_calibration(unit: str, cal: Any, fail: Any) -> None:
    from streamfuse.errors import ConfigError
    from streamfuse.monitor.evidence import Calibration

    try:
        Calibration.from_dict({unit: cal})
    except (ConfigError, AttributeError) as exc:
        raise fail(f"baselines.{unit}.calibration: {exc}") from None


def _check_spread(section: str, unit: str, spread: Any, fail: Any) -> None:
    from streamfuse.errors import ConfigError
    from streamfuse.monitor.spread import SpreadRange

    try:
        SpreadRange.from_dict(spread)
    except ConfigError as exc:
        raise fail(f"{section}.{unit}.spread: {exc}") from None


def _check_fusion(fusion: dict[str, Any], mods: list[str], classes: list[str], fail: Any) -> None:
    modes = fusion.get("modes", ["ume"])
    if not isinstance(modes, list) or "ume" not in modes or set(modes) - set(FUSION_MODES):
        raise fail(f"fusion.modes {modes!r} must list 'ume' and other values of {list(FUSION_MODES)}")
    if fusion["mode"] not in modes and fusion["mode"] not in CALIBRATED_MODES:
        raise fail(f"fusion.mode {fusion['mode']!r} is not one of fusion.modes {modes}")
    if len(modes) == 1:
        return
    for key in ("config", "trained_on", "weights"):
        if not isinstance(fusion.get(key), dict):
            raise fail(f"fusion.{key} is missing (needed by the learned modes {modes[1:]})")
    try:
        cfg = FusionConfig.from_dict(fusion["config"])
    except ModelError as exc:
        raise fail(f"fusion.config: {exc}") from None
    if list(cfg.modalities) != mods or list(cfg.classes) != classes:
        raise fail(f"fusion.config modalities/classes do not match {mods} / {classes}")
    if not isinstance(fusion["weights"].get("sha256"), str):
        raise fail("fusion.weights.sha256 is missing")


def _check_adapters(man: dict[str, Any], mods: list[str], fail: Any) -> None:
    """``adapters`` (MMLoRA, optional): per modality, its version, base, rank, alpha, weights."""
    adapters = man.get("adapters")
    if adapters is None:
        return
    if not isinstance(adapters, dict) or set(adapters) - set(mods):
        raise fail(f"adapters must be a map over the modalities {mods}")
    for m, rec in adapters.items():
        ok = isinstance(rec, dict) and isinstance(rec.get("version"), str) and isinstance(rec.get("rank"), int) \
            and isinstance(rec.get("alpha"), (int, float)) and isinstance((rec.get("weights") or {}).get("sha256"), str)
        if not ok:
            raise fail(f"adapters.{m} needs version, rank, alpha and weights.sha256")
        if rec.get("base") != man["configs"][m].get("version") or rec.get("modality") != m:
            raise fail(f"adapters.{m} was trained on {rec.get('base')!r}, the bundle's {m} is "
                       f"{man['configs'][m].get('version')!r}")
