"""``streamfuse replay``: run a recording through the full pipeline in its own namespace.

The recording's input records (samples, or per-modality readings through the
synchronizer; labels) are published into ``replay-<id>.*`` with their keys, values,
headers, partitions and timestamps unchanged, in lock-step with the monitor's event-time
windows (:mod:`streamfuse.replay.lockstep`); a worker and the monitor run there as
child processes with the chosen model versions and monitor policy. Afterwards the
outputs are evaluated against the recording's labels and fault annotations
(:mod:`streamfuse.replay.evaluate`), written as ``summary.json`` and ``report.html``,
and the namespace's topics and Redis keys are deleted (unless kept).

Works from the recording's files only; the broker's timestamp index is never used.
"""

from __future__ import annotations

import json
import logging
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from streamfuse.config import Settings
from streamfuse.replay.errors import ReplayError
from streamfuse.replay.format import Recording
from streamfuse.replay.options import ReplayOptions
from streamfuse.replay.plan import INPUT_TOPICS, SENSOR_TOPICS, Filters, Streams, clock_streams

if TYPE_CHECKING:
    from streamfuse.events import Label
    from streamfuse.replay.collect import Collector
    from streamfuse.replay.namespace import Namespace

log = logging.getLogger(__name__)


def _partitions(rec: Recording) -> int:
    counts = {v.get("partitions") for k, v in rec.topics.items() if k in INPUT_TOPICS and v.get("records")}
    counts.discard(None)
    if len(counts) > 1:
        raise ReplayError(f"the recording's input topics have different partition counts {sorted(counts)}; "
                          "streamfuse needs them co-partitioned (one count)")
    return counts.pop() if counts else int(rec.manifest.get("source", {}).get("partitions", 3))


def _filters(rec: Recording, time_range: tuple[float | None, float | None] | None,
             assets: list[str] | None) -> Filters:
    start = rec.manifest.get("time_range", {}).get("first_event_ms")
    lo, hi = time_range or (None, None)
    if (lo is not None or hi is not None) and start is None:
        raise ReplayError("--from/--to need event times, and this recording has none (no decodable inputs)")
    if lo is not None and hi is not None and hi <= lo:
        raise ReplayError(f"--to {hi} must be after --from {lo} (seconds from the recording's start)")
    return Filters(frozenset(assets) if assets else None,
                   None if lo is None else start + round(lo * 1000), None if hi is None else start + round(hi * 1000))


def replay(recording_dir: str | Path, settings: Settings, options: ReplayOptions | None = None, *,
           stop: threading.Event | None = None) -> dict[str, Any]:
    """Replay a recording through sync (if it holds readings), a worker and the monitor.

    Args:
        recording_dir: written by :func:`~streamfuse.replay.recorder.record`.
        settings: the live settings: bootstrap, Redis, model directory; the live topic
            prefix is what the replay must stay away from.
        options: namespace, speed, models, policy, report directory, time range...
            (:class:`~streamfuse.replay.options.ReplayOptions`; None = its defaults).
        stop: set it to stop early (the summary covers what was replayed).

    Returns:
        The summary (also written to ``report_dir/summary.json``).

    Raises:
        RecordingError: the recording is missing or damaged. ReplayError: unsafe
            namespace, bad option, a pipeline process died or stalled.
            RegistryError / ModelError: an unknown or broken model version.
    """
    from streamfuse.replay.namespace import setup_models
    from streamfuse.replay.summary import recorded_outputs, summarize
    from streamfuse.replay.syncstage import run_sync_stage
    from streamfuse.topics import ensure_topics

    opts = options if options is not None else ReplayOptions()
    rec = Recording(recording_dir, verify=opts.verify)
    sync, topics = _input_topics(rec, recording_dir)
    filters = _filters(rec, opts.time_range, opts.assets)
    ns = _namespace(settings, rec, opts)
    pipeline = _Pipeline(ns, _log_dir(opts.report_dir), rec.manifest.get("time_range", {}).get("first_event_ms") or 0)
    try:
        ensure_topics(ns.settings)
        versions = setup_models(ns, opts.models, opts.bundle)
        streams = _clock_streams(rec, topics, filters, ns.settings)
        with _Progress(opts.progress, streams.total) as bar:
            if sync:
                streams = run_sync_stage(ns, streams, pipeline.log_dir, on_progress=bar.sync)
            counters, wall_s = pipeline.run(streams, bar, opts.speed, stop)
        pipeline.drain()
    finally:
        pipeline.close(keep=opts.keep)
    summary = summarize(pipeline.collector, pipeline.labels, rec.annotations, ns.settings.monitor, versions, wall_s,
                        counters, start_ms=pipeline.t0 or None, recorded=recorded_outputs(rec))
    summary["replay"].update(_how_it_ran(recording_dir, ns, opts, sync, pipeline.log_dir))
    if opts.report_dir is not None:
        write_outputs(summary, Path(opts.report_dir), opts.title)
    return summary


def _input_topics(rec: Recording, recording_dir: str | Path) -> tuple[bool, list[str]]:
    """Whether the replay runs the synchronizer (the recording holds sensor readings), and
    the topics it publishes: the readings, or else the samples; and the labels.

    Raises:
        ReplayError: the recording holds neither samples nor readings.
    """
    present = {t for t, v in rec.topics.items() if v.get("records")}
    sync = bool(present & set(SENSOR_TOPICS))
    topics = [t for t in (*SENSOR_TOPICS, "labels") if t in present] if sync else \
        [t for t in ("samples", "labels") if t in present]
    if not any(t != "labels" for t in topics):
        raise ReplayError(f"{recording_dir} holds no samples or sensor readings (topics: {sorted(present)}); "
                          "record the inputs: streamfuse record --topics inputs")
    return sync, topics


def _namespace(live: Settings, rec: Recording, opts: ReplayOptions) -> Namespace:
    """The replay's namespace: the recording's partitions and plant rate, the options'
    policy; its worker cuts stream batches (of up to ``max_batch``)."""
    from streamfuse.replay.namespace import make_namespace

    rate = (rec.manifest.get("meta", {}).get("sim") or {}).get("rate_hz")
    ns = make_namespace(live, opts.namespace, _partitions(rec), opts.policy_overrides, rate)
    worker = {"stream_batches": True} | ({"max_batch": opts.max_batch} if opts.max_batch is not None else {})
    ns.settings = ns.settings.model_copy(update={"worker": ns.settings.worker.model_copy(update=worker)})
    return ns


def _log_dir(report_dir: str | Path | None) -> Path:
    """Where the replay's processes log: ``<report_dir>/logs``, or a new temporary directory."""
    return Path(report_dir) / "logs" if report_dir else Path(tempfile.mkdtemp(prefix="streamfuse-replay-"))


def _clock_streams(rec: Recording, topics: list[str], filters: Filters, s: Settings) -> Streams:
    """The recording's ``topics``, every partition, as clocked streams; a sample's label is
    due when the monitor closes the sample's KPI window (window end + label grace)."""
    sources = {(t, p): (lambda t=t, p=p: rec.records(t, p)) for t in topics for p in rec.partitions(t)}
    w, g = s.monitor.kpi_window_ms, s.monitor.label_grace_ms
    return clock_streams(sources, filters, deadline=lambda ts: ts - ts % w + w + g)


def _how_it_ran(recording_dir: str | Path, ns: Namespace, opts: ReplayOptions, sync: bool,
                log_dir: Path) -> dict[str, Any]:
    """The summary's ``replay`` entries that say what was replayed, where and how."""
    return {"recording": str(Path(recording_dir).resolve()), "namespace": ns.prefix,
            "kept": opts.keep, "speed_requested": opts.speed, "max_batch": ns.settings.worker.max_batch,
            "synchronizer": sync, "time_range_s": list(opts.time_range) if opts.time_range else None,
            "assets": sorted(opts.assets) if opts.assets else None,
            "policy_overrides": opts.policy_overrides or {}, "logs": str(log_dir)}


class _Pipeline:
    """The replay's worker and monitor processes, and the collector and producer that the
    lock-step drives them with; :meth:`close` takes them down, then the namespace."""

    def __init__(self, ns: Namespace, log_dir: Path, t0: int) -> None:
        self.ns, self.log_dir, self.t0 = ns, log_dir, t0  # t0: the recording's first event (ms), or 0
        self.procs: dict[str, Any] = {}
        self.collector: Collector | None = None
        self.producer: Any = None
        self.labels: dict[str, str] = {}  # sample id -> true class, of the labels published

    def run(self, streams: Streams, bar: _Progress, speed: float | None,
            stop: threading.Event | None) -> tuple[dict[str, Any], float]:
        """Start the worker and the monitor, then publish ``streams`` in lock-step.

        Returns:
            The lock-step's counters, and its wall time in seconds.
        """
        from streamfuse.kafka import make_rd_producer
        from streamfuse.models.registry import Registry
        from streamfuse.procs import spawn
        from streamfuse.replay.collect import Collector
        from streamfuse.replay.lockstep import Lockstep, LockstepConfig, ReplayPipeline
        from streamfuse.store import StatusStore, connect

        s = self.ns.settings
        self.procs = {"worker": spawn("worker", s, self.log_dir), "monitor": spawn("monitor", s, self.log_dir)}
        self.collector = Collector(s, self.t0)
        self.producer = make_rd_producer(s, "streamfuse-replay")
        store = StatusStore(connect(s), s.redis_prefix)
        bar.start(streams.total)
        registry = Registry(s)
        lock = Lockstep(ReplayPipeline(s, self.collector, self.producer, store, self._alive, registry.baselines(),
                                       registry.baselines_of),
                        streams, LockstepConfig(speed, stop=stop, on_progress=bar.update, on_label=self._label))
        wall0 = time.monotonic()
        counters = lock.run()
        return counters, time.monotonic() - wall0

    def _alive(self) -> None:
        for name, p in self.procs.items():
            if p.poll() is not None:
                raise ReplayError(f"the replay's {name} exited with {p.returncode}; see "
                                  f"{self.log_dir / (name + '.log')}", self.ns.prefix)

    def _label(self, label: Label) -> None:
        self.labels[label.sample_id] = label.label

    def drain(self) -> None:
        """Read the last acks and snapshots, which come after the final barrier."""
        for _ in range(3):
            self.collector.poll(100)

    def close(self, keep: bool) -> None:
        """Stop the processes, close the clients; delete the namespace unless ``keep``."""
        from streamfuse.procs import stop_children

        stop_children(list(self.procs.values()))
        if self.collector is not None:
            self.collector.consumer.close()
        if self.producer is not None:
            self.producer.flush(30)
        if not keep:
            self.ns.delete()


def write_outputs(summary: dict[str, Any], out: Path, title: str | None = None) -> None:
    """Write ``summary.json`` and ``report.html`` into ``out``."""
    from streamfuse.replay.report import render_report

    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=False))
    (out / "report.html").write_text(render_report(summary, title))


class _Progress:
    """A rich progress bar (records, events/s, event time reached, ETA), or nothing."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled, self.total, self._p, self._task, self._sync = enabled, total, None, None, None

    def __enter__(self) -> "_Progress":
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                               TextColumn("{task.fields[rate]}"),
                               TextColumn("{task.fields[at]}"), TimeRemainingColumn())
            self._p.start()
        return self

    def start(self, total: int) -> None:
        if self._p is not None:
            self._task = self._p.add_task("replay", total=total, rate="", at="")

    def sync(self, n: int, clock: int) -> None:
        if self._p is not None:
            if self._sync is None:
                self._sync = self._p.add_task("sync", total=self.total, rate="", at="")
            self._p.update(self._sync, completed=n)

    def update(self, n: int, clock: int) -> None:
        if self._p is None or self._task is None:
            return
        speed = self._p.tasks[self._task].speed
        at = time.strftime("%H:%M:%S", time.gmtime(clock / 1000))
        self._p.update(self._task, completed=n, rate=f"{speed or 0:,.0f} events/s", at=f"event time {at}")

    def __exit__(self, *exc: object) -> None:
        if self._p is not None:
            self._p.stop()
