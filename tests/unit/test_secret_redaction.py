"""Secrets inside URL-valued settings are masked wherever settings are shown."""

from __future__ import annotations

import json
import logging
import os

import pytest

from streamfuse.config import MASK, Settings, redact_secrets
from streamfuse.errors import ConfigError

CANARY = "CANARY-7f3a9c"


def _settings_with_canaries() -> Settings:
    return Settings(
        redis_url=f"redis://default:{CANARY}@redis.example:6379/0",
        redis_password=CANARY,
        kafka_bootstrap=f"sasl-user:{CANARY}@kafka-1:9092,kafka-2:9092",
        kafka_security={"protocol": "SASL_SSL", "sasl_mechanism": "PLAIN", "sasl_username": "u",
                        "sasl_password": CANARY},
        alerts={"external_url": f"https://grafana.example/d/x?auth_token={CANARY}", "api_token": CANARY},
    )


@pytest.mark.parametrize("text,shown", [
    (f"redis://:{CANARY}@h:6379/0", f"redis://:{MASK}@h:6379/0"),
    (f"rediss://user:{CANARY}@h", f"rediss://user:{MASK}@h"),
    (f"https://h/hook?token={CANARY}&team=ops", f"https://h/hook?token={MASK}&team=ops"),
    (f"https://h/hook?X-Api-Key={CANARY}", f"https://h/hook?X-Api-Key={MASK}"),
    ("redis://redis:6379/0", "redis://redis:6379/0"),
    ("kafka-1:9092,kafka-2:9092", "kafka-1:9092,kafka-2:9092"),
])
def test_redact_secrets(text: str, shown: str) -> None:
    assert redact_secrets(text) == shown


def test_effective_settings_line_masks_url_passwords(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("test.streamfuse.redaction")
    with caplog.at_level(logging.INFO, logger=logger.name):
        _settings_with_canaries().log_effective(logger)
    assert CANARY not in caplog.text
    shown = json.loads(caplog.records[-1].getMessage().split("effective settings: ", 1)[1])
    assert shown["redis_url"] == f"redis://default:{MASK}@redis.example:6379/0"
    assert shown["kafka_bootstrap"] == f"sasl-user:{MASK}@kafka-1:9092,kafka-2:9092"
    assert shown["alerts"]["api_token"] == MASK and shown["kafka_security"]["sasl_password"] == MASK


def test_repr_and_str_of_settings_mask_url_passwords() -> None:
    s = _settings_with_canaries()
    assert CANARY not in repr(s) and CANARY not in str(s)
    assert s.redis_url.endswith(f"{CANARY}@redis.example:6379/0")  # the value itself is intact


def test_redis_connection_error_names_the_url_without_its_password() -> None:
    from streamfuse.store import connect

    s = Settings(redis_url=f"redis://:{CANARY}@127.0.0.1:9/0")  # discard port: nothing listens
    with pytest.raises(ConfigError) as info:
        connect(s)
    assert CANARY not in str(info.value) and f"redis://:{MASK}@127.0.0.1:9/0" in str(info.value)


def test_a_child_process_gets_the_secrets_the_settings_dumps_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    from streamfuse.procs import child_env

    parent = _settings_with_canaries()
    env = child_env(parent)
    assert '"api_token":"**********"' in env["STREAMFUSE_ALERTS"]  # the dump is masked ...
    for key in [k for k in os.environ if k.startswith("STREAMFUSE_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        if key.startswith("STREAMFUSE_"):
            monkeypatch.setenv(key, value)
    child = Settings()  # ... and the child still gets every secret
    for get in (lambda s: s.redis_password, lambda s: s.kafka_security.sasl_password, lambda s: s.alerts.api_token):
        assert get(child).get_secret_value() == CANARY
