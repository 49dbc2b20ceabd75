"""Label-free evidence from a reading's own signal spread: the range fitted on the
validation split, its evidence in the sequential detectors (a fogged camera that agrees
with its line because the machine is in the class it is stuck on), two-modality
samples, restart safety, the ranges following the baselines, and bad ranges refused."""

from __future__ import annotations

import json
import math
import random

import pytest

from streamfuse.config import MonitorSettings
from streamfuse.errors import ConfigError
from streamfuse.monitor.core import MonitorCore
from streamfuse.monitor.evidence import Calibration
from streamfuse.monitor.sequential import SeqKey, SequentialDetection
from streamfuse.monitor.spread import BROKEN_OUT_RATE, SpreadRange, spread_evidence

HEALTHY = [10.0 + 45.0 * random.Random(3).random() for _ in range(240)]  # an image's grey-level spread
RANGES = {"image": SpreadRange.fit(HEALTHY)}


def agree(labels, conf):
    """Agreement evidence of a camera that agrees with its partners (its machine is in
    the class it is stuck on): every modality looks healthy."""
    return {m: -0.7 for m in labels}


def detector(**kw) -> SequentialDetection:
    return SequentialDetection(1.0, 1000, evidence=agree, min_answers=3,
                               spread=lambda values: spread_evidence(RANGES, values), **kw)


def feed(seq: SequentialDetection, seconds: int, fog_at_s: int | None, answers: int = 3, start: int = 0) -> list:
    """2 lines x 2 assets at 2 Hz; from ``fog_at_s`` the camera's spread is fog's (1-4)."""
    rng, out = random.Random(5), []
    mods = ("image", "audio", "series")[:answers]
    for step in range(start * 2, seconds * 2):
        ts = step * 500
        for a in range(4):
            fog = fog_at_s is not None and ts >= fog_at_s * 1000
            spread = {"image": rng.uniform(1.0, 4.0) if fog else rng.choice(HEALTHY), "audio": 0.05, "series": 1.0}
            seq.add(ts, f"s{a}-{step}", f"line-{a % 2}", {m: "normal" for m in mods}, {m: 1.0 for m in mods}, spread)
        out += seq.advance(ts)
    return out


def test_range_fits_the_validation_spreads_with_margins_and_keeps_the_budget() -> None:
    r = RANGES["image"]
    assert r.lo < min(HEALTHY) and r.hi > max(HEALTHY) and r.n == 240
    assert r.out(2.0) and not r.out(30.0) and r.llr(2.0) > 3 and -0.15 < r.llr(30.0) < 0
    # the evidence is a likelihood ratio: its mean under the healthy out-of-range rate is 1
    mean = r.p_out * math.exp(r.llr(2.0)) + (1 - r.p_out) * math.exp(r.llr(30.0))
    assert mean == pytest.approx(1.0) and BROKEN_OUT_RATE > r.p_out
    assert SpreadRange.fit(HEALTHY[:10]) is None  # too few readings to fit
    assert spread_evidence(RANGES, {"image": float("nan"), "audio": 0.1}) == {}


def test_a_fogged_camera_that_agrees_with_its_line_is_caught_by_its_spread() -> None:
    fired = [t for t in feed(detector(), 60, 30) if t.firing]
    lines = {t.key.scope_id: t.at_ms for t in fired if t.key.scope == "line" and t.key.modality == "image"}
    assert set(lines) == {"line-0", "line-1"}, fired
    assert all(30_000 < at <= 33_000 for at in lines.values()), lines  # within 3 s of the onset
    assert {t.key.modality for t in fired} == {"image"}
    # the same stream without the spread: agreement alone never sees it
    blind = SequentialDetection(1.0, 1000, evidence=agree, min_answers=3)
    assert not [t for t in feed(blind, 60, 30) if t.firing]


def test_clean_spreads_raise_nothing() -> None:
    seq = detector()
    assert feed(seq, 600, None) == []
    assert max(d.statistic for d in seq.detectors.values()) < 1.0


def test_two_modality_samples_count_their_spread_alone() -> None:
    """With two answers a disagreement cannot say who is wrong, but a reading out of range can."""
    fired = [t for t in feed(detector(), 60, 30, answers=2) if t.firing]
    assert {(t.key.scope_id, t.key.modality) for t in fired if t.key.scope == "line"} == {
        ("line-0", "image"), ("line-1", "image")}
    blind = SequentialDetection(1.0, 1000, evidence=agree, min_answers=3)
    assert feed(blind, 60, 30, answers=2) == [] and blind.detectors == {}


def test_restart_with_buffered_spreads_decides_like_an_uninterrupted_detector() -> None:
    whole = feed(detector(), 60, 30)
    first = detector()
    before = feed(first, 31, 30)
    state = json.loads(json.dumps(first.state_dict()))
    assert any(row[5] for row in state["buffer"]), "the checkpoint holds buffered spreads"
    second = detector()
    second.load_state_dict(state)
    after = feed(second, 60, 30, start=31)
    assert [(t.key, t.firing, t.at_ms) for t in before + after] == [(t.key, t.firing, t.at_ms) for t in whole]
    # a checkpoint written before spreads were buffered still loads
    old = dict(state, buffer=[row[:5] for row in state["buffer"]])
    third = detector()
    third.load_state_dict(old)
    assert all(row[5] == {} for row in third.state_dict()["buffer"])


def test_labels_do_not_clear_a_sensor_whose_readings_are_out_of_range() -> None:
    """The fogged camera stuck on the class its line's machines are in is right by
    coincidence: its labels look healthy, its readings do not."""
    seq, key = detector(), SeqKey("line", "line-0", "image")
    feed(seq, 40, 30)
    assert seq.firing("line", "line-0", "image") and seq.out_of_range(key)
    restored = detector()
    restored.load_state_dict(json.loads(json.dumps(seq.state_dict())))
    for s in (seq, restored):
        assert s.clear(key, 40_000) is None and s.firing("line", "line-0", "image")
    # an alarm that stands on the answers alone is the labels' to clear
    def odd(labels, conf):
        return {m: 2.5 if m == "image" else -0.7 for m in labels}
    by_answers = SequentialDetection(1.0, 1000, evidence=odd, min_answers=3,
                                     spread=lambda values: spread_evidence(RANGES, values))
    feed(by_answers, 40, None)
    assert by_answers.firing("line", "line-0", "image") and not by_answers.out_of_range(key)
    assert by_answers.clear(key, 40_000) is not None and not by_answers.firing("line", "line-0", "image")


def baselines(spread: dict | None) -> dict:
    rows = [({m: y for m in ("image", "audio", "series")}, y) for y in "abab"] * 20
    cal = Calibration.fit(rows)
    out = {m: {"top1": 0.9, "macro_f1": 0.9, "calibration": cal.unit_dict(m)} for m in ("image", "audio", "series")}
    if spread is not None:
        out["image"]["spread"] = spread
    return out


def test_the_monitor_takes_the_spread_ranges_of_the_active_versions() -> None:
    core = MonitorCore(baselines(RANGES["image"].to_dict()), MonitorSettings())
    assert core.spread_ranges == RANGES
    wider = SpreadRange(1.0, 500.0, 0.01, 100)
    core.set_baselines({"image": baselines(wider.to_dict())["image"]})
    assert core.spread_ranges == {"image": wider}
    core.set_baselines({"image": baselines(None)["image"]})  # a version trained without one
    assert core.spread_ranges == {}


@pytest.mark.parametrize("bad, why", [
    ({"lo": 1.0, "hi": 2.0}, "'lo', 'hi', 'p_out', 'n'"),
    ({"lo": 5.0, "hi": 2.0, "p_out": 0.01, "n": 10}, "0 <= lo < hi"),
    ({"lo": 1.0, "hi": 2.0, "p_out": 0.0, "n": 10}, "p_out in (0, 1)"),
])
def test_a_bad_spread_range_is_refused_naming_the_fix(bad, why) -> None:
    with pytest.raises(ConfigError, match="retrain the bundle") as exc:
        SpreadRange.from_dict(bad)
    assert why in str(exc.value)
    with pytest.raises(ConfigError, match="retrain the bundle"):
        MonitorCore(baselines(bad), MonitorSettings())

