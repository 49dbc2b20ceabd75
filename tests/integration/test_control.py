"""`streamfuse control`: operator commands reach a real worker, are acked and audited;
the monitor's proposals wait for approval and are released or dropped by an operator."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from streamfuse.cli import app as cli_app
from streamfuse.control import ControlError, ProposalStore, operator_command, parse_scope
from streamfuse.procs import child_env, spawn, stop_children
from streamfuse.events import Alert, Command
from streamfuse.monitor.policy import RollbackPolicy
from streamfuse.store import connect
from streamfuse.topics import Topics, ensure_topics

pytestmark = pytest.mark.integration


def invoke(*args: str):
    return CliRunner().invoke(cli_app, list(args))


def audit(settings) -> list[dict[str, str]]:
    entries = connect(settings).xrange(f"{settings.redis_prefix}audit")
    return [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in entries]


def commands_on_topic(settings, n: int) -> list[str]:
    from alertlib import read_events

    return [c.command_id for c in read_events(settings, Topics(settings.topic_prefix).control, n, 10)]


def policy_command(scope_id: str) -> Command:
    alert = Alert(f"fp-{scope_id}", f"fp-{scope_id}@5000", "firing", "degradation", "warning", "image", "line",
                  scope_id, 5000, 9000, summary=f"line {scope_id}: image degradation")
    (cmd,) = RollbackPolicy().decide(alert)
    return cmd


def test_scope_and_command_validation():
    for bad in ("plant", "line", "line:", "asset", "plant:1"):
        with pytest.raises(ControlError, match="global, line:ID, asset:ID"):
            parse_scope(bad)
    with pytest.raises(ControlError, match="--reason"):
        operator_command("mask_modality", "op-x", 1, reason="  ", operator="ana", modality="image")
    with pytest.raises(ControlError, match="fleet-wide"):
        operator_command("set_fusion_mode", "op-x", 1, reason="r", operator="ana", fusion_mode="ume",
                         scope=("line", "l1"))
    with pytest.raises(ControlError, match="needs a modality"):
        operator_command("unmask_modality", "op-x", 1, reason="r", operator="ana")


def test_operator_commands_and_approvals_with_a_real_worker(settings, tmp_path: Path, monkeypatch):
    ensure_topics(settings)
    for k, v in child_env(settings).items():
        if k.startswith("STREAMFUSE_"):
            monkeypatch.setenv(k, v)
    worker = spawn("worker", settings, tmp_path)
    try:
        out = invoke("control", "mask", "image", "--scope", "line:line-1", "--reason", "lens cleaning",
                     "--operator", "ana", "--timeout", "60", "--json")
        assert out.exit_code == 0, out.output
        masked = json.loads(out.output)
        (ack,) = masked["acks"]
        assert ack["status"] == "applied" and "image@line:line-1" in ack["masked"]
        assert masked["reason"] == "operator ana: lens cleaning"

        # The monitor in approval mode holds its commands; a restarted monitor re-deriving one adds nothing.
        proposals = ProposalStore(connect(settings), settings.redis_prefix)
        approved, rejected = policy_command("line-0"), policy_command("line-1")
        assert proposals.hold(approved, 1) and proposals.hold(rejected, 2) and not proposals.hold(approved, 3)
        status = json.loads(invoke("status", "--json").output)
        assert [p["command"]["command_id"] for p in status["pending_proposals"]] == [approved.command_id,
                                                                                      rejected.command_id]
        assert approved.command_id in invoke("status").output
        out = invoke("control", "approve", approved.command_id, "--operator", "bo", "--timeout", "60", "--json")
        assert out.exit_code == 0, out.output
        assert [a["status"] for a in json.loads(out.output)["acks"]] == ["applied"]
        assert "image@line:line-0" in json.loads(out.output)["acks"][0]["masked"]
        again = invoke("control", "approve", approved.command_id)
        assert again.exit_code == 2 and "was approved by bo" in again.output
        out = invoke("control", "reject", rejected.command_id, "--reason", "line-1 is in maintenance",
                     "--operator", "bo")
        assert out.exit_code == 0, out.output
        assert json.loads(invoke("status", "--json").output)["pending_proposals"] == []
        assert "no proposals" in invoke("control", "proposals").output
        assert len(json.loads(invoke("control", "proposals", "--all", "--json").output)) == 2
    finally:
        stop_children([worker])
    sent = commands_on_topic(settings, 2)
    assert approved.command_id in sent and rejected.command_id not in sent
    assert sent[0].startswith("op-") and len(sent) == 2
    trail = audit(settings)
    ops = [e for e in trail if e["type"] == "operator"]
    assert [(e["actor"], e["action"], e["scope"]) for e in ops] == [("ana", "mask_modality", "line:line-1"),
                                                                    ("bo", "mask_modality", "line:line-0")]
    assert ops[0]["reason"] == "operator ana: lens cleaning" and ops[0]["acks"].endswith("=applied")
    assert [e["type"] for e in trail if e["id"] == rejected.command_id] == ["proposal", "rejected"]
    assert [e["reason"] for e in trail if e["type"] == "rejected"] == ["line-1 is in maintenance"]


def test_too_few_acks_is_exit_status_1(settings, monkeypatch):
    ensure_topics(settings)
    for k, v in child_env(settings).items():
        if k.startswith("STREAMFUSE_"):
            monkeypatch.setenv(k, v)
    out = invoke("control", "fusion-mode", "ume", "--reason", "no worker runs", "--timeout", "1")
    assert out.exit_code == 1 and "only 0 of 1 workers acknowledged" in out.output
    bad = invoke("control", "mask", "image", "--scope", "plant:1", "--reason", "x")
    assert bad.exit_code == 2 and "line:ID" in bad.output


@pytest.mark.slow  # a worker, a monitor and a faulty plant: about a minute and a half here
def test_approval_mode_turns_the_monitors_commands_into_proposals(settings, tmp_path: Path):
    from test_scenarios import run_scenario, scenario_settings

    s = scenario_settings(settings)
    s = s.model_copy(update={"monitor": s.monitor.model_copy(update={"approval": True})})
    proposals = ProposalStore(connect(s), s.redis_prefix)
    run = run_scenario(s, tmp_path, ["image:fog@20-50/asset-0", "image:fog@20-50/asset-2"], duration_s=40,
                       until=lambda o: bool(proposals.list()))
    firing = run.alerts(kind="degradation", modality="image", status="firing")
    assert firing, run.observer.alerts  # the monitor still alerts
    assert run.observer.commands == []  # but sends no command
    first = proposals.list()[0].command
    assert (first.action, first.modality, first.scope_id, first.alert_id) == (
        "mask_modality", "image", "line-0", firing[0]["alert_id"])
    assert "proposed; `streamfuse control approve" in run.logs["monitor"]
