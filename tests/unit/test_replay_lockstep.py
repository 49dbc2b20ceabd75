"""The lock-step's stop rule: which window closes provably issue no command
(``MonitorCore.quiet_windows``) and where the replay waits (``Lockstep._next_stop``)."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from streamfuse.config import MonitorSettings, Settings
from streamfuse.events import Command, Label, Prediction
from streamfuse.monitor.core import MonitorCore
from streamfuse.replay.lockstep import Lockstep, threshold_after
from streamfuse.replay.plan import Stream, Streams

CLASSES = ("ok", "bad")
WINDOW, GRACE, PERIOD = 1000, 2000, 50
BASELINES = {"image": {"top1": 0.9, "macro_f1": 0.9}, "audio": {"top1": 0.9, "macro_f1": 0.9}}
ASSETS = (("a1", "L1", 0), ("a2", "L2", 1))


def plant(seed: int, windows: int = 80):
    """Labels and predictions of two assets, window by window; the image model is wrong
    in random runs of windows (a fault that comes and goes), on one asset or both."""
    rng = random.Random(seed)
    broken, i = set(), 0
    for w in range(windows):
        if rng.random() < 0.3:  # toggle the fault of one asset, or of both
            which = rng.choice([{"a1"}, {"a2"}, {"a1", "a2"}])
            broken = broken - which if which <= broken else broken | which
        for t in range(w * WINDOW, (w + 1) * WINDOW, PERIOD):
            for asset, line, part in ASSETS:
                truth = CLASSES[(i // 2) % 2]  # both classes on every asset
                right = (0.9, 0.1) if truth == "ok" else (0.1, 0.9)
                image = right[::-1] if asset in broken else right
                audio = (0.7, 0.3) if truth == "ok" else (0.3, 0.7)
                fused = tuple((a + b) / 2 for a, b in zip(image, audio))
                yield Label(f"s{i}", asset, t, truth, line_id=line), None
                yield Prediction(f"s{i}", asset, t, CLASSES, fused, CLASSES[fused.index(max(fused))], "ume",
                                 {"image": image, "audio": audio}, line_id=line), part
                i += 1


def closes_and_commands(settings: MonitorSettings, seed: int):
    """Drive a MonitorCore; returns ``{closes so far: quiet_windows() then}`` and the
    close number (1-based) that issued each command."""
    core = MonitorCore(BASELINES, settings)
    closed: list[int] = []
    quiet = {0: core.quiet_windows()}
    commands = []
    for ev, part in plant(seed):
        if part is None:
            core.on_label(ev)
            continue
        out = core.on_prediction(ev, f"p:{part}")
        starts = sorted({k.window_start_ms for k in out.kpis})
        closed += starts
        for c in out.commands:  # a command's issued_ms is its alert's window end
            commands.append(closed.index(c.issued_ms - settings.kpi_window_ms) + 1)
        if starts:
            quiet[len(closed)] = core.quiet_windows()
    return quiet, commands


@pytest.mark.parametrize("fire,resolve", [(1, 1), (2, 2), (3, 2), (2, 4)])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_no_command_comes_from_a_close_proved_quiet(fire, resolve, seed):
    s = MonitorSettings(kpi_window_ms=WINDOW, label_grace_ms=GRACE, min_labelled=10, fire_windows=fire,
                        resolve_windows=resolve, cooldown_ms=0, detect_scopes=("global", "line"))
    quiet, commands = closes_and_commands(s, seed)
    assert len(commands) >= 4, "the plant must make the policy act, else the test proves nothing"
    for after, q in quiet.items():
        assert not [j for j in commands if after < j <= after + q], (after, q, commands)
    # The bound is tight: some command comes from the first close after a quiet run.
    assert any(after + q + 1 in commands for after, q in quiet.items())
    # Quiet runs are as long as the detectors allow (a fresh one needs fire_windows closes);
    # with fire_windows 1 any close may command and the replay stops at each one.
    assert max(quiet.values()) == fire - 1


def make_lockstep(streams: Streams, **monitor) -> Lockstep:
    s = Settings(monitor={"kpi_window_ms": WINDOW, "label_grace_ms": GRACE, "min_labelled": 10, **monitor})
    return Lockstep(s, streams, SimpleNamespace(), None, None, BASELINES, lambda: None)


def samples_stream(clocks):
    return Stream("samples", 0, list(clocks), iter([{}] * len(clocks)))


def test_first_stop_skips_the_closes_no_detector_can_act_on():
    lock = make_lockstep(Streams([samples_stream(range(10_000, 20_000, 100))]), fire_windows=3)
    first = threshold_after(10_000, WINDOW, GRACE)
    assert first == 11_000
    assert lock._next_stop(None, 10_000) == first + 2 * WINDOW  # two closes cannot fire anything
    one = make_lockstep(Streams([samples_stream(range(10_000, 20_000, 100))]), fire_windows=1)
    assert one._next_stop(None, 10_000) == first


def test_stops_at_every_close_while_a_detector_is_one_window_from_acting():
    lock = make_lockstep(Streams([samples_stream(range(0, 80_000, 100))]), fire_windows=2, cooldown_ms=0)
    seen = []
    for ev, part in plant(seed=2):
        if part is None:
            lock.shadow.on_label(ev)
            continue
        out = lock.shadow.on_prediction(ev, f"p:{part}")
        if out.kpis:
            wm = lock.shadow.kpis.watermark
            stop = lock._next_stop(wm - 1, wm)
            seen.append(stop - threshold_after(wm, WINDOW, GRACE))
    # 0: the next close may fire (a bad streak of one); WINDOW: it cannot, skip it.
    assert set(seen) == {0, WINDOW}


def test_a_late_label_makes_its_deadline_a_stop():
    labels = Stream("labels", 0, [13_500], iter([{}]), deadlines=[12_000])
    lock = make_lockstep(Streams([samples_stream(range(10_000, 20_000, 100)), labels]), fire_windows=4)
    assert lock._next_stop(None, 10_000) == 12_000  # not 14_000: the label needs window [9 s, 10 s) closed
    assert lock._next_stop(12_000, 12_000) == 16_000  # its deadline is behind: the proof alone decides
    later = Stream("labels", 0, [14_500], iter([{}]), deadlines=[12_000])
    lock = make_lockstep(Streams([samples_stream(range(10_000, 20_000, 100)), later]), fire_windows=4)
    assert lock._next_stop(None, 10_000) == 14_000  # published after the 14 s stop, which closes it


def test_the_stop_always_moves_forward():
    lock = make_lockstep(Streams([samples_stream([10_000])]), fire_windows=2)
    for ev in (Prediction("x", "a1", 10_000, CLASSES, (0.9, 0.1), "ok", "ume", {"image": (0.9, 0.1)},
                          line_id="L1"),):
        lock.shadow.on_prediction(ev, "p:0")
    lock.streams.streams[0].pop()  # no samples left: the watermark is stuck at 10 s
    assert lock._next_stop(30_000, 40_000) > 30_000


def test_a_command_from_a_close_before_the_stop_is_reported():
    lock = make_lockstep(Streams([samples_stream([10_000])]))
    cmd = Command("c1", "mask_modality", 9_000, "image")  # window ending 9 s: closed at 11 s
    lock.expected_commands.append(cmd)
    lock._check_quiet(11_000)
    assert lock.quiet_violations == 0
    lock._check_quiet(12_000)
    assert lock.quiet_violations == 1
