"""Publish the simulated plant to Kafka: samples now, labels after a delay.

Event time drives everything: sample ``k`` of every asset has ``ts_ms = start_ms +
k * period_ms``; labels are due ``label_delay_ms`` later in event time. In real-time mode
the publisher sleeps until the wall clock reaches each event time; otherwise it
publishes as fast as it can (tests, replays) with the same event times.

With ``per_modality_topics`` the plant behaves like separate sensor gateways: each
reading goes to ``sensor.<modality>`` as a :class:`SensorEvent` (``start_ms`` is aligned
to a slot time), with event-time jitter, reordering, duplicates, drops and stragglers
(:class:`ReadingDisorder`), and the synchronizer (``streamfuse sync``) rebuilds the
samples. Labels carry the id the synchronizer gives the slot (:func:`~streamfuse.sync.core.slot_id`),
and :class:`SimStats` records the ground truth: which modalities each sample will have.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import logging
import math
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from streamfuse.clock import now_ms
from streamfuse.config import Settings
from streamfuse.errors import ConfigError
from streamfuse.events import JSON, MSGPACK, Label, Sample, SensorEvent, encode, encode_json, headers
from streamfuse.sends import TrackedProducer
from streamfuse.sim.dataset_plant import DatasetPlant, DatasetRows
from streamfuse.sim.faults import FaultSpec
from streamfuse.sim.plant import Plant, PlantConfig
from streamfuse.sync.core import SyncConfig, slot_id
from streamfuse.topics import Topics

log = logging.getLogger(__name__)


@dataclass
class SimStats:
    samples: int = 0
    sensor_events: int = 0  # readings inside the samples (per-modality: reading records, copies included)
    labels: int = 0
    malformed: int = 0
    sample_ids: list[str] = field(default_factory=list)
    # per-modality mode: ground truth of the synchronizer's output
    slot_modalities: dict[str, tuple[str, ...]] = field(default_factory=dict)  # sample id -> modalities joined
    dropped: int = 0  # readings never published
    reordered: int = 0  # published after later readings, still within grace
    duplicates: int = 0  # second copies (same event id)
    late: list[str] = field(default_factory=list)  # event ids of stragglers, published after their slot closed
    send_retried: int = 0  # sends the broker failed to take that were sent again
    send_lost: int = 0  # sends given up after every retry (reported, never silent)


@dataclass(frozen=True)
class ReadingDisorder:
    """What the per-modality mode does to readings; each reading draws its fate once.

    Args:
        jitter_ms: event-time jitter, uniform in ``[-jitter_ms, jitter_ms]`` (at most the
            sync tolerance: every published reading joins its slot).
        reorder_prob: probability that a reading is published later, after newer ones.
        reorder_ms: how much event time later, at most; the delay stays within the sync
            grace so a reordered reading still joins.
        drop_prob: probability that a reading is never published.
        duplicate_prob: probability that a published reading is published twice.
        late_prob: probability that a reading is a straggler, published at the end of the
            run (or by :meth:`SimPublisher.publish_late`), after its slot closed.
        seed: seeds every draw.
        sync: the synchronizer's settings the disorder must respect; default
            ``SyncConfig.for_rate(rate_hz)``.

    Every slot keeps at least one reading that joins (else the first one is kept on
    time), so every label has its sample.
    """

    jitter_ms: int = 0
    reorder_prob: float = 0.0
    reorder_ms: int = 0
    drop_prob: float = 0.0
    duplicate_prob: float = 0.0
    late_prob: float = 0.0
    seed: int = 0
    sync: SyncConfig | None = None

    def check(self, period_ms: int) -> SyncConfig:
        """Validate against the plant's period; returns the sync settings used.

        Raises:
            ConfigError: a value out of range, or disorder the synchronizer cannot absorb.
        """
        sync = self.sync or SyncConfig(period_ms=period_ms, tolerance_ms=period_ms // 4, grace_ms=period_ms)
        probs = (self.reorder_prob, self.drop_prob, self.duplicate_prob, self.late_prob)
        if any(not 0.0 <= p <= 1.0 for p in probs) or self.drop_prob + self.late_prob + self.reorder_prob > 1.0:
            raise ConfigError(f"ReadingDisorder probabilities {probs} must be in [0, 1], and drop + late + "
                              "reorder at most 1")
        if sync.period_ms != period_ms:
            raise ConfigError(f"sync period_ms={sync.period_ms} differs from the plant's period {period_ms} ms; "
                              "use SyncConfig.for_rate(rate_hz)")
        if not 0 <= self.jitter_ms <= sync.tolerance_ms:
            raise ConfigError(f"jitter_ms={self.jitter_ms} must be in 0..{sync.tolerance_ms} (the sync tolerance)")
        # A reordered reading is published up to this much event time after its slot time
        # (ahead of that tick's own readings, but another topic's may be read first).
        worst = self._reorder_ticks(period_ms) * period_ms + self.jitter_ms
        if self.reorder_ms < 0 or worst > sync.tolerance_ms + sync.grace_ms:
            raise ConfigError(f"reorder_ms={self.reorder_ms} with jitter {self.jitter_ms} ms can delay a reading "
                              f"past the sync grace ({sync.grace_ms} ms): lower it, or use late_prob for stragglers")
        return sync

    def _reorder_ticks(self, period_ms: int) -> int:
        return max(1, math.ceil(self.reorder_ms / period_ms))


def malformed_readings(sample: Sample) -> list[tuple[str, bytes, bytes, str, str]]:
    """Bad sensor records built around a sample, as ``(modality topic, key, value, content
    type, expected reason)``; the synchronizer must dead-letter each one and keep going."""
    key = sample.asset_id.encode()
    nan = SensorEvent(f"{sample.sample_id}-nan", sample.asset_id, "series", sample.ts_ms,
                      np.full(4, np.nan, "<f4").tobytes(), sample.line_id, "float32le", shape=(4,))
    out = [
        ("image", key, b"\x00\x01 not msgpack \xc1", MSGPACK, "undecodable"),
        ("audio", key, encode_json(Label("x", sample.asset_id, sample.ts_ms, "normal")), JSON, "unexpected_schema"),
        ("series", key, encode(nan), MSGPACK, "non_finite"),
    ]
    if sample.readings:
        m, ev = next(iter(sample.readings.items()))
        wrong = dataclasses.replace(ev, event_id=ev.event_id + "-badkey")
        out.append((m, b"not-" + key, encode(wrong), MSGPACK, "bad_field"))  # key must be the asset id
    return out


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
        start_ms: event time of the first sample (default: now); in per-modality mode it is
            rounded up to a multiple of the period (a slot time).
        speed: event-time seconds per wall-clock second; None = as fast as possible.
        malformed_every: every N samples, also publish a set of malformed records (0 = never).
        run_id: prefix of sample ids (unique per run); per-modality mode uses it in event ids.
        per_modality_topics: publish each reading to ``sensor.<modality>`` instead of whole
            samples to ``samples``.
        disorder: jitter, reordering, drops... of the per-modality mode (default: none).
        failures: ``streamfuse_producer_send_failures_total`` (``ProducerMetrics(registry).failures``)
            to count failed sends in; they are always in :class:`SimStats` too.
        dataset: stream these dataset rows (:func:`~streamfuse.sim.dataset_plant.load_rows`)
            as the plant's readings instead of simulating them (a
            :class:`~streamfuse.sim.dataset_plant.DatasetPlant`).

    Raises:
        ConfigError: a bad speed, or disorder the synchronizer cannot absorb.
    """

    def __init__(self, settings: Settings, faults: tuple[FaultSpec, ...] = (), start_ms: int | None = None,
                 speed: float | None = 1.0, malformed_every: int = 0, run_id: str = "sim",
                 per_modality_topics: bool = False, disorder: ReadingDisorder | None = None,
                 dataset: DatasetRows | None = None,
                 failures=None) -> None:
        self.settings = settings
        self.failures = failures
        self._sends: TrackedProducer | None = None
        self.topics = Topics(settings.topic_prefix)
        s = settings.sim
        self.start_ms = now_ms() if start_ms is None else start_ms
        cfg = PlantConfig(assets=s.assets, lines=s.lines, rate_hz=s.rate_hz, seed=s.seed, faults=faults)
        self.per_modality_topics = per_modality_topics
        self.disorder = disorder or ReadingDisorder()
        if per_modality_topics:
            period = Plant(cfg).period_ms
            self.start_ms = -(-self.start_ms // period) * period  # slot times are multiples of the period
            self.disorder.check(period)
            self._rng = np.random.default_rng([0x5F5, self.disorder.seed])
        self.plant = Plant(cfg, start_ms=self.start_ms, run_id=run_id) if dataset is None else \
            DatasetPlant(dataset, config=cfg, start_ms=self.start_ms, run_id=run_id)
        if speed is not None and speed <= 0:
            raise ConfigError(f"speed must be > 0 (or None for as fast as possible), got {speed}")
        self.speed = speed
        self._wall0 = 0.0
        self.malformed_every = malformed_every
        self.stats = SimStats()
        self._stop = threading.Event()
        self._reorder: list[tuple[int, int, SensorEvent, bool]] = []  # (release ms, tiebreak, reading, twice)
        self._stragglers: list[SensorEvent] = []
        self._tiebreak = itertools.count()

    def stop(self) -> None:
        self._stop.set()

    def run(self, duration_s: float | None = None, max_samples: int | None = None, producer=None,
            hold_late: bool = False) -> SimStats:
        """Publish until ``duration_s`` of event time, ``max_samples`` samples, or :meth:`stop`.

        Args:
            duration_s: seconds of event time to publish (None: until stopped).
            max_samples: stop after this many samples (per-modality mode: slots with a sample).
            producer: a kafka-python producer to use (default: one made and closed here).
            hold_late: per-modality mode: keep the stragglers for :meth:`publish_late`
                instead of publishing them at the end of the run.

        Returns:
            The run's counts and, in per-modality mode, its ground truth.
        """
        from streamfuse.kafka import make_producer

        own = producer is None
        producer = self._tracked(producer or make_producer(self.settings, "streamfuse-sim"))
        period = self.plant.period_ms
        end_ms = None if duration_s is None else self.start_ms + int(duration_s * 1000)
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
                self._release(producer, ts)
                self._publish_step(producer, k, ts, max_samples, pending, counter, hdrs)
                if max_samples is not None and self.stats.samples >= max_samples:
                    break
            self._release(producer, None)
            if self._stragglers and not hold_late:
                self.publish_late(producer)
            # Remaining labels: in real time they still wait for their due time.
            if pending and not self._stop.is_set():
                self._sleep_until(pending[-1][0])
                self._publish_labels(producer, pending, None, hdrs)
            producer.flush()
        finally:
            self._report(producer)
            if own:
                producer.close()
        return self.stats

    def _publish_step(self, producer, k: int, ts: int, max_samples: int | None,
                      pending: list[tuple[int, int, Label]], counter, hdrs) -> None:
        """One sample of every asset at plant step ``k`` (event time ``ts``); their labels are
        queued in ``pending`` until the label delay has passed."""
        delay = self.settings.sim.label_delay_ms
        for i, asset in enumerate(self.plant.asset_ids):
            if max_samples is not None and self.stats.samples >= max_samples:
                break
            sample, label = self.plant.sample(i, k, ts)
            if self.per_modality_topics:
                label = self._publish_readings(producer, sample, label)
                if label is None:
                    continue
            else:
                producer.send(self.topics.samples, key=asset.encode(), value=encode(sample), headers=hdrs)
                self.stats.sensor_events += len(sample.readings)
                self.stats.sample_ids.append(sample.sample_id)
            self.stats.samples += 1
            heapq.heappush(pending, (ts + delay, next(counter), label))
            if self.malformed_every and self.stats.samples % self.malformed_every == 0:
                self._publish_malformed(producer, sample)

    def _tracked(self, producer) -> TrackedProducer:
        """Every send checked: a failed one is sent again, or counted in ``stats.send_lost``."""
        if isinstance(producer, TrackedProducer):
            return producer
        if self._sends is None or self._sends.producer is not producer:
            self._sends = TrackedProducer(producer, "sim", self.failures)
        return self._sends

    def _report(self, producer: TrackedProducer) -> None:
        self.stats.send_retried, self.stats.send_lost = producer.retried, producer.lost
        if producer.lost or producer.pending_failures:
            log.error("simulator: %d records were not delivered after retries, %d still failing",
                      producer.lost, producer.pending_failures)

    def publish_late(self, producer=None) -> int:
        """Publish the stragglers held back by the per-modality mode; returns how many."""
        from streamfuse.kafka import make_producer

        own = producer is None
        producer = self._tracked(producer or make_producer(self.settings, "streamfuse-sim"))
        try:
            n = len(self._stragglers)
            for ev in self._stragglers:
                self._send_reading(producer, ev)
            self._stragglers.clear()
            producer.flush()
            return n
        finally:
            self._report(producer)
            if own:
                producer.close()

    def _publish_readings(self, producer, sample: Sample, label: Label) -> Label | None:
        """Per-modality mode: each reading's fate, then publish; returns the label (with the
        synchronizer's sample id), or None when no reading of the slot will join."""
        d, rng, period = self.disorder, self._rng, self.plant.period_ms
        fates = []
        for ev in sample.readings.values():  # draws are the same whatever the fate: reproducible
            jitter, u, dup = int(rng.integers(-d.jitter_ms, d.jitter_ms + 1)), rng.random(), rng.random()
            ticks = int(rng.integers(1, d._reorder_ticks(period) + 1))
            fate = ("drop" if u < d.drop_prob else "late" if u < d.drop_prob + d.late_prob
                    else "reorder" if u < d.drop_prob + d.late_prob + d.reorder_prob else "now")
            fates.append([dataclasses.replace(ev, ts_ms=sample.ts_ms + jitter), fate, ticks, dup < d.duplicate_prob])
        if not fates:
            return None
        if all(f[1] in ("drop", "late") for f in fates):
            fates[0][1] = "now"  # every slot keeps one reading, so every label has its sample
        sid = slot_id(sample.asset_id, sample.ts_ms)
        self.stats.slot_modalities[sid] = tuple(f[0].modality for f in fates if f[1] in ("now", "reorder"))
        self.stats.sample_ids.append(sid)
        for ev, fate, ticks, twice in fates:
            if fate == "drop":
                self.stats.dropped += 1
            elif fate == "late":
                self._stragglers.append(ev)
                self.stats.late.append(ev.event_id)
            elif fate == "reorder":
                self.stats.reordered += 1
                heapq.heappush(self._reorder, (sample.ts_ms + ticks * period, next(self._tiebreak), ev, twice))
            else:
                self._send_reading(producer, ev, twice)
        return dataclasses.replace(label, sample_id=sid)

    def _release(self, producer, upto_ms: int | None) -> None:
        while self._reorder and (upto_ms is None or self._reorder[0][0] <= upto_ms):
            _, _, ev, twice = heapq.heappop(self._reorder)
            self._send_reading(producer, ev, twice)

    def _send_reading(self, producer, ev: SensorEvent, twice: bool = False) -> None:
        for _ in range(2 if twice else 1):
            producer.send(self.topics.sensor(ev.modality), key=ev.asset_id.encode(), value=encode(ev),
                          headers=headers(MSGPACK))
            self.stats.sensor_events += 1
        self.stats.duplicates += int(twice)

    def _publish_labels(self, producer, pending: list, upto_ms: int | None, hdrs) -> None:
        while pending and (upto_ms is None or pending[0][0] <= upto_ms):
            _, _, label = heapq.heappop(pending)
            producer.send(self.topics.labels, key=label.asset_id.encode(), value=encode(label), headers=hdrs)
            self.stats.labels += 1

    def _publish_malformed(self, producer, sample: Sample) -> None:
        if self.per_modality_topics:
            for m, key, value, ctype, _ in malformed_readings(sample):
                producer.send(self.topics.sensor(m), key=key, value=value, headers=headers(ctype))
                self.stats.malformed += 1
            return
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
