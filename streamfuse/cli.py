"""``streamfuse`` — one CLI for every process and tool."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from streamfuse.cli_errors import new_typer
from streamfuse.config import SimSettings, Settings, load_settings
from streamfuse.errors import ConfigError, ModelError

app = new_typer(rich_markup_mode=None,
                help="Streaming monitor for multi-sensor ML: per-modality KPIs, dominance and "
                     "degradation alerts, per-unit rollback. Settings: env STREAMFUSE_* (see README).")
topics_app = new_typer(rich_markup_mode=None, help="Create or list the Kafka topics.")
app.add_typer(topics_app, name="topics")


def _register_subcommands() -> None:
    # Each area owns its commands; they are mounted here so `streamfuse --help` lists them all.
    from streamfuse.alerts.cli import alerts_app
    from streamfuse.control_cli import control_app
    from streamfuse.ingest.cli import ingest_app
    from streamfuse.models.cli import dataset_app, models_app, train
    from streamfuse.replay.cli import record, replay

    app.command(help=train.__doc__)(train)
    app.command(help=record.__doc__)(record)
    app.command(help=replay.__doc__)(replay)
    app.add_typer(dataset_app, name="dataset")
    app.add_typer(models_app, name="models")
    app.add_typer(alerts_app, name="alerts")
    app.add_typer(control_app, name="control")
    app.add_typer(ingest_app, name="ingest")


_register_subcommands()
console = Console()


def _settings(verbose: bool = False) -> Settings:
    return load_settings(verbose)


def _with_plant(settings: Settings, assets: int | None, rate: float | None) -> Settings:
    """``settings`` with the ``--assets`` / ``--rate`` overrides, checked like the environment's
    values (0 is refused, not ignored).

    Raises:
        ConfigError: an override out of range; the message names the option and the limit.
    """
    given = {"assets": assets, "rate_hz": rate}
    over = {k: v for k, v in given.items() if v is not None}
    try:
        sim = SimSettings.model_validate({**settings.sim.model_dump(), **over})
    except ValueError as exc:  # pydantic's ValidationError
        option = {"assets": "--assets", "rate_hz": "--rate"}
        raise ConfigError("; ".join(f"{option[e['loc'][0]]} {given[e['loc'][0]]:g}: {e['msg'].lower()}"
                                    for e in exc.errors())) from None
    return settings.model_copy(update={"sim": sim})


def _parse_faults(specs: list[str]):
    from streamfuse.sim.faults import parse_fault

    return tuple(parse_fault(s) for s in specs)


def _dataset_rows(settings: Settings, dataset: Optional[Path], split: str, faults):
    """The checked rows of ``--dataset`` (None without it), before anything starts."""
    if dataset is None:
        return None
    from streamfuse.sim.dataset_plant import load_rows

    rows = load_rows(dataset, split, max_payload_bytes=settings.max_payload_bytes)
    rows.check_faults(faults)
    console.print(f"dataset {rows.root}: {len(rows.rows)} {split} rows, classes {list(rows.classes)}, "
                  f"modalities {list(rows.modalities)}")
    return rows


@app.command()
def demo(
    duration: float = typer.Option(90.0, help="Seconds to run the simulated plant."),
    fault: list[str] = typer.Option([], help="Sensor fault MODALITY:KIND@START[-END][/ASSET], repeatable; "
                                             "e.g. image:fog@40."),
    summary: Optional[Path] = typer.Option(None, help="Write a JSON summary here."),
    assets: Optional[int] = typer.Option(None, help="Simulated assets (default STREAMFUSE_SIM__ASSETS, "
                                                    f"{SimSettings().assets})."),
    rate: Optional[float] = typer.Option(None, help="Samples per second per asset (default STREAMFUSE_SIM__RATE_HZ, "
                                                    f"{SimSettings().rate_hz:g})."),
    logs: Path = typer.Option(Path(".cache/streamfuse/demo-logs"), help="Child process logs."),
    record: Optional[Path] = typer.Option(None, help="Record the run (every topic, with the faults "
                                                     "annotated) into this new directory, for `streamfuse replay`."),
    dataset: Optional[Path] = typer.Option(None, help="Stream this labelled dataset (metadata.csv layout) as the "
                                                      "plant instead of simulating it."),
    split: str = typer.Option("test", help="With --dataset: the split to stream (train | val | test)."),
    models: Optional[Path] = typer.Option(None, help="Serve this bundle (`streamfuse train --out`), imported and "
                                                     "activated, instead of the demo bundle."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Run the whole pipeline locally: embedded broker, plant, worker, monitor, alert dispatcher, live KPIs."""
    from streamfuse.demo import run_demo

    settings = _with_plant(_settings(verbose), assets, rate)
    faults = _parse_faults(fault)
    rows = _dataset_rows(settings, dataset, split, faults)
    result = run_demo(settings, duration, faults, summary, console, logs, record_dir=record, dataset=rows,
                      models=models)
    c = result["counts"]
    console.print(f"samples {c['samples']}, predictions {c['predictions']}, dead-letter {c['dead_letter']}, "
                  f"KPI snapshots {c['kpi_snapshots']}, alerts {c['alerts']}, commands {c['commands']}")
    for a in result["alerts"]:
        console.print(f"  alert  t={a['t_s']:6.1f}s  {a['status']:8s} {a['kind']} {a['modality']} "
                      f"({a['scope']} {a['scope_id']})")
    for cmd in result["commands"]:
        console.print(f"  command t={cmd['t_s']:5.1f}s  {cmd['action']} {cmd['modality']}")


@app.command()
def broker(port: int = typer.Option(9092, help="Port to listen on (0 = a free one).")) -> None:
    """Run the embedded Kafka-protocol broker in the foreground (Ctrl-C or SIGTERM stops it and
    leaves no process behind; a port in use is an error)."""
    import signal

    from streamfuse.embedded import EmbeddedBroker

    _settings()

    def on_term(signum, frame):  # SIGTERM as Ctrl-C: the finally below kills and reaps the broker
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    b = EmbeddedBroker(port=port)
    try:
        b.start()
        console.print(f"broker ready: export STREAMFUSE_KAFKA_BOOTSTRAP={b.bootstrap} STREAMFUSE_BROKER=tansu")
        b.wait()
    except KeyboardInterrupt:
        pass  # Ctrl-C is the normal way to stop it
    finally:
        b.stop()


@topics_app.command("create")
def topics_create() -> None:
    """Create every missing topic (idempotent)."""
    from streamfuse.topics import ensure_topics

    created = ensure_topics(_settings())
    console.print(f"created {len(created)} topics" + (": " + ", ".join(created) if created else " (all existed)"))


@topics_app.command("list")
def topics_list() -> None:
    """List the topics under the prefix with their partition counts."""
    from streamfuse.topics import list_topics

    for name, parts in list_topics(_settings()).items():
        console.print(f"{name}\t{parts}")


@app.command()
def simulate(
    assets: Optional[int] = typer.Option(None, help="Number of assets (default STREAMFUSE_SIM__ASSETS, "
                                                    f"{SimSettings().assets})."),
    rate: Optional[float] = typer.Option(None, help="Samples per second per asset (default STREAMFUSE_SIM__RATE_HZ, "
                                                    f"{SimSettings().rate_hz:g})."),
    duration: Optional[float] = typer.Option(None, help="Seconds of event time (default: until Ctrl-C)."),
    fault: list[str] = typer.Option([], help="Sensor fault MODALITY:KIND@START[-END][/ASSET], repeatable."),
    speed: float = typer.Option(1.0, help="Event-time seconds per wall-clock second (1 = real time)."),
    max_speed: bool = typer.Option(False, "--max-speed", help="Publish as fast as possible (event time unchanged)."),
    malformed_every: int = typer.Option(0, help="Every N samples also publish malformed records (0 = never)."),
    per_modality_topics: bool = typer.Option(
        False, "--per-modality-topics", help="Publish each reading to <prefix>sensor.<modality> (run `streamfuse "
                                             "sync` to align them) instead of aligned samples."),
    jitter_ms: int = typer.Option(40, help="With --per-modality-topics: event-time jitter of each reading, ms."),
    reorder: float = typer.Option(0.05, help="With --per-modality-topics: share of readings published out of order."),
    drop: float = typer.Option(0.02, help="With --per-modality-topics: share of readings never published."),
    dataset: Optional[Path] = typer.Option(None, help="Stream this labelled dataset's rows (metadata.csv layout) "
                                                      "as the plant's readings, cycled across the assets."),
    split: str = typer.Option("test", help="With --dataset: the split to stream (train | val | test)."),
) -> None:
    """Run the simulated plant (or a labelled dataset as the plant): samples (or per-modality readings) and, late, labels."""
    from streamfuse.sim.publish import ReadingDisorder, SimPublisher

    settings = _with_plant(_settings(), assets, rate)
    sim = settings.sim
    faults = _parse_faults(fault)
    rows = _dataset_rows(settings, dataset, split, faults)
    disorder = ReadingDisorder(jitter_ms=jitter_ms, reorder_prob=reorder,
                               reorder_ms=int(500 / sim.rate_hz), drop_prob=drop) if per_modality_topics else None
    pub = SimPublisher(settings, faults, speed=None if max_speed else speed,
                       malformed_every=malformed_every, per_modality_topics=per_modality_topics,
                       **({"disorder": disorder} if disorder else {}), dataset=rows)
    try:
        stats = pub.run(duration_s=duration)
    except KeyboardInterrupt:
        stats = pub.stats
    console.print(f"published {stats.samples} samples ({stats.sensor_events} sensor readings), "
                  f"{stats.labels} labels, {stats.malformed} malformed records")
    if stats.send_retried or stats.send_lost:
        console.print(f"[red]broker trouble:[/red] {stats.send_retried} failed sends sent again, "
                      f"{stats.send_lost} records lost after every retry")


@app.command()
def worker(
    max_batch: Optional[int] = typer.Option(None, help="Largest micro-batch."),
    max_delay_ms: Optional[int] = typer.Option(None, help="Longest wait for a batch to fill, ms."),
    max_samples: Optional[int] = typer.Option(None, help="Stop after this many predictions."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Run an inference worker: samples → per-modality models + fusion → predictions."""
    import signal

    from streamfuse.models.bootstrap import ensure_models
    from streamfuse.inference.worker import InferenceWorker

    settings = _settings(verbose)
    over = {k: v for k, v in (("max_batch", max_batch), ("max_delay_ms", max_delay_ms)) if v is not None}
    settings = settings.model_copy(update={"worker": settings.worker.model_copy(update=over)})
    if settings.worker.threads:
        import torch

        # On a shared CPU, more threads than cores-per-process thrash (measured 20x slower).
        torch.set_num_threads(settings.worker.threads)
    registry = ensure_models(settings, console)
    bundle = registry.load_active(settings.worker.device)
    w = InferenceWorker(settings, bundle, model_registry=registry)
    signal.signal(signal.SIGTERM, lambda *_: w.stop())
    n = w.run(max_samples=max_samples)
    console.print(f"worker {w.worker_id} stopped after {n} predictions")


@app.command()
def sync(
    max_samples: Optional[int] = typer.Option(None, help="Stop after this many samples."),
    metrics_port: int = typer.Option(0, help="Serve Prometheus /metrics on this port (0 = off)."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Align per-modality readings (<prefix>sensor.*) into samples (<prefix>samples) by event time."""
    import signal
    import threading

    from prometheus_client import CollectorRegistry

    from streamfuse.metrics import serve
    from streamfuse.sync.app import run_sync

    settings = _settings(verbose)
    stop, registry = threading.Event(), CollectorRegistry()
    for sig in (signal.SIGTERM, signal.SIGINT):  # Ctrl-C too: stop after this poll, flushed and committed
        signal.signal(sig, lambda *_: stop.set())
    serve(registry, metrics_port)
    n = run_sync(settings, stop=stop, max_samples=max_samples, registry=registry)
    console.print(f"sync stopped after {n} samples")


@app.command()
def monitor(verbose: bool = typer.Option(False, "--verbose", "-v"),
            replica: str = typer.Option("", "--replica", metavar="NAME",
                                        help="Run a redundant monitor: app id <app_id>-NAME (its own consumer "
                                             "group and tables) on the same inputs; each alert and command is "
                                             "still published once (Redis leases), and if one monitor dies the "
                                             "others go on.")) -> None:
    """Run the monitor (faust): KPIs, degradation alerts, rollback commands."""
    from streamfuse.monitor.app import run_monitor

    from streamfuse.models.registry import Registry
    from streamfuse.store import RedisLink, connect

    settings = _settings(verbose)
    if replica:
        settings = settings.model_copy(update={"monitor": settings.monitor.model_copy(
            update={"app_id": f"{settings.monitor.app_id}-{replica}"})})
    # Started during a Redis outage (a restart), it waits for Redis instead of crash-looping.
    registry = Registry(settings, client=connect(settings, check=False))
    baselines = RedisLink("monitor").call(registry.baselines, what="reading the baselines at start-up")
    if not baselines:
        raise ModelError("the model registry has no active versions, so there are no baselines to monitor "
                         "against: start a worker first (it imports the bundle) or `streamfuse models import DIR`")
    run_monitor(settings, baselines, loglevel="info" if verbose else "warn")


@app.command()
def status(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Show the latest KPIs, open alerts, active model versions, workers' masks, pending proposals (from Redis)."""
    from streamfuse.control import ProposalStore
    from streamfuse.models.registry import Registry
    from streamfuse.store import StatusStore, connect

    settings = _settings()
    client = connect(settings)
    st = StatusStore(client, settings.redis_prefix).status()
    st["active_versions"] = Registry(settings).active()
    st["pending_proposals"] = [p.to_dict() for p in ProposalStore(client, settings.redis_prefix).list()]
    if as_json:
        print(json.dumps(st, indent=2))
        return
    from rich.table import Table

    t = Table(title="latest global KPIs")
    for col in ("scope", "modality", "n", "accuracy", "est. accuracy", "agreement", "contribution", "masked"):
        t.add_column(col)
    for key, k in st["kpis"].items():
        if k["scope"] != "global":
            continue
        fmt = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
        t.add_row(k["scope"], k["modality"], str(k["n"]), fmt(k["accuracy"]), fmt(k.get("est_accuracy")),
                  fmt(k["agreement"]),
                  fmt(k["mean_contribution"]), fmt(k["masked_rate"]))
    console.print(t)
    console.print(f"open alerts: {len(st['open_alerts'])}")
    for a in st["open_alerts"].values():
        console.print(f"  {a['severity']:8s} {a['kind']} {a['modality']} {a['scope']} {a['scope_id']}: {a['summary']}")
    console.print("active versions: " + (", ".join(f"{u}={v}" for u, v in st["active_versions"].items()) or "none"))
    for wid, ack in st["workers"].items():
        console.print(f"worker {wid}: masked={ack['masked']} fusion={ack['fusion_mode']} versions={ack['versions']}")
    console.print(f"pending proposals: {len(st['pending_proposals'])}"
                  + (" (streamfuse control approve ID | reject ID)" if st["pending_proposals"] else ""))
    for p in st["pending_proposals"]:
        c = p["command"]
        console.print(f"  {c['command_id']} {c['action']} {c['modality'] or c['fusion_mode'] or ''} "
                      f"{c['scope']} {c['scope_id']}: {c['reason']}", markup=False)


@app.command()
def health(
    url: list[str] = typer.Argument(None, help="HTTP endpoints that must answer 2xx, e.g. "
                                               "http://127.0.0.1:9100/metrics."),
    topic: Optional[str] = typer.Option(None, "--topic", help="A topic whose newest record must be recent."),
    max_age: float = typer.Option(60.0, "--max-age", help="With --topic: the newest record's age limit, s."),
    timeout: float = typer.Option(5.0, "--timeout", help="Seconds per probe."),
) -> None:
    """Health probe for container healthchecks: exit 0 when healthy, 1 with the reason when not."""
    from streamfuse.health import Unhealthy, newest_record_age_s, probe_http

    if not url and topic is None:
        raise typer.BadParameter("give a URL, or --topic")
    try:
        for u in url or []:
            console.print(f"{u}: HTTP {probe_http(u, timeout)}", markup=False)
        if topic is not None:
            age = newest_record_age_s(_settings(), topic, timeout)
            if age > max_age:
                raise Unhealthy(f"the newest record on {topic} is {age:.0f} s old (limit {max_age:g} s)")
            console.print(f"{topic}: newest record {age:.1f} s old", markup=False)
    except Unhealthy as exc:
        console.print(f"unhealthy: {exc}", markup=False)
        raise typer.Exit(1) from None


def main() -> None:
    app()  # a StreamfuseError ends as `error: ...` on stderr, exit status 2 (streamfuse.cli_errors)
