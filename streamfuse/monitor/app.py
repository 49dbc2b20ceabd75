"""The monitor as a faust-streaming app: decode, call :class:`MonitorCore`, emit.

One agent reads predictions and labels (both keyed by asset_id, co-partitioned) so that
they reach the logic in arrival order, and the workers' acks for the audit trail. Outputs go to ``kpis``, ``alerts`` and
``control``; rejected inputs to ``deadletter``; the latest state to Redis.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from prometheus_client import CollectorRegistry

from streamfuse.config import Settings
from streamfuse.errors import InvalidEvent, ModelError
from streamfuse.events import (
    MSGPACK, Ack, DeadLetter, Label, Prediction, content_type_of, decode, encode,
)
from streamfuse.kafka import faust_config
from streamfuse.metrics import MonitorMetrics, serve
from streamfuse.monitor.core import MonitorCore, Outputs
from streamfuse.store import StatusStore, connect
from streamfuse.topics import Topics

log = logging.getLogger(__name__)
HEADERS = {"content-type": MSGPACK.encode()}


def load_baselines(bundle_dir: Path) -> dict[str, dict[str, float]]:
    """Validation baselines from a bundle's manifest (no torch needed)."""
    path = bundle_dir / "manifest.json"
    if not path.is_file():
        raise ModelError(
            f"no model bundle manifest at {path}: run `streamfuse train` or `streamfuse demo` first, "
            "or set STREAMFUSE_MODEL_DIR / STREAMFUSE_BUNDLE", path,
        )
    return json.loads(path.read_text())["baselines"]


def create_app(settings: Settings, baselines: dict[str, dict[str, float]], registry: CollectorRegistry | None = None):
    import faust

    registry = registry or CollectorRegistry()
    metrics = MonitorMetrics(registry)
    serve(registry, settings.monitor.metrics_port)
    topics = Topics(settings.topic_prefix)
    datadir = Path(settings.model_dir).parent / "faust" / settings.monitor.app_id
    datadir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        settings.monitor.app_id, **faust_config(settings), web_enabled=False, store="memory://",
        datadir=str(datadir), autodiscover=False,
    )
    raw = {"key_serializer": "raw", "value_serializer": "raw"}
    source = app.topic(topics.predictions, topics.labels, topics.acks, **raw)
    out = {name: app.topic(getattr(topics, name), **raw) for name in ("kpis", "alerts", "control", "deadletter")}
    core = MonitorCore(baselines, settings.monitor)
    store = StatusStore(connect(settings), settings.redis_prefix)

    async def emit(result: Outputs) -> None:
        for s in result.kpis:
            await out["kpis"].send(key=f"{s.scope}|{s.scope_id}|{s.modality}".encode(), value=encode(s),
                                   headers=HEADERS)
            if s.scope == "global":
                for kpi in ("accuracy", "agreement", "mean_contribution", "mean_confidence", "missing_rate"):
                    value = getattr(s, kpi)
                    if value is not None:
                        metrics.kpi.labels(s.scope, s.modality, kpi).set(value)
        store.put_kpis(result.kpis)
        for a in result.alerts:
            await out["alerts"].send(key=a.fingerprint.encode(), value=encode(a), headers=HEADERS)
            store.put_alert(a)
            metrics.alerts.labels(a.kind, a.status).inc()
            metrics.firing.labels(a.kind, a.modality).inc(1 if a.status == "firing" else -1)
            log.warning("alert %s %s: %s", a.status, a.alert_id, a.summary)
        for c in result.commands:
            await out["control"].send(key=(c.modality or "").encode(), value=encode(c), headers=HEADERS)
            store.put_command(c)
            metrics.commands.labels(c.action).inc()
            log.warning("command %s %s %s", c.command_id, c.action, c.modality)

    @app.agent(source)
    async def monitor(stream):
        async for event in stream.events():
            msg = event.message
            try:
                ev = decode(event.value, content_type_of(event.headers),
                            expect=(Prediction, Label, Ack), max_bytes=settings.max_payload_bytes)
            except InvalidEvent as exc:
                metrics.rejected.labels(exc.reason).inc()
                dead = DeadLetter(exc.reason, exc.detail, msg.topic, event.value or b"", "monitor",
                                  int(msg.timestamp * 1000), msg.partition, msg.offset, event.key)
                await out["deadletter"].send(key=event.key, value=encode(dead), headers=HEADERS)
                continue
            if isinstance(ev, Ack):
                metrics.events.labels("ack").inc()
                store.put_ack(ev)
            elif isinstance(ev, Label):
                metrics.events.labels("label").inc()
                core.on_label(ev)
            else:
                metrics.events.labels("prediction").inc()
                await emit(core.on_prediction(ev, f"{msg.topic}:{msg.partition}"))
            metrics.pending_labels.set(core.kpis.pending_labels)

    @app.task
    async def ready() -> None:
        store.mark_ready("monitor", settings.monitor.app_id)

    return app


def run_monitor(settings: Settings, bundle_dir: Path, loglevel: str = "warn") -> None:
    """Run the monitor in the foreground until SIGTERM / Ctrl-C."""
    from faust.worker import Worker

    app = create_app(settings, load_baselines(bundle_dir))
    Worker(app, loglevel=loglevel).execute_from_commandline()
