"""Publish the simulated plant to Kafka: samples now, labels after a delay.

Event time drives everything: sample ``k`` of every asset has ``ts_ms = start_ms +
k * period_ms``; labels are due ``label_delay_ms`` later in event time. In real-time mode
the publisher sleeps until the wall clock reaches each event time; otherwise it
publishes as fast as it can (tests, replays) with the same event times.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field

from streamfuse.config import Settings
from streamfuse.errors import ConfigError
from streamfuse.events import JSON, MSGPACK, Label, Sample, SensorEvent, encode, encode_json, headers
from streamfuse.sim.faults import FaultSpec
from streamfuse.sim.plant import Plant, PlantConfig
from streamfuse.topics import Topics

log = logging.getLogger(__name__)


@dataclass
class SimStats:
    samples: int = 0
    sensor_events: int = 0  # readings inside the samples
    labels: int = 0
    malformed: int = 0
    sample_ids: list[str] = field(default_factory=list)


def malformed_records(sample: Sample) -> list[tuple[bytes, str, str]]:
    """Bad inputs a real plant produces, built around a valid sample, as
    ``(value, content type, expected reason)``; the worker must dead-letter each one
    and keep going. The last one is a sample whose image is broken: the worker still
    predicts it from the other modalities."""
    import dataclasses

    bad_image = dataclasses.replace(sample.readings["image"], payload=b"\xff\xd8\xff garbage") \
        if "image" in sample.readings else SensorEvent("x", sample.asset_id, "image", sample.ts_ms, b"nope")
    broken = dataclasses.replace(sample, sample_id=sample.sample_id + "-badimg",
                                 readings={**sample.readings, "image": bad_image})
    return [
        (b"\x00\x01 not msgpack \xc1", MSGPACK, "undecodable"),
        (b'{"schema": "sf.sample/99", "sample_id": "x"}', JSON, "unknown_schema"),
        (encode_json(Label("x", sample.asset_id, sample.ts_ms, "normal")), JSON, "unexpected_schema"),
        (encode(broken), MSGPACK, "bad_image"),
    ]


class SimPublisher:
    """Runs a :class:`Plant` and produces its samples and labels.

    Args:
        settings: bootstrap, topic prefix and ``settings.sim`` (assets, rate, delay, seed).
        faults: sensor faults to inject, timed from ``start_ms``.
        start_ms: event time of the first sample (default: now).
        speed: event-time seconds per wall-clock second; None = as fast as possible.
        malformed_every: every N samples, also publish a set of malformed records (0 = never).
        run_id: prefix of sample ids (unique per run).
    """

    def __init__(self, settings: Settings, faults: tuple[FaultSpec, ...] = (), start_ms: int | None = None,
                 speed: float | None = 1.0, malformed_every: int = 0, run_id: str = "sim") -> None:
        self.settings = settings
        self.topics = Topics(settings.topic_prefix)
        s = settings.sim
        self.start_ms = int(time.time() * 1000) if start_ms is None else start_ms
        self.plant = Plant(PlantConfig(assets=s.assets, lines=s.lines, rate_hz=s.rate_hz, seed=s.seed,
                                       faults=faults), start_ms=self.start_ms, run_id=run_id)
        if speed is not None and speed <= 0:
            raise ConfigError(f"speed must be > 0 (or None for as fast as possible), got {speed}")
        self.speed = speed
        self._wall0 = 0.0
        self.malformed_every = malformed_every
        self.stats = SimStats()
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def run(self, duration_s: float | None = None, max_samples: int | None = None, producer=None) -> SimStats:
        """Publish until ``duration_s`` of event time, ``max_samples`` samples, or :meth:`stop`."""
        from streamfuse.kafka import make_producer

        own = producer is None
        producer = producer or make_producer(self.settings, "streamfuse-sim")
        period = self.plant.period_ms
        end_ms = None if duration_s is None else self.start_ms + int(duration_s * 1000)
        delay = self.settings.sim.label_delay_ms
        pending: list[tuple[int, int, Label]] = []  # (due ms, tiebreak, label)
        counter = itertools.count()
        hdrs = headers(MSGPACK)
        self._wall0 = time.time()
        try:
            for k in itertools.count():
                ts = self.start_ms + k * period
                if self._stop.is_set() or (end_ms is not None and ts >= end_ms):
                    break
                self._sleep_until(ts)
                self._publish_labels(producer, pending, ts, hdrs)
                for i, asset in enumerate(self.plant.asset_ids):
                    if max_samples is not None and self.stats.samples >= max_samples:
                        break
                    sample, label = self.plant.sample(i, k, ts)
                    producer.send(self.topics.samples, key=asset.encode(), value=encode(sample), headers=hdrs)
                    self.stats.samples += 1
                    self.stats.sensor_events += len(sample.readings)
                    self.stats.sample_ids.append(sample.sample_id)
                    heapq.heappush(pending, (ts + delay, next(counter), label))
                    if self.malformed_every and self.stats.samples % self.malformed_every == 0:
                        self._publish_malformed(producer, sample)
                if max_samples is not None and self.stats.samples >= max_samples:
                    break
            # Remaining labels: in real time they still wait for their due time.
            if pending and not self._stop.is_set():
                self._sleep_until(pending[-1][0])
                self._publish_labels(producer, pending, None, hdrs)
            producer.flush()
        finally:
            if own:
                producer.close()
        return self.stats

    def _publish_labels(self, producer, pending: list, upto_ms: int | None, hdrs) -> None:
        while pending and (upto_ms is None or pending[0][0] <= upto_ms):
            _, _, label = heapq.heappop(pending)
            producer.send(self.topics.labels, key=label.asset_id.encode(), value=encode(label), headers=hdrs)
            self.stats.labels += 1

    def _publish_malformed(self, producer, sample: Sample) -> None:
        for value, ctype, _ in malformed_records(sample):
            producer.send(self.topics.samples, key=sample.asset_id.encode(), value=value, headers=headers(ctype))
            self.stats.malformed += 1
        # The broken-image sample is a real sample too: it must get a prediction.
        self.stats.samples += 1
        self.stats.sensor_events += len(sample.readings)
        self.stats.sample_ids.append(sample.sample_id + "-badimg")

    def _sleep_until(self, ts_ms: int) -> None:
        if self.speed is None:
            return
        wall = self._wall0 + (ts_ms - self.start_ms) / 1000 / self.speed
        while not self._stop.is_set():
            left = wall - time.time()
            if left <= 0:
                return
            self._stop.wait(min(left, 0.5))
