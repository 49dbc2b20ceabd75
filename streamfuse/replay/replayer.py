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
from typing import Any

from streamfuse.config import Settings
from streamfuse.replay.errors import ReplayError
from streamfuse.replay.format import Recording
from streamfuse.replay.plan import INPUT_TOPICS, SENSOR_TOPICS, Filters, clock_streams

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


def replay(recording_dir: str | Path, settings: Settings, namespace: str | None = None, speed: float | None = None,
           models: dict[str, str] | None = None, policy_overrides: dict[str, Any] | None = None,
           report_dir: str | Path | None = None, time_range: tuple[float | None, float | None] | None = None,
           assets: list[str] | None = None, keep: bool = False, bundle: str | Path | None = None,
           max_batch: int | None = None, progress: bool = False, verify: bool = True, title: str | None = None,
           stop: threading.Event | None = None) -> dict[str, Any]:
    """Replay a recording through sync (if it holds readings), a worker and the monitor.

    Args:
        recording_dir: written by :func:`~streamfuse.replay.recorder.record`.
        settings: the live settings: bootstrap, Redis, model directory; the live topic
            prefix is what the replay must stay away from.
        namespace: topic prefix of the replay (default ``replay-<random>.``); never the
            live one.
        speed: event-time seconds per wall second; None = as fast as the pipeline goes.
        models: unit -> version to serve (default: the live active versions).
        policy_overrides: ``MonitorSettings`` fields to change (windows, thresholds...).
        report_dir: write ``summary.json`` and ``report.html`` here.
        time_range: ``(from_s, to_s)`` seconds from the recording's first event.
        assets: only these asset ids.
        keep: keep the namespace's topics and Redis keys (to inspect them).
        bundle: a bundle directory whose units to import and serve.
        max_batch: the replay worker's micro-batch limit; None = the live setting. Either
            way every number is bit-for-bit reproducible: the worker cuts stream batches
            (by the records, never the clock; see :mod:`streamfuse.inference.feeder`).
        progress: show a progress bar (events/s, ETA).
        verify: check the recording's checksums first.
        title: a name for the report.
        stop: set it to stop early (the summary covers what was replayed).

    Returns:
        The summary (also written to ``report_dir/summary.json``).

    Raises:
        RecordingError: the recording is missing or damaged. ReplayError: unsafe
            namespace, bad option, a pipeline process died or stalled.
            RegistryError / ModelError: an unknown or broken model version.
    """
    from streamfuse.kafka import make_rd_producer
    from streamfuse.models.registry import Registry
    from streamfuse.procs import spawn, stop_children
    from streamfuse.replay.collect import Collector
    from streamfuse.replay.lockstep import Lockstep
    from streamfuse.replay.namespace import make_namespace, setup_models
    from streamfuse.replay.summary import recorded_outputs, summarize
    from streamfuse.replay.syncstage import run_sync_stage
    from streamfuse.store import StatusStore, connect
    from streamfuse.topics import ensure_topics

    if speed is not None and speed <= 0:
        raise ReplayError(f"speed must be > 0 (event seconds per wall second), got {speed}; or use --max-speed")
    rec = Recording(recording_dir, verify=verify)
    present = {t for t, v in rec.topics.items() if v.get("records")}
    sync = bool(present & set(SENSOR_TOPICS))
    wanted = [t for t in (*SENSOR_TOPICS, "labels") if t in present] if sync else \
        [t for t in ("samples", "labels") if t in present]
    if not any(t != "labels" for t in wanted):
        raise ReplayError(f"{recording_dir} holds no samples or sensor readings (topics: {sorted(present)}); "
                          "record the inputs: streamfuse record --topics inputs")
    filters = _filters(rec, time_range, assets)
    rate = (rec.manifest.get("meta", {}).get("sim") or {}).get("rate_hz")
    ns = make_namespace(settings, namespace, _partitions(rec), policy_overrides, rate)
    s = ns.settings
    worker = {"stream_batches": True} | ({"max_batch": max_batch} if max_batch is not None else {})
    s = ns.settings = s.model_copy(update={"worker": s.worker.model_copy(update=worker)})
    log_dir = Path(report_dir) / "logs" if report_dir else Path(tempfile.mkdtemp(prefix="streamfuse-replay-"))
    procs: dict[str, Any] = {}
    collector = producer = None
    labels: dict[str, str] = {}
    t0 = rec.manifest.get("time_range", {}).get("first_event_ms") or 0
    try:
        ensure_topics(s)
        versions = setup_models(ns, models, bundle)
        sources = {(t, p): (lambda t=t, p=p: rec.records(t, p)) for t in wanted for p in rec.partitions(t)}
        w, g = s.monitor.kpi_window_ms, s.monitor.label_grace_ms
        streams = clock_streams(sources, filters, deadline=lambda ts: ts - ts % w + w + g)
        bar = _Progress(progress, streams.total)
        with bar:
            if sync:
                streams = run_sync_stage(ns, streams, log_dir, on_progress=bar.sync)
            procs = {"worker": spawn("worker", s, log_dir), "monitor": spawn("monitor", s, log_dir)}
            collector = Collector(s, t0)
            producer = make_rd_producer(s, "streamfuse-replay")
            store = StatusStore(connect(s), s.redis_prefix)

            def alive() -> None:
                for name, p in procs.items():
                    if p.poll() is not None:
                        raise ReplayError(f"the replay's {name} exited with {p.returncode}; see "
                                          f"{log_dir / (name + '.log')}", ns.prefix)

            bar.start(streams.total)
            models = Registry(s)
            lock = Lockstep(s, streams, collector, producer, store, models.baselines(), alive, speed,
                            bar.update, stop=stop, on_label=lambda lab: labels.__setitem__(lab.sample_id, lab.label),
                            baselines_of=models.baselines_of)
            wall0 = time.monotonic()
            counters = lock.run()
            wall_s = time.monotonic() - wall0
        for _ in range(3):  # the last acks and snapshots after the final barrier
            collector.poll(100)
    finally:
        stop_children(list(procs.values()))
        if collector is not None:
            collector.consumer.close()
        if producer is not None:
            producer.flush(30)
        if not keep:
            ns.delete()
    summary = summarize(collector, labels, rec.annotations, s.monitor, versions, wall_s, counters,
                        start_ms=t0 or None, recorded=recorded_outputs(rec))
    summary["replay"].update({"recording": str(Path(recording_dir).resolve()), "namespace": ns.prefix,
                              "kept": keep, "speed_requested": speed, "max_batch": s.worker.max_batch,
                              "synchronizer": sync, "time_range_s": list(time_range) if time_range else None,
                              "assets": sorted(assets) if assets else None,
                              "policy_overrides": policy_overrides or {}, "logs": str(log_dir)})
    if report_dir is not None:
        write_outputs(summary, Path(report_dir), title)
    return summary


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
