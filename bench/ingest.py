"""MQTT gateway throughput (MQTT in → Kafka acked) against a raw paho-mqtt subscriber of
the same messages, in the same run.

Both clients hold a persistent QoS 1 session on the same Mosquitto, with the same
Receive Maximum, so every round's messages (20 KB JPEG images by default) are queued for
both. Each round then drains the raw subscriber's session (paho, automatic PUBACKs, no
work per message) and the gateway's (`MqttGateway`: map, validate, encode, produce to
the embedded Kafka broker, PUBACK only after Kafka acknowledged), each timed from
connect to its last message (raw: received; gateway: acknowledged by Kafka; neither
shutdown is timed). The ratio
is gateway rate / raw rate of the medians.

Usage: python bench/ingest.py [--n 800] [--rounds 3] [--size 20000] [--json out/ingest.json]
(Mosquitto keeps at most 1000 messages per offline session by default: keep --n below.)
"""

from __future__ import annotations

import argparse
import io
from importlib import metadata
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
from PIL import Image

from streamfuse.config import Settings
from streamfuse.embedded import EmbeddedBroker
from streamfuse.ingest.mapping import load_mapping
from streamfuse.ingest.mqtt import MqttGateway
from streamfuse.topics import ensure_topics
from report import emit, machine


def jpeg_of_size(size: int, seed: int = 0) -> bytes:
    """A noise JPEG of about ``size`` bytes (noise does not compress, so side ~ sqrt(size))."""
    rng = np.random.default_rng(seed)
    side = 16
    while True:
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, "JPEG", quality=75)
        if buf.tell() >= size:
            return buf.getvalue()
        side += 4


def client(client_id: str, host: str, port: int, inflight: int, on_message=None):
    import paho.mqtt.client as mqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    c.on_message = on_message
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 600
    props.ReceiveMaximum = inflight
    return c, dict(host=host, port=port, keepalive=30, clean_start=False, properties=props)


def raw_round(client_id: str, topic: str, n: int, host: str, port: int, inflight: int) -> float:
    """Seconds for a plain paho subscriber to receive its session's ``n`` queued messages."""
    done, got = threading.Event(), [0]

    def on_message(_c, _u, _msg) -> None:
        got[0] += 1
        if got[0] >= n:
            done.set()

    c, kw = client(client_id, host, port, inflight, on_message)
    if n == 0:  # set-up: the session and its subscription only
        c.on_subscribe = lambda *_: done.set()
    t0 = time.perf_counter()
    c.connect(**kw)
    c.subscribe(topic, qos=1)
    c.loop_start()
    assert done.wait(300), f"raw subscriber got {got[0]} of {n}"
    dt = time.perf_counter() - t0
    c.disconnect()
    c.loop_stop()
    return dt


def gateway_round(settings: Settings, mapping, n: int) -> tuple[float, int]:
    """Seconds for the gateway to take its session's ``n`` messages to Kafka (acknowledged)."""
    gw = MqttGateway(settings, mapping)
    if n == 0:  # set-up: the session and its subscription only
        stop = threading.Event()
        thread = threading.Thread(target=gw.run, args=(stop,))
        thread.start()
        ok = gw.subscribed.wait(30)
        stop.set()
        thread.join()
        assert ok, "the gateway did not subscribe"
        return 0.0, 0
    # Timed from connect to the n-th Kafka acknowledgement (the shutdown is not timed, as for raw).
    done, inner = threading.Event(), gw.sink.on_done

    def on_done(token) -> None:
        inner(token)
        if gw.sink.acked >= n:
            done.set()

    gw.sink.on_done = on_done
    stop = threading.Event()
    thread = threading.Thread(target=gw.run, args=(stop,))
    t0 = time.perf_counter()
    thread.start()
    assert done.wait(300), f"the gateway took {gw.sink.acked} of {n} messages to Kafka"
    dt = time.perf_counter() - t0
    stop.set()
    thread.join()
    return dt, gw.sink.acked


def publish(topic: str, payload: bytes, n: int, host: str, port: int) -> None:
    import paho.mqtt.client as mqtt

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{uuid.uuid4().hex[:6]}",
                    protocol=mqtt.MQTTv5)
    c.max_inflight_messages_set(100)
    c.max_queued_messages_set(0)
    c.connect(host, port, 30)
    c.loop_start()
    infos = [c.publish(topic, payload, qos=1) for _ in range(n)]
    for info in infos:
        info.wait_for_publish(60)
    c.disconnect()
    c.loop_stop()


def drop_sessions(ids: list[str], host: str, port: int) -> None:
    import paho.mqtt.client as mqtt

    for cid in ids:
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid, protocol=mqtt.MQTTv5)
        c.connect(host, port, 30, clean_start=True)
        c.loop_start()
        c.disconnect()
        c.loop_stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=800, help="messages per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size", type=int, default=20_000, help="image bytes per message")
    ap.add_argument("--inflight", type=int, default=100, help="MQTT 5 Receive Maximum of both clients")
    ap.add_argument("--mqtt-host", default="127.0.0.1")
    ap.add_argument("--mqtt-port", type=int, default=1883)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    tag = uuid.uuid4().hex[:8]
    prefix, raw_id, gw_id = f"bench/{tag}", f"bench-raw-{tag}", f"bench-gw-{tag}"
    topic = f"{prefix}/line-0/asset-0/camera"
    payload = jpeg_of_size(args.size)
    mapping_file = Path(tempfile.mkdtemp()) / "mapping.toml"
    mapping_file.write_text(f'[[mqtt]]\ntopic = "{prefix}/{{line}}/{{asset}}/camera"\nmodality = "image"\n'
                            f'format = "image"\n')
    mapping = load_mapping(mapping_file)
    host, port = args.mqtt_host, args.mqtt_port
    with EmbeddedBroker() as broker:
        settings = Settings(kafka_bootstrap=broker.bootstrap, broker="tansu", topic_prefix=f"bench{tag}.",
                            ingest={"mqtt": {"host": host, "port": port, "client_id": gw_id,
                                             "inflight": args.inflight}})
        ensure_topics(settings)
        # Create both sessions (subscribed), then leave them offline so the rounds queue.
        raw_round(raw_id, mapping.mqtt_filters[0], 0, host, port, args.inflight)
        gateway_round(settings, mapping, 0)
        raw_s, gw_s, acked = [], [], 0
        try:
            publish(topic, payload, 20, host, port)  # warm-up round
            raw_round(raw_id, mapping.mqtt_filters[0], 20, host, port, args.inflight)
            gateway_round(settings, mapping, 20)
            for r in range(args.rounds):
                publish(topic, payload, args.n, host, port)
                raw_s.append(raw_round(raw_id, mapping.mqtt_filters[0], args.n, host, port, args.inflight))
                dt, n_acked = gateway_round(settings, mapping, args.n)
                gw_s.append(dt)
                acked += n_acked
                print(f"round {r + 1}: raw {args.n / raw_s[-1]:7.0f} msg/s   gateway {args.n / dt:7.0f} msg/s")
        finally:
            drop_sessions([raw_id, gw_id], host, port)
    raw_rate, gw_rate = args.n / statistics.median(raw_s), args.n / statistics.median(gw_s)
    out = {
        "ratio": round(gw_rate / raw_rate, 3),
        "gateway_msgs_per_s": round(gw_rate, 1),
        "raw_msgs_per_s": round(raw_rate, 1),
        "gateway_mb_per_s": round(gw_rate * len(payload) / 1e6, 1),
        "messages_per_round": args.n, "rounds": args.rounds, "payload_bytes": len(payload), "qos": 1,
        "inflight": args.inflight, "kafka_acked": acked,
        "raw_s": [round(x, 3) for x in raw_s], "gateway_s": [round(x, 3) for x in gw_s],
        **machine(),
        "versions": {m: metadata.version(m) for m in ("paho-mqtt", "confluent-kafka", "streamfuse")},
    }
    emit(out, args.json)
    print(f"ratio {out['ratio']} (gateway MQTT in -> Kafka acked / raw paho subscriber)")


if __name__ == "__main__":
    main()
