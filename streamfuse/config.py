"""One Settings object for every streamfuse process.

Values come from (highest first) CLI options, environment variables with the prefix
``STREAMFUSE_`` (nested fields with ``__``, e.g. ``STREAMFUSE_WORKER__MAX_BATCH=64``),
a ``.env`` file, then the defaults below.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from streamfuse.alerts.config import AlertSettings
from streamfuse.events import MAX_PAYLOAD_BYTES

log = logging.getLogger(__name__)
MASK = "**********"  # how pydantic shows a SecretStr; URL passwords are shown the same way
# userinfo of any URL (``redis://:PW@host``, ``http://user:PW@host``, ``user:PW@host:9092``)
_USERINFO = re.compile(r"(?P<head>(?:^|[\s,;=(\"'])(?:[A-Za-z][A-Za-z0-9+.-]*://)?[^\s:/@,;\"']*):[^\s/@,;\"']+@")
# query or fragment parameters whose name says they carry a credential
_SECRET_PARAM = re.compile(
    r"(?P<head>[?&#;](?:[A-Za-z0-9_.-]*(?:token|secret|passw(?:or)?d|pass|pwd|key|sig|signature|auth|credential)"
    r"[A-Za-z0-9_.-]*)=)[^&#\s\"']*", re.IGNORECASE)


def redact_secrets(text: str) -> str:
    """``text`` with the password of every URL and every credential-like query parameter masked.

    Settings, status output and API responses pass through this before they are shown, so
    a password inside a URL (``STREAMFUSE_REDIS_URL=redis://:PW@host``) is never printed.

    Examples:
        >>> redact_secrets("redis://:hunter2@redis:6379/0")
        'redis://:**********@redis:6379/0'
        >>> redact_secrets("https://bob:pw@hooks.example.com/x?token=abc&team=ops")
        'https://bob:**********@hooks.example.com/x?token=**********&team=ops'
        >>> redact_secrets("kafka-1:9092,kafka-2:9092")
        'kafka-1:9092,kafka-2:9092'
    """
    text = _USERINFO.sub(lambda m: f"{m['head']}:{MASK}@", text)
    return _SECRET_PARAM.sub(lambda m: f"{m['head']}{MASK}", text)


def redact_value(value: Any) -> Any:
    """:func:`redact_secrets` applied to every string inside a JSON-like value."""
    if isinstance(value, str):
        return redact_secrets(value)
    if isinstance(value, dict):
        return {k: redact_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_value(v) for v in value]
    return value


class KafkaSecurity(BaseModel):
    """TLS / SASL for a real cluster; the embedded broker uses plaintext."""

    protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None


class WorkerSettings(BaseModel):
    group: str = "sf-workers"
    max_batch: int = Field(32, ge=1, le=4096)
    max_delay_ms: int = Field(20, ge=0, le=60_000)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = Field(1, ge=0)  # torch CPU threads; 0 = torch's default (one per core)
    metrics_port: int = Field(0, ge=0, le=65535)  # 0 = no /metrics endpoint
    # Cut micro-batches by the records only (max_batch per partition, or a batch-end
    # header), never by the clock: same records, same outputs bit for bit. Replays use it.
    stream_batches: bool = False


class MonitorSettings(BaseModel):
    app_id: str = "streamfuse-monitor"
    kpi_window_ms: int = Field(5_000, ge=100)
    label_grace_ms: int = Field(8_000, ge=0)  # how long a window waits for late labels
    max_pending_labels: int = Field(100_000, ge=1)  # bound on the label join state
    degradation_margin: float = Field(0.15, ge=0.0, le=1.0)
    confidence_z: float = Field(1.96, gt=0.0)  # Wilson bound; 1.96 ~ 95 %
    min_labelled: int = Field(10, ge=1)
    fire_windows: int = Field(2, ge=1)
    resolve_windows: int = Field(2, ge=1)
    dry_run: bool = False  # alert only, issue no commands
    approval: bool = False  # commands become proposals: `streamfuse control approve ID` sends them
    # faust's local state (table checkpoints); unset: <model_dir>/../faust. Must be writable.
    data_dir: Path | None = None
    metrics_port: int = Field(0, ge=0, le=65535)
    detect_scopes: tuple[str, ...] = ("global", "line")  # where the label-based degradation runs
    # Sensor health: a reading is flat at or below this signal std (image grey levels,
    # audio in [-1, 1], series in its own units); a fault fires above these rates.
    flat_std: dict[str, float] = {"image": 0.25, "audio": 1e-4, "series": 1e-6}
    sensor_fault_rate: float = Field(0.5, gt=0.0, le=1.0)
    sensor_fault_readings: int = Field(6, ge=1)  # flat / frozen readings: judged over each sensor's latest N
    max_abs_skew_ms: float = Field(500.0, gt=0.0)
    dominance_share: float = Field(0.9, gt=0.0, le=1.0)
    # Page-Hinkley on label-free proxies; these also move with the mix of machine states, so
    # the defaults only catch large, lasting drops.
    drift_delta: float = Field(0.15, gt=0.0)
    drift_threshold: float = Field(1.5, gt=0.0)
    fusion_margin: float = Field(0.05, ge=0.0, le=1.0)
    cooldown_ms: int = Field(30_000, ge=0)
    max_actions_per_hour: int = Field(20, ge=1)
    rollback_after_activation_ms: int = Field(120_000, ge=0)
    fusion_action: Literal["set_fusion_mode", "rollback_fusion"] = "set_fusion_mode"
    ack_timeout_ms: int = Field(15_000, ge=100)  # wall time a worker has to ack a command
    # Label-free sequential detection (streamfuse.monitor.sequential): one false-alarm budget
    # for every modality x scope detector; evidence is consumed in event-time steps.
    false_alarms_per_day: float = 1.0
    decision_step_ms: int = Field(1_000, ge=100, le=60_000)
    attribution_alpha: float = Field(0.01, gt=0.0, lt=1.0)

    @field_validator("false_alarms_per_day")
    @classmethod
    def _budget(cls, v: float) -> float:
        from streamfuse.errors import ConfigError
        from streamfuse.monitor.sequential import check_budget

        try:
            return check_budget(v)
        except ConfigError as exc:
            raise ConfigError(f"STREAMFUSE_MONITOR__FALSE_ALARMS_PER_DAY: {exc} (false alarms a day for the "
                              "whole monitor, e.g. 1)") from None


class SimSettings(BaseModel):
    assets: int = Field(4, ge=1)
    lines: int = Field(2, ge=1)
    rate_hz: float = Field(2.0, gt=0.0)  # samples per second per asset
    label_delay_ms: int = Field(2_000, ge=0)
    seed: int = 0


class MqttSettings(BaseModel):
    """The MQTT broker the ``ingest mqtt`` gateway subscribes to (TLS and login as for Kafka)."""

    host: str = "127.0.0.1"
    port: int = Field(1883, ge=1, le=65535)
    protocol: Literal["3.1.1", "5"] = "5"
    client_id: str = "streamfuse-ingest"  # one persistent session per id: give every gateway its own
    keepalive_s: int = Field(30, ge=5)
    session_expiry_s: int = Field(86_400, ge=0)  # MQTT 5: how long the broker keeps the session
    inflight: int = Field(100, ge=1, le=65_535)  # MQTT 5 Receive Maximum: un-acked messages at once
    username: str | None = None
    password: SecretStr | None = None
    tls: bool = False
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None


class OpcuaSettings(BaseModel):
    """The OPC-UA server the ``ingest opcua`` gateway subscribes to."""

    url: str = "opc.tcp://127.0.0.1:4840"
    security_policy: Literal["None", "Basic256Sha256"] = "None"
    security_mode: Literal["Sign", "SignAndEncrypt"] = "SignAndEncrypt"
    certificate: Path | None = None  # this client's certificate (DER or PEM)
    private_key: Path | None = None
    private_key_password: SecretStr | None = None
    server_certificate: Path | None = None  # None: taken from the server's endpoint list
    application_uri: str = "urn:streamfuse:ingest"  # must match the certificate's URI SAN
    username: str | None = None
    password: SecretStr | None = None
    sampling_interval_ms: float = Field(100.0, ge=0.0)  # default per node; the mapping may override
    queue_size: int = Field(10, ge=1)  # values the server keeps per node between publishes
    publishing_interval_ms: float = Field(100.0, gt=0.0)
    timeout_s: float = Field(4.0, gt=0.0)
    reconnect_min_s: float = Field(0.2, gt=0.0)
    reconnect_max_s: float = Field(10.0, gt=0.0)


class IngestSettings(BaseModel):
    """Plant gateways: MQTT / OPC-UA → sensor topics, by one mapping file."""

    mapping: Path | None = None  # TOML; see streamfuse.ingest.mapping
    metrics_port: int = Field(0, ge=0, le=65535)
    mqtt: MqttSettings = MqttSettings()
    opcua: OpcuaSettings = OpcuaSettings()


class Settings(BaseSettings):
    """Effective configuration; log it with :meth:`log_effective` (secrets masked)."""

    model_config = SettingsConfigDict(
        env_prefix="STREAMFUSE_", env_nested_delimiter="__", env_file=".env", extra="ignore"
    )

    kafka_bootstrap: str = ""  # empty: start the embedded broker
    # Which broker the clients talk to; "auto" = tansu for the embedded broker, else kafka.
    broker: Literal["auto", "kafka", "tansu"] = "auto"
    kafka_security: KafkaSecurity = KafkaSecurity()
    topic_prefix: str = "sf."
    partitions: int = Field(3, ge=1)
    replication_factor: int = Field(1, ge=1)
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_password: SecretStr | None = None
    redis_prefix: str = "streamfuse:"
    model_dir: Path = Path(".cache/streamfuse/models")
    bundle: str = "demo"  # the bundle under model_dir that workers serve
    max_payload_bytes: int = Field(MAX_PAYLOAD_BYTES, ge=1024)
    worker: WorkerSettings = WorkerSettings()
    monitor: MonitorSettings = MonitorSettings()
    sim: SimSettings = SimSettings()
    alerts: AlertSettings = AlertSettings()
    ingest: IngestSettings = IngestSettings()

    @property
    def bundle_dir(self) -> Path:
        return Path(self.model_dir) / self.bundle

    @property
    def broker_kind(self) -> Literal["kafka", "tansu"]:
        if self.broker != "auto":
            return self.broker
        return "tansu" if not self.kafka_bootstrap else "kafka"

    def redacted(self) -> dict[str, Any]:
        """The settings as JSON-able values with every secret masked: SecretStr fields, and
        passwords or tokens inside URL-valued settings (Redis, Kafka, webhook, dashboard URLs)."""
        return redact_value(self.model_dump(mode="json"))  # SecretStr dumps as '**********'

    def __repr_args__(self):
        # repr() / str() of the settings (tracebacks, debug logs) show the redacted values.
        shown = self.redacted()
        for name, _ in super().__repr_args__():
            yield name, shown.get(name)

    def secret_env(self) -> dict[str, str]:
        """Every secret that is set, as the ``STREAMFUSE_...`` variable that sets it: a child
        process gets its secrets from these, since dumps of the settings mask them."""
        out: dict[str, str] = {}

        def walk(model: BaseModel, path: str) -> None:
            for name in type(model).model_fields:
                value = getattr(model, name)
                if isinstance(value, SecretStr):
                    out[f"{path}{name.upper()}"] = value.get_secret_value()
                elif isinstance(value, BaseModel):
                    walk(value, f"{path}{name.upper()}__")

        walk(self, "STREAMFUSE_")
        return out

    def log_effective(self, logger: logging.Logger = log) -> None:
        logger.info("effective settings: %s", json.dumps(self.redacted()))


def load_settings(verbose: bool = False) -> Settings:
    """The settings of a command-line process: configure logging, read the environment,
    log the effective settings (secrets masked)."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings()
    settings.log_effective(logging.getLogger("streamfuse"))
    return settings
