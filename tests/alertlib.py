"""Helpers for the tests and benchmarks of alert delivery: make and publish alert events,
run a dispatcher in a thread, wait for conditions with deadlines, clean up topics and keys."""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid
from typing import Any, Callable

from streamfuse.alerts.lifecycle import fingerprint
from streamfuse.config import Settings
from streamfuse.events import Alert, encode, headers
from streamfuse.topics import Topics


def isolated_settings(bootstrap: str, **alerts: Any) -> Settings:
    """Settings with their own topic prefix, Redis prefix and consumer group, and fast alert timings.

    Args:
        bootstrap: the broker (the embedded one in tests).
        alerts: overrides of :class:`~streamfuse.alerts.config.AlertSettings` fields.
    """
    from streamfuse.alerts.sealing import generate_key

    tag = uuid.uuid4().hex[:8]
    fast = {"group": f"alerts-{tag}", "allow_private_targets": True, "group_wait_s": 0.2,
            "group_interval_s": 0.2, "backoff_initial_s": 0.2, "backoff_max_s": 1.0, "request_timeout_s": 2.0,
            "secret_key": generate_key(), "redis_channel_prefix": f"t{tag}.notify."}
    return Settings(kafka_bootstrap=bootstrap, broker="tansu", topic_prefix=f"t{tag}.",
                    redis_prefix=f"streamfuse-test:{tag}:", alerts={**fast, **alerts})


def make_alert(status: str = "firing", *, kind: str = "degradation", modality: str = "image",
               scope: str = "asset", scope_id: str = "asset-1", severity: str = "warning", starts_ms: int = 1_000,
               event_ms: int | None = None, summary: str = "") -> Alert:
    """An alert event like the monitor's (fingerprint from kind, modality, scope, scope_id)."""
    labels = {"kind": kind, "modality": modality, "scope": scope, "scope_id": scope_id}
    fp = fingerprint(labels)
    event = event_ms if event_ms is not None else starts_ms + (5_000 if status == "resolved" else 0)
    return Alert(fp, f"{fp}@{starts_ms}", status, kind, severity, modality, scope, scope_id, starts_ms, event,
                 summary=summary or f"{scope} {scope_id}: {modality} {kind}", labels=labels, value=0.41,
                 threshold=0.6, ends_ms=event if status == "resolved" else None)


def resolved(alert: Alert, ends_ms: int | None = None) -> Alert:
    ends = ends_ms if ends_ms is not None else alert.starts_ms + 5_000
    return dataclasses.replace(alert, status="resolved", event_ms=ends, ends_ms=ends)


def publish(settings: Settings, alerts: list[Alert], producer=None) -> None:
    """Send alert events to the alerts topic, keyed by fingerprint, and flush."""
    from streamfuse.kafka import make_producer

    own = producer is None
    producer = producer or make_producer(settings, "alerts-test")
    topic = Topics(settings.topic_prefix).alerts
    for a in alerts:
        producer.send(topic, key=a.fingerprint.encode(), value=encode(a), headers=headers())
    producer.flush()
    if own:
        producer.close()


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.05) -> None:
    """Return once ``predicate()`` holds.

    Raises:
        TimeoutError: not within ``timeout_s``; the message says what was awaited.
    """
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(poll_s)


def read_events(settings: Settings, topic: str, at_least: int, timeout_s: float) -> list[Any]:
    """Every event on ``topic`` from the beginning, once there are ``at_least`` of them.

    Raises:
        TimeoutError: fewer within ``timeout_s``.
    """
    from kafka import TopicPartition

    from streamfuse.events import content_type_of, decode
    from streamfuse.kafka import make_consumer

    consumer = make_consumer(settings, None, "alerts-test-reader")
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        consumer.assign([TopicPartition(topic, p) for p in sorted(parts)])
        consumer.seek_to_beginning()
        out: list[Any] = []
        deadline = time.monotonic() + timeout_s
        while len(out) < at_least:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(out)} events on {topic} after {timeout_s:.0f} s, wanted {at_least}")
            for recs in consumer.poll(timeout_ms=200).values():
                out += [decode(r.value, content_type_of(r.headers)) for r in recs]
        return out
    finally:
        consumer.close()


class DispatcherThread:
    """:func:`~streamfuse.alerts.dispatcher.run_dispatcher` in a thread; ``stop()`` returns its stats."""

    def __init__(self, settings: Settings, wait_ready: bool = True, **kwargs: Any) -> None:
        self.wait_ready = wait_ready  # False for a standby that may never get a partition
        self.stop_event = threading.Event()
        self.ready = threading.Event()
        self.result: dict[str, Any] | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(settings, kwargs), daemon=True,
                                        name="alerts-dispatcher")

    def _run(self, settings: Settings, kwargs: dict[str, Any]) -> None:
        from streamfuse.alerts.dispatcher import run_dispatcher

        try:
            self.result = run_dispatcher(settings, self.stop_event, ready=self.ready, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - re-raised by stop() in the test's thread
            self.error = exc
            self.ready.set()

    def start(self, timeout_s: float = 30.0) -> "DispatcherThread":
        self._thread.start()
        if self.wait_ready and not self.ready.wait(timeout_s):
            raise TimeoutError(f"dispatcher did not get its partitions within {timeout_s:.0f} s")
        if self.error is not None:
            raise self.error
        return self

    def stop(self, timeout_s: float = 30.0) -> dict[str, Any]:
        self.stop_event.set()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise TimeoutError(f"dispatcher did not stop within {timeout_s:.0f} s")
        if self.error is not None:
            raise self.error
        return self.result or {}

    def __enter__(self) -> "DispatcherThread":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def cleanup(settings: Settings) -> None:
    """Delete the settings' Redis keys and topics."""
    from streamfuse.store import connect
    from streamfuse.topics import delete_topics

    r = connect(settings)
    keys = list(r.scan_iter(match=f"{settings.redis_prefix}*"))
    if keys:
        r.delete(*keys)
    delete_topics(settings)
