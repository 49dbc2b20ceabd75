"""Every Prometheus metric of streamfuse, defined in one place.

Metrics register against an injectable ``CollectorRegistry``: tests pass a fresh one and
read values with ``registry.get_sample_value(...)``. Labels come from small fixed sets
(modality, topic, reason, outcome), never ids.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.samples = Counter(
            "streamfuse_worker_samples_total", "Samples turned into predictions.", registry=registry
        )
        self.batches = Counter("streamfuse_worker_batches_total", "Micro-batches run.", registry=registry)
        self.batch_size = Histogram(
            "streamfuse_worker_batch_size", "Samples per micro-batch.", buckets=BATCH_BUCKETS, registry=registry
        )
        self.rejected = Counter(
            "streamfuse_worker_rejected_total",
            "Inputs sent to the dead-letter topic.",
            ["reason"],
            registry=registry,
        )
        self.commands = Counter(
            "streamfuse_worker_commands_total", "Commands handled.", ["action", "outcome"], registry=registry
        )
        self.masked = Gauge(
            "streamfuse_worker_modality_masked", "1 when the modality is masked.", ["modality"], registry=registry
        )
        self.versions = Info("streamfuse_worker_active_versions", "Active model versions.", registry=registry)
        self.produce_failures = Counter(
            "streamfuse_worker_produce_failures_total",
            "Sends the broker did not acknowledge, per topic kind (each is sent again; the batch is committed "
            "only once all are acknowledged).",
            ["topic"],
            registry=registry,
        )
        self.lag = Gauge(
            "streamfuse_worker_consumer_lag_records",
            "Samples in this worker's assigned partitions after its committed offsets (librdkafka's consumer_lag).",
            registry=registry,
        )
        self._timings(registry)

    def _timings(self, registry: CollectorRegistry) -> None:
        """Where a batch's time goes."""
        self.queue_wait = Histogram(
            "streamfuse_worker_queue_wait_seconds",
            "Time from the first sample of a batch arriving to its compute starting.",
            buckets=SECONDS_BUCKETS,
            registry=registry,
        )
        self.compute = Histogram(
            "streamfuse_worker_compute_seconds",
            "Model compute time per batch and modality (decode + forward).",
            ["modality"],
            buckets=SECONDS_BUCKETS,
            registry=registry,
        )
        self.stage = Histogram(
            "streamfuse_worker_stage_seconds",
            "Time per batch in each stage of the worker: batch_wait (first record to compute start), compute "
            "(models, fusion, contributions), assemble (predictions encoded), produce (handed to the producer), ack "
            "(handed to the producer to the broker's acknowledgement of the batch's last prediction).",
            ["stage"],
            buckets=SECONDS_BUCKETS,
            registry=registry,
        )


class MonitorMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.events = Counter(
            "streamfuse_monitor_events_total", "Events consumed.", ["kind"], registry=registry
        )
        self.rejected = Counter(
            "streamfuse_monitor_rejected_total", "Inputs sent to the dead-letter topic.", ["reason"],
            registry=registry,
        )
        self.kpi = Gauge(
            "streamfuse_monitor_kpi_value",
            "Latest KPI value of the fleet (the global scope) per modality; lines and assets are in the "
            "KPI topic and `streamfuse status`.",
            ["scope", "modality", "kpi"],
            registry=registry,
        )
        self.alerts = Counter(
            "streamfuse_monitor_alerts_total", "Alert transitions.", ["kind", "status"], registry=registry
        )
        self.firing = Gauge(
            "streamfuse_monitor_alerts_firing", "Alerts firing now.", ["kind", "modality"], registry=registry
        )
        self.commands = Counter(
            "streamfuse_monitor_commands_total", "Commands issued.", ["action"], registry=registry
        )
        self.pending_labels = Gauge(
            "streamfuse_monitor_pending_labels", "Labels waiting for their prediction.", registry=registry
        )
        self.accuracy_estimate = Gauge(
            "streamfuse_monitor_accuracy_estimate",
            "Label-free accuracy estimate of the newest ended window (agreement, calibrated on the validation "
            "split), per global/line scope and modality; the labelled value follows in "
            "streamfuse_monitor_kpi_value{kpi=\"accuracy\"} once the window closes.",
            ["scope", "scope_id", "modality"],
            registry=registry,
        )
        self.late = Gauge(
            "streamfuse_monitor_late_events",
            "Predictions and labels that came after their KPI window had closed (kind), counted since the "
            "monitor's state began (restarts included); each is left out of its window.",
            ["kind"],
            registry=registry,
        )
        self.watermark = Gauge(
            "streamfuse_monitor_watermark_seconds",
            "Event time the monitor's KPI windows have reached, unix seconds (compare with time()).",
            registry=registry,
        )


class RedisMetrics:
    """``streamfuse_redis_up{process}``: one gauge for every process that talks to Redis
    (worker, monitor, sync, dispatcher, API), set by :class:`streamfuse.redislink.RedisLink`.

    Examples:
        >>> reg = CollectorRegistry()
        >>> RedisMetrics(reg).up.labels("worker").set(0)
        >>> reg.get_sample_value("streamfuse_redis_up", {"process": "worker"})
        0.0
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.up = Gauge(
            "streamfuse_redis_up", "1 while this process reaches Redis, 0 during an outage.", ["process"],
            registry=registry,
        )


def serve(registry: CollectorRegistry, port: int) -> None:
    """Expose ``/metrics`` on ``port`` (0 = do not serve)."""
    if port:
        from prometheus_client import start_http_server

        start_http_server(port, registry=registry)


class SyncMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.readings = Counter(
            "streamfuse_sync_readings_total", "Sensor readings consumed.", ["modality"], registry=registry
        )
        self.samples = Counter("streamfuse_sync_samples_total", "Synchronized samples emitted.", registry=registry)
        self.late = Counter(
            "streamfuse_sync_late_readings_total", "Readings that arrived after their slot closed.", ["modality"],
            registry=registry,
        )
        self.duplicates = Counter(
            "streamfuse_sync_duplicate_readings_total", "Readings ignored as duplicates (same event id).",
            ["modality"], registry=registry,
        )
        self.missing = Counter(
            "streamfuse_sync_missing_total", "Samples emitted without this modality.", ["modality"],
            registry=registry,
        )
        self.rejected = Counter(
            "streamfuse_sync_rejected_total", "Inputs sent to the dead-letter topic.", ["reason"], registry=registry
        )


class AlertMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.alerts = Counter(
            "streamfuse_alerts_received_total", "Alert events consumed by the dispatcher.", ["status"],
            registry=registry,
        )
        self.notifications = Counter(
            "streamfuse_alerts_notifications_total", "Notification attempts by receiver type and outcome.",
            ["receiver", "outcome"], registry=registry,
        )
        self.delivery = Histogram(
            "streamfuse_alerts_delivery_seconds", "Time from alert to successful delivery.", ["receiver"],
            buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900), registry=registry,
        )
        self.queued = Gauge(
            "streamfuse_alerts_queued", "Notifications waiting for delivery.", ["receiver"], registry=registry
        )


class ProducerMetrics:
    """Sends the broker did not take (see :class:`streamfuse.sends.TrackedProducer`)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.failures = Counter(
            "streamfuse_producer_send_failures_total",
            "Failed sends by outcome: retried (sent again) or lost (given up, reported).",
            ["process", "outcome"], registry=registry,
        )
class IngestMetrics:
    """One plant gateway (``gateway`` = mqtt | opcua): every series carries it as a label."""

    def __init__(self, registry: CollectorRegistry, gateway: str = "mqtt") -> None:
        g = ("gateway",)
        self.messages = Counter("streamfuse_ingest_messages_total", "Messages received from the plant side.", g,
                                registry=registry).labels(gateway)
        self._events = Counter("streamfuse_ingest_events_total", "Sensor events acknowledged by Kafka.",
                               ["gateway", "modality"], registry=registry)
        self._dead = Counter("streamfuse_ingest_dead_letters_total", "Dead letters acknowledged by Kafka.",
                             ["gateway", "reason"], registry=registry)
        self.ack_lag = Histogram("streamfuse_ingest_ack_lag_seconds",
                                 "Time from receiving a message to Kafka acknowledging its record.", g,
                                 buckets=SECONDS_BUCKETS, registry=registry).labels(gateway)
        self.delivery_failures = Counter("streamfuse_ingest_delivery_failures_total",
                                         "Kafka deliveries that failed (the record is sent again).", g,
                                         registry=registry).labels(gateway)
        self.reconnects = Counter("streamfuse_ingest_reconnects_total", "Reconnections to the plant side.", g,
                                  registry=registry).labels(gateway)
        self.pending = Gauge("streamfuse_ingest_pending", "Records sent to Kafka and not yet acknowledged.", g,
                             registry=registry).labels(gateway)
        self._missed = Counter("streamfuse_ingest_missed_readings_total",
                               "Readings never received (a gap while disconnected), estimated from the period.",
                               ["gateway", "modality"], registry=registry)
        self.gateway = gateway

    def event(self, modality: str) -> None:
        self._events.labels(self.gateway, modality).inc()

    def dead(self, reason: str) -> None:
        self._dead.labels(self.gateway, reason).inc()

    def missed(self, modality: str, n: int) -> None:
        self._missed.labels(self.gateway, modality).inc(n)
