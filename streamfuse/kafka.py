"""Where the code meets the broker: client settings chosen with the broker.

Every Kafka client in streamfuse is configured here: kafka-python for the control plane
and the tools, faust (aiokafka) for the monitor, and librdkafka (confluent-kafka) for the
inference worker's data path, whose fetching, parsing and producing run in C threads
that do not take Python's GIL from the models (see :mod:`streamfuse.inference.feeder`).
The embedded test broker (Tansu) differs from Apache Kafka in ways measured on it (the
README's broker section lists them); each workaround is a field of
:class:`BrokerProfile`, picked once by ``Settings.broker_kind`` — never scattered
through the code:

* end offsets are wrong when producers batch → one record per batch;
* kafka-python's idempotent producer never recovers after a broker restart → off;
* consumer groups join after half the session timeout → short session timeout;
* a fetch waiting for data is answered only when its wait is over, not when data arrives
  → short fetch waits (every replay step and every worker pick-up paid a full 500 ms).

Real Kafka keeps normal batching, idempotence and session timeouts.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from streamfuse.config import Settings

log = logging.getLogger(__name__)
RD_LOG = logging.getLogger("streamfuse.rdkafka")  # librdkafka's own messages, into our logs

MAX_MESSAGE_BYTES = 8 * 1024 * 1024
# Fetch sizes: Kafka's own default per partition. A record batch larger than this is still
# returned whole (so MAX_MESSAGE_BYTES records get through), while small fetches keep
# kafka-python from assembling huge responses: consuming 18 KB samples ran at 2.0k msg/s
# with 8 MiB / 32 MiB fetches and 8.3k msg/s with 1 MiB / 4 MiB (kafka-python against the embedded broker).
FETCH_PARTITION_BYTES = 1024 * 1024
FETCH_MAX_BYTES = 4 * FETCH_PARTITION_BYTES


@dataclass(frozen=True)
class BrokerProfile:
    """Client settings that depend on which broker is on the other end."""

    name: str
    one_record_per_batch: bool
    idempotent_producer: bool
    session_timeout_ms: int
    heartbeat_interval_ms: int
    fetch_max_wait_ms: int | None  # None: each client's default (a real broker answers when data arrives)


PROFILES = {
    "kafka": BrokerProfile("kafka", False, True, 45_000, 3_000, None),
    "tansu": BrokerProfile("tansu", True, False, 2_000, 500, 20),
}


def profile(settings: Settings) -> BrokerProfile:
    return PROFILES[settings.broker_kind]


# Each security setting under its kafka-python and its librdkafka name.
_SECURITY_NAMES = {
    "protocol": ("security_protocol", "security.protocol"),
    "sasl_mechanism": ("sasl_mechanism", "sasl.mechanism"),
    "sasl_username": ("sasl_plain_username", "sasl.username"),
    "sasl_password": ("sasl_plain_password", "sasl.password"),
    "ssl_cafile": ("ssl_cafile", "ssl.ca.location"),
    "ssl_certfile": ("ssl_certfile", "ssl.certificate.location"),
    "ssl_keyfile": ("ssl_keyfile", "ssl.key.location"),
}


def _security(settings: Settings, rdkafka: bool = False) -> dict[str, Any]:
    """TLS / SASL settings under kafka-python's names (or librdkafka's)."""
    sec = settings.kafka_security
    values: dict[str, Any] = {"protocol": sec.protocol}
    if sec.sasl_mechanism:
        values.update(sasl_mechanism=sec.sasl_mechanism, sasl_username=sec.sasl_username)
        if sec.sasl_password is not None:
            values["sasl_password"] = sec.sasl_password.get_secret_value()
    for key in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
        if getattr(sec, key) is not None:
            values[key] = str(getattr(sec, key))
    return {_SECURITY_NAMES[k][rdkafka]: v for k, v in values.items()}


def ssl_context(settings: Settings):
    """The client TLS context of the security settings (the CA to trust, and the client
    certificate when set), or None for a protocol without TLS. aiokafka (faust) takes TLS
    only as a context, not as file names."""
    import ssl

    from streamfuse.errors import ConfigError

    sec = settings.kafka_security
    if sec.protocol not in ("SSL", "SASL_SSL"):
        return None
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                         cafile=str(sec.ssl_cafile) if sec.ssl_cafile else None)
        if sec.ssl_certfile is not None:
            ctx.load_cert_chain(str(sec.ssl_certfile), str(sec.ssl_keyfile) if sec.ssl_keyfile else None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"Kafka TLS files do not load ({exc}); check STREAMFUSE_KAFKA_SECURITY__SSL_CAFILE, "
                          "__SSL_CERTFILE and __SSL_KEYFILE") from None
    return ctx


def faust_credentials(settings: Settings):
    """faust's ``broker_credentials`` for the security settings (None for PLAINTEXT): the
    same protocol, SASL mechanism, user, password and TLS files as every other client."""
    import faust

    sec = settings.kafka_security
    if sec.protocol == "PLAINTEXT":
        return None
    ctx = ssl_context(settings)
    if sec.protocol == "SSL":
        return faust.SSLCredentials(ctx)
    password = sec.sasl_password.get_secret_value() if sec.sasl_password is not None else None
    return faust.SASLCredentials(username=sec.sasl_username, password=password, ssl_context=ctx,
                                 mechanism=sec.sasl_mechanism or "PLAIN")


def bootstrap(settings: Settings) -> str:
    from streamfuse.errors import ConfigError

    if not settings.kafka_bootstrap:
        raise ConfigError(
            "no Kafka bootstrap address: set STREAMFUSE_KAFKA_BOOTSTRAP=host:9092, "
            "or run `streamfuse broker` / `streamfuse demo`, which start the embedded broker"
        )
    return settings.kafka_bootstrap


def producer_config(settings: Settings, client_id: str = "streamfuse") -> dict[str, Any]:
    """kafka-python ``KafkaProducer`` keyword arguments."""
    p = profile(settings)
    cfg: dict[str, Any] = {
        "bootstrap_servers": bootstrap(settings),
        "client_id": client_id,
        "acks": "all",
        "max_request_size": MAX_MESSAGE_BYTES,
        "enable_idempotence": p.idempotent_producer,
        "batch_size": 0 if p.one_record_per_batch else 64 * 1024,
        "linger_ms": 0 if p.one_record_per_batch else 5,
        "retries": 5,
    }
    cfg.update(_security(settings))
    return cfg


def consumer_config(
    settings: Settings, group: str | None, client_id: str = "streamfuse", **overrides: Any
) -> dict[str, Any]:
    """kafka-python ``KafkaConsumer`` keyword arguments (manual commits when in a group)."""
    p = profile(settings)
    cfg: dict[str, Any] = {
        "bootstrap_servers": bootstrap(settings),
        "client_id": client_id,
        "group_id": group,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "fetch_max_bytes": FETCH_MAX_BYTES,
        "max_partition_fetch_bytes": FETCH_PARTITION_BYTES,
        "session_timeout_ms": p.session_timeout_ms,
        "heartbeat_interval_ms": p.heartbeat_interval_ms,
    }
    if p.fetch_max_wait_ms is not None:
        cfg["fetch_max_wait_ms"] = p.fetch_max_wait_ms
    cfg.update(_security(settings))
    cfg.update(overrides)
    return cfg


def admin_config(settings: Settings) -> dict[str, Any]:
    cfg: dict[str, Any] = {"bootstrap_servers": bootstrap(settings), "client_id": "streamfuse-admin"}
    cfg.update(_security(settings))
    return cfg


def faust_config(settings: Settings) -> dict[str, Any]:
    """faust-streaming ``App`` keyword arguments (faust talks to Kafka through aiokafka).

    A broker URL of scheme ``sfkafka<ms>`` needs :func:`streamfuse.faust_transport.install`
    on the app built with them."""
    p = profile(settings)
    cfg: dict[str, Any] = {
        "broker": f"{_faust_scheme(p)}://{bootstrap(settings)}",
        "broker_session_timeout": p.session_timeout_ms / 1000,
        "broker_heartbeat_interval": p.heartbeat_interval_ms / 1000,
        "producer_max_request_size": MAX_MESSAGE_BYTES,
        "consumer_max_fetch_size": MAX_MESSAGE_BYTES,
        "topic_partitions": settings.partitions,
        "topic_replication_factor": settings.replication_factor,
    }
    if p.one_record_per_batch:
        # Tansu reports end offsets per batch; faust table recovery needs exact ones.
        cfg["producer_max_batch_size"] = 1
        cfg["producer_linger"] = 0.0
    credentials = faust_credentials(settings)
    if credentials is not None:
        cfg["broker_credentials"] = credentials
    return cfg


def rd_producer_config(settings: Settings, client_id: str = "streamfuse") -> dict[str, Any]:
    """librdkafka producer settings: the same choices as :func:`producer_config`."""
    p = profile(settings)
    cfg: dict[str, Any] = {
        "bootstrap.servers": bootstrap(settings),
        "client.id": client_id,
        "acks": "all",
        "message.max.bytes": MAX_MESSAGE_BYTES,
        "enable.idempotence": p.idempotent_producer,
        "linger.ms": 0 if p.one_record_per_batch else 5,
        "retries": 5,
        "logger": RD_LOG,
        # The Java client's (and kafka-python's) key hash: a keyed record lands on the same
        # partition whichever client sent it, so the predictions of an asset share the
        # partition number of its samples (co-partitioned: the monitor's per-partition
        # watermark and the replay's barriers rely on it). librdkafka's default is CRC32.
        "partitioner": "murmur2_random",
    }
    if p.one_record_per_batch:
        cfg["batch.num.messages"] = 1
    cfg.update(_security(settings, rdkafka=True))
    return cfg


def rd_consumer_config(settings: Settings, group: str | None, client_id: str = "streamfuse") -> dict[str, Any]:
    """librdkafka consumer settings: the same choices as :func:`consumer_config`. Without a
    group, the consumer can only ``assign`` (it gets a private group id it never joins)."""
    p = profile(settings)
    cfg: dict[str, Any] = {
        "bootstrap.servers": bootstrap(settings),
        "client.id": client_id,
        "group.id": group or f"{client_id}-assign-only",
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "fetch.max.bytes": FETCH_MAX_BYTES,
        "max.partition.fetch.bytes": FETCH_PARTITION_BYTES,
        "session.timeout.ms": p.session_timeout_ms,
        "heartbeat.interval.ms": p.heartbeat_interval_ms,
        "logger": RD_LOG,
    }
    if p.fetch_max_wait_ms is not None:
        cfg["fetch.wait.max.ms"] = p.fetch_max_wait_ms
    cfg.update(_security(settings, rdkafka=True))
    return cfg


def _faust_scheme(p: BrokerProfile) -> str:
    """The faust transport for the profile: faust's own (``kafka``), or — where the
    profile needs a shorter fetch wait — :mod:`streamfuse.faust_transport`, named
    ``sfkafka<ms>`` (on Tansu every monitor pick-up would otherwise take 1.5 s). Only a
    name: the app that uses it takes the transport from
    :func:`streamfuse.faust_transport.install`, faust's global registry is left alone."""
    if p.fetch_max_wait_ms is None:
        return "kafka"
    return f"sfkafka{p.fetch_max_wait_ms}"


def make_rd_producer(settings: Settings, client_id: str = "streamfuse"):
    """A librdkafka (confluent-kafka) producer: sends cost microseconds of Python, for
    the hot paths (the worker's outputs, a replay's inputs)."""
    from confluent_kafka import Producer

    return Producer(rd_producer_config(settings, client_id))


def make_rd_consumer(settings: Settings, group: str | None, client_id: str = "streamfuse", on_stats=None,
                     stats_interval_ms: int = 5_000):
    """A librdkafka (confluent-kafka) consumer (see :func:`rd_consumer_config`). ``on_stats``
    gets librdkafka's statistics JSON every ``stats_interval_ms``, on the thread that
    consumes (no call into the consumer from another thread: that stalled the worker)."""
    from confluent_kafka import Consumer

    cfg = rd_consumer_config(settings, group, client_id)
    if on_stats is not None:
        cfg.update({"statistics.interval.ms": stats_interval_ms, "stats_cb": on_stats})
    return Consumer(cfg)


def consumer_lag(stats_json: str) -> int:
    """Records the consumer has not fetched yet, summed over its assigned partitions, from a
    librdkafka statistics report (``stats_cb``; ``consumer_lag`` per partition, -1 while unknown).

    Examples:
        >>> consumer_lag('{"topics": {"t": {"partitions": {"0": {"consumer_lag": 7}, "1": {"consumer_lag": -1},'
        ...              ' "-1": {"consumer_lag": -1}}}}}')
        7
    """
    import json

    stats = json.loads(stats_json)
    return sum(max(0, p.get("consumer_lag", -1)) for t in stats.get("topics", {}).values()
               for pid, p in t.get("partitions", {}).items() if pid != "-1")


def make_producer(settings: Settings, client_id: str = "streamfuse"):
    from kafka import KafkaProducer

    return KafkaProducer(**producer_config(settings, client_id))


def make_consumer(settings: Settings, group: str | None, client_id: str = "streamfuse", **overrides: Any):
    from kafka import KafkaConsumer

    return KafkaConsumer(**consumer_config(settings, group, client_id, **overrides))


def wait_for_broker(bootstrap_servers: str, timeout_s: float = 30.0) -> None:
    """Return once the broker answers a metadata request; raise BrokerError at the deadline."""
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError

    from streamfuse.errors import BrokerError

    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers, request_timeout_ms=2_000)
            try:
                admin.list_topics()
                return
            finally:
                admin.close()
        except (KafkaError, OSError, ValueError) as exc:
            last = exc
            time.sleep(0.2)
    raise BrokerError(f"broker at {bootstrap_servers} did not answer metadata within {timeout_s:.0f} s: {last}")
