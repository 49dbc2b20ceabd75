"""The alerts API is closed by default: a token (or mTLS) off loopback, JSON bodies only,
no subscription takeover, URLs redacted, channels under a prefix, secrets sealed at rest."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import socket
import ssl
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from typer.testing import CliRunner

from streamfuse.alerts.api import check_exposure, make_app, tls_context
from streamfuse.alerts.cli import alerts_app
from streamfuse.alerts.config import AlertSettings
from streamfuse.alerts.subscriptions import AlertKeys, SubscriptionStore
from test_alerts_api import redis_settings  # noqa: F401 - a fixture
from streamfuse.config import Settings
from streamfuse.errors import ConfigError
from streamfuse.store import connect

pytestmark = pytest.mark.integration
TOKEN = "t0k-closed-by-default"


@pytest.fixture
def s(redis_settings):  # noqa: F811 (the fixture imported above)
    return redis_settings  # settings for Redis without a broker; keys deleted afterwards


def with_alerts(settings: Settings, **over) -> Settings:
    alerts = AlertSettings(**{**settings.alerts.model_dump(), **over})  # validated: tokens become SecretStr
    return settings.model_copy(update={"alerts": alerts})


def outward_address() -> str:
    """This machine's address on its default route (not loopback)."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("10.255.255.255", 9))  # no packet is sent: UDP connect only picks the route
        return probe.getsockname()[0]
    except OSError:
        pytest.skip("no non-loopback IPv4 address on this machine")
    finally:
        probe.close()


def run(settings: Settings, scenario, host: str = "127.0.0.1") -> None:
    async def main() -> None:
        async with TestClient(TestServer(make_app(settings), host=host)) as client:
            await scenario(client)

    asyncio.run(main())


def test_serve_refuses_a_non_loopback_address_without_a_token(s):
    for host in ("0.0.0.0", "", "::", "192.0.2.2", "api.example"):
        with pytest.raises(ConfigError, match="STREAMFUSE_ALERTS__API_TOKEN.*mTLS"):
            check_exposure(s, host)
    for host in ("127.0.0.1", "::1", "localhost"):
        check_exposure(s, host)
    check_exposure(with_alerts(s, api_token=TOKEN), "0.0.0.0")
    out = CliRunner().invoke(alerts_app, ["serve", "--host", "0.0.0.0", "--port", "0"])
    assert out.exit_code == 2 and "refusing to serve the alerts API" in out.output


def test_unauthenticated_requests_off_loopback_get_401(s):
    host = outward_address()
    settings = with_alerts(s, api_token=TOKEN)
    auth = {"Authorization": f"Bearer {TOKEN}"}

    async def scenario(client) -> None:
        assert (await client.get("/healthz")).status == 200
        assert (await client.get("/openapi.json")).status == 200
        for method, path in [("GET", "/subscriptions"), ("POST", "/subscriptions"), ("DELETE", "/subscriptions/x"),
                             ("GET", "/silences"), ("POST", "/silences"), ("GET", "/alerts"), ("GET", "/events"),
                             ("GET", "/stats")]:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
                resp = await client.request(method, path, json={"url": "http://8.8.8.8/"}, headers=headers)
                assert resp.status == 401, (method, path, headers)
        assert (await client.get("/subscriptions", headers=auth)).status == 200
        assert await asyncio.to_thread(SubscriptionStore(connect(s), s.redis_prefix, s.alerts).list) == []

    run(settings, scenario, host=host)


def test_only_json_bodies_are_accepted(s):
    async def scenario(client) -> None:
        for kwargs in ({"data": "url=http://8.8.8.8/"},  # a form, as a cross-site page posts it
                       {"data": '{"url": "http://8.8.8.8/"}', "headers": {"Content-Type": "text/plain"}},
                       {"data": aiohttp.FormData({"url": "http://8.8.8.8/"})}):
            for path in ("/subscriptions", "/silences"):
                resp = await client.post(path, **kwargs)
                assert resp.status == 415 and "application/json" in (await resp.json())["error"], (path, kwargs)
        assert await (await client.get("/subscriptions")).json() == []
        # Without a token the API answers only loopback host names (no DNS rebinding).
        resp = await client.get("/subscriptions", headers={"Host": "evil.example:9095"})
        assert resp.status == 403

    run(s, scenario)


def test_reposting_an_id_is_a_conflict_not_a_takeover(s, monkeypatch):
    url = "https://8.8.8.8/services/T0/B1/XyZsecretpath?token=abc123&team=ops"

    async def scenario(client) -> None:
        resp = await client.post("/subscriptions", json={"id": "ops", "url": url, "secret": "hunter2"})
        created = await resp.json()
        assert resp.status == 201 and created["url"] == "https://8.8.8.8/..." and created["signed"]
        assert "abc123" not in json.dumps(created) and "XyZsecretpath" not in json.dumps(created)
        taken = await client.post("/subscriptions", json={"id": "ops", "url": "https://8.8.4.4/mine"})
        assert taken.status == 409 and "exists" in (await taken.json())["error"]
        listed = await (await client.get("/subscriptions")).json()
        assert [(x["id"], x["url_sha256"], x["signed"]) for x in listed] == [("ops", created["url_sha256"], True)]
        one = await (await client.get("/subscriptions/ops")).text()
        assert "abc123" not in one and "XyZsecretpath" not in one and "hunter2" not in one

    run(s, scenario)
    store = SubscriptionStore(connect(s), s.redis_prefix, s.alerts)
    sub = store.get("ops")
    assert (sub.url, sub.secret) == (url, "hunter2")  # unchanged, and the secret still opens
    raw = connect(s).hget(AlertKeys(s.redis_prefix).subscriptions, "ops").decode()
    assert "hunter2" not in raw and "secret_sealed" in raw  # sealed at rest
    monkeypatch.setenv("STREAMFUSE_REDIS_PREFIX", s.redis_prefix)
    monkeypatch.setenv("STREAMFUSE_ALERTS__SECRET_KEY", s.alerts.secret_key.get_secret_value())
    runner = CliRunner()
    again = runner.invoke(alerts_app, ["subscribe", "--id", "ops", "--url", "https://8.8.4.4/x"])
    assert again.exit_code == 2 and "exists" in again.output
    replaced = runner.invoke(alerts_app, ["subscribe", "--id", "ops", "--url", "https://8.8.4.4/x", "--replace"])
    assert replaced.exit_code == 0 and store.get("ops").url == "https://8.8.4.4/x"


def test_a_secret_needs_the_sealing_key(s):
    keyless = with_alerts(s, secret_key=None)

    async def scenario(client) -> None:
        resp = await client.post("/subscriptions", json={"url": "https://8.8.8.8/h", "secret": "hunter2"})
        assert resp.status == 400 and "STREAMFUSE_ALERTS__SECRET_KEY" in (await resp.json())["error"]
        assert (await client.post("/subscriptions", json={"url": "https://8.8.8.8/h"})).status == 201

    run(keyless, scenario)
    assert connect(s).hlen(AlertKeys(s.redis_prefix).subscriptions) == 1


def _cert(name: str, key, issuer=None, issuer_key=None, ca: bool = False):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer or subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        loopback = x509.IPAddress(ipaddress.ip_address("127.0.0.1"))
        builder = builder.add_extension(x509.SubjectAlternativeName([loopback]), critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


def _write_pki(tmp: Path) -> dict[str, Path]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    files: dict[str, Path] = {}
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("streamfuse-test-ca", ca_key, ca=True)
    for name in ("server", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert(name, key, ca.subject, ca_key)
        files[f"{name}_cert"] = tmp / f"{name}.pem"
        files[f"{name}_key"] = tmp / f"{name}.key"
        files[f"{name}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        files[f"{name}_key"].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                           serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()))
    files["ca"] = tmp / "ca.pem"
    files["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    return files


def test_mtls_lets_only_clients_with_a_certificate_in(s, tmp_path):
    pki = _write_pki(tmp_path)
    settings = with_alerts(s, api_tls_certfile=pki["server_cert"], api_tls_keyfile=pki["server_key"],
                           api_tls_client_cafile=pki["ca"])
    check_exposure(settings, "0.0.0.0")  # mTLS instead of a token is enough off loopback
    with pytest.raises(ConfigError, match="both"):
        tls_context(with_alerts(s, api_tls_certfile=pki["server_cert"]))

    async def main() -> None:
        runner = web.AppRunner(make_app(settings))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls_context(settings))
        await site.start()
        port = runner.addresses[0][1]
        try:
            client_ctx = ssl.create_default_context(cafile=str(pki["ca"]))
            async with aiohttp.ClientSession() as http:
                with pytest.raises(aiohttp.ClientError):  # no client certificate: the handshake fails
                    await (await http.get(f"https://127.0.0.1:{port}/subscriptions", ssl=client_ctx)).read()
                client_ctx.load_cert_chain(pki["client_cert"], pki["client_key"])
                resp = await http.get(f"https://127.0.0.1:{port}/subscriptions", ssl=client_ctx)
                assert resp.status == 200 and await resp.json() == []
        finally:
            await runner.cleanup()

    asyncio.run(main())
