"""``streamfuse ingest mqtt``: MQTT messages → sensor events (or dead letters) on Kafka.

Delivery guarantee (QoS 1, at-least-once end to end). The gateway subscribes with QoS 1
in a persistent session (MQTT 3.1.1 ``clean_session=false``; MQTT 5 ``clean_start=false``
with a session expiry), with paho's manual acknowledgements. A message's PUBACK is sent
only after Kafka acknowledged (``acks=all``) the sensor event or the dead letter made from
it, and PUBACKs go out in the order the messages came (MQTT 3.1.1 §4.6). So a gateway
that crashes, is killed or loses its connection has acknowledged only what Kafka holds;
the broker redelivers the rest when it comes back with the same client id. A message
whose record Kafka had taken just before the crash is delivered again and becomes a
second event with the same ``event_id`` (derived from topic, payload and event time):
with a device timestamp (``time = "payload"``) it lands in the same sync slot and the
synchronizer drops it as a duplicate; with ``time = "arrival"`` a redelivery is a new
reading. QoS 0 messages are at most once (the broker does not keep them), and the broker
keeps an offline session's messages only within its own limits (Mosquitto:
``max_queued_messages``, the session expiry).

Paho's network thread receives messages and produces; the calling thread serves Kafka's
delivery reports and sends the acks.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

from prometheus_client import CollectorRegistry

from streamfuse.clock import now_ms
from streamfuse.config import MqttSettings, Settings
from streamfuse.errors import ConfigError, InvalidEvent
from streamfuse.events import DeadLetter
from streamfuse.ingest.decode import to_event
from streamfuse.ingest.mapping import Mapping
from streamfuse.ingest.sink import KafkaSink
from streamfuse.metrics import IngestMetrics

log = logging.getLogger(__name__)
COMPONENT = "ingest-mqtt"


class AckQueue:
    """Acknowledges messages in the order they arrived, once each is done.

    A handle is ``(epoch, seq)``; :meth:`reset` (the connection dropped) starts a new epoch,
    so records of the old connection that Kafka acknowledges later are not acknowledged
    on the new one: the broker redelivers those messages itself.

    Examples:
        >>> q = AckQueue()
        >>> a, b, c = q.add(7), q.add(8), q.add(9)
        >>> q.done(b), q.done(a), q.done(c)
        ([], [7, 8], [9])
        >>> d = q.add(10); q.reset(); q.done(d)
        []
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._epoch = 0
        self._seq = 0
        self._queue: deque[list] = deque()  # [seq, mid, done]
        self._by_seq: dict[int, list] = {}

    def add(self, mid: int) -> tuple[int, int]:
        with self._lock:
            self._seq += 1
            entry = [self._seq, mid, False]
            self._queue.append(entry)
            self._by_seq[self._seq] = entry
            return self._epoch, self._seq

    def done(self, handle: tuple[int, int]) -> list[int]:
        """Mark one message done; returns the message ids now ready to acknowledge, in order."""
        epoch, seq = handle
        with self._lock:
            entry = self._by_seq.pop(seq, None) if epoch == self._epoch else None
            if entry is None:
                return []
            entry[2] = True
            out = []
            while self._queue and self._queue[0][2]:
                out.append(self._queue.popleft()[1])
            return out

    def reset(self) -> None:
        with self._lock:
            self._epoch += 1
            self._queue.clear()
            self._by_seq.clear()

    def __len__(self) -> int:
        return len(self._queue)


class MqttGateway:
    """The MQTT → Kafka bridge; see the module docstring for its guarantee.

    Args:
        settings: Kafka and ``settings.ingest.mqtt`` (broker, session, TLS, login).
        mapping: the rules; the gateway subscribes to ``mapping.mqtt_filters``.
        registry: Prometheus registry for :class:`~streamfuse.metrics.IngestMetrics`.
        producer: a confluent-kafka producer (default: one from the settings).
    """

    def __init__(self, settings: Settings, mapping: Mapping, registry: CollectorRegistry | None = None,
                 producer=None) -> None:
        if not mapping.mqtt:
            raise ConfigError("the mapping file has no [[mqtt]] rules: nothing for `ingest mqtt` to subscribe to")
        self.settings, self.mapping = settings, mapping
        self.cfg: MqttSettings = settings.ingest.mqtt
        self.metrics = IngestMetrics(registry or CollectorRegistry(), "mqtt")
        self.acks = AckQueue()
        self.sink = KafkaSink(settings, self.metrics, "mqtt", self._on_kafka_ack, producer)
        self.client = self._make_client()
        self.connected = threading.Event()
        self.subscribed = threading.Event()  # the broker confirmed the subscriptions
        self.received = 0
        self._connects = 0
        self._closing = False

    def _make_client(self):
        import paho.mqtt.client as mqtt

        cfg = self.cfg
        v5 = cfg.protocol == "5"
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cfg.client_id,
                             protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
                             clean_session=None if v5 else False, manual_ack=True)
        if cfg.username is not None:
            client.username_pw_set(cfg.username, cfg.password.get_secret_value() if cfg.password else None)
        if cfg.tls:
            client.tls_set(ca_certs=_path(cfg.ssl_cafile), certfile=_path(cfg.ssl_certfile),
                           keyfile=_path(cfg.ssl_keyfile))
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = lambda *_: self.subscribed.set()
        return client

    def _connect_properties(self):
        if self.cfg.protocol != "5":
            return None
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.cfg.session_expiry_s
        props.ReceiveMaximum = self.cfg.inflight
        return props

    # ---------------------------------------------------------------- paho's thread

    def _on_connect(self, client, _userdata, _flags, reason_code, _properties) -> None:
        if reason_code.is_failure:
            log.error("MQTT broker %s:%d refused the connection: %s", self.cfg.host, self.cfg.port, reason_code)
            return
        self._connects += 1
        if self._connects > 1:
            self.metrics.reconnects.inc()
        # Subscribing again is harmless with a kept session and needed without one.
        client.subscribe([(f, 1) for f in self.mapping.mqtt_filters])
        log.info("MQTT connected to %s:%d as %s; subscribed to %s", self.cfg.host, self.cfg.port,
                 self.cfg.client_id, ", ".join(self.mapping.mqtt_filters))
        self.connected.set()

    def _on_disconnect(self, _client, _userdata, _flags, reason_code, _properties) -> None:
        self.connected.clear()
        self.subscribed.clear()
        self.acks.reset()  # the broker redelivers every message we had not acknowledged
        if self._closing:
            log.info("MQTT disconnected (%s)", reason_code)
        else:
            log.warning("MQTT connection lost (%s); paho reconnects", reason_code)

    def _on_message(self, _client, _userdata, msg) -> None:
        received = time.monotonic()
        self.received += 1
        self.metrics.messages.inc()
        token = self.acks.add(msg.mid) if msg.qos > 0 else None
        arrival_ms = now_ms()
        match = self.mapping.match_topic(msg.topic)
        try:
            if match is None:
                raise InvalidEvent("unmapped", f"no [[mqtt]] rule of the mapping matches topic {msg.topic!r}")
            rule, captures = match
            ev = to_event(rule, captures, msg.topic, msg.payload, arrival_ms=arrival_ms,
                          max_bytes=self.settings.max_payload_bytes, properties=_user_properties(msg))
        except InvalidEvent as exc:
            dead = DeadLetter(exc.reason, exc.detail, msg.topic, bytes(msg.payload[:self.settings.max_payload_bytes]),
                              COMPONENT, arrival_ms, modality=exc.modality)
            self.sink.dead(dead, token, received)
            return
        self.sink.event(ev, token, received)

    # ---------------------------------------------------------------- the caller's thread

    def _on_kafka_ack(self, token) -> None:
        if token is None:
            return
        for mid in self.acks.done(token):
            self.client.ack(mid, 1)

    def run(self, stop: threading.Event, max_messages: int | None = None) -> int:
        """Bridge until ``stop`` is set (or ``max_messages`` were received and acknowledged).

        Returns:
            The number of messages received.
        """
        cfg = self.cfg
        kwargs = {"clean_start": False, "properties": self._connect_properties()} if cfg.protocol == "5" else {}
        self.client.connect_async(cfg.host, cfg.port, cfg.keepalive_s, **kwargs)
        self.client.loop_start()
        try:
            while not stop.is_set():
                self.sink.poll(0.05)
                if max_messages is not None and self.received >= max_messages and not self.sink.pending:
                    break
        finally:
            self._shutdown()
        return self.received

    def _shutdown(self) -> None:
        """Stop reading, let Kafka acknowledge what it has, send those acks, then disconnect."""
        self._closing = True
        self.client.loop_stop()
        left = self.sink.flush(10.0)
        if left:
            log.warning("%d records were not acknowledged by Kafka before shutdown; their MQTT messages "
                        "stay unacknowledged and the broker redelivers them", left)
        self.client.disconnect()


def _user_properties(msg) -> dict[str, str] | None:
    props = getattr(msg, "properties", None)
    pairs = getattr(props, "UserProperty", None) if props is not None else None
    return dict(pairs) if pairs else None


def _path(p) -> str | None:
    return None if p is None else str(p)
