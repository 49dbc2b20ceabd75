"""``streamfuse ingest mqtt | opcua``: the plant gateways' commands."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Optional

import typer

from streamfuse.cli_errors import new_typer
from streamfuse.config import load_settings
from streamfuse.errors import ConfigError

ingest_app = new_typer(rich_markup_mode=None,
                       help="Plant gateways: MQTT / OPC-UA readings -> sensor topics, by a mapping file.")


def _setup(mapping: Optional[Path], metrics_port: Optional[int], verbose: bool, section: str, **over):
    from prometheus_client import CollectorRegistry

    from streamfuse.ingest.mapping import load_mapping
    from streamfuse.metrics import serve

    settings = load_settings(verbose)
    ing = settings.ingest
    raw = ing.model_dump()
    raw[section].update({k: v for k, v in over.items() if v is not None})
    raw.update({k: v for k, v in (("mapping", mapping), ("metrics_port", metrics_port)) if v is not None})
    try:
        ing = type(ing).model_validate(raw)  # CLI options are checked like the environment's values
    except ValueError as exc:
        raise ConfigError(f"invalid ingest option: {exc}") from None
    settings = settings.model_copy(update={"ingest": ing})
    if ing.mapping is None:
        raise ConfigError("no mapping file: pass --mapping FILE or set STREAMFUSE_INGEST__MAPPING")
    registry = CollectorRegistry()
    serve(registry, ing.metrics_port)
    return settings, load_mapping(ing.mapping), registry


@ingest_app.command("mqtt")
def mqtt(
    mapping: Optional[Path] = typer.Option(None, help="Mapping file (TOML); default STREAMFUSE_INGEST__MAPPING."),
    host: Optional[str] = typer.Option(None, help="MQTT broker host (default 127.0.0.1)."),
    port: Optional[int] = typer.Option(None, help="MQTT broker port (default 1883)."),
    client_id: Optional[str] = typer.Option(None, help="Client id = the persistent session's name."),
    protocol: Optional[str] = typer.Option(None, help="MQTT protocol: 3.1.1 or 5 (default 5)."),
    metrics_port: Optional[int] = typer.Option(None, help="Serve Prometheus /metrics on this port (0 = off)."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """MQTT -> Kafka: QoS 1, persistent session; a message is acked only after Kafka acked its event."""
    from streamfuse.ingest.mqtt import MqttGateway

    settings, rules, registry = _setup(mapping, metrics_port, verbose, "mqtt", host=host, port=port,
                                       client_id=client_id, protocol=protocol)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    gw = MqttGateway(settings, rules, registry)
    try:
        n = gw.run(stop)
    except KeyboardInterrupt:
        n = gw.received
    typer.echo(f"ingest mqtt stopped after {n} messages ({gw.sink.acked} records acknowledged by Kafka, "
               f"{gw.sink.failures} delivery failures)")


@ingest_app.command("opcua")
def opcua(
    mapping: Optional[Path] = typer.Option(None, help="Mapping file (TOML); default STREAMFUSE_INGEST__MAPPING."),
    url: Optional[str] = typer.Option(None, help="Server endpoint, e.g. opc.tcp://plc-1:4840."),
    metrics_port: Optional[int] = typer.Option(None, help="Serve Prometheus /metrics on this port (0 = off)."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """OPC-UA -> Kafka: subscriptions with sampling interval and queue size; reconnects and re-subscribes."""
    import asyncio

    from streamfuse.ingest.opcua import OpcuaGateway

    settings, rules, registry = _setup(mapping, metrics_port, verbose, "opcua", url=url)

    async def main() -> int:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        return await OpcuaGateway(settings, rules, registry).run(stop)

    try:
        n = asyncio.run(main())
    except KeyboardInterrupt:
        n = 0
    typer.echo(f"ingest opcua stopped after {n} values")

