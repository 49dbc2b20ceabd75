"""Detectors: Page-Hinkley, dominance, sensor-fault rates, clock skew, fusion regression.

Every detector is fed one value per KPI window; these tests pin the hysteresis (fire after
``fire_windows`` bad windows, resolve after ``resolve_windows`` good ones, no flapping on
a noisy signal at the threshold), checkpoint round trips, and the validation messages.
"""

from __future__ import annotations

import json
import math
import random

import pytest

from streamfuse.monitor.detectors import AccuracyDegradation, Dominance, PageHinkley
from streamfuse.monitor.paired import FusionRegression, paired_difference_interval
from streamfuse.monitor.sensor_faults import RateAlarm, SkewAlarm


def run(det, windows) -> str:
    """One char per window: '.' quiet, 'F' firing, '^' just fired, 'v' just resolved."""
    out = []
    for args in windows:
        det.update(*args)
        out.append(("^" if det.firing else "v") if det.changed else ("F" if det.firing else "."))
    return "".join(out)


def transitions(det, windows) -> list[tuple[int, bool]]:
    out = []
    for i, args in enumerate(windows):
        det.update(*args)
        if det.changed:
            out.append((i, det.firing))
    return out


# ---------------------------------------------------------------------------- Page-Hinkley

REF = 0.85


def ph(**kw) -> PageHinkley:
    kw = {"delta": 0.05, "threshold": 0.5, "warmup_windows": 3, **kw}
    return PageHinkley(**kw)


def warm(det: PageHinkley, level: float = REF) -> None:
    for _ in range(det.warmup_windows):
        det.update(level)
    assert det.reference == pytest.approx(level)


def test_page_hinkley_warmup_sets_reference_and_is_no_evidence() -> None:
    det = ph()
    assert run(det, [(0.9,), (0.8,), (0.0,)]) == "..."  # even a collapse during warm-up
    assert det.reference == pytest.approx((0.9 + 0.8 + 0.0) / 3)
    assert det.statistic == 0.0


def test_page_hinkley_fires_on_a_drop_and_the_statistic_is_cumulative() -> None:
    det = ph()
    warm(det)
    # each window 0.25 below the reference adds 0.25 - delta = 0.2
    assert run(det, [(REF - 0.25,)] * 2) == ".."
    assert det.statistic == pytest.approx(0.4)
    assert run(det, [(REF - 0.25,)]) == "^"
    assert det.statistic == pytest.approx(0.6)


def test_page_hinkley_ignores_shifts_within_delta_and_the_other_direction() -> None:
    rng = random.Random(4)
    det = ph()
    warm(det)
    # 1000 noisy windows 0.8 delta below the reference, noise delta / 5: never fires
    assert transitions(det, [(rng.gauss(REF - 0.04, 0.01),) for _ in range(1000)]) == []
    assert det.statistic < det.threshold
    up = ph()
    warm(up)
    assert run(up, [(1.0,)] * 20) == "." * 20  # "down" does not see a rise


@pytest.mark.parametrize(("direction", "shift", "fires"), [
    ("down", -0.3, True), ("down", +0.3, False),
    ("up", +0.3, True), ("up", -0.3, False),
    ("both", +0.3, True), ("both", -0.3, True),
])
def test_page_hinkley_directions(direction: str, shift: float, fires: bool) -> None:
    det = ph(direction=direction)
    warm(det, 0.5)
    history = run(det, [(0.5 + shift,)] * 5 + [(0.5,)] * 3)
    # each shifted window adds 0.3 - delta = 0.25: above 0.5 at the third
    assert history == ("..^FFFv." if fires else "........")


def test_page_hinkley_resolves_only_after_consecutive_windows_back_near_reference() -> None:
    det = ph(resolve_windows=2)
    warm(det)
    run(det, [(REF - 0.3,)] * 4)
    assert det.firing
    high = det.statistic
    # in the tolerated band (within delta) but not within delta / 2: stays firing
    assert run(det, [(REF - 0.04,)] * 10) == "F" * 10
    assert det.statistic == pytest.approx(high - 10 * 0.01)  # decays, slowly; no hidden reset
    # single windows back at the reference between bad ones: stays firing (no flapping)
    assert run(det, [(REF,), (REF - 0.3,)] * 5) == "F" * 10
    assert run(det, [(REF,), (REF,)]) == "Fv"
    assert det.statistic == 0.0  # the scheme restarts when the episode ends
    assert det.reference == pytest.approx(REF)  # the reference does not move


def test_page_hinkley_refire_needs_fresh_evidence() -> None:
    det = ph(resolve_windows=1)
    warm(det)
    run(det, [(REF - 0.3,)] * 20)
    assert run(det, [(REF,)]) == "v"
    # a bad window right after resolving is not enough to re-fire: the evidence builds anew
    assert run(det, [(REF - 0.3,), (REF,), (REF - 0.3,), (REF - 0.3,), (REF - 0.3,)]) == "...^F"
    assert det.statistic == pytest.approx(0.25 - 0.05 + 0.25 * 3)


def test_page_hinkley_no_flapping_on_noisy_fault_and_recovery() -> None:
    rng = random.Random(9)
    det = ph(warmup_windows=5)
    levels = [REF] * 5 + [REF] * 100 + [REF - 0.15] * 300 + [REF] * 300
    t = transitions(det, [(rng.gauss(level, 0.02),) for level in levels])
    assert [firing for _, firing in t] == [True, False]
    (fired, _), (resolved, _) = t
    assert 105 <= fired <= 110 and 405 <= resolved <= 410


def test_page_hinkley_rebase_accepts_a_new_level() -> None:
    det = ph(resolve_windows=2)
    warm(det)
    run(det, [(0.5,)] * 5)
    assert det.firing
    det.rebase()
    assert det.firing and det.reference is None
    assert run(det, [(0.5,)] * 3) == "FFF"  # warm-up again: no evidence, still open
    assert det.reference == pytest.approx(0.5)
    assert run(det, [(0.5,), (0.5,)]) == "Fv"  # the new level is normal now


def test_page_hinkley_min_n_and_none_are_no_evidence() -> None:
    det = ph(min_n=10, fire_windows=1)
    for _ in range(3):
        det.update(REF, 10)
    run(det, [(0.0, 50)] * 3)
    assert det.firing
    before = det.state_dict()
    det.update(None, 50)
    det.update(REF, 9)  # too few samples
    assert not det.changed and det.state_dict() == before


def test_page_hinkley_rejects_non_finite_values() -> None:
    det = ph()
    with pytest.raises(ValueError, match="x must be a finite number"):
        det.update(math.nan)


# ---------------------------------------------------------------------------- dominance


def test_dominance_fires_after_k_windows_with_others_healthy() -> None:
    det = Dominance(threshold=0.6, fire_windows=3, resolve_windows=3, hysteresis=0.05)
    assert run(det, [(0.7, True)] * 2 + [(0.7, False)] + [(0.7, True)] * 3) == ".....^"
    # the band (0.55..0.6] keeps the alert; only clearly lower shares resolve it
    assert run(det, [(0.58, True), (0.5, True), (0.5, True), (0.58, True), (0.5, True)]) == "FFFFF"
    # a low share is good whatever the others do: (0.5, False) extends the good streak to 2
    assert run(det, [(0.5, False), (0.5, True), (0.4, True)]) == "Fv."


def test_dominance_others_unhealthy_is_covering_not_dominating() -> None:
    det = Dominance(fire_windows=2)
    assert run(det, [(0.95, False)] * 10) == "." * 10


def test_dominance_no_flapping_near_threshold() -> None:
    rng = random.Random(0)
    det = Dominance(threshold=0.6, fire_windows=3, resolve_windows=3, hysteresis=0.05)
    t = transitions(det, [(rng.uniform(0.56, 0.64), True) for _ in range(2000)])
    assert len(t) <= 1
    rng = random.Random(1)
    det = Dominance(threshold=0.6, fire_windows=3, resolve_windows=3, hysteresis=0.05)
    t = transitions(det, [(rng.uniform(0.51, 0.59), True) for _ in range(2000)])
    assert t == []


def test_dominance_none_and_small_windows_are_no_evidence() -> None:
    det = Dominance(fire_windows=2, min_n=5)
    det.update(0.9, True, 5)
    det.update(None, True, 50)
    det.update(0.1, True, 4)
    assert not det.firing and det.last == 0.9
    det.update(0.9, True, 5)
    assert det.firing and det.changed


# ---------------------------------------------------------------------------- sensor-fault rates


def test_rate_alarm_small_windows_cannot_fire() -> None:
    det = RateAlarm(threshold=0.6, fire_windows=1, min_n=3)
    assert run(det, [(5, 5)] * 10) == "." * 10  # 5/5: lower bound 0.566 is not above 0.6
    assert det.last[0] == 1.0 and det.last[1] == pytest.approx(0.5655, abs=1e-4)
    assert run(det, [(30, 30)]) == "^"  # 30/30: lower bound 0.886


def test_rate_alarm_hysteresis() -> None:
    det = RateAlarm(threshold=0.2, fire_windows=2, resolve_windows=2, min_n=10)
    assert det.hysteresis == pytest.approx(0.1)
    assert run(det, [(40, 50), (1, 50), (40, 50), (40, 50)]) == "...^"  # a good window breaks the streak
    # 15 %: below the threshold but not below threshold - hysteresis: stays firing
    assert run(det, [(15, 100)] * 5) == "FFFFF"
    assert run(det, [(5, 100), (15, 100), (5, 100), (5, 100)]) == "FFFv"


@pytest.mark.parametrize("p", [0.2, 0.25, 0.3])
def test_rate_alarm_no_flapping_near_threshold(p: float) -> None:
    rng = random.Random(0)
    det = RateAlarm(threshold=0.2, fire_windows=2, resolve_windows=2, min_n=10)
    t = transitions(det, [(sum(rng.random() < p for _ in range(50)), 50) for _ in range(1500)])
    assert len(t) <= 2
    assert all(b[0] - a[0] > 100 for a, b in zip(t, t[1:]))  # any episode is long


def test_rate_alarm_empty_window_and_bad_counts() -> None:
    det = RateAlarm(threshold=0.5)
    det.update(0, 0)  # no readings: no evidence
    assert det.last is None and not det.changed
    with pytest.raises(ValueError, match="need 0 <= events <= n"):
        det.update(6, 5)
    with pytest.raises(ValueError, match="need 0 <= events <= n"):
        det.update(-1, 5)


def test_skew_alarm() -> None:
    det = SkewAlarm(max_abs_skew_ms=200.0, fire_windows=2, resolve_windows=2, min_n=5)
    assert det.hysteresis_ms == 50.0
    assert run(det, [(300.0, 10), (None, 10), (300.0, 4), (300.0, 10)]) == "...^"  # no-evidence windows keep the streak
    assert run(det, [(180.0, 10)] * 4) == "FFFF"  # under the limit, not under limit - hysteresis
    assert run(det, [(100.0, 10), (100.0, 10)]) == "Fv"
    assert det.last == 100.0


def test_skew_alarm_no_flapping_near_limit() -> None:
    rng = random.Random(0)
    det = SkewAlarm(max_abs_skew_ms=200.0)
    t = transitions(det, [(rng.uniform(170.0, 230.0), 20) for _ in range(2000)])
    assert len(t) <= 1


# ---------------------------------------------------------------------------- fusion regression


def test_paired_difference_interval() -> None:
    diff, low, high = paired_difference_interval(b=30, c=5, n=200)
    assert diff == 0.125 and low < diff < high
    assert paired_difference_interval(0, 0, 0) == (0.0, -1.0, 1.0)
    d0, l0, h0 = paired_difference_interval(0, 0, 50)
    assert d0 == 0 and l0 == pytest.approx(-h0)
    # antisymmetric in (b, c)
    d1, l1, h1 = paired_difference_interval(12, 3, 80)
    d2, l2, h2 = paired_difference_interval(3, 12, 80)
    assert (d1, l1, h1) == pytest.approx((-d2, -h2, -l2))
    # more discordance at the same difference: wider
    assert paired_difference_interval(40, 30, 200)[1] < paired_difference_interval(10, 0, 200)[1]


def test_paired_difference_interval_coverage() -> None:
    rng = random.Random(3)
    pb, pc, n, hits, reps = 0.08, 0.03, 100, 0, 1000
    for _ in range(reps):
        b = c = 0
        for _ in range(n):
            u = rng.random()
            b += u < pb
            c += pb <= u < pb + pc
        _, low, high = paired_difference_interval(b, c, n)
        hits += low <= pb - pc <= high
    assert hits / reps >= 0.93


def fr_windows(rng: random.Random, gap: float, windows: int, n: int = 100, discordance: float = 0.12):
    """Windows of (fused_correct, reference_correct, n, discordant); reference right on 80 %."""
    out = []
    for _ in range(windows):
        b = c = 0
        for _ in range(n):
            u = rng.random()
            if u < discordance / 2 + gap / 2:
                b += 1
            elif u < discordance:
                c += 1
        out.append((80 - b + c, 80, n, b + c))
    return out


def test_fusion_regression_fires_and_resolves() -> None:
    det = FusionRegression(margin=0.02, min_n=30, fire_windows=2, resolve_windows=2)
    assert det.hysteresis == 0.02
    worse = (60, 80, 100, 20)  # b = 20, c = 0: 20 points worse
    fine = (80, 80, 100, 10)
    assert run(det, [fine, worse, fine, worse, worse]) == "....^"
    assert det.last[0] == pytest.approx(0.2) and det.last[1] > 0.02
    slightly = (79, 80, 100, 5)  # 1 point worse: within the margin but not at least as good
    assert run(det, [slightly] * 4) == "FFFF"
    assert run(det, [fine, fine]) == "Fv"


def test_fusion_regression_small_or_equal_windows_never_fire() -> None:
    det = FusionRegression(margin=0.02, min_n=30, fire_windows=1)
    assert run(det, [(0, 29, 29, 29)] * 5) == "....."  # below min_n
    assert det.last is None
    assert run(det, [(70, 70, 100, 0)] * 5) == "....."  # fusion == UME: no discordance
    assert run(det, [(90, 80, 100, 14)] * 5) == "....."  # fusion better


@pytest.mark.parametrize("gap", [0.0, 0.02])
def test_fusion_regression_no_false_alarms_up_to_the_margin(gap: float) -> None:
    det = FusionRegression(margin=0.02)
    assert transitions(det, fr_windows(random.Random(0), gap, 1500)) == []


def test_fusion_regression_detects_a_clear_regression_once() -> None:
    det = FusionRegression(margin=0.02)
    t = transitions(det, fr_windows(random.Random(0), 0.1, 500))
    assert t and t[0][1] and t[0][0] <= 3 and len(t) == 1


def test_fusion_regression_unknown_discordance_is_conservative() -> None:
    known, unknown = FusionRegression(min_n=1, fire_windows=1), FusionRegression(min_n=1, fire_windows=1)
    known.update(70, 80, 100, 12)  # b = 11, c = 1
    unknown.update(70, 80, 100)  # assumes the widest discordance the counts allow: 10 + 2 * 20 = 50
    assert known.firing and not unknown.firing
    assert unknown.last[1] < known.last[1] and unknown.last[0] == known.last[0]


@pytest.mark.parametrize("discordant", [8, 51, 13, 200])
def test_fusion_regression_rejects_impossible_discordance(discordant: int) -> None:
    det = FusionRegression()
    with pytest.raises(ValueError, match=r"must be in \[10, 50\] with the parity of 10"):
        det.update(70, 80, 100, discordant)


def test_fusion_regression_rejects_bad_counts() -> None:
    with pytest.raises(ValueError, match="need 0 <= fused_correct <= n"):
        FusionRegression().update(101, 80, 100)
    with pytest.raises(ValueError, match="need 0 <= reference_correct <= n"):
        FusionRegression().update(80, -1, 100)


# ---------------------------------------------------------------------------- all detectors

FACTORIES = {
    "accuracy": lambda: AccuracyDegradation(baseline=0.9, fire_windows=2, resolve_windows=2),
    "page_hinkley": lambda: PageHinkley(delta=0.05, threshold=0.5, warmup_windows=4, direction="both",
                                        fire_windows=2, resolve_windows=2),
    "dominance": lambda: Dominance(threshold=0.6, fire_windows=2, resolve_windows=2),
    "rate": lambda: RateAlarm(threshold=0.3, fire_windows=2, resolve_windows=2, min_n=10),
    "skew": lambda: SkewAlarm(max_abs_skew_ms=200.0, fire_windows=2, resolve_windows=2),
    "fusion": lambda: FusionRegression(margin=0.02, min_n=20, fire_windows=2, resolve_windows=2),
}


def stream(name: str, windows: int = 60) -> list[tuple]:
    """A seeded stream with two faults and a few no-evidence windows."""
    rng = random.Random(name)
    out = []
    for w in range(windows):
        fault = 10 <= w < 20 or 35 <= w < 45
        small = w % 13 == 7
        n = 5 if small else 60
        if name == "accuracy":
            out.append((sum(rng.random() < (0.3 if fault else 0.95) for _ in range(n)), n))
        elif name == "page_hinkley":
            out.append((rng.gauss(0.5 if fault else 0.85, 0.02),))
        elif name == "dominance":
            out.append((None if small else rng.gauss(0.8 if fault else 0.4, 0.05), rng.random() < 0.9))
        elif name == "rate":
            out.append((sum(rng.random() < (0.8 if fault else 0.05) for _ in range(n)), n))
        elif name == "skew":
            out.append((abs(rng.gauss(400.0 if fault else 30.0, 40.0)), 3 if small else 20))
        else:
            pairs = [(rng.random() < 0.85, rng.random()) for _ in range(n)]
            pairs = [(r, (r and u > (0.35 if fault else 0.02)) or (not r and u < 0.2)) for r, u in pairs]
            ref, fused = sum(r for r, _ in pairs), sum(f for _, f in pairs)
            out.append((fused, ref, n, sum(r != f for r, f in pairs)))
    return out


@pytest.mark.parametrize("name", list(FACTORIES))
def test_streams_fire_during_faults_and_resolve_after(name: str) -> None:
    history = run(FACTORIES[name](), stream(name))
    assert history.count("^") == 2 and history.count("v") == 2, history
    assert history[:10] == "." * 10 and history[-5:] == "." * 5, history


@pytest.mark.parametrize("name", list(FACTORIES))
@pytest.mark.parametrize("split", [1, 7, 12, 21, 40])
def test_state_round_trip_mid_stream_continues_identically(name: str, split: int) -> None:
    windows = stream(name)
    ref = FACTORIES[name]()
    expected = run(ref, windows)
    first = FACTORIES[name]()
    head = run(first, windows[:split])
    state = json.loads(json.dumps(first.state_dict()))  # checkpoints are plain JSON
    restored = FACTORIES[name]()
    run(restored, windows[-3:])  # whatever it held before is replaced
    restored.load_state_dict(state)
    assert restored.firing == first.firing and restored.state_dict() == first.state_dict()
    assert not restored.changed
    assert head + run(restored, windows[split:]) == expected
    assert restored.state_dict() == ref.state_dict()


@pytest.mark.parametrize("name", list(FACTORIES))
def test_reset_forgets_everything_and_same_input_same_output(name: str) -> None:
    det = FACTORIES[name]()
    fresh = det.state_dict()
    first = run(det, stream(name))
    det.reset()
    assert det.state_dict() == fresh and not det.firing and not det.changed
    assert run(det, stream(name)) == first


@pytest.mark.parametrize("name", list(FACTORIES))
def test_changed_is_per_update(name: str) -> None:
    det = FACTORIES[name]()
    for args in stream(name):
        det.update(*args)
        if det.changed:
            break
    assert det.firing and det.changed
    det.update(*stream(name)[12])  # still in the fault
    assert det.firing and not det.changed


@pytest.mark.parametrize(("cls", "kw", "match"), [
    (PageHinkley, dict(direction="sideways"), r"direction must be one of 'down', 'up', 'both', got 'sideways'"),
    (PageHinkley, dict(delta=-0.1), r"delta must be a finite number >= 0, got -0.1"),
    (PageHinkley, dict(threshold=0), r"threshold must be a finite number > 0, got 0"),
    (PageHinkley, dict(warmup_windows=0), r"warmup_windows must be an integer >= 1, got 0"),
    (PageHinkley, dict(min_n=0), r"min_n must be an integer >= 1, got 0"),
    (PageHinkley, dict(fire_windows=1.5), r"fire_windows must be an integer >= 1, got 1.5"),
    (Dominance, dict(threshold=1.0), r"threshold must be in \(0, 1\), got 1.0"),
    (Dominance, dict(hysteresis=0.7), r"hysteresis must be in \[0, threshold=0.6\), got 0.7"),
    (Dominance, dict(resolve_windows=0), r"resolve_windows must be an integer >= 1, got 0"),
    (RateAlarm, dict(threshold=1.0), r"threshold must be in \[0, 1\), got 1.0"),
    (RateAlarm, dict(threshold=0.2, hysteresis=0.3), r"hysteresis must be in \[0, threshold=0.2\], or None"),
    (RateAlarm, dict(threshold=0.2, z=0), r"z must be > 0, got 0"),
    (RateAlarm, dict(threshold=0.2, min_n=0), r"min_n must be an integer >= 1, got 0"),
    (SkewAlarm, dict(max_abs_skew_ms=0), r"max_abs_skew_ms must be a finite number > 0, got 0"),
    (SkewAlarm, dict(max_abs_skew_ms=100, hysteresis_ms=100), r"hysteresis_ms must be in \[0, max_abs_skew_ms=100\)"),
    (FusionRegression, dict(margin=1.0), r"margin must be in \[0, 1\), got 1.0"),
    (FusionRegression, dict(margin=0.02, hysteresis=0.05), r"hysteresis must be in \[0, margin=0.02\], or None"),
    (FusionRegression, dict(z=-1), r"z must be > 0, got -1"),
    (FusionRegression, dict(fire_windows=True), r"fire_windows must be an integer >= 1, got True"),
])
def test_validation_lists_valid_values(cls, kw, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        cls(**kw)


def test_constructor_arguments_are_public_attributes() -> None:
    det = PageHinkley(delta=0.1, threshold=1.0, min_n=3, warmup_windows=7, direction="up", fire_windows=2,
                      resolve_windows=3)
    assert (det.delta, det.threshold, det.min_n, det.warmup_windows, det.direction, det.fire_windows,
            det.resolve_windows) == (0.1, 1.0, 3, 7, "up", 2, 3)
    dom = Dominance(threshold=0.7, fire_windows=4, resolve_windows=5, hysteresis=0.1, min_n=2)
    assert (dom.threshold, dom.fire_windows, dom.resolve_windows, dom.hysteresis, dom.min_n) == (0.7, 4, 5, 0.1, 2)
    rate = RateAlarm(threshold=0.4, fire_windows=3, resolve_windows=1, min_n=20, hysteresis=0.1, z=2.5)
    assert (rate.threshold, rate.fire_windows, rate.resolve_windows, rate.min_n, rate.hysteresis, rate.z) == (
        0.4, 3, 1, 20, 0.1, 2.5)
    skew = SkewAlarm(max_abs_skew_ms=300.0, hysteresis_ms=10.0)
    assert (skew.max_abs_skew_ms, skew.hysteresis_ms) == (300.0, 10.0)
    reg = FusionRegression(margin=0.05, z=2.39, min_n=40, fire_windows=3, resolve_windows=4, hysteresis=0.01)
    assert (reg.margin, reg.z, reg.min_n, reg.fire_windows, reg.resolve_windows, reg.hysteresis) == (
        0.05, 2.39, 40, 3, 4, 0.01)
