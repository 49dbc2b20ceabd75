"""KPI windows wait for input still unread (a monitor catching up a backlog)."""

from __future__ import annotations

from streamfuse.events import Label, Prediction
from streamfuse.monitor.kpis import FUSED, HOLD_MAX_WINDOWS, KpiEngine


def pred(sid: str, t: int) -> Prediction:
    return Prediction(sid, "a1", t, ("ok", "bad"), (0.9, 0.1), "ok", "ume", {"image": (0.9, 0.1)}, line_id="L1")


def labelled(snaps) -> list[tuple[int, int]]:
    return [(s.window_start_ms, s.n_labelled) for s in snaps if s.scope == "global" and s.modality == FUSED]


def test_windows_wait_for_the_labels_the_input_still_holds():
    """The predictions of ten seconds are read before those seconds' labels: while labels
    are unread, a window closes only once the labels read reach its end, so its labels
    are not taken for late ones."""
    behind: list[int | None] = [0]  # labels unread in the input, read up to t=0 so far
    eng = KpiEngine(window_ms=1000, grace_ms=500, input_behind=lambda: behind[0])
    for i in range(10):
        assert eng.add_prediction(pred(f"s{i}", i * 1000)) == []
    for i in range(5):  # the backlog's labels of 0-4 s
        eng.add_label(Label(f"s{i}", "a1", i * 1000, "ok"))
    behind[0] = 4000
    closed = [s for j in range(10) for s in eng.add_prediction(pred(f"s10-{j}", 10_000 + j))]
    assert labelled(closed) == [(t, 1) for t in range(0, 4000, 1000)]
    behind[0] = None  # every label read
    for i in range(5, 10):
        eng.add_label(Label(f"s{i}", "a1", i * 1000, "ok"))
    # released, the watermark moves on one window per prediction, as it would have live
    closed = [s for j in range(10) for s in eng.add_prediction(pred(f"s11-{j}", 11_000 + j))]
    assert labelled(closed) == [(t, 1) for t in range(4000, 10_000, 1000)]
    assert eng.late_labels == 0


def test_without_a_hold_the_same_backlog_closes_its_windows_unlabelled():
    eng = KpiEngine(window_ms=1000, grace_ms=500)
    for i in range(11):
        eng.add_prediction(pred(f"s{i}", i * 1000))
    for i in range(10):
        eng.add_label(Label(f"s{i}", "a1", i * 1000, "ok"))
    assert eng.late_labels == 9  # what the hold is for


def test_labels_that_never_come_hold_windows_at_most_hold_max_windows():
    eng = KpiEngine(window_ms=1000, grace_ms=0, input_behind=lambda: 0)
    closed = []
    for i in range(HOLD_MAX_WINDOWS + 5):
        closed += eng.add_prediction(pred(f"s{i}", i * 1000))
    assert [t for t, _ in labelled(closed)] == [t * 1000 for t in range(4)]  # 34 s in, 30 windows held


def test_input_progress_reads_the_consumer_high_watermarks_against_what_was_handled(monkeypatch):
    from collections import namedtuple

    from streamfuse.monitor import input_progress
    from streamfuse.monitor.input_progress import InputProgress

    monkeypatch.setattr(input_progress, "ANSWER_TTL_S", -1.0)  # every call answers afresh

    TP = namedtuple("TP", "topic partition")

    class Consumer:  # the two things InputProgress asks faust's consumer
        ends = {TP("p.labels", 0): 10, TP("p.labels", 1): 5, TP("p.predictions", 0): 99}

        def assignment(self):
            return set(self.ends)

        def highwater(self, tp):
            return self.ends[tp]

    progress = InputProgress(("p.labels",))  # p.predictions left out here
    progress.started({("p.labels", 0): 4, ("p.labels", 1): 5})  # partition 1 read to its end before a restart
    assert progress.behind(Consumer()) == 0  # partition 0 holds 6 labels, none read yet
    progress.read("p.labels", 0, 4, 7_000)
    progress.read("p.labels", 0, 5, 7_200)
    assert progress.behind(Consumer()) == 7_200
    for offset in range(6, 9):
        progress.read("p.labels", 0, offset, 8_000)
    progress.read("p.labels", 0, 9)  # a poison record, dead-lettered: read all the same
    assert progress.behind(Consumer()) is None  # every label read


def test_a_held_watermark_is_released_without_another_prediction():
    """The stream's last labels come after its last prediction: reading them releases the
    held windows (the core calls ``release`` on every label), one window per step."""
    behind: list[int | None] = [0]
    eng = KpiEngine(window_ms=1000, grace_ms=500, input_behind=lambda: behind[0])
    for i in range(10):
        assert eng.add_prediction(pred(f"s{i}", i * 1000)) == []
    for i in range(10):
        eng.add_label(Label(f"s{i}", "a1", i * 1000, "ok"))
    behind[0] = None
    steps = []
    while (before := eng.watermark) is not None:
        steps.append(labelled(eng.release()))
        if eng.watermark == before:
            break
    assert [s for s in steps if s] == [[(t, 1)] for t in range(0, 8000, 1000)]  # one window a step
    assert eng.watermark == 9000
