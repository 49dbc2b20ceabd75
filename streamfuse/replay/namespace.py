"""A replay's namespace: its own topic prefix, Redis prefix, consumer groups, monitor app
id and model registry pointers, and how to remove them afterwards.

A replay never touches the live namespace: the prefix must differ from the live one (and
neither may be a prefix of the other, so deleting ``replay-<id>.*`` can never match a
live topic), and it must be unused when the replay starts.
"""

from __future__ import annotations

import logging
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streamfuse.config import MonitorSettings, Settings
from streamfuse.replay.errors import ReplayError

log = logging.getLogger(__name__)
_LEGAL = re.compile(r"^[A-Za-z0-9._-]+$")


def namespace_prefix(name: str | None) -> str:
    """The topic prefix for a namespace name: ``replay-<random>.`` by default.

    Examples:
        >>> namespace_prefix("replay-ab12"), namespace_prefix("bt.")
        ('replay-ab12.', 'bt.')
    """
    if name is None:
        return f"replay-{uuid.uuid4().hex[:8]}."
    if not name or not _LEGAL.match(name):
        raise ReplayError(f"namespace {name!r} is not a valid topic prefix: use letters, digits, '.', '_' "
                          "and '-' only, e.g. replay-monday", name)
    return name if name.endswith(".") else name + "."


def check_isolated(live: Settings, prefix: str) -> None:
    """Refuse a namespace that is, contains or is contained in the live prefix.

    Raises:
        ReplayError: saying which prefix collides and how to choose another.

    Examples:
        >>> check_isolated(Settings(topic_prefix="sf."), "replay-1.")
        >>> check_isolated(Settings(topic_prefix="sf."), "sf.")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        streamfuse.replay.errors.ReplayError: replay namespace 'sf.' overlaps the live topic prefix 'sf.' ...
    """
    live_prefix = live.topic_prefix
    if prefix.startswith(live_prefix) or live_prefix.startswith(prefix):
        raise ReplayError(f"replay namespace {prefix!r} overlaps the live topic prefix {live_prefix!r} (a replay "
                          "must never publish into or delete live topics); choose another --namespace, e.g. "
                          "replay-test", prefix)


def policy_overrides(base: MonitorSettings, overrides: dict[str, Any] | None) -> MonitorSettings:
    """``base`` with ``overrides`` applied and validated.

    Raises:
        ReplayError: an unknown field (the message lists the valid ones) or a bad value.
    """
    if not overrides:
        return base
    data = dict(overrides.get("monitor", overrides))  # a [monitor] table or the fields themselves
    unknown = sorted(set(data) - set(MonitorSettings.model_fields))
    if unknown:
        raise ReplayError(f"unknown monitor setting(s) {unknown} in the policy; valid: "
                          f"{', '.join(sorted(MonitorSettings.model_fields))}")
    from pydantic import ValidationError

    try:
        return MonitorSettings.model_validate({**base.model_dump(), **data})
    except ValidationError as exc:
        raise ReplayError(f"bad policy value: {exc}") from None


@dataclass
class Namespace:
    """The replay's effective settings and what it created."""

    prefix: str
    settings: Settings
    live: Settings

    @property
    def faust_dir(self) -> Path:
        return Path(self.settings.model_dir).parent / "faust" / self.settings.monitor.app_id

    def existing_topics(self) -> list[str]:
        from kafka import KafkaAdminClient

        from streamfuse.kafka import admin_config

        admin = KafkaAdminClient(**admin_config(self.settings))
        try:
            return sorted(n for n in admin.list_topics() if n.startswith(self.prefix))
        finally:
            admin.close()

    def delete(self) -> list[str]:
        """Delete the namespace's topics, consumer groups, Redis keys and the monitor's local data."""
        from kafka import KafkaAdminClient
        from kafka.errors import KafkaError

        from streamfuse.kafka import admin_config
        from streamfuse.store import StatusStore, connect

        names = self.existing_topics()
        groups = [self.settings.worker.group, self.settings.monitor.app_id, f"{self.prefix}sync.sync"]
        admin = KafkaAdminClient(**admin_config(self.settings))
        try:
            if names:
                admin.delete_topics(names)
            try:
                admin.delete_groups(groups)
            except KafkaError as exc:  # groups expire on their own; the topics are what matters
                log.info("consumer groups %s of replay %s not deleted: %s", groups, self.prefix, exc)
        finally:
            admin.close()
        StatusStore(connect(self.settings), self.settings.redis_prefix).clear()
        shutil.rmtree(self.faust_dir, ignore_errors=True)
        return names


def drop_namespace(live: Settings, name: str) -> list[str]:
    """Delete a kept replay namespace (``replay(..., keep=True)``): its topics, Redis keys
    and monitor data. Returns the topics deleted.

    Raises:
        ReplayError: the name overlaps the live prefix.
    """
    prefix = namespace_prefix(name)
    check_isolated(live, prefix)
    return Namespace(prefix, _settings_for(live, prefix, live.monitor), live).delete()


def _settings_for(live: Settings, prefix: str, monitor: MonitorSettings, **update: Any) -> Settings:
    """The live settings moved into the namespace: topics, Redis keys, groups, app id, no
    metrics ports (the live processes hold those)."""
    return live.model_copy(update={
        "topic_prefix": prefix,
        "redis_prefix": f"streamfuse-replay:{prefix.rstrip('.')}:",
        "worker": live.worker.model_copy(update={"group": f"{prefix}workers", "metrics_port": 0}),
        "monitor": monitor.model_copy(update={"app_id": f"{prefix}monitor", "metrics_port": 0}),
        **update})


def make_namespace(live: Settings, name: str | None, partitions: int, policy: dict[str, Any] | None = None,
                   rate_hz: float | None = None) -> Namespace:
    """Settings for a replay beside ``live``.

    Args:
        live: the live settings (bootstrap, Redis, model directory are shared).
        name: the namespace (topic prefix); default ``replay-<random>.``.
        partitions: the recording's partition count (records keep their partitions).
        policy: monitor setting overrides (:func:`policy_overrides`).
        rate_hz: the recorded plant's sample rate (the synchronizer's period).

    Raises:
        ReplayError: the namespace overlaps the live prefix, or is in use already.
    """
    prefix = namespace_prefix(name)
    check_isolated(live, prefix)
    update: dict[str, Any] = {"partitions": partitions}
    if rate_hz is not None:
        update["sim"] = live.sim.model_copy(update={"rate_hz": rate_hz})
    settings = _settings_for(live, prefix, policy_overrides(live.monitor, policy), **update)
    if settings.redis_prefix == live.redis_prefix:
        raise ReplayError(f"the replay's Redis prefix equals the live one ({live.redis_prefix!r}); "
                          "choose another --namespace", prefix)
    ns = Namespace(prefix, settings, live)
    used = ns.existing_topics()
    if used:
        raise ReplayError(f"namespace {prefix!r} is in use ({len(used)} topics, e.g. {used[0]}): another replay "
                          "runs there or one was kept; choose another --namespace, or delete those topics",
                          prefix)
    return ns


def setup_models(ns: Namespace, models: dict[str, str] | None = None, bundle: str | Path | None = None
                 ) -> dict[str, str]:
    """Point the namespace's registry at the live active versions, then at ``bundle``'s
    units and at ``models`` (unit -> version). Versions on disk are shared.

    Returns:
        unit -> the version the replay serves.

    Raises:
        RegistryError: an unknown unit or version. ModelError: a version does not load.
    """
    from streamfuse.models.bootstrap import ensure_models
    from streamfuse.models.registry import UNITS, Registry

    reg = Registry(ns.settings)
    live = Registry(ns.live).active()
    if live:
        for unit in UNITS:  # fusion last: its classes are checked against the modalities'
            if unit in live:
                reg.activate(unit, live[unit], reason="replay: the live version", actor="replay")
    else:
        ensure_models(ns.settings)
    if bundle is not None:
        reg.import_bundle(bundle, actor="replay")
    for unit, version in (models or {}).items():
        reg.activate(unit, version, reason="replay --models", actor="replay")
    return reg.active()
