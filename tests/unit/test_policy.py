"""Rollback policy: alert transitions -> commands, with scopes, rollbacks after an
activation, fusion actions, cooldowns, the hourly cap, dry runs and checkpoints."""

from __future__ import annotations

import dataclasses
import json

import pytest

from streamfuse.errors import ConfigError
from streamfuse.events import Alert, Command
from streamfuse.monitor.policy import PolicyConfig, PolicyContext, RollbackPolicy, Suppressed

MIN = 60_000


def alert(
    status: str = "firing",
    kind: str = "degradation",
    modality: str = "image",
    scope: str = "global",
    scope_id: str = "",
    start: int = 10 * MIN,
    at: int | None = None,
    fp: str | None = None,
) -> Alert:
    fp = fp or f"{kind}-{modality}-{scope}-{scope_id}"
    at = start if at is None else at
    return Alert(fp, f"{fp}@{start}", status, kind, "critical", modality, scope, scope_id, start, at,
                 summary="s", ends_ms=at if status == "resolved" else None)


def ctx(now: int, **changes: tuple[str, str, int]) -> PolicyContext:
    return PolicyContext(now_ms=now, version_changes=dict(changes))


def actions(cmds: list[Command]) -> list[tuple]:
    return [(c.action, c.modality, c.scope, c.scope_id) for c in cmds]


# ---------------------------------------------------------------------------- masks


def test_degradation_masks_its_scope_and_unmasks_when_resolved() -> None:
    policy = RollbackPolicy()
    firing = alert(scope="line", scope_id="L1")
    (mask,) = policy.decide(firing)
    assert (mask.command_id, mask.action, mask.modality, mask.scope, mask.scope_id, mask.alert_id,
            mask.issued_ms) == (f"{firing.alert_id}:mask_modality", "mask_modality", "image", "line", "L1",
                                firing.alert_id, 10 * MIN)
    assert "degradation firing" in mask.reason
    assert policy.masks == {("image", "line", "L1"): [firing.alert_id]}
    (unmask,) = policy.decide(alert("resolved", scope="line", scope_id="L1", at=12 * MIN))
    assert (unmask.command_id, unmask.action, unmask.scope, unmask.scope_id) == (
        f"{firing.alert_id}:unmask_modality", "unmask_modality", "line", "L1")
    assert policy.masks == {}


@pytest.mark.parametrize("scope,scope_id", [("global", ""), ("line", "L2"), ("asset", "a7")])
def test_sensor_fault_masks_its_scope(scope: str, scope_id: str) -> None:
    policy = RollbackPolicy()
    cmds = policy.decide(alert(kind="sensor_fault", modality="audio", scope=scope, scope_id=scope_id))
    assert actions(cmds) == [("mask_modality", "audio", scope, scope_id)]


def test_resolved_unmasks_only_what_the_policy_masked() -> None:
    policy = RollbackPolicy()
    assert policy.decide(alert("resolved")) == []  # never masked (e.g. the mask was suppressed)
    policy.decide(alert(scope="asset", scope_id="a1"))
    assert policy.decide(alert("resolved", scope="asset", scope_id="a2")) == []  # another asset
    assert policy.decide(alert("resolved", kind="dominance", scope="asset", scope_id="a1")) == []


def test_two_alerts_share_one_mask_and_unmask_after_both_resolve() -> None:
    policy = RollbackPolicy()
    dropout = alert(kind="sensor_fault", scope="asset", scope_id="a1", fp="dropout")
    flat = alert(kind="sensor_fault", scope="asset", scope_id="a1", fp="flatline", start=11 * MIN)
    assert actions(policy.decide(dropout)) == [("mask_modality", "image", "asset", "a1")]
    assert policy.decide(flat) == []  # already masked: nothing to send, nothing suppressed
    assert policy.suppressed == []
    assert policy.decide(alert("resolved", kind="sensor_fault", scope="asset", scope_id="a1", fp="dropout",
                               at=12 * MIN)) == []
    (unmask,) = policy.decide(alert("resolved", kind="sensor_fault", scope="asset", scope_id="a1", fp="flatline",
                                    start=11 * MIN, at=13 * MIN))
    assert unmask.action == "unmask_modality" and unmask.alert_id == flat.alert_id


def test_decide_without_context_keeps_working_and_ids_are_deterministic() -> None:
    a = alert()
    assert RollbackPolicy().decide(a) == RollbackPolicy().decide(a, ctx(a.event_ms))
    assert RollbackPolicy().decide(a)[0].command_id == f"{a.alert_id}:mask_modality"


# ---------------------------------------------------------------------------- rollback


def test_degradation_right_after_an_activation_rolls_the_model_back() -> None:
    policy = RollbackPolicy(PolicyConfig(rollback_after_activation_ms=5 * MIN))
    a = alert(scope="line", scope_id="L1", start=10 * MIN)
    (cmd,) = policy.decide(a, ctx(10 * MIN, image=("v1", "v2", 6 * MIN), audio=("a1", "a2", 9 * MIN)))
    assert (cmd.command_id, cmd.action, cmd.modality, cmd.version, cmd.scope, cmd.scope_id) == (
        f"{a.alert_id}:rollback_model", "rollback_model", "image", "v1", "global", "")
    assert "v2" in cmd.reason and policy.masks == {}
    # resolving after a rollback unmasks nothing (nothing was masked)
    assert policy.decide(alert("resolved", scope="line", scope_id="L1", at=14 * MIN)) == []


@pytest.mark.parametrize("changed_at", [4 * MIN, 11 * MIN])  # too long before / after the alert
def test_version_change_outside_the_window_masks(changed_at: int) -> None:
    policy = RollbackPolicy(PolicyConfig(rollback_after_activation_ms=5 * MIN))
    cmds = policy.decide(alert(start=10 * MIN), ctx(10 * MIN, image=("v1", "v2", changed_at)))
    assert [c.action for c in cmds] == ["mask_modality"]


def test_only_the_degraded_modality_is_rolled_back_and_sensor_faults_never_are() -> None:
    policy = RollbackPolicy()
    context = ctx(10 * MIN, image=("v1", "v2", 9 * MIN), audio=("a1", "a2", 9 * MIN))
    assert actions(policy.decide(alert(modality="audio"), context)) == [("rollback_model", "audio", "global", "")]
    cmds = policy.decide(alert(kind="sensor_fault", modality="image", scope="asset", scope_id="a1"), context)
    assert actions(cmds) == [("mask_modality", "image", "asset", "a1")]


def test_no_rollback_back_to_a_version_the_policy_rolled_back_from() -> None:
    policy = RollbackPolicy(PolicyConfig(cooldown_ms=0))
    assert [c.version for c in policy.decide(alert(start=10 * MIN), ctx(10 * MIN, image=("v1", "v2", 9 * MIN)))] \
        == ["v1"]
    policy.decide(alert("resolved", start=10 * MIN, at=11 * MIN))
    # v1 is active now (v2 -> v1 seen at 10.5 min) and image degrades again: mask, don't flip back to v2
    cmds = policy.decide(alert(start=12 * MIN), ctx(12 * MIN, image=("v2", "v1", 10 * MIN + 30_000)))
    assert [c.action for c in cmds] == ["mask_modality"]


# ---------------------------------------------------------------------------- fusion, alert-only kinds


def test_fusion_regression_sets_ume_or_rolls_fusion_back() -> None:
    a = alert(kind="fusion_regression", modality="fused")
    (cmd,) = RollbackPolicy().decide(a)
    assert (cmd.command_id, cmd.action, cmd.fusion_mode, cmd.modality, cmd.scope) == (
        f"{a.alert_id}:set_fusion_mode", "set_fusion_mode", "ume", None, "global")
    (cmd,) = RollbackPolicy(PolicyConfig(fusion_action="rollback_fusion")).decide(a)
    assert (cmd.action, cmd.fusion_mode, cmd.command_id) == ("rollback_fusion", None, f"{a.alert_id}:rollback_fusion")
    assert RollbackPolicy().decide(alert("resolved", kind="fusion_regression", modality="fused")) == []


def test_fusion_action_waits_while_a_modality_is_masked() -> None:
    policy = RollbackPolicy()
    policy.decide(alert(scope="line", scope_id="L1"))
    regression = alert(kind="fusion_regression", modality="fused")
    assert policy.decide(regression) == []
    assert policy.suppressed == [Suppressed(regression.alert_id, "set_fusion_mode", "fused", "modality_masked")]
    policy.decide(alert("resolved", scope="line", scope_id="L1", at=11 * MIN))
    assert [c.action for c in policy.decide(alert(kind="fusion_regression", modality="fused", start=12 * MIN))] == [
        "set_fusion_mode"]


def test_a_label_free_alarm_right_after_another_modality_release_masks_nothing() -> None:
    """A bad image release makes the healthy microphone look like the odd one out; the
    image's own alarm rolls it back, the microphone keeps its place in the fusion."""
    import dataclasses

    policy = RollbackPolicy(PolicyConfig(rollback_after_activation_ms=5 * MIN))
    release = ctx(10 * MIN, image=("v1", "v2", 7 * MIN))
    agreement = dataclasses.replace(alert(modality="audio", scope="line", scope_id="L1"),
                                    labels={"evidence": "agreement"})
    assert policy.decide(agreement, release) == []
    assert policy.suppressed == [Suppressed(agreement.alert_id, "mask_modality", "audio", "model_version_changed")]
    assert [c.action for c in policy.decide(alert(modality="image"), release)] == ["rollback_model"]
    # a labelled alarm on the microphone still masks it; so does a label-free one long after the release
    labelled = alert(modality="audio", scope="line", scope_id="L2")
    assert actions(policy.decide(labelled, release)) == [("mask_modality", "audio", "line", "L2")]
    later = dataclasses.replace(alert(modality="audio", scope="line", scope_id="L3", start=20 * MIN),
                                labels={"evidence": "agreement"})
    assert actions(RollbackPolicy(PolicyConfig(rollback_after_activation_ms=5 * MIN)).decide(later, release)) == [
        ("mask_modality", "audio", "line", "L3")]


def test_fusion_action_waits_after_a_modality_version_changed() -> None:
    policy = RollbackPolicy(PolicyConfig(rollback_after_activation_ms=5 * MIN))
    regression = alert(kind="fusion_regression", modality="fused", start=10 * MIN)
    assert policy.decide(regression, ctx(10 * MIN, image=("v1", "v2", 7 * MIN))) == []
    assert policy.suppressed == [Suppressed(regression.alert_id, "set_fusion_mode", "fused", "model_version_changed")]
    # a new fusion version is no excuse, nor a modality version changed long before
    for change in ({"fusion": ("f1", "f2", 7 * MIN)}, {"image": ("v1", "v2", 4 * MIN)}):
        later = alert(kind="fusion_regression", modality="fused", start=10 * MIN, fp=f"r-{sorted(change)}")
        assert [c.action for c in RollbackPolicy(PolicyConfig(rollback_after_activation_ms=5 * MIN)).decide(
            later, ctx(10 * MIN, **change))] == ["set_fusion_mode"]


@pytest.mark.parametrize("kind", ["dominance", "drift", "command_unacked", "action_suppressed"])
def test_alert_only_kinds(kind: str) -> None:
    policy = RollbackPolicy()
    assert policy.decide(alert(kind=kind), ctx(10 * MIN, image=("v1", "v2", 9 * MIN))) == []
    assert policy.decide(alert("resolved", kind=kind)) == []
    assert policy.suppressed == []


def test_scopes_not_acted_on_are_alert_only() -> None:
    policy = RollbackPolicy(PolicyConfig(act_on_scopes=("global",)))
    assert policy.decide(alert(scope="line", scope_id="L1")) == []
    assert policy.decide(alert(scope="asset", scope_id="a1")) == []
    assert policy.suppressed == [] and policy.masks == {}
    assert [c.action for c in policy.decide(alert())] == ["mask_modality"]


# ---------------------------------------------------------------------------- limits


def test_cooldown_per_action_modality_and_scope() -> None:
    policy = RollbackPolicy(PolicyConfig(cooldown_ms=5 * MIN))
    assert policy.decide(alert(scope="line", scope_id="L1", start=10 * MIN))
    assert policy.decide(alert("resolved", scope="line", scope_id="L1", start=10 * MIN, at=11 * MIN))
    # the alert comes back within the cooldown: held back, and reported
    again = alert(scope="line", scope_id="L1", start=12 * MIN)
    assert policy.decide(again) == []
    assert policy.suppressed == [Suppressed(again.alert_id, "mask_modality", "image", "cooldown")]
    # other units are not affected
    assert actions(policy.decide(alert(scope="line", scope_id="L2", start=12 * MIN))) == [
        ("mask_modality", "image", "line", "L2")]
    assert actions(policy.decide(alert(modality="audio", scope="line", scope_id="L1", start=12 * MIN))) == [
        ("mask_modality", "audio", "line", "L1")]
    # after the cooldown the same unit can be masked again
    assert [c.action for c in policy.decide(alert(scope="line", scope_id="L1", start=15 * MIN))] == ["mask_modality"]
    assert policy.suppressed == []  # per call


def test_hourly_cap_rolls_and_unmask_is_exempt() -> None:
    policy = RollbackPolicy(PolicyConfig(max_actions_per_hour=2, cooldown_ms=0))
    assert policy.decide(alert(scope="asset", scope_id="a1", start=0))
    assert policy.decide(alert(scope="asset", scope_id="a2", start=10 * MIN))
    third = alert(scope="asset", scope_id="a3", start=20 * MIN)
    assert policy.decide(third) == []
    assert policy.suppressed == [Suppressed(third.alert_id, "mask_modality", "image", "rate_cap")]
    # unmasks are neither capped nor counted
    assert policy.decide(alert("resolved", scope="asset", scope_id="a1", start=0, at=30 * MIN))
    assert policy.decide(alert(scope="asset", scope_id="a4", start=50 * MIN)) == []
    # an hour after the first action, one slot is free again
    assert actions(policy.decide(alert(scope="asset", scope_id="a4", start=60 * MIN))) == [
        ("mask_modality", "image", "asset", "a4")]
    assert policy.decide(alert(scope="asset", scope_id="a5", start=61 * MIN)) == []


def test_cap_counts_every_kind_of_action() -> None:
    policy = RollbackPolicy(PolicyConfig(max_actions_per_hour=2))
    assert policy.decide(alert(kind="fusion_regression", modality="fused"))
    assert policy.decide(alert(modality="audio"), ctx(10 * MIN, audio=("a1", "a2", 9 * MIN)))
    assert policy.decide(alert()) == [] and policy.suppressed[0].reason == "rate_cap"


def test_dry_run_issues_nothing_but_reports_what_it_would_do() -> None:
    policy = RollbackPolicy(PolicyConfig(dry_run=True, cooldown_ms=5 * MIN))
    first = alert(scope="line", scope_id="L1")
    assert policy.decide(first) == []
    assert policy.suppressed == [Suppressed(first.alert_id, "mask_modality", "image", "dry_run")]
    assert policy.decide(alert("resolved", scope="line", scope_id="L1", at=11 * MIN)) == []
    assert policy.suppressed == [Suppressed(first.alert_id, "unmask_modality", "image", "dry_run")]
    # the simulated state is that of a live policy: the cooldown applies
    again = alert(scope="line", scope_id="L1", start=12 * MIN)
    assert policy.decide(again) == [] and policy.suppressed[0].reason == "cooldown"


# ---------------------------------------------------------------------------- checkpoints


def scenario() -> list[tuple[Alert, PolicyContext]]:
    cfg_changes = {"image": ("v1", "v2", 30 * MIN)}
    events = [
        (alert(scope="asset", scope_id="a1", kind="sensor_fault", fp="drop", start=1 * MIN), ctx(1 * MIN)),
        (alert(scope="line", scope_id="L1", start=2 * MIN), ctx(2 * MIN)),
        (alert(scope="asset", scope_id="a1", kind="sensor_fault", fp="flat", start=3 * MIN), ctx(3 * MIN)),
        (alert("resolved", scope="line", scope_id="L1", start=2 * MIN, at=4 * MIN), ctx(4 * MIN)),
        (alert(scope="line", scope_id="L1", start=5 * MIN), ctx(5 * MIN)),  # cooldown
        (alert("resolved", scope="asset", scope_id="a1", kind="sensor_fault", fp="drop", start=1 * MIN,
               at=6 * MIN), ctx(6 * MIN)),
        (alert(kind="fusion_regression", modality="fused", start=7 * MIN), ctx(7 * MIN)),  # a1 still masked
        (alert(scope="asset", scope_id="a2", start=8 * MIN), ctx(8 * MIN)),
        (alert(start=31 * MIN), ctx(31 * MIN, **cfg_changes)),  # a rollback, but over the cap
        (alert("resolved", scope="asset", scope_id="a1", kind="sensor_fault", fp="flat", start=3 * MIN,
               at=32 * MIN), ctx(32 * MIN)),
        (alert(scope="asset", scope_id="a3", start=70 * MIN), ctx(70 * MIN)),
        (alert("resolved", start=31 * MIN, at=72 * MIN), ctx(72 * MIN)),
        (alert(start=73 * MIN), ctx(73 * MIN, image=("v2", "v1", 31 * MIN))),
        (alert(modality="audio", start=75 * MIN), ctx(75 * MIN, audio=("a1", "a2", 74 * MIN))),
        (alert("resolved", modality="audio", start=75 * MIN, at=76 * MIN), ctx(76 * MIN)),
        (alert(modality="audio", start=77 * MIN), ctx(77 * MIN, audio=("a2", "a1", 76 * MIN))),
    ]
    return events


def play(policy: RollbackPolicy, events) -> list:
    return [(policy.decide(a, c), policy.suppressed) for a, c in events]


CONFIG = PolicyConfig(cooldown_ms=10 * MIN, max_actions_per_hour=3, rollback_after_activation_ms=5 * MIN)


def test_scenario_outcome() -> None:
    out = play(RollbackPolicy(CONFIG), scenario())
    summary = [([c.action for c in cmds], [s.reason for s in sup]) for cmds, sup in out]
    assert summary == [
        (["mask_modality"], []),
        (["mask_modality"], []),
        ([], []),
        (["unmask_modality"], []),
        ([], ["cooldown"]),
        ([], []),
        ([], ["modality_masked"]),
        (["mask_modality"], []),
        ([], ["rate_cap"]),  # 3 actions in the hour before 31 min: at 1, 2 and 8
        (["unmask_modality"], []),
        (["mask_modality"], []),
        ([], []),  # the 31-min rollback was suppressed, so its resolution undoes nothing
        (["mask_modality"], []),  # v2 -> v1 was 42 min ago: outside the rollback window
        (["rollback_model"], []),
        ([], []),
        ([], ["rate_cap"]),  # would mask (never back to a2), but 70, 73, 75 fill the hour
    ]
    assert [sup[0].action for _, sup in out if sup] == [
        "mask_modality", "set_fusion_mode", "rollback_model", "mask_modality"]


@pytest.mark.parametrize("split", [1, 3, 5, 8, 10, 12, 14])
def test_state_round_trip_mid_stream_continues_identically(split: int) -> None:
    events = scenario()
    expected = play(RollbackPolicy(CONFIG), events)
    first = RollbackPolicy(CONFIG)
    head = play(first, events[:split])
    state = json.loads(json.dumps(first.state_dict()))  # checkpoints are plain JSON
    restored = RollbackPolicy(CONFIG)
    play(restored, events[-2:])  # whatever it held before is replaced
    restored.load_state_dict(state)
    assert restored.state_dict() == first.state_dict()
    assert head + play(restored, events[split:]) == expected


def test_empty_state_is_a_fresh_policy() -> None:
    policy = RollbackPolicy()
    policy.decide(alert())
    policy.load_state_dict({})
    assert policy.state_dict() == RollbackPolicy().state_dict() and policy.masks == {}


def test_state_stays_bounded() -> None:
    policy = RollbackPolicy(PolicyConfig(cooldown_ms=MIN, max_actions_per_hour=1000))
    for i in range(500):
        policy.decide(alert(scope="asset", scope_id=f"a{i}", start=i * MIN))
        policy.decide(alert("resolved", scope="asset", scope_id=f"a{i}", start=i * MIN, at=i * MIN + 1))
    state = policy.state_dict()
    assert len(state["recent"]) <= 60 and len(state["last_action"]) <= 2 and state["masks"] == []


# ---------------------------------------------------------------------------- config


@pytest.mark.parametrize(("kw", "match"), [
    (dict(act_on_scopes=("global", "plant")), r"act_on_scopes has \['plant'\]; valid scopes are global, line, asset"),
    (dict(fusion_action="retrain"), r"fusion_action must be one of set_fusion_mode, rollback_fusion, got 'retrain'"),
    (dict(cooldown_ms=-1), r"cooldown_ms must be an integer >= 0, got -1"),
    (dict(max_actions_per_hour=0), r"max_actions_per_hour must be an integer >= 1, got 0"),
    (dict(rollback_after_activation_ms=1.5), r"rollback_after_activation_ms must be an integer >= 0, got 1.5"),
    (dict(fusion_mode=""), r"fusion_mode must name a fusion mode"),
])
def test_config_validation_lists_valid_values(kw, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        PolicyConfig(**kw)


def test_config_defaults() -> None:
    cfg = PolicyConfig(act_on_scopes=["global"])
    assert cfg.act_on_scopes == ("global",)  # lists from settings are normalized
    d = PolicyConfig()
    assert (d.dry_run, d.act_on_scopes, d.fusion_action, d.fusion_mode) == (
        False, ("global", "line", "asset"), "set_fusion_mode", "ume")


def test_one_rollback_per_release_even_when_several_lines_degrade() -> None:
    policy = RollbackPolicy(PolicyConfig(cooldown_ms=0))
    change = ctx(10 * MIN, image=("good", "bad", 9 * MIN))
    first = policy.decide(alert(scope="line", scope_id="line-0"), change)
    assert [(c.action, c.version) for c in first] == [("rollback_model", "good")]
    assert policy.decide(alert(scope="line", scope_id="line-1"), change) == []
    assert [(s.action, s.reason) for s in policy.suppressed] == [("rollback_model", "rollback_in_flight")]


def inferred(modality: str, scope_id: str = "L1") -> Alert:
    a = alert(modality=modality, scope="line", scope_id=scope_id, fp=f"lf-{modality}")
    return dataclasses.replace(a, labels={**a.labels, "evidence": "agreement"})


def test_a_mask_never_takes_the_last_modality_out_of_a_scope() -> None:
    policy, c = RollbackPolicy(), ctx(10 * MIN)
    c = dataclasses.replace(c, modalities=("audio", "image", "series"))
    assert actions(policy.decide(inferred("image"), c)) == [("mask_modality", "image", "line", "L1")]
    assert actions(policy.decide(inferred("series"), c)) == [("mask_modality", "series", "line", "L1")]
    last = inferred("audio")
    assert policy.decide(last, c) == []
    assert policy.suppressed == [Suppressed(last.alert_id, "mask_modality", "audio", "last_modality")]


def test_a_measured_fault_releases_masks_held_only_by_label_free_evidence() -> None:
    """A stuck microphone can make its healthy partners look like the odd ones out; when
    the labels then show the microphone broken, its mask replaces theirs."""
    policy = RollbackPolicy()
    c = dataclasses.replace(ctx(10 * MIN), modalities=("audio", "image", "series"))
    policy.decide(inferred("image"), c)
    policy.decide(inferred("series"), c)
    labelled = alert(modality="audio", scope="line", scope_id="L1", fp="lab-audio")
    cmds = policy.decide(labelled, c)
    assert actions(cmds) == [("unmask_modality", "image", "line", "L1"), ("unmask_modality", "series", "line", "L1"),
                             ("mask_modality", "audio", "line", "L1")]
    assert len({x.command_id for x in cmds}) == 3 and policy.masks == {("audio", "line", "L1"): [labelled.alert_id]}
    # the released label-free alerts resolve later: nothing left to unmask for them
    assert policy.decide(dataclasses.replace(inferred("image"), status="resolved", ends_ms=11 * MIN), c) == []
