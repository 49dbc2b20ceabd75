"""Model units on disk: ``<root>/<unit>/<version>/unit.json`` (+ ``weights.safetensors``).

A unit is one modality's model or the fusion step. Its directory holds a JSON manifest
(format ``streamfuse.unit/1``: unit, version, classes, config, validation ``baseline``,
``test`` metrics, the weights' sha256 and tensor shapes, where it came from) and its
weights as safetensors. Versions are content ids (digests of the weights), so writing a
unit that exists is a no-op. Loading reads only these two files and refuses anything
else: a pickle, a truncated file, shapes that differ from the manifest, a modified file.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from streamfuse.errors import ModelError
from streamfuse.events import MODALITIES
from streamfuse.models.bundle import LoadedUnit
from streamfuse.models.bundle_io import build_fusion, build_sensor_model, read_weights
from streamfuse.models.config import CALIBRATED_MODES, ModalityConfig
from streamfuse.models.fusion import FusionUnit
from streamfuse.models.lora import Adapter, adapter_unit
from streamfuse.models.manifest import FUSION_FILE, adapter_file, file_sha256, read_manifest, weights_file
from streamfuse.models.runtime import resolve_device
from streamfuse.models.safefile import inspect_safetensors

__all__ = ["UNIT_FORMAT", "UNIT_MANIFEST", "UNIT_WEIGHTS", "bundle_units", "load_unit_dir", "read_unit_manifest",
           "write_unit"]
UNIT_FORMAT = "streamfuse.unit/1"
UNIT_MANIFEST = "unit.json"
UNIT_WEIGHTS = "weights.safetensors"
UNITS = (*MODALITIES, *(f"lora_{m}" for m in MODALITIES), "fusion")  # lora_*: MMLoRA adapters
_FIX = "re-import the bundle it came from with `streamfuse models import BUNDLE`"


def _scores(section: Mapping[str, Any], unit: str) -> dict[str, Any]:
    return dict(section.get(unit) or {})


def _weights_entry(file: Path, entry: Mapping[str, Any]) -> dict[str, Any]:
    tensors = entry.get("tensors") or inspect_safetensors(file)
    return {"file": UNIT_WEIGHTS, "sha256": entry["sha256"], "bytes": file.stat().st_size, "tensors": tensors}


def bundle_units(bundle_dir: Path) -> list[tuple[dict[str, Any], Path | None]]:
    """The unit manifests of a bundle and each one's weights file (None for UME only)."""
    man = read_manifest(bundle_dir)
    source = {"bundle": man["version"], "path": str(Path(bundle_dir).resolve()), "created_ms": man["created_ms"]}
    common = {"format": UNIT_FORMAT, "classes": man["classes"], "created_ms": man["created_ms"], "source": source}
    out: list[tuple[dict[str, Any], Path | None]] = []
    for m in man["modalities"]:
        file = weights_file(bundle_dir, m)
        cfg = man["configs"][m]
        out.append(({**common, "unit": m, "kind": "modality", "version": cfg["version"], "config": cfg,
                     "baseline": _scores(man["baselines"], m), "test": _scores(man.get("test") or {}, m),
                     "weights": _weights_entry(file, man["weights"][m])}, file))
    for m, rec in (man.get("adapters") or {}).items():
        file = adapter_file(bundle_dir, m)
        out.append(({**common, "unit": adapter_unit(m), "kind": "adapter", "version": rec["version"],
                     "adapter": {k: rec[k] for k in ("modality", "base", "rank", "alpha")},
                     "baseline": dict(rec.get("baseline") or {}), "test": dict(rec.get("test") or {}),
                     "weights": _weights_entry(file, rec["weights"])}, file))
    fusion = {k: v for k, v in man["fusion"].items() if k != "weights"}
    file = bundle_dir / FUSION_FILE if "weights" in man["fusion"] else None
    weights = _weights_entry(file, man["fusion"]["weights"]) if file is not None else None
    out.append(({**common, "unit": "fusion", "kind": "fusion", "version": fusion["version"], "fusion": fusion,
                 "modalities": man["modalities"], "baseline": _scores(man["baselines"], "fused"),
                 "test": _scores(man.get("test") or {}, "fused"), "weights": weights}, file))
    return out


def write_unit(root: Path, manifest: Mapping[str, Any], weights: Path | None) -> Path:
    """Store a unit under ``root/<unit>/<version>`` (atomically). A version that exists with
    the same weights keeps them and takes this manifest (the same weights retrained or
    recalibrated: their validation baseline, calibration and spread range are the newest).

    Raises:
        ModelError: the version exists with other weights (a corrupted store).
    """
    final = Path(root) / manifest["unit"] / manifest["version"]
    if (final / UNIT_MANIFEST).is_file():
        have = read_unit_manifest(final)
        if (have.get("weights") or {}).get("sha256") != (manifest.get("weights") or {}).get("sha256"):
            raise ModelError(f"{final} holds other weights under the same version id; remove it and {_FIX}", final)
        if have != dict(manifest):
            tmp = final / f".{UNIT_MANIFEST}.tmp-{os.getpid()}"
            tmp.write_text(_manifest_json(manifest))
            os.replace(tmp, final / UNIT_MANIFEST)
        return final
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if weights is not None:
            shutil.copyfile(weights, tmp / UNIT_WEIGHTS)
            if file_sha256(tmp / UNIT_WEIGHTS) != manifest["weights"]["sha256"]:
                raise ModelError(f"{weights} changed while it was copied, or does not match its manifest; {_FIX}",
                                 weights)
        (tmp / UNIT_MANIFEST).write_text(_manifest_json(manifest))
        shutil.rmtree(final, ignore_errors=True)  # a half-written leftover without unit.json
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _manifest_json(manifest: Mapping[str, Any]) -> str:
    return json.dumps(dict(manifest), indent=2, sort_keys=True, allow_nan=False) + "\n"


def read_unit_manifest(path: Path) -> dict[str, Any]:
    """Read and check ``path/unit.json`` (JSON only).

    Raises:
        ModelError: missing, not JSON, or missing fields; naming the file.
    """
    file = Path(path) / UNIT_MANIFEST
    if not file.is_file():
        others = sorted(p.name for p in Path(path).iterdir()) if Path(path).is_dir() else []
        raise ModelError(f"{file} is missing (found {others}); units load only from unit.json + "
                         f"{UNIT_WEIGHTS}; {_FIX}", file)
    try:
        man = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{file} is not a JSON unit manifest ({exc}); {_FIX}", file) from None
    if not isinstance(man, dict) or man.get("format") != UNIT_FORMAT:
        raise ModelError(f"{file}: format must be {UNIT_FORMAT!r}; {_FIX}", file)
    for key in ("unit", "version", "classes", "baseline"):
        if key not in man:
            raise ModelError(f"{file}: field {key!r} is missing; {_FIX}", file)
    if man["unit"] not in UNITS:
        raise ModelError(f"{file}: unit {man['unit']!r} is not one of {list(UNITS)}", file)
    weights = man.get("weights")
    if weights is not None and (not isinstance(weights, dict) or weights.get("file") != UNIT_WEIGHTS):
        raise ModelError(f"{file}: weights.file must be {UNIT_WEIGHTS!r}; {_FIX}", file)
    return man


def load_unit_dir(path: Path, device: str | torch.device = "cpu") -> LoadedUnit:
    """Load one unit (a modality's model on ``device``, or the fusion on the CPU).

    Raises:
        ModelError: the manifest or weights are missing, a pickle, truncated, modified,
            or do not match each other; the error names the file and the problem.
    """
    path = Path(path)
    man = read_unit_manifest(path)
    where, unit, version = path / UNIT_MANIFEST, man["unit"], man["version"]
    file = path / UNIT_WEIGHTS
    state = read_weights(file, man["weights"], where) if man.get("weights") is not None else None
    if unit == "fusion":
        section = man.get("fusion") or {}
        if state is None:  # UME, or a calibrated mode without weights ("quality")
            module = FusionUnit(None, section.get("mode") if section.get("mode") in CALIBRATED_MODES else "ume",
                                version, {})
        else:
            try:
                module = build_fusion({**section, "version": version}, state, file)
            except KeyError as exc:
                raise ModelError(f"{where}: fusion.{exc.args[0]} is missing; {_FIX}", where) from None
        return LoadedUnit(unit, version, module, man["baseline"], man)
    if state is None:
        raise ModelError(f"{where}: a {unit} unit needs weights; {_FIX}", where)
    if unit.startswith("lora_"):
        rec = man.get("adapter") or {}
        try:
            adapter = Adapter(rec["modality"], rec["base"], int(rec["rank"]), float(rec["alpha"]), state).with_version()
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"{where}: adapter.{exc} is missing or invalid; {_FIX}", where) from None
        if adapter.version != version or adapter_unit(adapter.modality) != unit:
            raise ModelError(f"{where}: its weights are not adapter {unit} {version}; {_FIX}", where)
        return LoadedUnit(unit, version, adapter, man["baseline"], man)
    cfg = ModalityConfig.from_dict(man.get("config") or {})
    if cfg.modality != unit or cfg.version != version or list(cfg.classes) != list(man["classes"]):
        raise ModelError(f"{where}: its config ({cfg.modality}, {cfg.version}) does not match unit {unit} "
                         f"version {version}; {_FIX}", where)
    model = build_sensor_model(cfg, state, file).to(resolve_device(device))
    return LoadedUnit(unit, version, model, man["baseline"], man)

