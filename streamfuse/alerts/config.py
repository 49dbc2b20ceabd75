"""Settings of alert routing and delivery (``STREAMFUSE_ALERTS__*``).

Only pydantic here: ``streamfuse.config`` imports this module, so it stays light.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field, SecretStr


class InhibitRuleSettings(BaseModel):
    """While an alert matching ``source`` fires, alerts matching ``target`` with equal ``equal`` labels are muted."""

    source: list[str]
    target: list[str]
    equal: list[str] = []


# A broken sensor explains the degradation of its own modality on its own asset (the one
# default rule: the dispatcher's settings and the lifecycle's DEFAULT_INHIBIT_RULES).
DEFAULT_INHIBIT = InhibitRuleSettings(source=["kind=sensor_fault"], target=["kind=degradation"],
                                      equal=["asset", "modality"])


class AlertSettings(BaseModel):
    group: str = "sf-alert-dispatch"  # consumer group of `streamfuse alerts dispatch`
    allow_private_targets: bool = False  # webhooks to 10/8, 172.16/12, 192.168/16, loopback
    request_timeout_s: float = Field(5.0, gt=0)
    give_up_s: float = Field(3600.0, gt=0)  # then the notification goes to the dead-letter topic
    # Grouping (Alertmanager's route knobs): alerts with equal `group_by` labels travel together.
    group_by: list[str] = ["kind", "modality"]
    group_wait_s: float = Field(2.0, ge=0)  # a new group waits this long for more alerts
    group_interval_s: float = Field(10.0, ge=0)  # later changes of a group wait this long after its last send
    repeat_interval_s: float = Field(4 * 3600.0, gt=0)  # re-notify alerts still firing
    # Retries: exponential backoff from `backoff_initial_s`, doubling, capped, with jitter.
    backoff_initial_s: float = Field(0.5, gt=0)
    backoff_max_s: float = Field(60.0, gt=0)
    inhibit_rules: list[InhibitRuleSettings] = [DEFAULT_INHIBIT]
    external_url: str = ""  # this deployment's dashboard; webhook `externalURL` and alerts' `generatorURL`
    # HTTP API of `streamfuse alerts serve`.
    api_host: str = "127.0.0.1"
    api_port: int = Field(9095, ge=0, le=65535)
    api_token: SecretStr | None = None  # when set, the API wants `Authorization: Bearer <token>`
    # mTLS for the API: its certificate and key, and the CA its clients' certificates must chain to.
    api_tls_certfile: Path | None = None
    api_tls_keyfile: Path | None = None
    api_tls_client_cafile: Path | None = None
    # Fernet key(s) sealing webhook secrets in Redis, comma-separated (the first seals, all open);
    # `streamfuse alerts keygen` makes one. Without it a subscription cannot have a secret.
    secret_key: SecretStr | None = None
    # Channels of the `redis` receiver must start with this (keeps them off internal channels).
    redis_channel_prefix: str = Field("streamfuse.notify.", min_length=1)
    metrics_port: int = Field(0, ge=0, le=65535)  # dispatcher /metrics (0 = off)
