"""``streamfuse alerts ...``: subscriptions, silences, the dispatcher and the HTTP API.

Settings come from the environment (``STREAMFUSE_*``) like every other command; Redis
is ``STREAMFUSE_REDIS_URL`` and keys live under ``STREAMFUSE_REDIS_PREFIX``.
"""

from __future__ import annotations

import json
import signal
import threading
from typing import Optional

import typer
from rich.console import Console
from rich.text import Text

from streamfuse.cli_errors import new_typer
from streamfuse.clock import now_ms
from streamfuse.config import Settings, load_settings

alerts_app = new_typer(
    help="Alert subscriptions and silences, the dispatcher (webhooks, Alertmanager, Redis pub/sub) and its HTTP API.")
console = Console(highlight=False)


def _settings(verbose: bool = False) -> Settings:
    return load_settings(verbose)


def _stores(settings: Settings):
    from streamfuse.alerts.subscriptions import SilenceStore, SubscriptionStore
    from streamfuse.store import connect

    client = connect(settings)
    return (SubscriptionStore(client, settings.redis_prefix, settings.alerts),
            SilenceStore(client, settings.redis_prefix))



@alerts_app.command()
def serve(
    host: Optional[str] = typer.Option(None, help="Address to listen on (default STREAMFUSE_ALERTS__API_HOST)."),
    port: Optional[int] = typer.Option(None, help="Port (default STREAMFUSE_ALERTS__API_PORT, 9095)."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Serve the JSON API: /subscriptions, /silences, /alerts, /stats, /events (SSE), /openapi.json."""
    from streamfuse.alerts.api import serve as run_api

    run_api(_settings(verbose), host, port)


@alerts_app.command()
def dispatch(
    metrics_port: Optional[int] = typer.Option(None, help="Serve /metrics on this port (0 = off)."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Consume <prefix>alerts and notify every subscription (runs until Ctrl-C / SIGTERM)."""
    from streamfuse.alerts.dispatcher import run_dispatcher

    settings = _settings(verbose)
    if metrics_port is not None:
        settings = settings.model_copy(
            update={"alerts": settings.alerts.model_copy(update={"metrics_port": metrics_port})})
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stats = run_dispatcher(settings, stop)
    console.print(f"dispatcher stopped: {stats['sent']} notifications sent in {stats['requests']} requests, "
                  f"{stats['dead']} dead-lettered, {stats['pending']} pending")


@alerts_app.command()
def subscribe(
    url: str = typer.Option(..., "--url", help="Webhook URL; Alertmanager base URL; or, with --receiver redis, "
                                              "the pub/sub channel."),
    match: list[str] = typer.Option([], "--match", help="Label matcher LABEL=VALUE, LABEL!=VALUE or LABEL=~REGEX; "
                                                        "repeatable, all must match."),
    secret: Optional[str] = typer.Option(None, "--secret", envvar="STREAMFUSE_SUBSCRIPTION_SECRET",
                                         help="HMAC-SHA256 key for signing webhooks (or env "
                                              "STREAMFUSE_SUBSCRIPTION_SECRET)."),
    min_severity: str = typer.Option("info", "--min-severity", help="info | warning | critical"),
    receiver: str = typer.Option("webhook", "--receiver", help="webhook | alertmanager | redis"),
    sub_id: Optional[str] = typer.Option(None, "--id", help="Subscription id (default: generated); an existing "
                                                           "id is an error unless --replace."),
    replace: bool = typer.Option(False, "--replace", help="Replace the subscription with this --id."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Subscribe a receiver to the alerts that match (a --secret needs STREAMFUSE_ALERTS__SECRET_KEY)."""
    subs, _ = _stores(_settings())
    sub = subs.create(url, now_ms(), receiver, match, min_severity, secret, sub_id, replace=replace)
    if as_json:
        print(json.dumps(sub.public()))
        return
    console.print(f"subscribed {sub.id}: {sub.receiver} {sub.shown_url} "
                  f"[{', '.join(str(m) for m in sub.matchers) or 'all alerts'}] severity >= {sub.min_severity}"
                  + ("" if sub.secret else " (unsigned: give --secret to sign webhooks)"), markup=False)


@alerts_app.command()
def keygen() -> None:
    """Print a new key for STREAMFUSE_ALERTS__SECRET_KEY (seals webhook secrets in Redis)."""
    from streamfuse.alerts.sealing import generate_key

    print(generate_key())


@alerts_app.command()
def unsubscribe(sub_id: str = typer.Argument(..., metavar="ID", help="The subscription id.")) -> None:
    """Delete a subscription and whatever is still queued for it."""
    subs, _ = _stores(_settings())
    subs.delete(sub_id)
    console.print(f"unsubscribed {sub_id}", markup=False)


@alerts_app.command("list")
def list_(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List subscriptions (secrets are never shown) and active silences."""
    subs, silences = _stores(_settings())
    now = now_ms()
    all_subs, active = subs.list(), silences.list(now)
    if as_json:
        print(json.dumps({"subscriptions": [s.public() for s in all_subs],
                          "silences": [s.to_dict() for s in active]}, indent=2))
        return
    from rich.table import Table

    t = Table(title=f"subscriptions ({len(all_subs)})")
    for col in ("id", "receiver", "url", "matchers", "min severity", "signed"):
        t.add_column(col)
    for s in all_subs:
        t.add_row(*map(Text, (s.id, s.receiver, s.shown_url, ", ".join(str(m) for m in s.matchers) or "*",
                              s.min_severity, "yes" if s.secret else "no")))
    console.print(t)
    t = Table(title=f"silences ({len(active)})")
    for col in ("id", "matchers", "ends in", "comment"):
        t.add_column(col)
    for s in active:
        t.add_row(*map(Text, (s.id, ", ".join(str(m) for m in s.matchers), f"{(s.ends_ms - now) / 60000:.0f} min",
                              s.comment)))
    console.print(t)


@alerts_app.command()
def silence(
    match: list[str] = typer.Option([], "--match", help="Label matcher; repeatable, all must match."),
    for_: str = typer.Option("2h", "--for", help="How long: 90s, 30m, 2h, 1d, 1h30m."),
    comment: str = typer.Option("", "--comment", help="Why (shown in `alerts list`)."),
    by: str = typer.Option("", "--by", help="Who."),
    expire: Optional[str] = typer.Option(None, "--expire", metavar="ID", help="End this silence now instead."),
) -> None:
    """Mute matching alerts for a while, e.g. `silence --match modality=audio --for 2h`."""
    from streamfuse.alerts.matchers import parse_duration

    _, silences = _stores(_settings())
    if expire is not None:
        silences.expire(expire, now_ms())
        console.print(f"silence {expire} expired", markup=False)
        return
    s = silences.create(match, parse_duration(for_), now_ms(), comment, by)
    console.print(f"silence {s.id}: {', '.join(str(m) for m in s.matchers)} for {for_}", markup=False)
