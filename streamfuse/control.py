"""Operators stay in charge: the policy's commands by hand, and automatic ones on approval.

* :func:`operator_command` builds the same :class:`~streamfuse.events.Command` records the
  rollback policy issues (mask / unmask a modality for a scope, roll a unit back, set the
  fusion mode), with the operator's name and reason in ``reason``.
* :func:`send_and_wait` publishes a command on ``control`` and waits for the workers' acks
  on ``control.acks``; :func:`audit` writes the operator's entry into the audit stream
  that already holds the monitor's alert → command → ack trail (``P audit``).
* :class:`ProposalStore` is the approval gate. With ``STREAMFUSE_MONITOR__APPROVAL=true``
  the monitor hands each automatic command to :meth:`ProposalStore.hold` instead of
  publishing it; the command waits in ``P control:proposals`` until an operator approves
  it (``streamfuse control approve ID``: published with its original id, so workers apply
  it once) or rejects it (``control reject ID``). A re-derived command (a restarted
  monitor) finds its proposal and is not proposed twice.

Redis keys (``P`` = ``Settings.redis_prefix``): ``P control:proposals`` (hash, command id →
JSON), and audit entries in ``P audit``.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from streamfuse.config import Settings
from streamfuse.errors import InvalidEvent, StreamfuseError
from streamfuse.events import JSON, Ack, Command, decode, to_map

FUSION_UNIT = "fusion"
PENDING, APPROVED, REJECTED = "pending", "approved", "rejected"


class ControlError(StreamfuseError):
    """An operator command or approval is invalid, or its acks did not come."""


def parse_scope(text: str) -> tuple[str, str]:
    """``global``, ``line:ID`` or ``asset:ID`` → (scope, scope id).

    Raises:
        ControlError: any other form.

    Examples:
        >>> parse_scope("line:line-1"), parse_scope("global"), parse_scope("asset:asset-3")
        (('line', 'line-1'), ('global', ''), ('asset', 'asset-3'))
    """
    scope, _, ident = text.partition(":")
    if scope == "global" and not ident:
        return "global", ""
    if scope in ("line", "asset") and ident:
        return scope, ident
    raise ControlError(f"scope {text!r} is not one of global, line:ID, asset:ID (e.g. --scope line:line-1)")


def operator_command(action: str, command_id: str, now_ms: int, *, reason: str, operator: str,
                     modality: str | None = None, version: str | None = None, fusion_mode: str | None = None,
                     scope: tuple[str, str] = ("global", "")) -> Command:
    """The command an operator issues; the same record the policy would send.

    Args:
        action: one of :attr:`Command.ACTIONS`.
        command_id: a new unique id (workers apply each id once).
        now_ms: when it is issued (wall time).
        reason: why; required, it goes to the audit trail.
        operator: who.

    Raises:
        ControlError: a missing reason, modality or fusion mode, or an unknown action.

    Examples:
        >>> c = operator_command("mask_modality", "op-1", 5, reason="lens cleaning", operator="ana",
        ...                      modality="image", scope=("line", "line-1"))
        >>> c.action, c.modality, c.scope, c.scope_id, c.reason
        ('mask_modality', 'image', 'line', 'line-1', 'operator ana: lens cleaning')
    """
    if action not in Command.ACTIONS:
        raise ControlError(f"unknown action {action!r}; one of {', '.join(Command.ACTIONS)}")
    if not reason.strip():
        raise ControlError("an operator command needs --reason \"...\" (it goes to the audit trail)")
    if action in ("mask_modality", "unmask_modality", "rollback_model", "activate_model") and not modality:
        raise ControlError(f"{action} needs a modality")
    if action == "set_fusion_mode" and not fusion_mode:
        raise ControlError("set_fusion_mode needs a fusion mode, e.g. ume")
    if scope[0] != "global" and action not in ("mask_modality", "unmask_modality"):
        raise ControlError(f"{action} applies fleet-wide (model versions and the fusion mode are global); "
                           "leave --scope out")
    return Command(command_id, action, now_ms, modality=modality, version=version, fusion_mode=fusion_mode,
                   reason=f"operator {operator}: {reason.strip()}", scope=scope[0], scope_id=scope[1])


def new_command_id() -> str:
    return f"op-{uuid.uuid4().hex[:12]}"


@dataclass(frozen=True)
class Proposal:
    """An automatic command waiting for an operator."""

    command: Command
    status: str
    proposed_ms: int
    decided_ms: int | None = None
    decided_by: str = ""
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"command": to_map(self.command), "status": self.status, "proposed_ms": self.proposed_ms,
                "decided_ms": self.decided_ms, "decided_by": self.decided_by, "note": self.note}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Proposal":
        cmd = decode(json.dumps(d["command"]).encode(), JSON, expect=(Command,))
        return cls(cmd, d["status"], d["proposed_ms"], d.get("decided_ms"),
                   d.get("decided_by", ""), d.get("note", ""))


class ProposalStore:
    """Automatic commands held for approval (sync Redis client)."""

    def __init__(self, client, prefix: str) -> None:
        self.r = client
        self.prefix = prefix
        self.key = f"{prefix}control:proposals"

    def hold(self, cmd: Command, now_ms: int) -> bool:
        """Store ``cmd`` as a pending proposal; False when it was proposed before (a re-derived
        command after a restart), so the monitor logs and audits it once."""
        new = bool(self.r.hsetnx(self.key, cmd.command_id, json.dumps(Proposal(cmd, PENDING, now_ms).to_dict())))
        if new:
            audit_entry(self.r, self.prefix, {"type": "proposal", "id": cmd.command_id, "action": cmd.action,
                                              "alert_id": cmd.alert_id or "", "reason": cmd.reason})
        return new

    def get(self, command_id: str) -> Proposal:
        raw = self.r.hget(self.key, command_id)
        if raw is None:
            raise ControlError(f"no proposal {command_id!r}; `streamfuse control proposals` lists them")
        return Proposal.from_dict(json.loads(raw))

    def list(self, status: str | None = PENDING) -> list[Proposal]:
        props = [Proposal.from_dict(json.loads(v)) for v in self.r.hgetall(self.key).values()]
        return sorted((p for p in props if status is None or p.status == status),
                      key=lambda p: (p.proposed_ms, p.command.command_id))

    def decide(self, command_id: str, status: str, by: str, note: str, now_ms: int) -> Proposal:
        """Mark a pending proposal approved or rejected (once: a second decision is refused).

        Raises:
            ControlError: no such proposal, or it was decided already.
        """
        import redis

        with self.r.pipeline() as pipe:
            pipe.watch(self.key)
            current = self.get(command_id)
            if current.status != PENDING:
                pipe.reset()
                raise ControlError(f"proposal {command_id} was {current.status} by {current.decided_by or '?'}")
            decided = Proposal(current.command, status, current.proposed_ms, now_ms, by, note)
            pipe.multi()
            pipe.hset(self.key, command_id, json.dumps(decided.to_dict()))
            try:
                pipe.execute()
            except redis.WatchError:
                raise ControlError(f"proposal {command_id} was decided by someone else just now; "
                                   "`streamfuse control proposals --all` shows it") from None
        audit_entry(self.r, self.prefix, {"type": status, "id": command_id, "actor": by, "reason": note})
        return decided


def audit_entry(client, prefix: str, fields: dict[str, str]) -> None:
    """One entry in the audit stream the monitor writes (``P audit``)."""
    client.xadd(f"{prefix}audit", {k: str(v) for k, v in fields.items()}, maxlen=100_000, approximate=True)


def audit(client, prefix: str, cmd: Command, operator: str, acks: list[Ack]) -> None:
    """The operator's entry: who, what, why, and which workers acknowledged it."""
    audit_entry(client, prefix, {
        "type": "operator", "id": cmd.command_id, "actor": operator, "action": cmd.action,
        "modality": cmd.modality or "", "scope": f"{cmd.scope}:{cmd.scope_id}" if cmd.scope_id else cmd.scope,
        "reason": cmd.reason, "acks": ",".join(f"{a.worker_id}={a.status}" for a in acks)})


def send_and_wait(settings: Settings, cmd: Command, workers: int, timeout_s: float) -> list[Ack]:
    """Publish ``cmd`` on ``control`` and return the acks of ``workers`` distinct workers
    (or those that came within ``timeout_s``; the caller decides what too few means)."""
    from kafka import TopicPartition

    from streamfuse.events import content_type_of, encode, headers
    from streamfuse.kafka import make_consumer, make_producer
    from streamfuse.topics import Topics

    topics = Topics(settings.topic_prefix)
    consumer = make_consumer(settings, None, "streamfuse-control")
    producer = make_producer(settings, "streamfuse-control")
    acks: dict[str, Ack] = {}
    try:
        parts = consumer.partitions_for_topic(topics.acks)
        if not parts:
            raise ControlError(f"topic {topics.acks} does not exist; run `streamfuse topics create`")
        consumer.assign([TopicPartition(topics.acks, p) for p in sorted(parts)])
        consumer.seek_to_end()
        for tp in consumer.assignment():
            consumer.position(tp)  # resolve "end" now, before the command can be acked
        producer.send(topics.control, key=(cmd.modality or "").encode(), value=encode(cmd), headers=headers())
        producer.flush(timeout=timeout_s)
        deadline = time.monotonic() + timeout_s
        while len(acks) < workers and time.monotonic() < deadline:
            for recs in consumer.poll(timeout_ms=200).values():
                for r in recs:
                    try:
                        ack = decode(r.value, content_type_of(r.headers), expect=(Ack,))
                    except InvalidEvent:
                        continue  # not an ack of ours; the monitor dead-letters bad records
                    if ack.command_id == cmd.command_id:
                        acks[ack.worker_id] = ack
    finally:
        producer.close()
        consumer.close()
    return sorted(acks.values(), key=lambda a: a.worker_id)
