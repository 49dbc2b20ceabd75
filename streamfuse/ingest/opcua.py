"""``streamfuse ingest opcua``: OPC-UA data changes → sensor events (or dead letters) on Kafka.

The gateway opens a session (optionally Basic256Sha256 ``Sign`` or ``SignAndEncrypt``
with the certificate, key and server certificate from the settings), creates one
subscription and a monitored item per mapped node with its sampling interval and queue
size. When the connection is lost (a server restart, the network) it reconnects with
exponential backoff and subscribes again. After the reconnect, each node's re-reported
current value is recognised as stale and not forwarded again, and the readings it never
received are reported as a gap (:mod:`streamfuse.ingest.gaps`): never invented.

Guarantee: OPC-UA has no per-value acknowledgement toward the source, so a value is on
Kafka once its delivery report arrived (counted, resent on failure, never dropped while
the gateway runs); values sampled while the gateway itself is down are not recoverable
from a subscription and show up as missing downstream.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time

from prometheus_client import CollectorRegistry

from streamfuse.clock import now_ms
from streamfuse.config import OpcuaSettings, Settings
from streamfuse.errors import ConfigError, InvalidEvent
from streamfuse.events import DeadLetter
from streamfuse.ingest.decode import to_event
from streamfuse.ingest.gaps import Gap, GapTracker
from streamfuse.ingest.mapping import Mapping, Rule
from streamfuse.ingest.sink import KafkaSink
from streamfuse.metrics import IngestMetrics

log = logging.getLogger(__name__)
COMPONENT = "ingest-opcua"


def epoch_ms(t: dt.datetime | None) -> int | None:
    """Epoch milliseconds of an OPC-UA timestamp (naive ones are UTC).

    Examples:
        >>> epoch_ms(dt.datetime(2027, 1, 1)), epoch_ms(None)
        (1798761600000, None)
    """
    if t is None:
        return None
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.timezone.utc)
    return int(t.timestamp() * 1000)


class OpcuaGateway:
    """The OPC-UA → Kafka bridge; see the module docstring.

    Args:
        settings: Kafka and ``settings.ingest.opcua`` (server, security, sampling, backoff).
        mapping: the ``[[opcua]]`` rules: node id → asset, modality, format.
        registry: Prometheus registry for :class:`~streamfuse.metrics.IngestMetrics`.
        producer: a confluent-kafka producer (default: one from the settings).
    """

    def __init__(self, settings: Settings, mapping: Mapping, registry: CollectorRegistry | None = None,
                 producer=None) -> None:
        if not mapping.opcua:
            raise ConfigError("the mapping file has no [[opcua]] rules: nothing for `ingest opcua` to subscribe to")
        self.settings, self.cfg = settings, settings.ingest.opcua
        _check_security(self.cfg)
        self.rules = mapping.node_rules()
        self.metrics = IngestMetrics(registry or CollectorRegistry(), "opcua")
        self.sink = KafkaSink(settings, self.metrics, "opcua", producer=producer)
        self.gaps = GapTracker()
        self.sessions = 0  # sessions opened (each after the first is a reconnect)
        self.subscribed = asyncio.Event()
        self.received = 0
        self.stale = 0

    async def run(self, stop: asyncio.Event) -> int:
        """Bridge until ``stop`` is set, reconnecting as needed. Returns the values received."""
        from asyncua import ua

        poller = asyncio.create_task(self._poll_sink(stop))
        delay = self.cfg.reconnect_min_s
        try:
            while not stop.is_set():
                try:
                    await self._session(stop)
                    delay = self.cfg.reconnect_min_s
                except (OSError, asyncio.TimeoutError, ConnectionError, ua.UaError) as exc:
                    log.warning("OPC-UA %s: %r; retrying in %.1f s", self.cfg.url, exc, delay)
                self.subscribed.clear()
                self.gaps.disconnected()
                if not stop.is_set():
                    await _wait(stop, delay)
                    delay = min(delay * 2, self.cfg.reconnect_max_s)
        finally:
            poller.cancel()
            left = self.sink.flush(10.0)
            if left:
                log.warning("%d records were not acknowledged by Kafka before shutdown", left)
        return self.received

    async def _poll_sink(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.sink.poll(0)
            await asyncio.sleep(0.01)

    async def _session(self, stop: asyncio.Event) -> None:
        """One connection: connect, subscribe, forward until it is lost or ``stop`` is set."""
        from asyncua import Client

        client = Client(self.cfg.url, timeout=self.cfg.timeout_s, watchdog_intervall=0.5)
        client.application_uri = self.cfg.application_uri
        if self.cfg.username is not None:
            client.set_user(self.cfg.username)
            if self.cfg.password is not None:
                client.set_password(self.cfg.password.get_secret_value())
        await self._secure(client)
        lost = asyncio.Event()

        async def on_lost(exc: Exception) -> None:
            log.warning("OPC-UA connection to %s lost: %r", self.cfg.url, exc)
            lost.set()

        client.connection_lost_callback = on_lost
        await client.connect()
        try:
            await self._subscribe(client)
            self.sessions += 1
            if self.sessions > 1:
                self.metrics.reconnects.inc()
            self.subscribed.set()
            log.info("OPC-UA subscribed to %d nodes on %s", len(self.rules), self.cfg.url)
            waiters = [asyncio.create_task(lost.wait()), asyncio.create_task(stop.wait())]
            try:
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waiters:
                    w.cancel()
        finally:
            await _close(client)

    async def _secure(self, client) -> None:
        from asyncua import ua
        from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256

        cfg = self.cfg
        if cfg.security_policy == "None":
            return
        await client.set_security(
            SecurityPolicyBasic256Sha256, str(cfg.certificate), str(cfg.private_key),
            cfg.private_key_password.get_secret_value() if cfg.private_key_password else None,
            str(cfg.server_certificate) if cfg.server_certificate else None,
            getattr(ua.MessageSecurityMode, cfg.security_mode))

    async def _subscribe(self, client) -> None:
        from asyncua import ua

        sub = await client.create_subscription(self.cfg.publishing_interval_ms, _Handler(self))
        for node_id, rule in self.rules.items():
            interval = rule.sampling_interval_ms if rule.sampling_interval_ms is not None \
                else self.cfg.sampling_interval_ms
            queue = rule.queue_size or self.cfg.queue_size
            try:
                await sub.subscribe_data_change(client.get_node(node_id), queuesize=queue, sampling_interval=interval)
            except (ua.UaStatusCodeError, ValueError) as exc:  # an unknown node or a malformed id
                self._dead(InvalidEvent("unmapped", f"cannot subscribe to node {node_id!r}: {exc}", rule.modality),
                           node_id, b"", time.monotonic())

    # ------------------------------------------------------------- notifications

    def on_value(self, node_id: str, value, data_value) -> None:
        """One data change (called by the subscription handler)."""
        received = time.monotonic()
        self.received += 1
        self.metrics.messages.inc()
        rule = self.rules.get(node_id)
        arrival_ms = now_ms()
        device_ms, server_ms = epoch_ms(data_value.SourceTimestamp), epoch_ms(data_value.ServerTimestamp)
        status = data_value.StatusCode
        if rule is None:
            return self._dead(InvalidEvent("unmapped", f"no [[opcua]] rule for node {node_id!r}"), node_id, b"",
                              received)
        if status is not None and not status.is_good():
            return self._dead(InvalidEvent("bad_quality", f"{node_id}: status {status.name}; no reading",
                                           rule.modality), node_id, b"", received, rule)
        outcome, gap = self.gaps.observe(node_id, device_ms or server_ms or arrival_ms, _period(rule, self.cfg))
        if outcome == "stale":
            self.stale += 1  # the value we already forwarded, reported again after a re-subscribe
            return None
        if gap is not None:
            self._gap(gap, rule, received)
        try:
            ev = to_event(rule, {}, node_id, value, arrival_ms=arrival_ms, device_ms=device_ms, server_ms=server_ms,
                          max_bytes=self.settings.max_payload_bytes)
        except InvalidEvent as exc:
            return self._dead(exc, node_id, _original(value), received, rule)
        self.sink.event(ev, None, received)
        return None

    def _gap(self, gap: Gap, rule: Rule, received: float) -> None:
        self.metrics.missed(rule.modality, gap.missed)
        detail = (f"{gap.node}: no readings between {gap.after_ms} and {gap.before_ms} ms (connection to "
                  f"{self.cfg.url} lost); about {gap.missed} readings missed, none invented")
        log.warning("%s", detail)
        self._dead(InvalidEvent("missing_readings", detail, rule.modality), gap.node, b"", received, rule,
                   ts_ms=gap.before_ms)

    def _dead(self, exc: InvalidEvent, node_id: str, original: bytes, received: float, rule: Rule | None = None,
              ts_ms: int | None = None) -> None:
        key = rule.asset.encode() if rule is not None else None
        d = DeadLetter(exc.reason, exc.detail, node_id, original, COMPONENT,
                       ts_ms if ts_ms is not None else now_ms(), key=key, modality=exc.modality)
        self.sink.dead(d, None, received)


class _Handler:
    """asyncua's subscription callback interface."""

    def __init__(self, gateway: OpcuaGateway) -> None:
        self.gateway = gateway

    def datachange_notification(self, node, val, data) -> None:
        self.gateway.on_value(node.nodeid.to_string(), val, data.monitored_item.Value)

    def status_change_notification(self, status) -> None:
        log.info("OPC-UA subscription status: %s", status)


def _period(rule: Rule, cfg: OpcuaSettings) -> float:
    if rule.period_ms is not None:
        return rule.period_ms
    return rule.sampling_interval_ms if rule.sampling_interval_ms is not None else cfg.sampling_interval_ms


def _original(value) -> bytes:
    return bytes(value) if isinstance(value, (bytes, bytearray)) else repr(value).encode()[:100_000]


def _check_security(cfg: OpcuaSettings) -> None:
    if cfg.security_policy == "None":
        return
    for name in ("certificate", "private_key"):
        path = getattr(cfg, name)
        if path is None or not path.is_file():
            raise ConfigError(f"OPC-UA security policy {cfg.security_policy} needs "
                              f"STREAMFUSE_INGEST__OPCUA__{name.upper()} to name an existing file (got {path})")
    if cfg.server_certificate is not None and not cfg.server_certificate.is_file():
        raise ConfigError(f"STREAMFUSE_INGEST__OPCUA__SERVER_CERTIFICATE={cfg.server_certificate} does not exist")


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except asyncio.TimeoutError:
        return


async def _close(client) -> None:
    try:
        await asyncio.wait_for(client.disconnect(), 2.0)
    except Exception as exc:  # the server may be gone already; the session ends either way
        log.debug("OPC-UA disconnect: %r", exc)
