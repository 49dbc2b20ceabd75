"""The model registry: unit versions on disk, active versions and history in Redis.

Units are each modality's model and the fusion step. Their versions live under
``<model_dir>/units/<unit>/<version>/`` (``unit.json`` + ``weights.safetensors``, see
:mod:`streamfuse.models.units`); which version of each unit is active, the versions
active before it (for rollback) and an audit history live in Redis:

- ``<prefix>registry:active``            hash   unit -> active version
- ``<prefix>registry:previous:<unit>``   list   versions active before, newest last
- ``<prefix>registry:history:<unit>``    list   JSON entries, oldest first
- ``<prefix>registry:changes``           pub/sub channel, one JSON message per switch

A switch verifies that the version loads before it happens, and is one Redis
transaction (WATCH/MULTI), so concurrent switches cannot interleave.
"""

from __future__ import annotations

import json
from pathlib import Path
from collections.abc import Mapping
from typing import Any

from streamfuse.clock import now_ms
from streamfuse.config import Settings
from streamfuse.errors import StreamfuseError
from streamfuse.events import MODALITIES

__all__ = ["UNITS", "Registry", "RegistryError"]
UNITS: tuple[str, ...] = (*MODALITIES, *(f"lora_{m}" for m in MODALITIES), "fusion")  # lora_*: MMLoRA adapters
KEEP_HISTORY = 1000


class RegistryError(StreamfuseError):
    """A registry operation cannot be done (unknown unit or version, nothing to roll back to)."""

    def __init__(self, message: str, unit: str | None = None, version: str | None = None) -> None:
        super().__init__(message)
        self.unit = unit
        self.version = version


class Registry:
    """Model versions per unit, the active one, and how it got there.

    Args:
        settings: ``model_dir`` (versions on disk), ``redis_url`` / ``redis_prefix``.
        client: a Redis client; default: :func:`streamfuse.store.connect` on first use.
    """

    def __init__(self, settings: Settings, client: Any = None) -> None:
        self.settings = settings
        self.root = Path(settings.model_dir) / "units"
        self.prefix = f"{settings.redis_prefix}registry:"
        self._client = client

    @property
    def redis(self) -> Any:
        if self._client is None:
            from streamfuse.store import connect

            self._client = connect(self.settings)
        return self._client

    def _key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    @staticmethod
    def _check_unit(unit: str) -> None:
        if unit not in UNITS:
            raise RegistryError(f"unknown unit {unit!r}; units are {list(UNITS)}", unit)

    # ------------------------------------------------------------------ versions on disk

    def import_bundle(self, path: str | Path, activate: bool = True, actor: str = "cli") -> dict[str, str]:
        """Store every unit of a bundle (idempotent) and, by default, activate them.

        The bundle is loaded first (every file checked), so nothing is stored from a
        broken one.

        Returns:
            unit -> version.

        Raises:
            ModelError: the bundle does not load (the error names the file).
        """
        from streamfuse.models.bundle_io import load_bundle
        from streamfuse.models.units import bundle_units, write_unit

        load_bundle(path, "cpu")
        units = bundle_units(Path(path))
        out = {}
        for man, weights in units:
            write_unit(self.root, man, weights)
            out[man["unit"]] = man["version"]
        if activate:
            reason = f"import of bundle {units[0][0]['source']['bundle']}"
            for unit, version in out.items():  # classes are checked against units outside this bundle only
                self._activate(unit, version, reason, actor, ignore=set(out))
        return out

    def import_unit(self, modality: str, arch: str, weights: str | Path, preprocessing: str | Path,
                    data: str | Path | None = None, activate: bool = False, actor: str = "cli") -> str:
        """Store a model trained elsewhere as a version of ``modality`` (validated first;
        see :mod:`streamfuse.models.importer`) and optionally activate it.

        Returns:
            The new version.

        Raises:
            ModelError: a check failed (nothing was written); RegistryError: activation refused.
        """
        from streamfuse.models.importer import import_unit

        man = import_unit(self.root, modality, arch, weights, preprocessing, data)
        if activate:
            self._activate(modality, man["version"], f"import-unit {Path(weights).name}", actor, ignore={modality})
        return man["version"]

    def versions(self, unit: str) -> list[str]:
        """Versions of ``unit`` on disk, oldest first (by creation time, then id)."""
        from streamfuse.models.units import UNIT_MANIFEST

        self._check_unit(unit)
        found = []
        for d in (self.root / unit).glob(f"*/{UNIT_MANIFEST}"):
            if d.parent.name.startswith("."):
                continue  # a unit being written (write_unit renames it into place when complete)
            try:
                created = json.loads(d.read_text()).get("created_ms", 0)
            except (OSError, ValueError):
                created = 0  # listed anyway; loading it will say what is wrong
            found.append((created, d.parent.name))
        return [v for _, v in sorted(found)]

    def manifest(self, unit: str, version: str) -> dict[str, Any]:
        """The unit manifest of one version.

        Raises:
            RegistryError: no such version; ModelError: its manifest is unreadable.
        """
        from streamfuse.models.units import read_unit_manifest

        return read_unit_manifest(self._dir(unit, version))

    def _dir(self, unit: str, version: str) -> Path:
        self._check_unit(unit)
        path = self.root / unit / version
        if "/" in version or version.startswith(".") or not path.is_dir():
            have = self.versions(unit)
            raise RegistryError(f"{unit} has no version {version!r} under {self.root / unit}; versions: {have}; "
                                "import a bundle with `streamfuse models import PATH`", unit, version)
        return path

    def load_unit(self, unit: str, version: str, device: Any = "cpu") -> Any:
        """Load one unit version, for :meth:`Bundle.with_unit <streamfuse.models.bundle.Bundle.with_unit>`.

        Returns:
            A :class:`~streamfuse.models.bundle.LoadedUnit`.

        Raises:
            RegistryError: no such version. ModelError: it does not load (pickle,
                truncated, shapes differ from its manifest, modified); names the file.
        """
        from streamfuse.models.units import load_unit_dir

        return load_unit_dir(self._dir(unit, version), device)

    # ------------------------------------------------------------------ active versions

    def active(self) -> dict[str, str]:
        """unit -> active version (units never activated are absent)."""
        raw = self.redis.hgetall(self._key("active"))
        return {k.decode(): v.decode() for k, v in sorted(raw.items())}

    def history(self, unit: str) -> list[dict[str, Any]]:
        """Every switch of ``unit``, oldest first: ts_ms, action, version, previous, reason, actor."""
        self._check_unit(unit)
        return [json.loads(x) for x in self.redis.lrange(self._key("history", unit), 0, -1)]

    def activate(self, unit: str, version: str, reason: str = "", actor: str = "cli") -> None:
        """Make ``version`` the active one of ``unit`` (after checking it loads).

        A no-op (no history entry) when it is already active.

        Raises:
            RegistryError: unknown unit or version, or other classes than the other
                active units. ModelError: the version does not load.
        """
        self._activate(unit, version, reason, actor, ignore={unit})

    def _activate(self, unit: str, version: str, reason: str, actor: str, ignore: set[str]) -> None:
        loaded = self.load_unit(unit, version, "cpu")
        self._check_classes(unit, loaded.manifest["classes"], ignore)
        self._switch(unit, lambda current, previous: version, "activate", reason, actor)

    def rollback(self, unit: str, reason: str = "", actor: str = "cli") -> str:
        """Re-activate the version that was active before the current one.

        Returns:
            The version now active.

        Raises:
            RegistryError: nothing to roll back to. ModelError: that version no longer loads.
        """
        def target(current: str | None, previous: str | None) -> str:
            if previous is None:
                raise RegistryError(f"{unit} has no previous version to roll back to (active: {current}); "
                                    f"activate one explicitly: `streamfuse models activate {unit} VERSION` "
                                    f"(versions: {self.versions(unit)})", unit, current)
            self.load_unit(unit, previous, "cpu")
            return previous

        return self._switch(unit, target, "rollback", reason, actor)

    def _switch(self, unit: str, target: Any, action: str, reason: str, actor: str) -> str:
        from redis.exceptions import WatchError

        self._check_unit(unit)
        active, stack, hist = self._key("active"), self._key("previous", unit), self._key("history", unit)
        while True:
            with self.redis.pipeline() as pipe:
                try:
                    pipe.watch(active, stack)
                    cur = pipe.hget(active, unit)
                    cur = cur.decode() if cur is not None else None
                    prev = pipe.lindex(stack, -1)
                    version = target(cur, prev.decode() if prev is not None else None)
                    if version == cur:
                        pipe.unwatch()
                        return version
                    entry = {"ts_ms": now_ms(), "unit": unit, "action": action, "version": version,
                             "previous": cur, "reason": reason, "actor": actor}
                    pipe.multi()
                    pipe.hset(active, unit, version)
                    if action == "rollback":
                        pipe.rpop(stack)
                    elif cur is not None:
                        pipe.rpush(stack, cur)
                        pipe.ltrim(stack, -KEEP_HISTORY, -1)
                    pipe.rpush(hist, json.dumps(entry))
                    pipe.ltrim(hist, -KEEP_HISTORY, -1)
                    pipe.publish(self._key("changes"), json.dumps(entry))
                    pipe.execute()
                    return version
                except WatchError:
                    continue  # another switch won the race; decide again on the new state

    def _check_classes(self, unit: str, classes: list[str], ignore: set[str]) -> None:
        for other, version in self.active().items():
            if other in ignore:
                continue
            have = self.manifest(other, version)["classes"]
            if list(have) != list(classes):
                raise RegistryError(f"{unit} has classes {classes}, but active {other} {version} has {have}; "
                                    "activate units trained on the same classes", unit)

    def baselines(self) -> dict[str, dict[str, float]]:
        """Validation Top-1 / macro-F1 (and ``calibration``, ``recall`` and ``spread`` where the
        unit has them) of the active versions: modality -> scores, plus ``"fused"``."""
        return self.baselines_of(self.active())

    def baselines_of(self, versions: Mapping[str, str]) -> dict[str, dict[str, float]]:
        """:meth:`baselines` of the given unit versions (as a prediction reports what served it)."""
        out = {}
        active = dict(versions)
        for unit, version in sorted(active.items(), key=lambda kv: kv[0].startswith("lora_")):
            man = self.manifest(unit, version)
            base = man.get("baseline") or {}
            if unit.startswith("lora_"):  # an adapter serves its modality only on the base it was trained on
                modality = unit.removeprefix("lora_")
                if (man.get("adapter") or {}).get("base") != active.get(modality):
                    continue
                unit = modality
            if "top1" in base and "macro_f1" in base:
                out["fused" if unit == "fusion" else unit] = {"top1": base["top1"], "macro_f1": base["macro_f1"]}
                for extra in ("calibration", "recall", "spread"):  # label-free evidence; per-class accuracy
                    if base.get(extra):
                        out["fused" if unit == "fusion" else unit][extra] = base[extra]
        return out

    def load_active(self, device: Any = "cpu") -> Any:
        """Assemble a :class:`~streamfuse.models.bundle.Bundle` from the active versions.

        Raises:
            RegistryError: no modality is active, or the active units disagree on classes.
            ModelError: an active version does not load.
        """
        from streamfuse.models.bundle import Bundle
        from streamfuse.models.fusion import FusionUnit
        from streamfuse.models.manifest import FORMAT, bundle_version
        from streamfuse.models.runtime import resolve_device

        dev = resolve_device(device)
        active = self.active()
        mods = [m for m in MODALITIES if m in active]
        if not mods:
            raise RegistryError(f"no active models in the registry at {self.root} (Redis prefix {self.prefix!r}); "
                                "import a bundle with `streamfuse models import PATH`")
        loaded = {m: self.load_unit(m, active[m], dev) for m in mods}
        fusion = self.load_unit("fusion", active["fusion"], dev) if "fusion" in active else None
        classes = list(loaded[mods[0]].manifest["classes"])
        for u in [*loaded.values(), *([fusion] if fusion else [])]:
            if list(u.manifest["classes"]) != classes:
                raise RegistryError(f"active {u.unit} {u.version} has classes {u.manifest['classes']}, "
                                    f"{mods[0]} has {classes}; activate matching versions", u.unit)
        adapters = {m: self.load_unit(f"lora_{m}", active[f"lora_{m}"]) for m in mods if f"lora_{m}" in active}
        unit = fusion.module if fusion else FusionUnit.ume_only()
        versions = {m: active[m] for m in mods} | {"fusion": unit.version}
        manifest = {
            "format": FORMAT, "version": bundle_version(versions, classes), "created_ms": now_ms(),
            "classes": classes, "modalities": mods,
            "configs": {m: u.manifest["config"] for m, u in loaded.items()},
            "weights": {m: u.manifest["weights"] for m, u in loaded.items()},
            "fusion": fusion.manifest.get("fusion", {"mode": "ume", "version": "ume"}) if fusion else
            {"mode": "ume", "version": "ume"},
            "baselines": {m: u.baseline for m, u in loaded.items()} | ({"fused": fusion.baseline} if fusion else {}),
            "test": {m: u.manifest.get("test", {}) for m, u in loaded.items()},
            "source": "registry",
        }
        manifest["adapters"] = {m: {**a.module.config(), "version": a.version, "baseline": a.baseline}
                                for m, a in adapters.items()}
        return Bundle(self.root, manifest, {m: u.module for m, u in loaded.items()}, dev, unit,
                      {m: a.module for m, a in adapters.items()})
