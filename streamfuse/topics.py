"""Topic names (from the configurable prefix), their specs, and idempotent creation.

All sensor topics and ``samples`` share one partition count so that an asset's data is
co-partitioned (key = asset_id). Command and alert topics have one partition so that
their order is total.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from streamfuse.config import Settings
from streamfuse.errors import BrokerError
from streamfuse.events import MODALITIES

log = logging.getLogger(__name__)

DAY_MS = 24 * 3600 * 1000


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    configs: dict[str, str] = field(default_factory=dict)
    purpose: str = ""


class Topics:
    """Names of every streamfuse topic under one prefix (``sf.`` or ``replay-<id>.``)."""

    def __init__(self, prefix: str = "sf.") -> None:
        self.prefix = prefix

    def sensor(self, modality: str) -> str:
        return f"{self.prefix}sensor.{modality}"

    @property
    def samples(self) -> str:
        return f"{self.prefix}samples"

    @property
    def predictions(self) -> str:
        return f"{self.prefix}predictions"

    @property
    def labels(self) -> str:
        return f"{self.prefix}labels"

    @property
    def kpis(self) -> str:
        return f"{self.prefix}kpis"

    @property
    def alerts(self) -> str:
        return f"{self.prefix}alerts"

    @property
    def control(self) -> str:
        return f"{self.prefix}control"

    @property
    def acks(self) -> str:
        return f"{self.prefix}control.acks"

    @property
    def deadletter(self) -> str:
        return f"{self.prefix}deadletter"

    def specs(self, partitions: int) -> list[TopicSpec]:
        """Every topic with its partition count and configs."""
        data = {"cleanup.policy": "delete", "retention.ms": str(DAY_MS)}
        week = {"cleanup.policy": "delete", "retention.ms": str(7 * DAY_MS)}
        out = [TopicSpec(self.sensor(m), partitions, data, f"raw {m} readings") for m in MODALITIES]
        out += [
            TopicSpec(self.samples, partitions, data, "synchronized samples"),
            TopicSpec(self.predictions, partitions, week, "fused + per-modality predictions"),
            TopicSpec(self.labels, partitions, week, "late ground truth"),
            # Latest snapshot per (scope, modality) is state: compact.
            TopicSpec(self.kpis, 1, {"cleanup.policy": "compact"}, "KPI snapshots"),
            # Latest status per alert fingerprint is state: compact.
            TopicSpec(self.alerts, 1, {"cleanup.policy": "compact"}, "firing/resolved alerts"),
            # The command log is the workers' desired state: keep it all, in order.
            TopicSpec(self.control, 1, {"cleanup.policy": "delete", "retention.ms": "-1"}, "commands"),
            TopicSpec(self.acks, 1, week, "command acknowledgements"),
            TopicSpec(self.deadletter, partitions, {"cleanup.policy": "delete", "retention.ms": str(14 * DAY_MS)},
                      "rejected inputs with reasons"),
        ]
        return out


def ensure_topics(settings: Settings, topics: Topics | None = None) -> list[str]:
    """Create every missing topic; existing ones are left alone (idempotent).

    Returns:
        The names created by this call.

    Raises:
        BrokerError: an existing topic has the wrong partition count (Kafka cannot
            shrink partitions and co-partitioning would break), or creation failed.
    """
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    from streamfuse.kafka import admin_config

    topics = topics or Topics(settings.topic_prefix)
    specs = topics.specs(settings.partitions)
    admin = KafkaAdminClient(**admin_config(settings))
    try:
        existing = partition_counts(admin, [s.name for s in specs])
        created = []
        for spec in specs:
            have = existing.get(spec.name)
            if have is None:
                try:
                    admin.create_topics(
                        [NewTopic(spec.name, spec.partitions, settings.replication_factor, topic_configs=spec.configs)]
                    )
                    created.append(spec.name)
                except TopicAlreadyExistsError:
                    pass  # created concurrently by another process: fine
            elif have != spec.partitions:
                raise BrokerError(
                    f"topic {spec.name} has {have} partitions, streamfuse expects {spec.partitions} "
                    f"(STREAMFUSE_PARTITIONS); delete and recreate it, or set the setting to match"
                )
        if created:
            log.info("created topics: %s", ", ".join(created))
        return created
    finally:
        admin.close()


def partition_counts(admin, names: list[str]) -> dict[str, int]:
    present = set(admin.list_topics())
    wanted = [n for n in names if n in present]
    if not wanted:
        return {}
    return {t.get("name", t.get("topic")): len(t["partitions"]) for t in admin.describe_topics(wanted)}


def list_topics(settings: Settings) -> dict[str, int]:
    """Every topic under the prefix with its partition count."""
    from kafka import KafkaAdminClient

    from streamfuse.kafka import admin_config

    admin = KafkaAdminClient(**admin_config(settings))
    try:
        names = [n for n in admin.list_topics() if n.startswith(settings.topic_prefix)]
        return dict(sorted(partition_counts(admin, names).items()))
    finally:
        admin.close()


def delete_topics(settings: Settings, monitor_topics: bool = False) -> list[str]:
    """Delete every topic under the prefix (and, with ``monitor_topics``, the monitor's own
    faust topics, named after its app id); returns their names. For tests, benchmarks and
    throw-away namespaces: the embedded broker keeps every record in memory."""
    from kafka import KafkaAdminClient

    from streamfuse.kafka import admin_config

    admin = KafkaAdminClient(**admin_config(settings))
    try:
        names = [n for n in admin.list_topics()
                 if n.startswith(settings.topic_prefix) or monitor_topics and settings.monitor.app_id in n]
        if names:
            admin.delete_topics(names)
        return names
    finally:
        admin.close()
