"""Monitor pure logic: windowed KPIs with the late-label join, statistics, the accuracy
degradation detector, the rollback policy, and MonitorCore end to end on synthetic data."""

from __future__ import annotations

import json

import pytest

from streamfuse.errors import ConfigError

from streamfuse.alerts.lifecycle import fingerprint
from streamfuse.config import MonitorSettings
from streamfuse.events import Alert, KpiSnapshot, Label, Prediction
from streamfuse.monitor.core import MonitorCore, Outputs
from streamfuse.monitor.detectors import AccuracyDegradation
from streamfuse.monitor.kpis import FUSED, UME, KpiEngine
from streamfuse.monitor.stats import macro_f1, wilson_interval

CLASSES = ("ok", "bad")


def pred(
    sid: str,
    t: int,
    fused: tuple[float, float] = (0.9, 0.1),
    asset: str = "a1",
    line: str = "L1",
    **kw,
) -> Prediction:
    kw.setdefault("modality_probs", {"image": fused})
    label = CLASSES[0] if fused[0] >= fused[1] else CLASSES[1]
    return Prediction(sid, asset, t, CLASSES, fused, label, "ume", line_id=line, **kw)


def by_key(snaps: list[KpiSnapshot]) -> dict[tuple[str, str, str], KpiSnapshot]:
    out = {(s.scope, s.scope_id, s.modality): s for s in snaps}
    assert len(out) == len(snaps), "one snapshot per (scope, scope_id, modality) and window"
    return out


# ---------------------------------------------------------------------------- stats


def test_wilson_interval_values() -> None:
    assert wilson_interval(0, 0) == (0.0, 1.0)
    low, high = wilson_interval(8, 10)
    assert (round(low, 3), round(high, 3)) == (0.49, 0.943)
    low, high = wilson_interval(0, 20)
    assert low == 0.0 and high == pytest.approx(0.1611, abs=1e-4)
    low, high = wilson_interval(20, 20)
    assert high == 1.0 and low == pytest.approx(1 - 0.1611, abs=1e-4)


def test_wilson_interval_properties() -> None:
    for n in (1, 7, 50):
        for k in range(n + 1):
            low, high = wilson_interval(k, n)
            assert 0.0 <= low <= k / n <= high <= 1.0
            mirror = wilson_interval(n - k, n)
            assert low == pytest.approx(1 - mirror[1]) and high == pytest.approx(1 - mirror[0])
            wide = wilson_interval(k, n, z=3.0)
            assert wide[0] <= low + 1e-12 and wide[1] >= high - 1e-12
    # more data, narrower interval
    def width(k: int, n: int) -> float:
        low, high = wilson_interval(k, n)
        return high - low

    assert width(80, 100) < width(8, 10)


def test_macro_f1_values() -> None:
    assert macro_f1([], []) == 0.0
    assert macro_f1(["a", "b", "c"], ["a", "b", "c"]) == 1.0
    assert macro_f1(["a", "a"], ["b", "b"]) == 0.0
    # a: tp 1 fp 0 fn 1 -> 2/3; b: tp 2 fp 1 fn 0 -> 4/5
    assert macro_f1(["a", "a", "b", "b"], ["a", "b", "b", "b"]) == pytest.approx((2 / 3 + 4 / 5) / 2)
    # a class only ever predicted counts too (F1 0)
    assert macro_f1(["a", "a"], ["a", "c"]) == pytest.approx((2 / 3 + 0.0) / 2)


# ---------------------------------------------------------------------------- KpiEngine: windows


@pytest.mark.parametrize("kw", [dict(window_ms=0, grace_ms=0), dict(window_ms=10, grace_ms=-1),
                                dict(window_ms=10, grace_ms=0, max_pending_labels=0)])
def test_kpi_engine_validates(kw) -> None:
    with pytest.raises(ValueError, match="window_ms > 0"):
        KpiEngine(**kw)


def test_window_closes_only_after_end_plus_grace() -> None:
    eng = KpiEngine(window_ms=1000, grace_ms=500)
    assert eng.add_prediction(pred("s1", 0)) == []
    assert eng.add_prediction(pred("s2", 999)) == []
    assert eng.add_prediction(pred("s3", 1000)) == []  # next window; window 0 waits for grace
    assert eng.add_prediction(pred("s4", 1499)) == []
    snaps = eng.add_prediction(pred("s5", 1500))  # watermark reaches end + grace
    assert snaps and {(s.window_start_ms, s.window_end_ms) for s in snaps} == {(0, 1000)}
    assert by_key(snaps)[("global", "", FUSED)].n == 2
    assert eng.watermark == 1500
    assert eng.advance(2499) == []
    later = eng.advance(2500)
    assert {s.window_start_ms for s in later} == {1000}
    assert by_key(later)[("global", "", FUSED)].n == 3


def test_windows_close_in_order_and_gaps_are_skipped() -> None:
    eng = KpiEngine(window_ms=100, grace_ms=0)
    snaps = []
    for i, t in enumerate((5, 250, 420)):
        snaps += eng.add_prediction(pred(f"s{i}", t))
    snaps += eng.advance(10_000)
    starts = [s.window_start_ms for s in snaps if s.scope == "global" and s.modality == FUSED]
    assert starts == [0, 200, 400]


def test_late_prediction_is_counted_not_used() -> None:
    eng = KpiEngine(window_ms=1000, grace_ms=0)
    eng.add_prediction(pred("s1", 100))
    assert eng.add_prediction(pred("s2", 1000))  # closes window 0
    assert eng.add_prediction(pred("s3", 500)) == []
    assert eng.late_predictions == 1
    snaps = by_key(eng.advance(5000))
    assert snaps[("global", "", FUSED)].n == 1 and snaps[("global", "", FUSED)].window_start_ms == 1000


def test_duplicate_predictions_counted_once() -> None:
    eng = KpiEngine(window_ms=1000, grace_ms=0)
    eng.add_prediction(pred("s1", 100, (0.9, 0.1)))
    eng.add_prediction(pred("s1", 100, (0.9, 0.1)))  # redelivered after a crash
    eng.add_prediction(pred("s2", 200, (0.2, 0.8)))
    eng.add_label(Label("s1", "a1", 100, "ok"))
    snaps = by_key(eng.advance(1000))
    assert eng.duplicates == 1
    fused = snaps[("global", "", FUSED)]
    assert fused.n == 2 and fused.n_labelled == 1 and fused.accuracy == 1.0


def test_per_source_watermark_lagging_source_holds_windows_open() -> None:
    eng = KpiEngine(window_ms=1000, grace_ms=500)
    assert eng.add_prediction(pred("a", 100), source="p0") == []
    assert eng.add_prediction(pred("b", 200), source="p1") == []
    # p0 runs far ahead; p1 still lags at 200, so window 0 must stay open for it
    for i, t in enumerate(range(1000, 10_000, 500)):
        assert eng.add_prediction(pred(f"a{i}", t), source="p0") == []
    assert eng.watermark == 200
    assert eng.add_prediction(pred("c", 900), source="p1") == []  # still joins window 0
    assert eng.late_predictions == 0
    snaps = eng.add_prediction(pred("d", 2600), source="p1")  # p1 catches up: min is 2600
    assert eng.watermark == 2600
    fused = {s.window_start_ms: s for s in snaps if s.scope == "global" and s.modality == FUSED}
    assert sorted(fused) == [0, 1000]
    assert fused[0].n == 3  # a, b and c
    # a source's watermark never moves backwards
    eng.add_prediction(pred("e", 2000), source="p1")
    assert eng.watermark == 2600


def test_prediction_for_passed_empty_window_is_late() -> None:
    eng = KpiEngine(window_ms=1000, grace_ms=500)
    eng.add_prediction(pred("s0", 100))
    eng.add_prediction(pred("s3", 3000))  # closes window 0; window 1000 (end+grace 2500) has passed, empty
    snaps = eng.add_prediction(pred("s1", 1200))  # window [1000, 2000) is over
    assert eng.late_predictions == 1
    assert snaps == []


# ---------------------------------------------------------------------------- KpiEngine: late labels


def test_a_dead_sensors_readings_are_left_out_of_its_models_accuracy() -> None:
    # A muted microphone (flat signal) makes its model answer "bad" on "ok" machines: that
    # is a sensor fault (reported per reading), not a degradation of the audio model.
    eng = KpiEngine(window_ms=1000, grace_ms=0, flat_std={"audio": 1e-3})
    for i in range(6):
        p = pred(f"s{i}", i * 100, modality_probs={"image": (0.9, 0.1), "audio": (0.2, 0.8) if i < 4 else (0.9, 0.1)},
                 signal_std={"image": 12.0, "audio": 0.0 if i < 4 else 0.3})
        eng.add_prediction(p)
        eng.add_label(Label(f"s{i}", "a1", i * 100, "ok", line_id="L1"))
    snaps = by_key(eng.advance(1000))
    audio, image, fused = (snaps[("global", "", m)] for m in ("audio", "image", FUSED))
    assert (audio.n, audio.n_flat, audio.n_labelled, audio.accuracy) == (6, 4, 2, 1.0)
    assert (image.n_labelled, image.accuracy) == (6, 1.0)
    assert fused.n_labelled == 6  # the fused output is judged on every sample


def test_label_joins_before_or_after_prediction() -> None:
    eng = KpiEngine(window_ms=1000, grace_ms=2000)
    eng.add_label(Label("early", "a1", 100, "ok"))  # label first
    assert eng.pending_labels == 1
    eng.add_prediction(pred("early", 100, (0.9, 0.1)))
    assert eng.pending_labels == 0
    eng.add_prediction(pred("late", 200, (0.9, 0.1)))
    eng.add_label(Label("late", "a1", 200, "bad"))  # label after, within grace
    eng.add_prediction(pred("never", 300, (0.9, 0.1)))  # never labelled
    eng.add_prediction(pred("tick", 2999))
    assert eng.advance(2999) == []  # still in grace
    eng.add_label(Label("never2", "a1", 900, "ok"))  # label with no prediction (yet): pending
    fused = by_key(eng.advance(3000))[("global", "", FUSED)]
    assert fused.n == 3 and fused.n_labelled == 2
    assert fused.accuracy == 0.5  # early right, late wrong
    assert eng.late_labels == 0


def test_label_for_closed_window_is_late_not_used() -> None:
    eng = KpiEngine(window_ms=1000, grace_ms=0)
    eng.add_prediction(pred("s1", 100))
    first = by_key(eng.add_prediction(pred("s2", 1000)))
    assert first[("global", "", FUSED)].n_labelled == 0
    eng.add_label(Label("s1", "a1", 100, "ok"))  # its prediction's window is closed
    eng.add_label(Label("ghost", "a1", 500, "ok"))  # a closed window, prediction never seen
    assert eng.late_labels == 2
    assert eng.pending_labels == 0
    eng.add_label(Label("s2", "a1", 1000, "ok"))  # open window: joins
    later = by_key(eng.advance(2000))[("global", "", FUSED)]
    assert later.n_labelled == 1 and eng.late_labels == 2


def test_pending_labels_bounded_oldest_evicted() -> None:
    eng = KpiEngine(window_ms=1000, grace_ms=0, max_pending_labels=2)
    for sid in ("x1", "x2", "x3"):
        eng.add_label(Label(sid, "a1", 100, "ok"))
    assert eng.pending_labels == 2 and eng.evicted_labels == 1
    for sid in ("x1", "x2", "x3"):
        eng.add_prediction(pred(sid, 100, (0.9, 0.1)))
    fused = by_key(eng.advance(1000))[("global", "", FUSED)]
    assert fused.n == 3 and fused.n_labelled == 2  # x1's label was evicted
    assert eng.pending_labels == 0


def test_reset_clears_state() -> None:
    eng = KpiEngine(window_ms=1000, grace_ms=0)
    eng.add_label(Label("x", "a", 5, "ok"))
    eng.add_prediction(pred("s1", 100))
    eng.add_prediction(pred("s1", 100))
    eng.reset()
    assert (eng.pending_labels, eng.duplicates, eng.watermark) == (0, 0, None)
    assert eng.advance(10**9) == []


# ---------------------------------------------------------------------------- KpiEngine: values by hand


def _hand_example() -> list[KpiSnapshot]:
    """Four samples in window [0, 1000), checked by hand below.

    s1 a1/L1 fused ok   image ok .9  audio bad .7   contrib image .75 audio .25  truth ok  lat 10
    s2 a1/L1 fused bad  image bad .6  audio missing  contrib image 1.0           truth ok  lat 20
    s3 a2/L2 fused ok   image bad .8 (masked)  audio ok .7  contrib audio 1.0    no label  lat 30
    s4 a2/L2 fused bad  image bad .7  audio bad .8  contrib .5 / .5              truth bad lat 40
    """
    eng = KpiEngine(window_ms=1000, grace_ms=500)
    eng.add_label(Label("s1", "a1", 10, "ok"))  # before its prediction
    eng.add_prediction(pred("s1", 10, (0.8, 0.2), "a1", "L1", modality_probs={"image": (0.9, 0.1), "audio": (0.3, 0.7)},
                            contributions={"image": 0.75, "audio": 0.25}, latency_ms=10.0))
    eng.add_prediction(pred("s2", 20, (0.3, 0.7), "a1", "L1", modality_probs={"image": (0.4, 0.6)},
                            missing=("audio",), contributions={"image": 1.0}, latency_ms=20.0))
    eng.add_prediction(pred("s3", 30, (0.6, 0.4), "a2", "L2", modality_probs={"image": (0.2, 0.8), "audio": (0.7, 0.3)},
                            masked=("image",), contributions={"audio": 1.0}, latency_ms=30.0))
    eng.add_prediction(pred("s4", 40, (0.1, 0.9), "a2", "L2", modality_probs={"image": (0.3, 0.7), "audio": (0.2, 0.8)},
                            contributions={"image": 0.5, "audio": 0.5}, latency_ms=40.0))
    eng.add_label(Label("s2", "a1", 20, "ok"))  # after
    eng.add_label(Label("s4", "a2", 40, "bad"))
    return eng.add_prediction(pred("next", 1500))


def test_snapshot_layout() -> None:
    snaps = _hand_example()
    keys = [(s.scope, s.scope_id, s.modality) for s in snaps]
    scopes = [("asset", "a1"), ("asset", "a2"), ("global", ""), ("line", "L1"), ("line", "L2")]
    assert keys == [(sc, sid, m) for sc, sid in scopes for m in (FUSED, "audio", "image", UME)]
    assert all((s.window_start_ms, s.window_end_ms) == (0, 1000) for s in snaps)


def test_global_values_by_hand() -> None:
    s = by_key(_hand_example())
    fused = s[("global", "", FUSED)]
    assert (fused.n, fused.n_labelled) == (4, 3)
    assert fused.accuracy == pytest.approx(2 / 3)  # ok/ok, bad/ok, bad/bad
    assert fused.macro_f1 == pytest.approx(2 / 3)
    assert (fused.accuracy_low, fused.accuracy_high) == pytest.approx(wilson_interval(2, 3))
    assert fused.agreement is None and fused.mean_contribution is None
    assert fused.mean_confidence == pytest.approx((0.8 + 0.7 + 0.6 + 0.9) / 4)
    assert fused.mean_latency_ms == pytest.approx(25.0)
    assert fused.missing_rate == 0.0 and fused.masked_rate == 0.0

    image = s[("global", "", "image")]
    assert (image.n, image.n_labelled) == (4, 3)
    assert image.accuracy == pytest.approx(2 / 3)  # ok/ok, bad/ok, bad/bad
    assert image.agreement == pytest.approx(3 / 4)  # disagrees with the fused label on s3
    assert image.mean_confidence == pytest.approx((0.9 + 0.6 + 0.8 + 0.7) / 4)
    assert image.mean_contribution == pytest.approx((0.75 + 1.0 + 0.5) / 3)  # s3 masked: not in the fusion
    assert image.missing_rate == 0.0 and image.masked_rate == pytest.approx(1 / 4)
    assert image.mean_latency_ms is None

    audio = s[("global", "", "audio")]
    assert (audio.n, audio.n_labelled) == (3, 2)
    assert audio.accuracy == pytest.approx(1 / 2)  # bad/ok, bad/bad
    assert audio.macro_f1 == pytest.approx((0 + 2 / 3) / 2)  # ok: tp0 -> 0; bad: tp1 fp1 -> 2/3
    assert audio.agreement == pytest.approx(2 / 3)
    assert audio.mean_confidence == pytest.approx((0.7 + 0.7 + 0.8) / 3)
    assert audio.mean_contribution == pytest.approx((0.25 + 1.0 + 0.5) / 3)
    assert audio.missing_rate == pytest.approx(1 / 4) and audio.masked_rate == 0.0

    ume = s[("global", "", UME)]  # mean of the per-modality probs: ok, bad, bad, bad
    assert (ume.n, ume.n_labelled) == (4, 3)
    assert ume.accuracy == pytest.approx(2 / 3)
    assert ume.agreement == pytest.approx(3 / 4)
    assert ume.mean_confidence is None and ume.mean_contribution is None


def test_line_and_asset_values_by_hand() -> None:
    s = by_key(_hand_example())
    for scope, first, second in (("asset", "a1", "a2"), ("line", "L1", "L2")):
        f1 = s[(scope, first, FUSED)]
        assert (f1.n, f1.n_labelled, f1.accuracy) == (2, 2, 0.5)
        assert f1.mean_latency_ms == pytest.approx(15.0)
        a1 = s[(scope, first, "audio")]
        assert (a1.n, a1.n_labelled, a1.accuracy) == (1, 1, 0.0)
        assert a1.missing_rate == pytest.approx(0.5)
        i1 = s[(scope, first, "image")]
        assert (i1.n, i1.accuracy, i1.masked_rate) == (2, 0.5, 0.0)
        assert i1.mean_contribution == pytest.approx((0.75 + 1.0) / 2)

        f2 = s[(scope, second, FUSED)]
        assert (f2.n, f2.n_labelled, f2.accuracy) == (2, 1, 1.0)
        i2 = s[(scope, second, "image")]
        assert i2.masked_rate == pytest.approx(0.5) and i2.mean_contribution == pytest.approx(0.5)
        assert i2.agreement == pytest.approx(0.5) and i2.accuracy == 1.0
        a2 = s[(scope, second, "audio")]
        assert (a2.n, a2.accuracy, a2.agreement, a2.missing_rate) == (2, 1.0, 1.0, 0.0)


def test_modality_missing_everywhere_still_reported() -> None:
    eng = KpiEngine(window_ms=1000, grace_ms=0)
    eng.add_prediction(pred("s1", 5, missing=("series",)))
    s = by_key(eng.advance(1000))[("global", "", "series")]
    assert (s.n, s.missing_rate, s.accuracy, s.agreement, s.mean_contribution) == (0, 1.0, None, None, None)


# ---------------------------------------------------------------------------- detector


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(baseline=0.0), r"baseline must be in \(0, 1\]"),
        (dict(baseline=1.2), r"baseline must be in \(0, 1\]"),
        (dict(baseline=0.9, margin=-0.1), r"margin must be in \[0, baseline=0.9\)"),
        (dict(baseline=0.5, margin=0.5), r"margin must be in \[0, baseline=0.5\)"),
        (dict(baseline=0.9, z=0), r"z must be in \(0.0, inf\), got 0"),
        (dict(baseline=0.9, min_n=0), "min_n must be an integer >= 1, got 0"),
        (dict(baseline=0.9, fire_windows=0), "fire_windows must be an integer >= 1, got 0"),
        (dict(baseline=0.9, resolve_windows=0), "resolve_windows must be an integer >= 1, got 0"),
    ],
)
def test_detector_validates(kw, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        AccuracyDegradation(**kw)


def test_detector_public_attributes() -> None:
    det = AccuracyDegradation(baseline=0.9, margin=0.15, z=2.0, min_n=5, fire_windows=3, resolve_windows=4)
    assert (det.baseline, det.margin, det.z, det.min_n, det.fire_windows, det.resolve_windows) == (
        0.9, 0.15, 2.0, 5, 3, 4)
    assert det.threshold == pytest.approx(0.75)
    assert (det.firing, det.changed, det.last) == (False, False, None)


BAD = (0, 20)  # Wilson high ~0.16 < 0.75
GOOD = (20, 20)
BAND = (70, 100)  # accuracy 0.70 < 0.75 but Wilson high ~0.78 >= 0.75: neither bad nor good
SMALL_BAD = (0, 5)  # below min_n


def run(det: AccuracyDegradation, windows) -> list[str]:
    """One char per window: '.' quiet, 'F' firing, '^' just fired, 'v' just resolved."""
    out = []
    for correct, n in windows:
        det.update(correct, n)
        out.append(("^" if det.firing else "v") if det.changed else ("F" if det.firing else "."))
    return out


def test_detector_band_window_is_neither_bad_nor_good() -> None:
    low, high = wilson_interval(*BAND)
    assert BAND[0] / BAND[1] < 0.75 <= high


def test_detector_fires_after_fire_windows_and_resolves_after_resolve_windows() -> None:
    det = AccuracyDegradation(baseline=0.9, margin=0.15, fire_windows=3, resolve_windows=2)
    assert "".join(run(det, [GOOD, BAD, BAD, BAD, BAD, GOOD, GOOD, GOOD])) == "...^FFv."
    assert det.last == (1.0, *wilson_interval(20, 20))


def test_detector_bad_streak_must_be_consecutive() -> None:
    det = AccuracyDegradation(baseline=0.9, fire_windows=2)
    assert "".join(run(det, [BAD, GOOD, BAD, BAND, BAD, GOOD])) == "......"


def test_detector_small_windows_are_no_evidence() -> None:
    det = AccuracyDegradation(baseline=0.9, min_n=10, fire_windows=2, resolve_windows=2)
    assert "".join(run(det, [SMALL_BAD] * 5)) == "....."
    assert det.last is None
    assert "".join(run(det, [BAD, SMALL_BAD, (5, 5), BAD])) == "...^"  # the streak survives a small window
    last = det.last
    det.update(9, 9)  # small and perfect: ignored, changes nothing
    assert det.firing and not det.changed and det.last == last


def test_detector_no_flapping_in_hysteresis_band() -> None:
    det = AccuracyDegradation(baseline=0.9, fire_windows=2, resolve_windows=2)
    # around the threshold, never firing
    assert "".join(run(det, [BAND, BAD, BAND, BAD, BAND, GOOD, BAND])) == "......."
    # firing, then hovering in the band and single good windows: stays firing
    assert "".join(run(det, [BAD, BAD, BAND, GOOD, BAND, GOOD, BAND, BAND])) == ".^FFFFFF"
    assert "".join(run(det, [GOOD, GOOD])) == "Fv"


def test_detector_changed_is_per_update() -> None:
    det = AccuracyDegradation(baseline=0.9, fire_windows=1, resolve_windows=1)
    det.update(*BAD)
    assert det.firing and det.changed
    det.update(*BAD)
    assert det.firing and not det.changed
    det.update(*GOOD)
    assert not det.firing and det.changed
    det.reset()
    assert (det.firing, det.changed, det.last) == (False, False, None)


@pytest.mark.parametrize("split", [1, 3, 5, 8])
def test_detector_state_dict_round_trip_continues_identically(split: int) -> None:
    windows = [GOOD, BAD, BAND, BAD, BAD, SMALL_BAD, BAND, GOOD, (15, 20), GOOD, GOOD, BAD, BAD]
    params = dict(baseline=0.9, margin=0.15, z=1.96, min_n=10, fire_windows=2, resolve_windows=2)
    ref = AccuracyDegradation(**params)
    expected = run(ref, windows)
    first = AccuracyDegradation(**params)
    head = run(first, windows[:split])
    state = json.loads(json.dumps(first.state_dict()))  # checkpoints are plain JSON
    restored = AccuracyDegradation(**params)
    restored.update(*BAD)  # whatever it held before is replaced
    restored.load_state_dict(state)
    assert restored.firing == first.firing and restored.last == first.last
    assert head + run(restored, windows[split:]) == expected
    assert restored.state_dict() == ref.state_dict()


# ---------------------------------------------------------------------------- policy


def alert(status: str = "firing", kind: str = "degradation", scope: str = "global", scope_id: str = "") -> Alert:
    return Alert("fp1", "fp1@5000", status, kind, "critical", "image", scope, scope_id, 5000, 9000, summary="s")


# ---------------------------------------------------------------------------- MonitorCore end to end

FAULT_FROM, FAULT_TO, END = 20_000, 40_000, 55_000
PERIOD = 50  # ms per sample per asset: 20 labelled samples per asset per 1 s window


def synthetic_stream():
    """Two assets; audio always right; image right before 20 s, wrong in [20 s, 40 s), right after.

    Fusion is the UME mean, so the fused label is wrong during the fault too. Half the labels
    arrive before their prediction, half right after it.
    """
    i = 0
    for t in range(0, END, PERIOD):
        for asset, line in (("a1", "L1"), ("a2", "L2")):
            truth = CLASSES[i % 2]
            right = (0.9, 0.1) if truth == "ok" else (0.1, 0.9)
            wrong = right[::-1]
            image = wrong if FAULT_FROM <= t < FAULT_TO else right
            audio = (0.8, 0.2) if truth == "ok" else (0.2, 0.8)
            fused = tuple((a + b) / 2 for a, b in zip(image, audio))
            p = Prediction(f"s{i}", asset, t, CLASSES, fused, CLASSES[fused.index(max(fused))], "ume",
                           {"image": image, "audio": audio}, line_id=line)
            label = Label(f"s{i}", asset, t, truth, line_id=line)
            yield ("label", label) if i % 2 else ("pred", p)
            yield ("pred", p) if i % 2 else ("label", label)
            i += 1


SETTINGS = dict(kpi_window_ms=1000, label_grace_ms=2000, min_labelled=10, fire_windows=2, resolve_windows=2,
                degradation_margin=0.15, detect_scopes=("global",))
BASELINES = {"image": {"top1": 0.9, "macro_f1": 0.9}, "audio": {"top1": 0.9, "macro_f1": 0.9},
             "fused": {"top1": 0.95, "macro_f1": 0.95}}


PARTITION = {"a1": "sf.predictions:0", "a2": "sf.predictions:1"}


def run_core(**overrides) -> tuple[MonitorCore, list[tuple[int, Outputs]]]:
    core = MonitorCore(BASELINES, MonitorSettings(**{**SETTINGS, **overrides}))
    outs = []
    for kind, ev in synthetic_stream():
        if kind == "label":
            assert core.on_label(ev) == Outputs()
        else:
            outs.append((ev.ts_ms, core.on_prediction(ev, source=PARTITION[ev.asset_id])))
    return core, outs


def test_monitor_core_end_to_end() -> None:
    core, outs = run_core()
    every = [(t, a.kind, a.modality, a.status) for t, o in outs for a in o.alerts]
    # Besides the image degradation: the fused label follows the confident, wrong image, so
    # the fusion falls below audio. Audio's agreement with the fused label drops too, but
    # with image known to be broken that says nothing about audio: no drift alert.
    assert [e for e in every if e[1] != "degradation"] == [
        (24_000, "fusion_regression", "fused", "firing"), (44_000, "fusion_regression", "fused", "resolved")]
    alerts = [(t, a) for t, o in outs for a in o.alerts if a.kind == "degradation"]
    commands = [(t, c) for t, o in outs for c in o.commands]
    assert all(t >= FAULT_FROM for t, _ in alerts)  # nothing before the fault
    glob = [a for _, a in alerts if a.scope == "global"]
    assert [(a.modality, a.status) for a in glob] == [("image", "firing"), ("image", "resolved")]
    firing, resolved = glob
    # fires on the second bad window [21 s, 22 s), once the grace has passed
    assert firing.event_ms == firing.starts_ms == 22_000
    assert firing.kind == "degradation" and firing.severity == "critical"
    assert firing.fingerprint == fingerprint({"kind": "degradation", "modality": "image", "scope": "global",
                                              "scope_id": ""})
    assert firing.alert_id == f"{firing.fingerprint}@22000"
    assert firing.value == 0.0 and firing.threshold == pytest.approx(0.75) and firing.ends_ms is None
    assert "image accuracy 0.00 < 0.75" in firing.summary and firing.summary.startswith("fleet:")
    emitted_at = next(t for t, o in outs if firing in o.alerts)
    assert emitted_at >= 22_000 + 2_000  # end of the window + grace
    assert "recovered" in resolved.summary
    # resolves after two good windows once the image recovers at 40 s
    assert (resolved.fingerprint, resolved.alert_id, resolved.starts_ms) == (
        firing.fingerprint, firing.alert_id, 22_000)
    assert resolved.event_ms == resolved.ends_ms == 42_000 and resolved.value == 1.0
    # one window of one asset is too little evidence: no asset-scope alerts; the
    # fused/UME/audio KPIs raise nothing
    assert [a for _, a in alerts if a.scope == "asset"] == []
    assert {a.modality for _, a in alerts} == {"image"}
    assert not any(a.scope == "line" for _, a in alerts)
    # commands: mask on firing, unmask on resolving, only for the fleet-wide alert
    assert [(c.action, c.modality, c.alert_id) for _, c in commands] == [
        ("mask_modality", "image", firing.alert_id), ("unmask_modality", "image", firing.alert_id)]
    for _, o in outs:  # each command travels with the alert that caused it
        for c in o.commands:
            assert any(a.alert_id == c.alert_id and a.scope == "global" for a in o.alerts)
    assert core.open_alerts() == []
    assert [s.action for s in core.policy.suppressed] == []


def test_monitor_core_kpis_show_the_fault() -> None:
    _, outs = run_core()
    snaps = [s for _, o in outs for s in o.kpis if s.scope == "global" and s.modality == "image"]
    acc = {s.window_start_ms: s.accuracy for s in snaps}
    assert acc[19_000] == 1.0 and acc[20_000] == 0.0 and acc[39_000] == 0.0 and acc[40_000] == 1.0
    assert all(s.n == s.n_labelled == 40 for s in snaps)
    audio = [s for _, o in outs for s in o.kpis if s.scope == "global" and s.modality == "audio"]
    assert {s.accuracy for s in audio} == {1.0}


def test_monitor_core_open_alerts_while_firing() -> None:
    core = MonitorCore(BASELINES, MonitorSettings(**SETTINGS))
    for kind, ev in synthetic_stream():
        if kind == "label":
            core.on_label(ev)
        elif ev.ts_ms < 30_000:
            core.on_prediction(ev)
    # image degradation (global only: asset scope is not detected on) and fusion regression
    assert len(core.open_alerts()) == 2


def test_monitor_core_dry_run_alerts_without_commands() -> None:
    _, outs = run_core(dry_run=True)
    alerts = [a for _, o in outs for a in o.alerts if a.kind == "degradation"]
    glob = [(a.modality, a.status) for a in alerts if a.scope == "global"]
    assert glob == [("image", "firing"), ("image", "resolved")]
    assert [c for _, o in outs for c in o.commands] == []


def test_monitor_core_small_windows_never_alert() -> None:
    _, outs = run_core(min_labelled=50)  # 40 labelled per global window: no evidence
    assert [a for _, o in outs for a in o.alerts] == []


def test_monitor_core_ignores_modalities_without_baseline() -> None:
    core = MonitorCore({"audio": {"top1": 0.9}}, MonitorSettings(**SETTINGS))
    alerts = []
    for kind, ev in synthetic_stream():
        alerts += core.on_label(ev).alerts if kind == "label" else core.on_prediction(ev).alerts
    assert [a for a in alerts if a.kind == "degradation" or a.modality == "image"] == []
    assert core.baselines == {"audio": {"top1": 0.9}}


def test_monitor_core_rejects_unusable_baseline_at_construction() -> None:
    settings = MonitorSettings(**{**SETTINGS, "min_labelled": 1, "label_grace_ms": 0})
    try:
        core = MonitorCore({"image": {"top1": 0.12}}, settings)
    except ConfigError as exc:
        assert "image" in str(exc) and "DEGRADATION_MARGIN" in str(exc)
        return  # failing fast, at start-up, is the wanted behaviour
    core.on_label(Label("s1", "a1", 10, "ok"))
    core.on_prediction(pred("s1", 10))
    core.on_prediction(pred("s2", 5_000))  # closes the first window: must not raise


def test_baselines_follow_the_served_versions_across_an_outage_and_a_restart() -> None:
    """A prediction served by other unit versions switches the baselines to theirs (the
    registry's answer); no answer (Redis down) keeps the old ones and asks again; a
    restored monitor continues with the versions it followed."""
    baselines = {"v1": {"image": {"top1": 0.9, "macro_f1": 0.9}}, "v2": {"image": {"top1": 0.7, "macro_f1": 0.7}}}
    asked, down = [], [True]

    def baselines_of(versions: dict[str, str]) -> dict | None:
        asked.append(versions["image"])
        return None if down[0] else baselines[versions["image"]]

    core = MonitorCore(baselines["v1"], MonitorSettings(), baselines_of=baselines_of)
    core.on_prediction(pred("s1", 1_000, versions={"image": "v1"}))
    assert asked == [] and core.baselines["image"]["top1"] == 0.9  # the start-up baselines are v1's
    core.on_prediction(pred("s2", 2_000, versions={"image": "v2"}))
    assert asked == ["v2"] and core.baselines["image"]["top1"] == 0.9  # Redis down: kept
    down[0] = False
    core.on_prediction(pred("s3", 3_000, versions={"image": "v2"}))
    assert asked == ["v2", "v2"] and core.baselines["image"]["top1"] == 0.7
    core.on_prediction(pred("s4", 4_000, versions={"image": "v2"}))
    assert asked == ["v2", "v2"]  # asked once per change
    restored = MonitorCore(baselines["v1"], MonitorSettings(), baselines_of=baselines_of)
    restored.load_state_dict(core.state_dict(), [])
    assert restored.baselines["image"]["top1"] == 0.7


def test_a_baseline_without_room_for_the_margin_is_refused_for_that_modality_only() -> None:
    core = MonitorCore({"image": {"top1": 0.9, "macro_f1": 0.9}, "audio": {"top1": 0.8, "macro_f1": 0.8}},
                       MonitorSettings(degradation_margin=0.15))
    core.set_baselines({"image": {"top1": 0.1, "macro_f1": 0.1}, "audio": {"top1": 0.7, "macro_f1": 0.7}})
    assert core.baselines["image"]["top1"] == 0.9 and core.baselines["audio"]["top1"] == 0.7


def test_a_window_of_the_class_a_model_finds_hard_is_not_a_degradation() -> None:
    """Series is right 99 % on "ok" but 51 % on "bad" (validation recall). A window that is
    80 % "bad" expects 0.61, not the 0.83 of the whole split: 60 % right is healthy there;
    28 % right is a degradation."""
    base = {"series": {"top1": 0.83, "macro_f1": 0.8, "recall": {"ok": 0.99, "bad": 0.51}}}
    core = MonitorCore(base, MonitorSettings(kpi_window_ms=1000, label_grace_ms=0, detect_scopes=("global",)))

    def windows(first: int, count: int, right_on_bad: float) -> list:
        alerts = []
        for w in range(first, first + count):
            for i in range(200):
                truth = "bad" if i < 160 else "ok"
                right = truth == "ok" or i < 160 * right_on_bad
                answer = truth if right else ("ok" if truth == "bad" else "bad")
                sid, t = f"w{w}-{i}", w * 1000 + i * 5
                probs = (0.9, 0.1) if answer == "ok" else (0.1, 0.9)
                alerts += core.on_prediction(pred(sid, t, probs, modality_probs={"series": probs})).alerts
                core.on_label(Label(sid, "a1", t, truth, line_id="L1"))
        return alerts

    assert windows(0, 4, right_on_bad=0.5) == []  # 0.60 right: the Top-1 rule would fire (upper bound 0.67 < 0.68)
    fired = [a for a in windows(4, 4, right_on_bad=0.1) if a.status == "firing"]
    assert [(a.kind, a.modality) for a in fired] == [("degradation", "series")]
    assert fired[0].threshold == pytest.approx(0.606 - 0.15) and "expected 0.61" in fired[0].summary


def test_a_flat_sensor_is_a_sensor_fault_within_a_few_readings_and_masks_its_asset() -> None:
    """At 2 readings/s, series on asset a2 goes flat at 10 s and comes back at 20 s: the
    fault fires on the third flat reading (1 s), masks series on a2 only, and resolves after
    six good readings. A frozen image (the same bytes again and again) is a stuck sensor."""
    core = MonitorCore({"series": {"top1": 0.9, "macro_f1": 0.9}, "image": {"top1": 0.9, "macro_f1": 0.9}},
                       MonitorSettings(kpi_window_ms=5000))
    alerts, commands = [], []
    for i in range(60):
        t = i * 500
        for asset in ("a1", "a2"):
            flat = asset == "a2" and 10_000 <= t < 20_000
            frozen = asset == "a1" and t >= 25_000
            out = core.on_prediction(pred(f"{asset}-{i}", t, asset=asset, modality_probs={
                "series": (0.9, 0.1), "image": (0.9, 0.1)},
                signal_std={"series": 0.0 if flat else 1.0, "image": 40.0},
                digest={"image": 7 if frozen else 1000 * i + len(asset), "series": i}))
            alerts += out.alerts
            commands += out.commands
    seen = [(a.status, a.labels["fault"], a.modality, a.scope_id, a.event_ms) for a in alerts]
    assert seen == [("firing", "flatline", "series", "a2", 11_000), ("resolved", "flatline", "series", "a2", 22_500),
                    ("firing", "stuck", "image", "a1", 26_500)], seen  # the first frozen reading is new
    assert [(c.action, c.modality, c.scope, c.scope_id) for c in commands] == [
        ("mask_modality", "series", "asset", "a2"), ("unmask_modality", "series", "asset", "a2"),
        ("mask_modality", "image", "asset", "a1")]
