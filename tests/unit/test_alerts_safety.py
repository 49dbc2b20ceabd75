"""Receiver URL validation and webhook signatures: pure, no network."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from streamfuse.alerts.config import AlertSettings
from streamfuse.alerts.delivery import backoff_s
from streamfuse.alerts.errors import (
    CredentialsInUrl,
    InvalidSignature,
    InvalidSubscription,
    LinkLocalTarget,
    MissingHost,
    PrivateTarget,
    ReservedTarget,
    UnresolvableTarget,
    UnsafeTarget,
    UnsupportedScheme,
)
from streamfuse.alerts.signing import SIGNATURE_HEADER, TIMESTAMP_HEADER, sign, signed_headers, verify_signature
from streamfuse.alerts.subscriptions import check_target
from streamfuse.alerts.targets import redact, validate_url
from streamfuse.errors import StreamfuseError

PUBLIC = lambda host, port: ["93.184.215.14"]  # noqa: E731 - a resolver that needs no DNS


@pytest.mark.parametrize("url,error,words", [
    ("ftp://hooks.example.com/x", UnsupportedScheme, "use http or https"),
    ("file:///etc/passwd", UnsupportedScheme, "use http or https"),
    ("https://bob:hunter2@hooks.example.com/x", CredentialsInUrl, "credentials in the URL"),
    ("https://bob@hooks.example.com/x", CredentialsInUrl, "credentials in the URL"),
    ("https:///x", MissingHost, "no host"),
    ("http://169.254.169.254/latest/meta-data/", LinkLocalTarget, "metadata"),
    ("http://169.254.10.1/", LinkLocalTarget, "link-local"),
    ("http://[fe80::1]/", LinkLocalTarget, "link-local"),
    ("http://[::ffff:169.254.169.254]/", LinkLocalTarget, "metadata"),
    ("http://[fd00:ec2::254]/", LinkLocalTarget, "metadata"),
    ("http://metadata.google.internal/computeMetadata/v1/", LinkLocalTarget, "metadata"),
    ("http://0.0.0.0:8080/", ReservedTarget, "unspecified"),
    ("http://224.0.0.1/", ReservedTarget, "multicast"),
    ("http://127.0.0.1:8080/hook", PrivateTarget, "ALLOW_PRIVATE_TARGETS"),
    ("http://10.1.2.3/hook", PrivateTarget, "private"),
    ("http://192.168.1.20/hook", PrivateTarget, "private"),
    ("http://172.16.5.4/hook", PrivateTarget, "private"),
    ("http://100.64.0.1/hook", PrivateTarget, "private"),
    ("http://[::1]/hook", PrivateTarget, "loopback"),
    ("http://[fd12::1]/hook", PrivateTarget, "private"),
    ("http://nonexistent.invalid/hook", UnresolvableTarget, "does not resolve"),
])
def test_refused_urls_each_with_a_clear_error(url, error, words):
    with pytest.raises(error, match=words) as info:
        validate_url(url, allow_private=False)
    assert isinstance(info.value, UnsafeTarget) and isinstance(info.value, StreamfuseError)
    assert "hunter2" not in str(info.value)  # the message never repeats a password


def test_a_host_resolving_to_a_private_address_is_refused():
    with pytest.raises(PrivateTarget, match="10.0.0.7"):
        validate_url("https://hooks.example.com/x", resolve=lambda h, p: ["93.184.215.14", "10.0.0.7"])
    with pytest.raises(LinkLocalTarget):
        validate_url("https://hooks.example.com/x", allow_private=True, resolve=lambda h, p: ["169.254.169.254"])
    with pytest.raises(UnresolvableTarget, match="no address"):
        validate_url("https://hooks.example.com/x", resolve=lambda h, p: [])


def test_private_targets_only_when_allowed_and_link_local_never():
    assert validate_url("http://127.0.0.1:8080/hook", allow_private=True) == "http://127.0.0.1:8080/hook"
    assert validate_url("http://localhost:9/x", allow_private=True) == "http://localhost:9/x"
    with pytest.raises(PrivateTarget):
        validate_url("http://localhost:9/x", allow_private=False)
    with pytest.raises(LinkLocalTarget):
        validate_url("http://169.254.169.254/", allow_private=True)


def test_public_urls_pass_and_are_normalized():
    url = validate_url("HTTPS://Hooks.Example.COM:8443/a?b=1", resolve=PUBLIC)
    assert url == "https://hooks.example.com:8443/a?b=1"
    assert validate_url("http://8.8.8.8", resolve=None) == "http://8.8.8.8/"


def test_redis_channel_and_receiver_checks():
    s = AlertSettings(redis_channel_prefix="plant.")
    assert check_target("redis", "plant.alerts", s) == "plant.alerts"
    with pytest.raises(InvalidSubscription, match="channel"):
        check_target("redis", "bad channel!", s)
    # Outside the configured prefix, e.g. the API's internal live channel: refused.
    for channel in ("streamfuse:alerts:live", "__keyspace:x", "plantx"):
        with pytest.raises(InvalidSubscription, match="must start with 'plant.'.*REDIS_CHANNEL_PREFIX"):
            check_target("redis", channel, s)
    with pytest.raises(InvalidSubscription, match="webhook, alertmanager, redis"):
        check_target("pager", "https://x/", s)


def test_redact_hides_paths_queries_and_credentials():
    assert redact("https://u:p@hooks.slack.com/services/T0/B1/secret?x=1") == "https://hooks.slack.com/..."


def test_signature_round_trip_and_independent_hmac():
    body = b'{"version":"4","alerts":[]}'
    h = signed_headers(body, "k3y", 1_800_000_000)
    expected = hmac.new(b"k3y", b"1800000000." + body, hashlib.sha256).hexdigest()
    assert h == {TIMESTAMP_HEADER: "1800000000", SIGNATURE_HEADER: f"sha256={expected}"}
    verify_signature(body, h, "k3y", now_s=1_800_000_100)
    verify_signature(body, {k.lower(): v for k, v in h.items()}, "k3y", now_s=1_800_000_000)  # any case


@pytest.mark.parametrize("mutate,reason", [
    (lambda b, h: (b + b" ", h), "mismatch"),
    (lambda b, h: (b, {**h, TIMESTAMP_HEADER: "1800000001"}), "mismatch"),  # replayed with a new timestamp
    (lambda b, h: (b, {TIMESTAMP_HEADER: h[TIMESTAMP_HEADER]}), "missing"),
    (lambda b, h: (b, {**h, TIMESTAMP_HEADER: "soon"}), "malformed"),
    (lambda b, h: (b, {**h, SIGNATURE_HEADER: "md5=00"}), "malformed"),
])
def test_tampered_requests_are_refused(mutate, reason):
    body = b'{"version":"4"}'
    b, h = mutate(body, signed_headers(body, "k3y", 1_800_000_000))
    with pytest.raises(InvalidSignature) as info:
        verify_signature(b, h, "k3y", now_s=1_800_000_000)
    assert info.value.reason == reason


def test_replay_window():
    body = b"{}"
    h = signed_headers(body, "k3y", 1_800_000_000)
    verify_signature(body, h, "k3y", now_s=1_800_000_299)
    for now in (1_800_000_301, 1_799_999_699):  # too old, or from the future
        with pytest.raises(InvalidSignature, match="replay window"):
            verify_signature(body, h, "k3y", now_s=now)
    with pytest.raises(InvalidSignature, match="mismatch"):
        verify_signature(body, h, "other", now_s=1_800_000_000)
    assert sign(body, "k3y", 1) != sign(body, "k3y", 2)


def test_backoff_doubles_caps_and_jitters():
    delays = [backoff_s(n, 0.5, 8.0, rand=0.5) for n in range(1, 8)]
    assert delays == sorted(delays) and max(delays) <= 8.0
    assert backoff_s(10, 0.5, 8.0, rand=0.0) == 4.0 and backoff_s(10, 0.5, 8.0, rand=0.9999) < 8.0


def test_the_http_connector_never_connects_to_a_refused_address():
    import asyncio

    from streamfuse.alerts.delivery import GuardedResolver

    async def resolve(allow_private: bool):
        return await GuardedResolver(allow_private).resolve("localhost", 80)

    with pytest.raises(OSError, match="no address receivers may use"):
        asyncio.run(resolve(False))
    assert {r["host"] for r in asyncio.run(resolve(True))} <= {"127.0.0.1", "::1"}
