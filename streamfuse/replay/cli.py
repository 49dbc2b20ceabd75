"""CLI commands ``record`` and ``replay``; the main ``streamfuse`` app mounts them::

    app.command()(record)
    app.command()(replay)

They read :class:`~streamfuse.config.Settings` from the environment (``STREAMFUSE_*``);
a :class:`~streamfuse.errors.StreamfuseError` is printed with its fix to stderr and exits
with 2 (:mod:`streamfuse.cli_errors`).
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator, Optional

import typer
from rich.console import Console
from rich.table import Table

from streamfuse.cli_errors import cli_errors
from streamfuse.config import Settings, load_settings
from streamfuse.replay.errors import RecordingError, ReplayError

__all__ = ["record", "replay"]
console = Console()


def parse_time_ms(text: str) -> int:
    """Epoch milliseconds, or an ISO 8601 time (UTC unless it says otherwise).

    Examples:
        >>> parse_time_ms("1800000000000"), parse_time_ms("2027-01-15T08:00:00Z")
        (1800000000000, 1800000000000)
    """
    if text.strip().isdigit():
        return int(text)
    try:
        dt = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise RecordingError(f"time {text!r} is neither epoch milliseconds nor ISO 8601 "
                             "(e.g. 2027-01-15T08:00:00Z)") from None
    if dt.tzinfo is None:
        from datetime import timezone

        dt = dt.replace(tzinfo=timezone.utc)
    return int(dt.timestamp() * 1000)


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    return stop


@cli_errors()  # mounted on its own: the main app, or a test's
def record(
    out: Path = typer.Option(..., "--out", help="New directory for the recording."),
    topics: list[str] = typer.Option([], "--topics", help="Topics without the prefix (samples, labels, sensor.image, "
                                     "predictions...; or all / inputs / outputs). Default: inputs."),
    duration: Optional[float] = typer.Option(None, "--duration", help="Stop after S seconds (wall clock)."),
    until: Optional[str] = typer.Option(None, "--until", help="Stop at this time (ISO 8601 or epoch ms)."),
    from_now: bool = typer.Option(False, "--from-now", help="Start at the end of the topics, not the beginning."),
    snapshot: bool = typer.Option(False, "--snapshot", help="Record what the topics hold now, then stop."),
    annotate: list[str] = typer.Option([], "--annotate", help="A known fault, as for `streamfuse demo --fault` "
                                       "(e.g. image:fog@40-90, seconds from --annotate-start), repeatable."),
    annotate_start: Optional[str] = typer.Option(None, "--annotate-start", help="Time zero of --annotate specs "
                                                 "(ISO 8601 or epoch ms, event time)."),
    compression: str = typer.Option("gzip", help="Segment compression: gzip or none."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Record topics (key, value, headers, partition, offset, timestamp) into DIR; Ctrl-C stops."""
    from streamfuse.replay.recorder import fault_annotations, record as do_record

    settings = load_settings(verbose)
    if annotate and annotate_start is None:
        raise RecordingError("--annotate needs --annotate-start (the event time its seconds count from)")
    notes = fault_annotations(annotate, parse_time_ms(annotate_start)) if annotate else None
    stop = None if snapshot else _stop_on_signals()
    if stop is not None and duration is None and until is None:
        console.print("recording until Ctrl-C ...")
    manifest = do_record(settings, out, topics or None, duration_s=duration,
                         until_ms=parse_time_ms(until) if until else None, stop=stop, annotations=notes,
                         from_now=from_now, compression=compression)
    total = sum(manifest["counts"].values())
    console.print(f"recorded {total} records from {len(manifest['counts'])} topics into {out} "
                  f"({', '.join(f'{k} {v}' for k, v in manifest['counts'].items())})")


@cli_errors()
def replay(
    recording: Path = typer.Argument(..., help="A directory written by `streamfuse record`."),
    speed: Optional[float] = typer.Option(None, "--speed", help="Event-time seconds per wall second."),
    max_speed: bool = typer.Option(False, "--max-speed", help="As fast as the pipeline goes (the default)."),
    namespace: Optional[str] = typer.Option(None, "--namespace", help="Topic prefix (default replay-<random>.)."),
    models: list[str] = typer.Option([], "--models", help="UNIT=VERSION to serve, repeatable or comma-separated."),
    policy: Optional[Path] = typer.Option(None, "--policy", help="JSON/TOML file of monitor setting overrides."),
    report: Optional[Path] = typer.Option(None, "--report", help="Write summary.json and report.html here."),
    compare: Optional[tuple[str, str]] = typer.Option(None, "--compare", metavar="A B",
                                            help="Replay twice: A and B are UNIT=VERSION sets, bundle directories, "
                                                 "policy files or 'live'."),
    from_s: Optional[float] = typer.Option(None, "--from", help="Start S seconds after the recording's start."),
    to_s: Optional[float] = typer.Option(None, "--to", help="Stop S seconds after the recording's start."),
    assets: Optional[str] = typer.Option(None, "--assets", help="Only these asset ids, comma-separated."),
    keep: bool = typer.Option(False, "--keep", help="Keep the namespace's topics and Redis keys."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Replay a recording through sync/worker/monitor in its own namespace; evaluate and report.
    Without STREAMFUSE_KAFKA_BOOTSTRAP it runs on an embedded broker, as the demo does."""
    from streamfuse.replay.compare import compare as do_compare, load_policy, parse_models
    from streamfuse.replay.format import Recording
    from streamfuse.replay.options import ReplayOptions
    from streamfuse.replay.replayer import replay as do_replay

    if speed is not None and max_speed:
        raise ReplayError("choose --speed X or --max-speed, not both")
    settings = load_settings(verbose)
    Recording(recording, verify=False)  # a missing recording fails before a broker starts
    with _cluster(settings) as settings:
        options = ReplayOptions(
            namespace=namespace, report_dir=report, speed=speed, models=parse_models(models), keep=keep,
            progress=True, policy_overrides=load_policy(policy) if policy else None,
            time_range=(from_s, to_s) if from_s is not None or to_s is not None else None,
            assets=[a.strip() for a in assets.split(",") if a.strip()] if assets else None)
        stop = _stop_on_signals()
        if compare:
            _print_compare(do_compare(recording, settings, compare[0], compare[1], options, stop=stop))
            if report:
                console.print(f"report: {report / 'compare.html'}")
            return
        summary = do_replay(recording, settings, options, stop=stop)
    _print_summary(summary)
    if report:
        console.print(f"report: {report / 'report.html'}")


@contextmanager
def _cluster(settings: Settings) -> Iterator[Settings]:
    """The settings to run on: ``settings`` if they name a cluster; else, as ``streamfuse
    demo`` does, an embedded broker that runs as long as the block does."""
    if settings.kafka_bootstrap:
        yield settings
        return
    from streamfuse.embedded import EmbeddedBroker

    broker = EmbeddedBroker().start()
    try:
        cluster = settings.model_copy(update={"kafka_bootstrap": broker.bootstrap, "broker": "tansu"})
        console.print(f"embedded broker on {broker.bootstrap} (set STREAMFUSE_KAFKA_BOOTSTRAP to use a cluster)")
        yield cluster
    finally:
        broker.stop()


def _f(x: Any) -> str:
    return "-" if x is None else f"{x:.3f}" if isinstance(x, float) else str(x)


def _print_summary(s: dict[str, Any]) -> None:
    r = s["replay"]
    console.print(f"replayed {s['counts']['predictions']} samples ({r['event_s']:.0f} s of event time) in "
                  f"{r['wall_s']:.1f} s: {r['speed_x']}x real time after a {r['startup_s'] or 0:.1f} s start-up; "
                  f"{s['counts']['alerts']} alert event(s), {s['counts']['commands']} command(s); "
                  f"false alerts/hour {_f(s['false_alerts']['per_hour'])}")
    t = Table(title="scores")
    for col in ("unit", "Top-1", "macro-F1", "labelled"):
        t.add_column(col)
    for u, v in s["metrics"]["overall"].items():
        t.add_row(u, _f(v["top1"]), _f(v["macro_f1"]), str(v["n"]))
    console.print(t)
    for d in s["fault_detection"]:
        delay = "not detected" if d["delay_ms"] is None else f"detected after {d['delay_ms'] / 1000:.1f} s"
        console.print(f"fault {d['fault']}: {delay}")


def _print_compare(result: dict[str, Any]) -> None:
    a, b = result["names"]
    t = Table(title=f"A = {a}   B = {b}")
    for col in ("", "A", "B", "B - A"):
        t.add_column(col)
    for u, v in result["a"]["metrics"]["overall"].items():
        w = result["b"]["metrics"]["overall"].get(u, {})
        t.add_row(f"{u} Top-1", _f(v["top1"]), _f(w.get("top1")), _f(result["differences"]["scores"][u]["top1"]))
    t.add_row("alerts", str(result["a"]["counts"]["alerts"]), str(result["b"]["counts"]["alerts"]),
              _f(result["differences"]["alerts"]))
    t.add_row("false alerts/h", _f(result["a"]["false_alerts"]["per_hour"]),
              _f(result["b"]["false_alerts"]["per_hour"]), _f(result["differences"]["false_alerts_per_hour"]))
    console.print(t)
