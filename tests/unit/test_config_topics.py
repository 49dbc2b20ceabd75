"""Settings from the environment, topic names and specs, and broker-dependent client configs."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from streamfuse.config import KafkaSecurity, MonitorSettings, Settings
from streamfuse.errors import ConfigError, StreamfuseError
from streamfuse.events import MODALITIES
from streamfuse.kafka import (
    FETCH_PARTITION_BYTES,
    MAX_MESSAGE_BYTES,
    PROFILES,
    admin_config,
    consumer_config,
    faust_config,
    producer_config,
    profile,
    rd_consumer_config,
    rd_producer_config,
)
from streamfuse.topics import DAY_MS, Topics


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No STREAMFUSE_* from the caller's shell and no .env from the working directory."""
    for key in list(os.environ):
        if key.upper().startswith("STREAMFUSE_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)


# ---------------------------------------------------------------------------- Settings


def test_defaults() -> None:
    s = Settings()
    assert s.kafka_bootstrap == "" and s.broker == "auto" and s.topic_prefix == "sf."
    assert s.partitions == 3 and s.worker.max_batch == 32 and s.monitor == MonitorSettings()
    assert s.redis_password is None and s.kafka_security.protocol == "PLAINTEXT"


def test_env_prefix_and_nested_delimiter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMFUSE_KAFKA_BOOTSTRAP", "kafka-1:9092,kafka-2:9092")
    monkeypatch.setenv("STREAMFUSE_PARTITIONS", "12")
    monkeypatch.setenv("STREAMFUSE_TOPIC_PREFIX", "replay-7.")
    monkeypatch.setenv("STREAMFUSE_WORKER__MAX_BATCH", "64")
    monkeypatch.setenv("STREAMFUSE_WORKER__DEVICE", "cuda:1")
    monkeypatch.setenv("STREAMFUSE_MONITOR__KPI_WINDOW_MS", "2500")
    monkeypatch.setenv("STREAMFUSE_MONITOR__DRY_RUN", "true")
    monkeypatch.setenv("STREAMFUSE_KAFKA_SECURITY__PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("STREAMFUSE_KAFKA_SECURITY__SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("STREAMFUSE_KAFKA_SECURITY__SASL_PASSWORD", "kafka-pw")
    monkeypatch.setenv("WORKER__MAX_BATCH", "7")  # no prefix: ignored
    s = Settings()
    assert s.kafka_bootstrap == "kafka-1:9092,kafka-2:9092"
    assert s.partitions == 12 and s.topic_prefix == "replay-7."
    assert s.worker.max_batch == 64 and s.worker.device == "cuda:1"
    assert s.worker.max_delay_ms == 20  # untouched nested fields keep their defaults
    assert s.monitor.kpi_window_ms == 2500 and s.monitor.dry_run is True
    assert s.kafka_security.protocol == "SASL_SSL" and s.kafka_security.sasl_mechanism == "SCRAM-SHA-512"
    assert isinstance(s.kafka_security.sasl_password, SecretStr)
    assert s.kafka_security.sasl_password.get_secret_value() == "kafka-pw"


def test_env_is_case_insensitive(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("streamfuse_worker__max_batch", "8")
    assert Settings().worker.max_batch == 8


def test_dotenv_file_is_read_and_env_wins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("STREAMFUSE_PARTITIONS=5\nSTREAMFUSE_REDIS_PREFIX=test:\n")
    monkeypatch.setenv("STREAMFUSE_PARTITIONS", "9")
    s = Settings()
    assert s.redis_prefix == "test:" and s.partitions == 9


def test_arguments_override_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMFUSE_PARTITIONS", "9")
    assert Settings(partitions=2).partitions == 2


@pytest.mark.parametrize(
    ("key", "value", "field"),
    [
        ("STREAMFUSE_WORKER__MAX_BATCH", "0", "max_batch"),
        ("STREAMFUSE_WORKER__MAX_BATCH", "many", "max_batch"),
        ("STREAMFUSE_PARTITIONS", "0", "partitions"),
        ("STREAMFUSE_BROKER", "redpanda", "broker"),
        ("STREAMFUSE_KAFKA_SECURITY__PROTOCOL", "TLS", "protocol"),
        ("STREAMFUSE_MONITOR__KPI_WINDOW_MS", "10", "kpi_window_ms"),
        ("STREAMFUSE_MONITOR__DEGRADATION_MARGIN", "1.5", "degradation_margin"),
    ],
)
def test_invalid_env_values_are_rejected(monkeypatch: pytest.MonkeyPatch, key: str, value: str, field: str) -> None:
    monkeypatch.setenv(key, value)
    with pytest.raises(ValidationError) as info:
        Settings()
    assert field in str(info.value)


def test_secrets_are_secretstr_and_masked_in_repr() -> None:
    s = Settings(redis_password="hunter2", kafka_security=KafkaSecurity(sasl_password="s3cret"))
    assert isinstance(s.redis_password, SecretStr)
    assert s.redis_password.get_secret_value() == "hunter2"
    assert "hunter2" not in repr(s) and "s3cret" not in repr(s) and "hunter2" not in str(s)


def test_log_effective_masks_secrets(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("STREAMFUSE_REDIS_PASSWORD", "hunter2")
    monkeypatch.setenv("STREAMFUSE_KAFKA_SECURITY__SASL_PASSWORD", "s3cret")
    monkeypatch.setenv("STREAMFUSE_KAFKA_BOOTSTRAP", "broker:9092")
    logger = logging.getLogger("test.streamfuse.config")
    with caplog.at_level(logging.INFO, logger=logger.name):
        Settings().log_effective(logger)
    text = caplog.text
    assert "hunter2" not in text and "s3cret" not in text
    assert "**********" in text
    assert "broker:9092" in text  # the rest is shown
    (record,) = [r for r in caplog.records if r.name == logger.name]
    shown = json.loads(record.getMessage().split("effective settings: ", 1)[1])
    assert shown["redis_password"] == "**********"
    assert shown["kafka_security"]["sasl_password"] == "**********"
    assert shown["worker"]["max_batch"] == 32


def test_log_effective_default_logger(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="streamfuse.config"):
        Settings(redis_password="hunter2").log_effective()
    assert "effective settings" in caplog.text and "hunter2" not in caplog.text


@pytest.mark.parametrize(
    ("bootstrap", "broker", "kind"),
    [
        ("", "auto", "tansu"),  # no bootstrap: the embedded broker
        ("kafka:9092", "auto", "kafka"),
        ("127.0.0.1:9092", "tansu", "tansu"),  # an embedded broker started elsewhere
        ("", "kafka", "kafka"),
        ("kafka:9092", "kafka", "kafka"),
    ],
)
def test_broker_kind(bootstrap: str, broker: str, kind: str) -> None:
    s = Settings(kafka_bootstrap=bootstrap, broker=broker)
    assert s.broker_kind == kind
    assert profile(s) is PROFILES[kind]


def test_broker_kind_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMFUSE_KAFKA_BOOTSTRAP", "kafka:9092")
    assert Settings().broker_kind == "kafka"
    monkeypatch.setenv("STREAMFUSE_BROKER", "tansu")
    assert Settings().broker_kind == "tansu"


# ---------------------------------------------------------------------------- Topics


@pytest.mark.parametrize("prefix", ["sf.", "replay-42.", ""])
def test_topic_names_under_prefix(prefix: str) -> None:
    t = Topics(prefix)
    assert t.prefix == prefix
    assert [t.sensor(m) for m in MODALITIES] == [f"{prefix}sensor.{m}" for m in MODALITIES]
    assert t.samples == f"{prefix}samples"
    assert t.predictions == f"{prefix}predictions"
    assert t.labels == f"{prefix}labels"
    assert t.kpis == f"{prefix}kpis"
    assert t.alerts == f"{prefix}alerts"
    assert t.control == f"{prefix}control"
    assert t.acks == f"{prefix}control.acks"
    assert t.deadletter == f"{prefix}deadletter"


def test_default_prefix() -> None:
    assert Topics().samples == "sf.samples"


@pytest.mark.parametrize("partitions", [1, 3, 12])
def test_topic_specs(partitions: int) -> None:
    t = Topics("replay-1.")
    specs = {s.name: s for s in t.specs(partitions)}
    assert len(specs) == len(t.specs(partitions)), "topic names are unique"
    assert all(name.startswith("replay-1.") for name in specs)
    expected = {t.sensor(m) for m in MODALITIES} | {
        t.samples, t.predictions, t.labels, t.kpis, t.alerts, t.control, t.acks, t.deadletter}
    assert set(specs) == expected
    # co-partitioning: every sensor topic and samples share the partition count
    assert {specs[t.sensor(m)].partitions for m in MODALITIES} | {specs[t.samples].partitions} == {partitions}
    # total order for commands
    assert specs[t.control].partitions == 1
    assert specs[t.control].configs["cleanup.policy"] == "delete"
    assert specs[t.control].configs["retention.ms"] == "-1"  # the command log is kept
    # latest state per key: compacted
    for name in (t.kpis, t.alerts):
        assert specs[name].configs["cleanup.policy"] == "compact"
        assert specs[name].partitions == 1
    for name in (t.samples, t.predictions, t.labels, t.acks, t.deadletter, *(t.sensor(m) for m in MODALITIES)):
        assert specs[name].configs["cleanup.policy"] == "delete"
        assert int(specs[name].configs["retention.ms"]) >= DAY_MS
    assert all(spec.purpose for spec in specs.values())


# ---------------------------------------------------------------------------- client configs


def tansu() -> Settings:
    return Settings(kafka_bootstrap="127.0.0.1:19092", broker="tansu")


def kafka() -> Settings:
    return Settings(kafka_bootstrap="kafka-1:9092")


def test_profiles() -> None:
    assert PROFILES["tansu"].one_record_per_batch and not PROFILES["tansu"].idempotent_producer
    assert PROFILES["tansu"].session_timeout_ms == 2_000
    assert not PROFILES["kafka"].one_record_per_batch and PROFILES["kafka"].idempotent_producer
    assert PROFILES["kafka"].session_timeout_ms == 45_000
    for p in PROFILES.values():
        assert p.heartbeat_interval_ms * 3 <= p.session_timeout_ms  # Kafka's rule of thumb


def test_producer_config_tansu() -> None:
    cfg = producer_config(tansu(), client_id="sim")
    assert cfg["bootstrap_servers"] == "127.0.0.1:19092" and cfg["client_id"] == "sim"
    assert cfg["batch_size"] == 0 and cfg["linger_ms"] == 0
    assert cfg["enable_idempotence"] is False
    assert cfg["acks"] == "all" and cfg["max_request_size"] == MAX_MESSAGE_BYTES
    assert cfg["security_protocol"] == "PLAINTEXT"


def test_producer_config_kafka() -> None:
    cfg = producer_config(kafka())
    assert cfg["bootstrap_servers"] == "kafka-1:9092" and cfg["client_id"] == "streamfuse"
    assert cfg["batch_size"] > 0 and cfg["linger_ms"] > 0
    assert cfg["enable_idempotence"] is True and cfg["acks"] == "all"


def test_consumer_config() -> None:
    t = consumer_config(tansu(), "g1")
    assert t["group_id"] == "g1" and t["enable_auto_commit"] is False
    assert t["auto_offset_reset"] == "earliest"
    assert (t["session_timeout_ms"], t["heartbeat_interval_ms"]) == (2_000, 500)
    # small fetches (fast); a larger record batch is still returned whole
    assert t["max_partition_fetch_bytes"] == FETCH_PARTITION_BYTES < t["fetch_max_bytes"] < MAX_MESSAGE_BYTES
    k = consumer_config(kafka(), None, client_id="rec", auto_offset_reset="latest", consumer_timeout_ms=100)
    assert k["group_id"] is None and k["client_id"] == "rec"
    assert (k["session_timeout_ms"], k["heartbeat_interval_ms"]) == (45_000, 3_000)
    assert k["auto_offset_reset"] == "latest" and k["consumer_timeout_ms"] == 100  # overrides win


def test_faust_config() -> None:
    t = faust_config(Settings(kafka_bootstrap="127.0.0.1:19092", broker="tansu", partitions=6))
    assert t["broker"] == "sfkafka20://127.0.0.1:19092"  # faust's transport with Tansu's short fetch wait
    from streamfuse.faust_transport import transport_for

    consumer = transport_for(t["broker"]).Consumer
    assert consumer.__mro__[1].__module__ == "faust.transport.drivers.aiokafka"
    assert t["broker_session_timeout"] == 2.0 and t["broker_heartbeat_interval"] == 0.5
    assert t["producer_max_batch_size"] == 1 and t["producer_linger"] == 0.0
    assert t["topic_partitions"] == 6 and t["topic_replication_factor"] == 1
    k = faust_config(kafka())
    assert k["broker"] == "kafka://kafka-1:9092" and k["broker_session_timeout"] == 45.0
    assert "producer_max_batch_size" not in k and "producer_linger" not in k
    assert k["producer_max_request_size"] == k["consumer_max_fetch_size"] == MAX_MESSAGE_BYTES


def test_security_settings_reach_every_client(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    s = Settings(
        kafka_bootstrap="kafka:9093",
        kafka_security=KafkaSecurity(protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-256", sasl_username="sf",
                                     sasl_password="pw", ssl_cafile=ca),
    )
    for cfg in (producer_config(s), consumer_config(s, "g"), admin_config(s)):
        assert cfg["security_protocol"] == "SASL_SSL"
        assert cfg["sasl_mechanism"] == "SCRAM-SHA-256"
        assert cfg["sasl_plain_username"] == "sf" and cfg["sasl_plain_password"] == "pw"
        assert cfg["ssl_cafile"] == str(ca)
        assert "ssl_certfile" not in cfg and "ssl_keyfile" not in cfg
    plain = producer_config(kafka())
    assert not any(k.startswith(("sasl_", "ssl_")) for k in plain)
    for cfg in (rd_producer_config(s), rd_consumer_config(s, "g")):  # librdkafka's names
        assert cfg["security.protocol"] == "SASL_SSL" and cfg["sasl.mechanism"] == "SCRAM-SHA-256"
        assert cfg["sasl.username"] == "sf" and cfg["sasl.password"] == "pw"
        assert cfg["ssl.ca.location"] == str(ca) and "ssl.key.location" not in cfg


def test_librdkafka_configs_follow_the_profile() -> None:
    from confluent_kafka import Consumer, Producer

    t, k = rd_producer_config(tansu(), "w1"), rd_producer_config(kafka())
    assert t["batch.num.messages"] == 1 and t["enable.idempotence"] is False and t["acks"] == "all"
    assert "batch.num.messages" not in k and k["enable.idempotence"] is True and k["linger.ms"] == 5
    c = rd_consumer_config(tansu(), "g1", "w1")
    assert (c["group.id"], c["enable.auto.commit"], c["auto.offset.reset"]) == ("g1", False, "earliest")
    assert (c["session.timeout.ms"], c["fetch.wait.max.ms"]) == (2_000, 20)
    assert c["max.partition.fetch.bytes"] == FETCH_PARTITION_BYTES
    assert "fetch.wait.max.ms" not in rd_consumer_config(kafka(), "g1")  # Kafka answers when data arrives
    assert rd_consumer_config(tansu(), None, "w1")["group.id"] == "w1-assign-only"
    Producer(t)  # librdkafka accepts every key
    Consumer(c).close()


@pytest.mark.parametrize("make", [producer_config, admin_config, faust_config, lambda s: consumer_config(s, "g")])
def test_no_bootstrap_is_a_helpful_error(make) -> None:
    with pytest.raises(ConfigError) as info:
        make(Settings())
    assert "STREAMFUSE_KAFKA_BOOTSTRAP" in str(info.value)
    assert isinstance(info.value, StreamfuseError)
