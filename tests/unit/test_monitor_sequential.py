"""Label-free detection: the calibration, the budget, sequential detectors with fleet
pooling and per-line attribution, the estimate, the upstream outage, restart safety."""

from __future__ import annotations

import dataclasses
import random

import pytest

from streamfuse.config import MonitorSettings, Settings
from streamfuse.errors import ConfigError, StreamfuseError
from streamfuse.events import Label, Prediction
from streamfuse.monitor.base import DetectorValueError
from streamfuse.monitor.core import MonitorCore
from streamfuse.monitor.evidence import Calibration, estimate_errors
from streamfuse.monitor.sequential import Cusum, SeqKey, SequentialDetection, budget_threshold

CLASSES = ("normal", "imbalance", "bearing", "overheat")
MODS = ("image", "audio", "series")
ACC = {"image": 0.9, "audio": 0.92, "series": 0.9}


def answer(rng: random.Random, truth: str, m: str, broken: bool) -> str:
    if broken:
        return "normal"  # fogged: always the same answer, whatever the machine does
    return truth if rng.random() < ACC[m] else rng.choice([c for c in CLASSES if c != truth])


def probs_of(label: str, conf: float) -> tuple[float, ...]:
    rest = (1 - conf) / (len(CLASSES) - 1)
    return tuple(conf if c == label else rest for c in CLASSES)


def calibration(seed: int = 1, n: int = 400) -> dict:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        truth = CLASSES[i % 4]
        rows.append(({m: answer(rng, truth, m, False) for m in MODS}, truth))
    cal = Calibration.fit(rows, fused=[max(set(r.values()), key=list(r.values()).count) for r, _ in rows])
    return {m: {"top1": 0.9, "macro_f1": 0.9, "calibration": cal.unit_dict(m)} for m in MODS} | {
        "fused": {"top1": 0.97, "macro_f1": 0.97, "calibration": cal.unit_dict("fused")}}


def stream(duration_s: float, fault_at_s: float | None, seed: int = 7, assets: int = 4, missing=(),
           fault_end_s: float | None = None, flat=()):
    """(prediction, label) pairs of a 4-asset, 2-line plant at 2 Hz per asset; the
    ``flat`` modalities' signals are flat (a muted microphone: its model answers noise)."""
    rng = random.Random(seed)
    state = {a: "normal" for a in range(assets)}
    for step in range(int(duration_s * 2)):
        ts = step * 500
        for a in range(assets):
            if rng.random() < 0.1:
                state[a] = rng.choice(CLASSES)
            truth = state[a]
            broken = fault_at_s is not None and ts >= fault_at_s * 1000 and (
                fault_end_s is None or ts < fault_end_s * 1000)
            labels = {m: answer(rng, truth, m, broken and m == "image") for m in MODS if m not in missing}
            labels |= {m: rng.choice(CLASSES) for m in flat}
            mp = {m: probs_of(y, 1.0 if broken and m == "image" else 0.85) for m, y in labels.items()}
            fused = [sum(p[i] for p in mp.values()) / len(mp) for i in range(4)]
            fl = CLASSES[max(range(4), key=fused.__getitem__)]
            sid = f"s-{a}-{step}"
            yield (Prediction(sid, f"asset-{a}", ts, CLASSES, tuple(fused), fl, "ume", mp, line_id=f"line-{a % 2}",
                              missing=tuple(missing), worker_id="w1",
                              signal_std={m: 0.0 if m in flat else 1.0 for m in labels}),
                   Label(sid, f"asset-{a}", ts, truth, line_id=f"line-{a % 2}"))


def run(core: MonitorCore, pairs, label_lag: int = 4):
    alerts, commands, kpis, backlog = [], [], [], []
    for pred, label in pairs:
        backlog.append(label)
        if len(backlog) > label_lag:
            core.on_label(backlog.pop(0))
        out = core.on_prediction(pred, f"p{int(pred.asset_id[-1]) % 3}")
        alerts += out.alerts
        commands += out.commands
        kpis += out.kpis
    return alerts, commands, kpis


def settings(**kw) -> MonitorSettings:
    return MonitorSettings(kpi_window_ms=5000, label_grace_ms=2000, **kw)


# ------------------------------------------------------------------ budget and detectors


@pytest.mark.parametrize("bad", [0, -1, 0.0, 1e6, float("nan"), float("inf")])
def test_false_alarm_budget_out_of_range_is_refused_with_the_range(bad, monkeypatch) -> None:
    with pytest.raises(ConfigError, match=r"false_alarms_per_day must be in \(0, 10000.0\], got"):
        budget_threshold(bad, 9, 8.0)
    monkeypatch.setenv("STREAMFUSE_MONITOR__FALSE_ALARMS_PER_DAY", str(bad))
    with pytest.raises(StreamfuseError, match="STREAMFUSE_MONITOR__FALSE_ALARMS_PER_DAY"):
        Settings()


def test_threshold_grows_with_detectors_and_rate_and_shrinks_with_budget() -> None:
    h = budget_threshold(1.0, 9, 8.0)
    assert budget_threshold(1.0, 18, 8.0) > h and budget_threshold(1.0, 9, 16.0) > h > budget_threshold(10, 9, 8.0)


def test_cusum_validates_and_round_trips_mid_stream() -> None:
    with pytest.raises(DetectorValueError, match=r"threshold must be in \(0.0, inf\), got -1"):
        Cusum(threshold=-1)
    with pytest.raises(DetectorValueError, match="llr must be a finite number, got nan"):
        Cusum(threshold=5).update(float("nan"))
    rng = random.Random(3)
    xs = [2.5 if rng.random() < (0.6 if 30 <= i < 60 else 0.05) else -0.9 for i in range(100)]
    a = Cusum(threshold=6.0)
    for x in xs[:45]:
        a.update(x)
    b = Cusum(threshold=6.0)
    b.load_state_dict(a.state_dict())
    for x in xs[45:]:
        a.update(x)
        b.update(x)
        assert (a.firing, a.statistic) == (b.firing, b.statistic)


def test_calibration_is_checked_when_read() -> None:
    with pytest.raises(ConfigError, match="calibration of 'image' k='2' is not a table"):
        Calibration.from_dict({"image": {"2": {"llr": {}}}})
    with pytest.raises(ConfigError, match="values out of range"):
        Calibration.from_dict({"image": {"2": {"p_correct": {"agree": 1.5}}}})


# ------------------------------------------------------------------ the monitor


def test_fog_on_every_line_alerts_and_masks_every_line_within_seconds() -> None:
    core = MonitorCore(calibration(), settings())
    alerts, commands, _ = run(core, stream(60, fault_at_s=30))
    fired = [a for a in alerts if a.status == "firing"]
    assert fired and all(a.event_ms >= 30_000 for a in fired), [(a.summary, a.event_ms) for a in fired]
    first = {a.scope_id: a.event_ms for a in reversed(fired) if a.kind == "degradation" and a.modality == "image"}
    assert set(first) >= {"line-0", "line-1"}, [a.summary for a in fired]
    assert max(first.values()) <= 35_000  # every line <= 5 s after the onset
    masks = {c.scope_id: c.issued_ms for c in commands if c.action == "mask_modality" and c.modality == "image"}
    assert masks.keys() == {"line-0", "line-1"} and max(masks.values()) <= 38_000
    assert not any(a.modality in ("audio", "series") and a.kind == "degradation" for a in fired)


def test_a_stuck_camera_agreeing_by_coincidence_does_not_resolve_until_the_fog_lifts() -> None:
    # The fogged camera always says "normal", the machine's usual state: it agrees for long
    # runs, which must not read as a recovery; agreeing on the other states after it does.
    core = MonitorCore(calibration(), settings())
    alerts, commands, _ = run(core, stream(200, fault_at_s=30, fault_end_s=120, seed=3))
    image = [(a.status, a.scope_id, a.event_ms) for a in alerts if a.kind == "degradation" and a.modality == "image"]
    fired = {sid for st, sid, _ in image if st == "firing"}
    assert {"line-0", "line-1"} <= fired, image
    resolved = {sid: t for st, sid, t in image if st == "resolved"}
    assert resolved.keys() >= {"line-0", "line-1"} and min(resolved.values()) >= 120_000, image
    unmasks = [c.issued_ms for c in commands if c.action == "unmask_modality"]
    assert unmasks and min(unmasks) >= 120_000


def test_a_dead_microphone_is_no_evidence_against_the_others() -> None:
    # Flat audio: its model answers noise. The camera and the vibration model still agree
    # mostly, but when they differ neither can be blamed with one partner left.
    core = MonitorCore(calibration(), settings())
    alerts, commands, _ = run(core, stream(120, fault_at_s=None, seed=5, flat=("audio",)))
    assert not [a for a in alerts if a.kind == "degradation"], [a.summary for a in alerts]


def test_clean_stream_raises_nothing() -> None:
    core = MonitorCore(calibration(), settings())
    alerts, commands, _ = run(core, stream(240, fault_at_s=None, seed=11))
    assert alerts == [] and commands == []


def test_estimate_tracks_labelled_accuracy_without_labels() -> None:
    core = MonitorCore(calibration(), settings())
    _, _, kpis = run(core, stream(60, fault_at_s=30))
    windows = [(k.modality, k.est_accuracy, k.accuracy, k.n_labelled) for k in kpis if k.scope == "global"]
    err = estimate_errors(windows)
    assert err["windows"] >= 30 and err["median_abs_error"] <= 0.05, err
    fog = [k for k in kpis if k.scope == "global" and k.modality == "image" and k.window_start_ms >= 35_000]
    # confidence 1.00, and the estimate is not fooled
    assert fog and all(k.mean_confidence > 0.99 and abs(k.est_accuracy - k.accuracy) <= 0.2 for k in fog)


def test_restart_mid_fault_decides_exactly_like_an_uninterrupted_monitor() -> None:
    pairs = list(stream(60, fault_at_s=30))
    whole = MonitorCore(calibration(), settings())
    expected = run(whole, pairs)
    first = MonitorCore(calibration(), settings())
    records: dict = {}
    first.kpis.sink = lambda k, v: records.pop(k, None) if v is None else records.__setitem__(k, v)
    a1, c1, _ = run(first, pairs[:290])
    second = MonitorCore(calibration(), settings())
    second.load_state_dict(first.state_dict(), list(records.items()))
    second.kpis.sink = first.kpis.sink
    a2, c2, _ = run(second, pairs[290:])
    assert [a.alert_id for a in a1 + a2] == [a.alert_id for a in expected[0]]
    assert [c.command_id for c in c1 + c2] == [c.command_id for c in expected[1]]


def test_resolved_alert_remembers_what_it_said_across_a_restart() -> None:
    core = MonitorCore(calibration(), settings())
    run(core, stream(40, fault_at_s=30))
    state = core.state_dict()
    assert any(e["what"] for e in state["episodes"].values())
    again = MonitorCore(calibration(), settings())
    again.load_state_dict(state, [])
    fp, ep = next(iter(again.episodes.open.items()))
    assert ep.what == state["episodes"][fp]["what"]


def test_upstream_outage_is_not_a_sensor_fault() -> None:
    """Every asset loses audio and series at once (a broker outage): one upstream_outage
    alert, no dropout alert and no mask for the healthy sensors."""
    core = MonitorCore(calibration(), settings())
    run(core, stream(30, fault_at_s=None))
    outage = list(stream(40, fault_at_s=None, seed=5, missing=("audio", "series")))
    shifted = [(dataclasses.replace(p, ts_ms=p.ts_ms + 30_000, sample_id="o" + p.sample_id),
                Label("o" + lab.sample_id, lab.asset_id, lab.ts_ms + 30_000, lab.label, lab.line_id))
               for p, lab in outage]
    alerts, commands, _ = run(core, shifted)
    kinds = {(a.kind, a.status) for a in alerts}
    assert ("upstream_outage", "firing") in kinds, kinds
    assert not any(a.kind == "sensor_fault" for a in alerts) and commands == []


def test_single_line_fault_alerts_that_line_only() -> None:
    pairs = [(p, lab) for p, lab in stream(60, fault_at_s=None)]
    broken = []
    for p, lab in pairs:
        if p.line_id == "line-1" and p.ts_ms >= 30_000:
            mp = dict(p.modality_probs, image=probs_of("normal", 1.0))
            p = dataclasses.replace(p, modality_probs=mp)
        broken.append((p, lab))
    alerts, _, _ = run(MonitorCore(calibration(), settings()), broken)
    scopes = {(a.scope, a.scope_id) for a in alerts if a.status == "firing" and a.modality == "image"}
    assert ("line", "line-1") in scopes and ("line", "line-0") not in scopes


def test_sequential_detection_validates_its_arguments() -> None:
    with pytest.raises(ConfigError, match="step_ms must be an integer >= 1, got 0"):
        SequentialDetection(1.0, step_ms=0)


def test_a_line_the_labels_cleared_is_not_attributed_again_while_the_fleet_alarm_lasts() -> None:
    def evidence(labels, conf):
        return {m: 2.5 if y == "fog" else -0.9 for m, y in labels.items()}

    seq = SequentialDetection(false_alarms_per_day=1.0, step_ms=1000, evidence=evidence, min_answers=2)
    for i in range(80):
        t = i * 125
        seq.add(t, f"s{i}", f"line-{i % 2}", {"image": "fog" if t >= 5000 else "ok", "audio": "ok"}, {})
    fired = seq.advance(10_000)
    assert {(x.key.scope_id, x.firing) for x in fired} >= {("line-0", True), ("line-1", True), ("", True)}
    cleared = seq.clear(SeqKey("line", "line-0", "image"), 10_000)
    assert cleared is not None and not cleared.firing and not seq.firing("line", "line-0", "image")
    assert seq.clear(SeqKey("line", "line-0", "image"), 10_000) is None  # not firing any more
    for i in range(80, 96):  # the fleet alarm goes on; line-0's own statistic restarts from zero
        t = i * 125
        seq.add(t, f"s{i}", f"line-{i % 2}", {"image": "fog", "audio": "ok"}, {})
    again = seq.advance(12_000)
    assert not any(x.key.scope_id == "line-0" and x.attributed for x in again)
    restored = SequentialDetection(false_alarms_per_day=1.0, step_ms=1000, evidence=evidence, min_answers=2)
    restored.load_state_dict(seq.state_dict())
    assert restored.state_dict() == seq.state_dict()


def _stuck_camera_plant(line0_states: list[str], line0_broken: bool, seconds: int = 60, seed: int = 2):
    """Samples of a 2-line plant (2 assets per line, 2 Hz) with a camera stuck on "normal"
    on line-1 from 10 s (and on line-0 too when ``line0_broken``); line-0's machine walks
    through ``line0_states``, line-1's through every state. A healthy camera errs 10 % of
    the time. -> [(ts, sample id, line, labels)]"""
    rng = random.Random(seed)
    out = []
    for step in range(seconds * 2):
        ts = step * 500
        for a in range(4):
            line = f"line-{a % 2}"
            states = line0_states if line == "line-0" else list(CLASSES)
            truth = states[(step // 6 + a) % len(states)]
            stuck = ts >= 10_000 and (line == "line-1" or line0_broken)
            labels = {"image": "normal" if stuck else answer(rng, truth, "image", False), "audio": truth,
                      "series": truth}
            out.append((ts, f"s{step}-{a}", line, labels))
    return out


def _agreement_evidence(labels: dict, conf: dict) -> dict:
    out = {}
    for m, y in labels.items():
        others = [v for o, v in labels.items() if o != m]
        out[m] = -0.9 if all(v == y for v in others) else 1.7 if len(set(others)) == 1 else 0.0
    return out


def _first_image_alarms(samples) -> dict[str, int]:
    seq = SequentialDetection(false_alarms_per_day=1.0, step_ms=1000, evidence=_agreement_evidence, min_answers=3)
    first: dict[str, int] = {}
    for ts, sid, line, labels in samples:
        seq.add(ts, sid, line, labels, {})
        for t in seq.advance(ts):
            if t.firing and t.key.modality == "image":
                first.setdefault(t.key.scope_id or "fleet", t.at_ms)
    return first


def test_a_line_whose_machine_sits_in_the_stuck_answer_is_still_attributed() -> None:
    # Line-0's machine is "normal" 5 steps in 6: its stuck camera agrees most of the time,
    # which would keep its statistic at zero; counting only the stuck answer against the
    # others (and agreement in other answers) attributes the fleet's fault to it too.
    first = _first_image_alarms(_stuck_camera_plant(["normal"] * 5 + ["bearing"], line0_broken=True))
    assert {"fleet", "line-0", "line-1"} <= first.keys(), first
    assert first["line-0"] - 10_000 <= 10_000, first  # 20 s counting every sample


def test_a_healthy_line_in_the_stuck_answer_is_not_attributed() -> None:
    # The same plant with a healthy camera on line-0: its errors are other answers than the
    # fault's, and must not add up to an attribution while its agreements are skipped.
    first = _first_image_alarms(_stuck_camera_plant(["normal"] * 5 + ["bearing"], line0_broken=False))
    assert "line-1" in first and "line-0" not in first, first


def assert_restart_changes_nothing(pairs, checkpoint_at: int, kill_at: int, kind: str,
                                   redelivered: bool = False) -> None:
    """Checkpoint after ``checkpoint_at`` predictions, kill after ``kill_at`` (an alert of
    ``kind`` having fired in between), restore from that checkpoint and the KPI records
    (written per prediction, so newer than it), go on from ``kill_at`` — or from the
    checkpoint, the predictions in between ``redelivered`` as duplicates: the alerts and
    commands are the uninterrupted monitor's, same ids."""
    expected = run(MonitorCore(calibration(), settings()), pairs)
    first = MonitorCore(calibration(), settings())
    records: dict = {}
    first.kpis.sink = lambda k, v: records.pop(k, None) if v is None else records.__setitem__(k, v)
    a1, c1, _ = run(first, pairs[:checkpoint_at])
    checkpoint = first.state_dict()
    a2, c2, _ = run(first, pairs[checkpoint_at:kill_at])
    assert [a for a in a2 if a.kind == kind and a.status == "firing"], "it fired between the checkpoint and the kill"
    second = MonitorCore(calibration(), settings())
    second.load_state_dict(checkpoint, list(records.items()))
    second.kpis.sink = first.kpis.sink
    a3, c3, _ = run(second, pairs[checkpoint_at if redelivered else kill_at:])
    assert {(a.alert_id, a.status) for a in a1 + a2 + a3} == {(a.alert_id, a.status) for a in expected[0]}
    assert {c.command_id for c in c1 + c2 + c3} == {c.command_id for c in expected[1]}


def test_restart_from_a_checkpoint_older_than_the_records_loses_no_evidence() -> None:
    # Killed after the fault's alert, with the last checkpoint from before the fault; the
    # predictions in between are not delivered again (their offsets were committed). Their
    # evidence comes back from the records.
    assert_restart_changes_nothing(list(stream(60, fault_at_s=30)), 240, 290, "degradation")


@pytest.mark.parametrize("redelivered", [False, True])
def test_restart_from_a_checkpoint_older_than_the_records_fires_a_sensor_fault_under_the_same_id(redelivered) -> None:
    # A microphone goes flat between the last checkpoint and a kill: the readings in between
    # are only in the KPI records (their predictions come again as duplicates, or not at
    # all). The restored monitor checks them before anything newer, so the flatline fires
    # at the reading it did without the kill, under the same alert id.
    pairs = [(dataclasses.replace(p, signal_std={**p.signal_std, "audio": 0.0}) if i >= 116 else p, label)
             for i, (p, label) in enumerate(stream(40, None))]
    assert_restart_changes_nothing(pairs, 112, 140, "sensor_fault", redelivered)
