"""Alert lifecycle, matchers, silences, inhibition and grouping: pure, no broker, no Redis."""

from __future__ import annotations

import dataclasses
import json

import pytest

from streamfuse.alerts.config import AlertSettings
from streamfuse.alerts.errors import InvalidDuration, InvalidMatcher, InvalidSubscription
from streamfuse.alerts.formats import alertmanager_alerts, webhook_body
from streamfuse.alerts.lifecycle import AlertState, AlertTracker, alert_labels, fingerprint, group_due, group_key
from streamfuse.alerts.matchers import InhibitRule, Matcher, Silence, parse_duration, parse_matchers
from streamfuse.alerts.subscriptions import Subscription
from streamfuse.events import Alert

MIN = 60_000


def alert(status="firing", kind="degradation", modality="image", scope="global", scope_id="", starts=0,
          severity="critical", labels=None) -> Alert:
    ident = {"kind": kind, "modality": modality, "scope": scope, "scope_id": scope_id, **(labels or {})}
    fp = fingerprint(ident)
    return Alert(fp, f"{fp}@{starts}", status, kind, severity, modality, scope, scope_id, starts, starts + 1000,
                 summary=f"{modality} {kind}", labels=ident, value=0.4, threshold=0.6,
                 ends_ms=starts + 5000 if status == "resolved" else None)


def test_fingerprint_is_unchanged():
    assert fingerprint({"kind": "degradation", "modality": "image"}) == "9b10b81f6a725174"


def test_firing_then_resolved_notifies_once_each():
    t = AlertTracker()
    a = alert()
    assert [n.status for n in t.observe(a, 1_000)] == ["firing"]
    assert t.observe(a, 2_000) == []  # redelivery or monitor restart
    done = dataclasses.replace(a, status="resolved", ends_ms=9_000)
    notes = t.observe(done, 3_000)
    assert [(n.status, n.ends_ms) for n in notes] == [("resolved", 9_000)]
    assert t.observe(done, 4_000) == []
    assert t.duplicates == 2
    # A new firing episode is a new notification.
    again = dataclasses.replace(a, starts_ms=20_000, alert_id=f"{a.fingerprint}@20000")
    assert [n.key for n in t.observe(again, 5_000)] == [f"{a.fingerprint}:20000:firing"]


def test_dedup_survives_a_restart_through_serialized_state():
    t = AlertTracker()
    t.observe(alert(), 1_000)
    saved = {fp: json.dumps(st.to_dict()) for fp, st in t.take_dirty().items()}
    restored = AlertTracker({fp: AlertState.from_dict(json.loads(v)) for fp, v in saved.items()})
    assert restored.observe(alert(), 2_000) == []  # the monitor re-fired after its own restart
    assert [n.status for n in restored.observe(alert(status="resolved"), 3_000)] == ["resolved"]


def test_resolved_without_seen_firing_is_not_notified_but_remembered():
    t = AlertTracker()
    assert t.observe(alert(status="resolved"), 1_000) == []
    assert t.states[alert().fingerprint].status == "resolved"


def test_repeat_interval_renotifies_firing_alerts_only():
    t = AlertTracker(repeat_interval_ms=10 * MIN)
    t.observe(alert(), 0)
    assert t.tick(9 * MIN) == []
    assert [n.key.rsplit(":", 1)[-1] for n in t.tick(10 * MIN)] == ["1"]
    assert t.tick(15 * MIN) == []
    assert len(t.tick(20 * MIN)) == 1
    t.observe(alert(status="resolved"), 21 * MIN)
    assert t.tick(60 * MIN) == []


def test_silence_mutes_until_it_expires_then_the_alert_is_notified():
    t = AlertTracker()
    s = Silence("s1", parse_matchers(["modality=audio"]), 0, 2 * MIN)
    a = alert(modality="audio")
    assert t.observe(a, 1_000, [s]) == []
    assert t.states[a.fingerprint].muted_by == "silenced:s1"
    assert t.tick(MIN, [s]) == []
    assert [n.status for n in t.tick(2 * MIN, [s])] == ["firing"]
    # Other modalities were never muted.
    assert len(t.observe(alert(modality="image"), 1_000, [s])) == 1


def test_muted_firing_that_resolves_is_never_notified():
    t = AlertTracker()
    s = Silence("s1", parse_matchers(["modality=~aud.*"]), 0, 10 * MIN)
    t.observe(alert(modality="audio"), 1_000, [s])
    assert t.observe(alert(modality="audio", status="resolved"), 2_000, [s]) == []
    assert t.tick(20 * MIN, [s]) == []


def test_sensor_fault_inhibits_degradation_of_the_same_asset_and_modality():
    t = AlertTracker()
    fault = alert(kind="sensor_fault", modality="audio", scope="asset", scope_id="a1", severity="warning")
    assert len(t.observe(fault, 1_000)) == 1
    same = alert(modality="audio", scope="asset", scope_id="a1", severity="warning")
    other_asset = alert(modality="audio", scope="asset", scope_id="a2", severity="warning")
    other_modality = alert(modality="image", scope="asset", scope_id="a1", severity="warning")
    assert t.observe(same, 2_000) == []
    assert t.states[same.fingerprint].muted_by == f"inhibited:{fault.fingerprint}"
    assert len(t.observe(other_asset, 2_000)) == 1
    assert len(t.observe(other_modality, 2_000)) == 1
    # When the sensor fault resolves, the degradation it explained is notified.
    t.observe(dataclasses.replace(fault, status="resolved", ends_ms=3_000), 3_000)
    assert [n.fingerprint for n in t.tick(4_000)] == [same.fingerprint]


def test_inhibition_uses_an_explicit_asset_label_too():
    rule = InhibitRule.from_config(["kind=sensor_fault"], ["kind=degradation"], ["asset", "modality"])
    src = alert_labels(alert(kind="sensor_fault", modality="audio", labels={"asset": "a9"}))
    tgt = alert_labels(alert(modality="audio", scope="asset", scope_id="a9"))
    assert src["asset"] == tgt["asset"] == "a9" and rule.inhibits(src, tgt)
    assert not rule.inhibits(src, src)


@pytest.mark.parametrize("text,labels,expected", [
    ("modality=audio", {"modality": "audio"}, True),
    ("modality!=audio", {"modality": "audio"}, False),
    ("modality!=audio", {}, True),
    ("modality=~aud.*", {"modality": "audio"}, True),
    ("modality=~aud", {"modality": "audio"}, False),  # anchored, like Alertmanager
    ("modality!~image|series", {"modality": "audio"}, True),
    ('asset="line=1"', {"asset": "line=1"}, True),
])
def test_matchers(text, labels, expected):
    assert Matcher.parse(text).matches(labels) is expected


@pytest.mark.parametrize("text", ["modality", "=audio", "1x=a", "modality=~(", ""])
def test_bad_matchers_are_refused_with_the_syntax(text):
    with pytest.raises(InvalidMatcher, match="NAME=VALUE"):
        Matcher.parse(text)


def test_durations():
    assert parse_duration("2h") == 7200 and parse_duration("90s") == 90 and parse_duration("1d") == 86400
    for bad in ("", "2x", "h", "-5", "0s", "2h junk"):
        with pytest.raises(InvalidDuration):
            parse_duration(bad)


def test_subscription_filter_by_matchers_and_min_severity():
    sub = Subscription("s", "webhook", "https://x/", parse_matchers(["modality=~image|audio", "scope!=asset"]),
                       "warning")
    labels = alert_labels(alert(modality="audio", severity="warning"))
    assert sub.accepts(labels)
    assert not sub.accepts({**labels, "severity": "info"})
    assert not sub.accepts({**labels, "modality": "series"})
    assert not sub.accepts({**labels, "scope": "asset"})
    with pytest.raises(InvalidSubscription, match="info, warning, critical"):
        Subscription("s", "webhook", "https://x/", (), "fatal").accepts(labels)


def test_secret_never_in_public_view_or_repr():
    sub = Subscription("s", "webhook", "https://x/", (), "info", secret="hunter2")
    assert "hunter2" not in json.dumps(sub.public()) and "hunter2" not in repr(sub)
    assert sub.public()["signed"] is True


def test_grouping():
    by = AlertSettings().group_by
    a, b = alert_labels(alert(scope="line", scope_id="l1")), alert_labels(alert(scope="line", scope_id="l2"))
    assert group_key(a, by) == group_key(b, by) == '{kind="degradation",modality="image"}'
    assert group_key(a, ["scope_id"]) != group_key(b, ["scope_id"])
    # A newcomer joins a waiting group; a fresh group waits group_wait; a just-sent one waits the interval.
    assert group_due(100, 500, None, 2_000, 10_000) == 500
    assert group_due(100, None, None, 2_000, 10_000) == 2_100
    assert group_due(100, None, 50, 2_000, 10_000) == 10_050
    assert group_due(100_000, None, 50, 2_000, 10_000) == 102_000


def test_webhook_body_is_alertmanager_v4():
    t = AlertTracker()
    n1 = t.observe(alert(scope="line", scope_id="l1"), 1_000)[0].to_dict()
    n2 = t.observe(alert(scope="line", scope_id="l2", status="resolved"), 1_000)
    assert n2 == []  # never fired here
    body = webhook_body("sub1", '{kind="degradation"}', {"kind": "degradation"}, [n1], "http://dash/")
    assert set(body) == {"version", "groupKey", "truncatedAlerts", "status", "receiver", "groupLabels",
                         "commonLabels", "commonAnnotations", "externalURL", "alerts"}
    assert body["version"] == "4" and body["status"] == "firing" and body["receiver"] == "sub1"
    a = body["alerts"][0]
    assert set(a) == {"status", "labels", "annotations", "startsAt", "endsAt", "generatorURL", "fingerprint"}
    assert a["endsAt"] == "0001-01-01T00:00:00Z" and a["startsAt"] == "1970-01-01T00:00:00.000Z"
    assert a["labels"]["line"] == "l1" and a["annotations"]["summary"] == "image degradation"


def test_alertmanager_payload_keeps_end_after_start():
    t = AlertTracker()
    future = 1_900_000_000_000  # event time ahead of the wall clock (a replay)
    n = t.observe(alert(starts=future), 1_000)[0].to_dict()
    [item] = alertmanager_alerts([n], now_ms=1_700_000_000_000, hold_ms=60_000)
    assert item["startsAt"] < item["endsAt"]
    assert set(item) == {"labels", "annotations", "startsAt", "endsAt"}
    assert "scope_id" not in item["labels"]  # empty labels are left out


def test_a_late_copy_of_a_resolved_episode_is_a_duplicate():
    t = AlertTracker()
    a = alert(starts=1_000)
    t.observe(a, 1)
    t.observe(dataclasses.replace(a, status="resolved", ends_ms=5_000), 2)
    assert t.observe(a, 3) == [] and t.duplicates == 1
    assert len(t.observe(dataclasses.replace(a, starts_ms=9_000), 4)) == 1  # a later start: a new episode
