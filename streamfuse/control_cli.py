"""``streamfuse control ...``: operator commands (acked and audited) and approvals.

Each command is published on ``<prefix>control`` like the policy's, the workers' acks
are awaited on ``<prefix>control.acks``, and an audit entry with the operator's name and
reason goes to the audit trail that ``streamfuse status`` shows. Exit status: 0 when
``--workers`` workers applied it, 1 when fewer acked in time or one rejected it, 2 on
bad input.
"""

from __future__ import annotations

import getpass
import json
import os
from typing import Optional

import typer
from rich.console import Console

from streamfuse.cli_errors import new_typer
from streamfuse.clock import now_ms
from streamfuse.config import Settings, load_settings

control_app = new_typer(
    rich_markup_mode=None,
    help="Operator commands (mask, unmask, rollback, fusion-mode) with a reason, acked by the workers and "
         "audited; approve or reject the monitor's proposals (STREAMFUSE_MONITOR__APPROVAL=true).")
console = Console(highlight=False)

REASON = typer.Option(..., "--reason", help="Why (required; goes to the audit trail).")
OPERATOR = typer.Option(None, "--operator", help="Who (default: $USER).")
WORKERS = typer.Option(1, "--workers", min=0, help="Wait for acks from this many workers (0 = do not wait).")
TIMEOUT = typer.Option(30.0, "--timeout", help="Seconds to wait for the acks.")
AS_JSON = typer.Option(False, "--json", help="Print JSON.")


def _operator(given: Optional[str]) -> str:
    return given or os.environ.get("USER") or getpass.getuser()



def _issue(settings: Settings, cmd, operator: str, workers: int, timeout_s: float, as_json: bool) -> None:
    """Publish, wait for the acks, audit, report; exit 1 when the workers did not all apply it."""
    from streamfuse.control import audit, send_and_wait
    from streamfuse.store import StatusStore, connect

    store = StatusStore(connect(settings), settings.redis_prefix)
    store.put_command(cmd)  # the command record, as the monitor records its own
    acks = send_and_wait(settings, cmd, workers, timeout_s) if workers else []
    audit(store.r, settings.redis_prefix, cmd, operator, acks)
    ok = len(acks) >= workers and all(a.status in ("applied", "duplicate") for a in acks)
    if as_json:
        print(json.dumps({"command_id": cmd.command_id, "action": cmd.action, "reason": cmd.reason, "ok": ok,
                          "acks": [{"worker_id": a.worker_id, "status": a.status, "reason": a.reason,
                                    "masked": list(a.masked), "fusion_mode": a.fusion_mode} for a in acks]}))
    else:
        console.print(f"{cmd.command_id} {cmd.action} {cmd.modality or cmd.fusion_mode or ''} "
                      f"{cmd.scope} {cmd.scope_id}: {cmd.reason}", markup=False)
        for a in acks:
            console.print(f"  {a.worker_id}: {a.status} {a.reason} masked={list(a.masked)} "
                          f"fusion={a.fusion_mode}", markup=False)
        if len(acks) < workers:
            console.print(f"  only {len(acks)} of {workers} workers acknowledged within {timeout_s:g} s",
                          markup=False)
    if not ok:
        raise typer.Exit(1)


def _run(action: str, reason: str, operator: Optional[str], workers: int, timeout_s: float, as_json: bool,
         **fields) -> None:
    from streamfuse.control import new_command_id, operator_command, parse_scope

    settings = load_settings()
    if "scope" in fields:
        fields["scope"] = parse_scope(fields["scope"])
    who = _operator(operator)
    cmd = operator_command(action, new_command_id(), now_ms(), reason=reason, operator=who, **fields)
    _issue(settings, cmd, who, workers, timeout_s, as_json)


def _mask_command(action: str, doc: str):
    def command(modality: str = typer.Argument(..., help="image | audio | series"),
                scope: str = typer.Option("global", "--scope", help="global | line:ID | asset:ID"),
                reason: str = REASON, operator: Optional[str] = OPERATOR, workers: int = WORKERS,
                timeout: float = TIMEOUT, as_json: bool = AS_JSON) -> None:
        _run(action, reason, operator, workers, timeout, as_json, modality=modality, scope=scope)

    command.__doc__ = doc
    return command


control_app.command("mask")(_mask_command("mask_modality", "Mask a modality for a scope: fusion carries on without "
                                                           "it there."))
control_app.command("unmask")(_mask_command("unmask_modality", "Unmask a modality for a scope."))


@control_app.command()
def rollback(unit: str = typer.Argument(..., help="A modality's model (image, audio, series) or fusion."),
             to: Optional[str] = typer.Option(None, "--to", help="Version (default: the previous one)."),
             reason: str = REASON, operator: Optional[str] = OPERATOR, workers: int = WORKERS,
             timeout: float = TIMEOUT, as_json: bool = AS_JSON) -> None:
    """Roll a unit back to its previous version (or --to VERSION) in every worker."""
    if unit == "fusion":
        _run("rollback_fusion", reason, operator, workers, timeout, as_json, version=to)
    else:
        _run("rollback_model", reason, operator, workers, timeout, as_json, modality=unit, version=to)


@control_app.command("fusion-mode")
def fusion_mode(mode: str = typer.Argument(..., help="e.g. ume, weighted, head"),
                reason: str = REASON, operator: Optional[str] = OPERATOR, workers: int = WORKERS,
                timeout: float = TIMEOUT, as_json: bool = AS_JSON) -> None:
    """Set the fusion mode in every worker."""
    _run("set_fusion_mode", reason, operator, workers, timeout, as_json, fusion_mode=mode)


@control_app.command()
def approve(command_id: str = typer.Argument(..., metavar="ID", help="A proposal's command id."),
            reason: str = typer.Option("", "--reason", help="Note for the audit trail."),
            operator: Optional[str] = OPERATOR, workers: int = WORKERS, timeout: float = TIMEOUT,
            as_json: bool = AS_JSON) -> None:
    """Release a proposed command: published with its own id, acked and audited."""
    from streamfuse.control import APPROVED, ProposalStore
    from streamfuse.store import connect

    settings = load_settings()
    who = _operator(operator)
    proposal = ProposalStore(connect(settings), settings.redis_prefix).decide(command_id, APPROVED, who,
                                                                              reason, now_ms())
    _issue(settings, proposal.command, who, workers, timeout, as_json)


@control_app.command()
def reject(command_id: str = typer.Argument(..., metavar="ID", help="A proposal's command id."),
           reason: str = REASON, operator: Optional[str] = OPERATOR) -> None:
    """Drop a proposed command; it is never sent."""
    from streamfuse.control import REJECTED, ProposalStore
    from streamfuse.store import connect

    settings = load_settings()
    ProposalStore(connect(settings), settings.redis_prefix).decide(command_id, REJECTED, _operator(operator),
                                                                   reason, now_ms())
    console.print(f"rejected {command_id}", markup=False)


@control_app.command()
def proposals(all_: bool = typer.Option(False, "--all", help="Also approved and rejected ones."),
              as_json: bool = AS_JSON) -> None:
    """List the monitor's proposed commands (pending unless --all)."""
    from streamfuse.control import ProposalStore
    from streamfuse.store import connect

    settings = load_settings()
    props = ProposalStore(connect(settings), settings.redis_prefix).list(None if all_ else "pending")
    if as_json:
        print(json.dumps([p.to_dict() for p in props], indent=2))
        return
    for p in props:
        c = p.command
        console.print(f"{c.command_id}  {p.status:8s} {c.action} {c.modality or c.fusion_mode or ''} "
                      f"{c.scope} {c.scope_id}: {c.reason}", markup=False)
    if not props:
        console.print("no proposals", markup=False)
