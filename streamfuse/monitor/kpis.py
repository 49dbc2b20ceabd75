"""Rolling per-modality KPIs over event-time windows, with the late-label join.

Pure logic: plain values and event timestamps in, :class:`KpiSnapshot` values out. A
window ``[start, start + window_ms)`` closes once the watermark (the minimum over input
partitions of the largest prediction event time seen) passes its end plus ``grace_ms``,
the time it waits for late labels.

State that must survive a restart goes through a *sink* (``put(key, value | None)``):
one entry per open record (``r:<sample_id>``) and per waiting label (``l:<sample_id>``);
the monitor backs it with a changelogged faust table and rebuilds the engine from it
with :meth:`KpiEngine.restore`.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from streamfuse.events import KpiSnapshot, Label, Prediction
from streamfuse.monitor.stats import macro_f1, wilson_interval

FUSED = "fused"
UME = "ume"  # the Uni-Modal Ensemble recomputed from per-modality probabilities
Sink = Callable[[str, Any], None]
Estimator = Callable[[Prediction], dict[str, list]]  # unit -> label-free [P(right) if healthy, if broken]
Flagged = Callable[[str, str, int], bool]  # (line, unit, ts) -> whether the unit was judged broken then
RETAIN_WINDOWS = 3  # closed windows whose records stay in the sink (restart safety)
HOLD_MAX_WINDOWS = 30  # the watermark waits for unread input at most this many windows
InputBehind = Callable[[], "int | None"]  # newest event time read from the partitions holding unread records


@dataclass
class _Record:
    window: int
    asset_id: str
    line_id: str
    fused: str
    fused_conf: float
    ume: str | None
    labels: dict[str, str]  # modality -> its own argmax label (computed modalities only)
    conf: dict[str, float]
    entropy: dict[str, float]
    contributions: dict[str, float]
    missing: list[str]
    masked: list[str]
    flat: list[str]  # modalities whose signal is flat
    stuck: list[str]  # modalities whose reading repeats the previous one byte for byte
    skew_ms: dict[str, int]
    latency_ms: float
    truth: str | None = None
    est: dict[str, list] = field(default_factory=dict)  # unit -> label-free [P(right) if healthy, if broken]
    ts: int = 0
    # The sensors the prediction reported on (signal spread or payload digest), each with
    # whether it had a digest: a restored monitor replays its per-reading sensor checks.
    sensors: dict[str, bool] = field(default_factory=dict)
    spread: dict[str, float] = field(default_factory=dict)  # each reading's signal spread (label-free evidence)

    def live(self, m: str) -> bool:
        """Whether modality ``m``'s reading was neither flat nor frozen (a dead reading is its
        sensor's fault, no evidence about its model)."""
        return m not in self.flat and m not in self.stuck


def sensors_of(pred: Prediction) -> dict[str, bool]:
    """The sensors a prediction reports on (a signal spread or a payload digest), each with
    whether it has a digest (the frozen-reading check needs one)."""
    return {m: m in pred.digest for m in sorted(set(pred.signal_std) | set(pred.digest))}


def _stored(rec: _Record) -> dict[str, Any]:
    """The record as a map for the state table. Shallow: a record's containers are built
    fresh for it and never changed afterwards (only ``truth`` is set), so they can be
    shared; ``dataclasses.asdict`` deep-copied them and cost two thirds of the monitor's
    time per prediction."""
    return dict(vars(rec))


@dataclass
class _Window:
    start: int
    records: dict[str, _Record] = field(default_factory=dict)


def _argmax(classes: tuple[str, ...], probs: tuple[float, ...]) -> tuple[str, float]:
    i = max(range(len(probs)), key=probs.__getitem__)
    return classes[i], probs[i]


class KpiEngine:
    """Windowed KPI accumulation per (scope, modality).

    Args:
        window_ms: window length (tumbling, event time).
        grace_ms: how long after its end a window waits for late labels.
        max_pending_labels: labels whose prediction has not arrived yet are kept up to
            this many (oldest evicted first), so state stays bounded.
        flat_std: per modality, a reading whose signal standard deviation is at or below
            this counts as flat (a dead or stuck sensor).
        sink: receives every change of the persistent state (see the module docstring).
        estimator: per prediction, unit (modality or ``fused``) -> label-free probability
            that it is right if healthy and if broken; the window mean (broken where
            ``flagged`` says so at the sample's time) is the snapshot's ``est_accuracy``.
        flagged: ``(line, unit, ts) -> bool``, the label-free detectors' verdict.
        input_behind: ``() -> event time | None``: where the input partitions (predictions
            and labels) still hold records not read yet, the newest event time read so far
            from those partitions (0 for one not read at all; None when all are read). A
            monitor catching up a backlog (after a restart) gets its partitions unevenly,
            a minute of predictions before that minute's labels; the watermark then waits
            until those are read (at most :data:`HOLD_MAX_WINDOWS` windows), so they are
            not taken for late ones, and every detector that follows the watermark sees the
            windows as they would have been live.

    Examples:
        >>> from streamfuse.events import Prediction, Label
        >>> eng = KpiEngine(window_ms=1000, grace_ms=500)
        >>> def pred(i, t, fused, image):
        ...     return Prediction(f"s{i}", "a", t, ("ok", "bad"), fused, "ok" if fused[0] > .5 else "bad",
        ...                       "ume", {"image": image}, line_id="l")
        >>> eng.add_prediction(pred(1, 100, (.9, .1), (.8, .2)))
        []
        >>> eng.add_label(Label("s1", "a", 100, "ok"))
        >>> snaps = eng.add_prediction(pred(2, 1600, (.2, .8), (.7, .3)))
        >>> [(s.scope, s.modality, s.n, s.accuracy) for s in snaps if s.scope == "global"]
        [('global', 'fused', 1, 1.0), ('global', 'image', 1, 1.0), ('global', 'ume', 1, 1.0)]
    """

    def __init__(self, window_ms: int, grace_ms: int, max_pending_labels: int = 100_000,
                 flat_std: dict[str, float] | None = None, sink: Sink | None = None,
                 estimator: Estimator | None = None, flagged: Flagged | None = None,
                 input_behind: InputBehind | None = None) -> None:
        if window_ms <= 0 or grace_ms < 0 or max_pending_labels <= 0:
            raise ValueError("window_ms > 0, grace_ms >= 0 and max_pending_labels > 0 are required")
        self.window_ms = window_ms
        self.grace_ms = grace_ms
        self.max_pending_labels = max_pending_labels
        self.input_behind = input_behind
        self.flat_std = dict(flat_std or {})
        self.sink = sink
        self.estimator = estimator
        self.flagged = flagged
        self.reset()

    def reset(self) -> None:
        self._windows: dict[int, _Window] = {}
        self._index: dict[str, int] = {}  # sample_id -> window start, open windows only
        self._pending: OrderedDict[str, str] = OrderedDict()
        self._closed_before: int | None = None  # windows starting before this are closed
        self._source_max: dict[str, int] = {}
        self._last_digest: dict[str, int] = {}  # "asset|modality" -> digest of the last reading
        # Records of closed windows stay in the sink for a few more windows: a restart may
        # restore a checkpoint slightly older than the sink, and must still find them.
        self._retired: list[tuple[int, list[str]]] = []
        self.watermark: int | None = None
        self._provisioned: int | None = None  # start of the last window given a provisional snapshot
        self.late_predictions = 0
        self.late_labels = 0
        self.evicted_labels = 0
        self.duplicates = 0

    # ------------------------------------------------------------------ persistence

    def _put(self, key: str, value: Any) -> None:
        if self.sink is not None:
            self.sink(key, value)

    def state_dict(self) -> dict[str, Any]:
        """The engine's small state (records and labels live in the sink)."""
        return {"closed_before": self._closed_before, "source_max": dict(self._source_max),
                "watermark": self.watermark,
                "last_digest": dict(self._last_digest),
                "counters": [self.late_predictions, self.late_labels, self.evicted_labels, self.duplicates]}

    def restore(self, state: dict[str, Any] | None, entries: Iterable[tuple[str, Any]]) -> None:
        """Rebuild from :meth:`state_dict` and the sink's entries (after a restart)."""
        self.reset()
        if state:
            self._closed_before = state["closed_before"]
            self._source_max = dict(state["source_max"])
            self._last_digest = dict(state["last_digest"])
            self.late_predictions, self.late_labels, self.evicted_labels, self.duplicates = state["counters"]
            self.watermark = state.get("watermark") or (min(self._source_max.values()) if self._source_max else None)
        for key, value in entries:
            if value is None:
                continue
            kind, sid = key.split(":", 1)
            if kind == "r":
                rec = _Record(**value)
                if self._closed_before is not None and rec.window < self._closed_before:
                    self._retired.append((rec.window, [sid]))  # closed before the checkpoint
                    continue
                self._windows.setdefault(rec.window, _Window(rec.window)).records[sid] = rec
                self._index[sid] = rec.window
            elif kind == "l":
                self._pending[sid] = value

    def record(self, sample_id: str) -> _Record | None:
        """The record of a prediction in a window not closed yet."""
        start = self._index.get(sample_id)
        return None if start is None else self._windows[start].records.get(sample_id)

    def open_records(self) -> list[tuple[str, _Record]]:
        """``(sample id, record)`` of every prediction in a window not closed yet."""
        return [(sid, r) for start in sorted(self._windows) for sid, r in self._windows[start].records.items()]

    # ------------------------------------------------------------------ input

    @property
    def pending_labels(self) -> int:
        return len(self._pending)

    def add_label(self, label: Label) -> None:
        start = self._index.get(label.sample_id)
        if start is not None:
            rec = self._windows[start].records[label.sample_id]
            rec.truth = label.label
            self._put(f"r:{label.sample_id}", _stored(rec))
            return
        if self._closed_before is not None and label.ts_ms < self._closed_before:
            self.late_labels += 1  # its window already closed
            return
        self._pending[label.sample_id] = label.label
        self._put(f"l:{label.sample_id}", label.label)
        if len(self._pending) > self.max_pending_labels:
            sid, _ = self._pending.popitem(last=False)
            self._put(f"l:{sid}", None)
            self.evicted_labels += 1

    def add_prediction(self, pred: Prediction, source: str = "") -> list[KpiSnapshot]:
        """Add one prediction; returns the snapshots of every window this closes.

        Args:
            pred: the prediction.
            source: the input partition it came from. The watermark is the minimum over
                sources of each one's largest event time, so a partition that lags
                behind does not see its windows closed under it.
        """
        start = pred.ts_ms - pred.ts_ms % self.window_ms
        if self._closed_before is not None and start < self._closed_before:
            self.late_predictions += 1
        elif pred.sample_id in self._index:
            self.duplicates += 1  # at-least-once delivery: count each sample once
        else:
            rec = self._record(pred, start)
            self._windows.setdefault(start, _Window(start)).records[pred.sample_id] = rec
            self._index[pred.sample_id] = start
            if rec.truth is not None:
                self._put(f"l:{pred.sample_id}", None)
            self._put(f"r:{pred.sample_id}", _stored(rec))
        self._source_max[source] = max(self._source_max.get(source, pred.ts_ms), pred.ts_ms)
        self.watermark = self._held(min(self._source_max.values()))
        return self.advance(self.watermark)

    def _held(self, watermark: int) -> int:
        """``watermark`` (the predictions read), held back while records the input still
        holds lag behind it (``input_behind``); the hold never takes back what was passed."""
        if self.input_behind is None:
            return watermark
        reached = self.input_behind()
        held = watermark if reached is None else \
            max(min(watermark, reached + self.grace_ms), watermark - HOLD_MAX_WINDOWS * self.window_ms)
        if self.watermark is None:
            return held
        # Released, it moves on one window per prediction: the window detectors and the
        # label-free ones, stepped by the same watermark, then take their turns as live.
        return max(min(held, self.watermark + self.window_ms), min(self.watermark, watermark))

    def release(self) -> list[KpiSnapshot]:
        """Move a held watermark on (by one window at most) once the input it waited for
        was read; the snapshots of the windows that closes."""
        if self.input_behind is None or self.watermark is None or not self._source_max:
            return []
        watermark = self._held(min(self._source_max.values()))
        if watermark <= self.watermark:
            return []
        self.watermark = watermark
        return self.advance(watermark)

    def advance(self, watermark: int) -> list[KpiSnapshot]:
        """Close every window whose end + grace is at or before ``watermark``."""
        out: list[KpiSnapshot] = []
        for start in sorted(self._windows):
            if start + self.window_ms + self.grace_ms > watermark:
                break
            window = self._windows.pop(start)
            for sid in window.records:
                self._index.pop(sid, None)
            self._retired.append((start, list(window.records)))
            self._closed_before = start + self.window_ms
            out.extend(self._snapshots(window))
        # Windows that got nothing are closed too: a prediction for one now is late.
        passed = (watermark - self.grace_ms) // self.window_ms * self.window_ms
        self._closed_before = max(self._closed_before or passed, passed)
        horizon = self._closed_before - RETAIN_WINDOWS * self.window_ms
        keep = []
        for start, sids in self._retired:
            if start < horizon:
                for sid in sids:
                    self._put(f"r:{sid}", None)
            else:
                keep.append((start, sids))
        self._retired = keep
        return out

    def provisional(self, watermark: int) -> list[KpiSnapshot]:
        """Global and line snapshots of every window that *ended* at or before ``watermark``
        and was not reported yet: the label-free estimate at once, long before the labels
        (the final snapshot at close replaces it)."""
        out: list[KpiSnapshot] = []
        for start in sorted(self._windows):
            if start + self.window_ms > watermark:
                break
            if self._provisioned is not None and start <= self._provisioned:
                continue
            self._provisioned = start
            out += self._snapshots(self._windows[start], scopes=("global", "line"))
        return out

    def _record(self, pred: Prediction, start: int) -> _Record:
        fused, fused_conf = _argmax(pred.classes, pred.fused_probs)
        labels, conf = {}, {}
        for m, probs in pred.modality_probs.items():
            labels[m], conf[m] = _argmax(pred.classes, probs)
        ume = None
        if pred.modality_probs:
            k = len(pred.modality_probs)
            mean = tuple(sum(p[i] for p in pred.modality_probs.values()) / k for i in range(len(pred.classes)))
            ume = _argmax(pred.classes, mean)[0]
        flat = [m for m, std in pred.signal_std.items() if std <= self.flat_std.get(m, 0.0)]
        stuck = []
        for m, digest in pred.digest.items():
            key = f"{pred.asset_id}|{m}"
            if self._last_digest.get(key) == digest:
                stuck.append(m)
            self._last_digest[key] = digest
        return _Record(
            start, pred.asset_id, pred.line_id, fused, fused_conf, ume, labels, conf, dict(pred.entropy),
            dict(pred.contributions), list(pred.missing), list(pred.masked), flat, stuck, dict(pred.skew_ms),
            pred.latency_ms, self._pending.pop(pred.sample_id, None),
            self.estimator(pred) if self.estimator is not None else {}, pred.ts_ms,
            sensors_of(pred), dict(pred.signal_std),
        )

    def _snapshots(self, window: _Window, scopes: tuple[str, ...] = ("global", "line", "asset")) -> list[KpiSnapshot]:
        groups: dict[tuple[str, str], list[_Record]] = {}
        for r in window.records.values():
            for key in (("global", ""), ("line", r.line_id), ("asset", r.asset_id)):
                if key[0] in scopes:
                    groups.setdefault(key, []).append(r)
        out = []
        end = window.start + self.window_ms
        for (scope, scope_id), recs in sorted(groups.items()):
            modalities = sorted({m for r in recs for m in (*r.labels, *r.missing)})
            for m in (FUSED, *modalities, UME):
                out.append(_snapshot(scope, scope_id, m, window.start, end, recs, self.flagged))
        return out


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _snapshot(scope: str, scope_id: str, m: str, start: int, end: int, recs: list[_Record],
              flagged: Flagged | None = None) -> KpiSnapshot:
    unit = m not in (FUSED, UME)
    pairs = _answers(m, recs)
    n = len(pairs)
    # A flat or frozen reading is its sensor's fault (a sensor_fault, per reading), not its
    # model's: a modality's accuracy and its estimate leave such readings out.
    live = [(pred, c, r) for pred, c, r in pairs if not unit or r.live(m)]
    labelled = [(pred, r.truth) for pred, _, r in live if r.truth is not None]
    computed = [r for _, _, r in pairs]
    in_fusion = [r for r in computed if m not in r.masked]
    ref = _best_reference(recs) if m == FUSED else {}
    est = [r.est[m][1] if flagged is not None and r.est[m][1] is not None and flagged(r.line_id, m, r.ts)
           else r.est[m][0] for _, _, r in live if m in r.est and r.est[m][0] is not None]
    return KpiSnapshot(
        scope=scope,
        scope_id=scope_id,
        modality=m,
        window_start_ms=start,
        window_end_ms=end,
        n=n,
        **_accuracy(labelled),
        agreement=(sum(p == r.fused for p, _, r in pairs) / n) if n and m != FUSED else None,
        mean_confidence=_mean([c for _, c, _ in pairs if c is not None]),
        mean_entropy=_mean([r.entropy[m] for r in computed if m in r.entropy]) if unit else None,
        mean_contribution=_mean([r.contributions.get(m, 0.0) for r in in_fusion]) if unit else None,
        dominance=_mean([float(d) for d in _dominant(m, computed)]) if unit else None,
        **_sensor_health(m, recs, computed, unit),
        mean_latency_ms=_mean([r.latency_ms for r in recs]) if m == FUSED else None,
        est_accuracy=_mean(est),
        est_n=len(est),
        **ref,
    )


def _answers(m: str, recs: list[_Record]) -> list[tuple[str, float | None, _Record]]:
    """(answer, confidence, record) of unit ``m`` (a modality, ``fused`` or ``ume``) in each record it answered."""
    if m == FUSED:
        return [(r.fused, r.fused_conf, r) for r in recs]
    if m == UME:
        return [(r.ume, None, r) for r in recs if r.ume is not None]
    return [(r.labels[m], r.conf[m], r) for r in recs if m in r.labels]


def _accuracy(labelled: list[tuple[str, str]]) -> dict[str, Any]:
    """The labelled KPIs of (answer, truth) pairs."""
    correct = sum(p == t for p, t in labelled)
    low, high = wilson_interval(correct, len(labelled)) if labelled else (None, None)
    return dict(
        n_labelled=len(labelled),
        n_correct=correct,
        n_truth_classes=len({t for _, t in labelled}),
        truth_counts=_counts(t for _, t in labelled),
        n_right_classes=len({t for p, t in labelled if p == t}),
        accuracy=correct / len(labelled) if labelled else None,
        accuracy_low=low,
        accuracy_high=high,
        macro_f1=macro_f1([t for _, t in labelled], [p for p, _ in labelled]) if labelled else None,
    )


def _dominant(m: str, computed: list[_Record]) -> list[bool]:
    """Dominance index: the fused label follows this modality while another present one disagrees."""
    return [r.labels[m] == r.fused and any(lbl != r.fused for o, lbl in r.labels.items() if o != m)
            for r in computed]


def _sensor_health(m: str, recs: list[_Record], computed: list[_Record], unit: bool) -> dict[str, Any]:
    """Missing, masked, flat, frozen and skewed readings of modality ``m`` (zeros for ``fused`` and ``ume``)."""
    skews = [abs(r.skew_ms[m]) for r in computed if unit and m in r.skew_ms]
    return dict(
        missing_rate=sum(m in r.missing for r in recs) / len(recs) if unit else 0.0,
        masked_rate=sum(m in r.masked for r in recs) / len(recs) if unit else 0.0,
        n_flat=sum(m in r.flat for r in computed) if unit else 0,
        n_stuck=sum(m in r.stuck for r in computed) if unit else 0,
        n_missing=sum(m in r.missing for r in recs) if unit else 0,
        mean_abs_skew_ms=_mean(skews),
    )


def _best_reference(recs: list[_Record]) -> dict[str, Any]:
    """Paired counts of the fused label against the best single modality or UME, each
    on the labelled samples it has an answer for (for the fusion-regression test)."""
    best: dict[str, Any] = {}
    for ref in sorted({m for r in recs for m in r.labels} | {UME}):
        pairs = [(r.fused == r.truth, (r.ume if ref == UME else r.labels[ref]) == r.truth) for r in recs
                 if r.truth is not None and (r.ume is not None if ref == UME else ref in r.labels)]
        if not pairs:
            continue
        ref_correct = sum(b for _, b in pairs)
        if not best or ref_correct / len(pairs) > best["ref_correct"] / best["ref_n"]:
            best = {"ref_modality": ref, "ref_n": len(pairs), "ref_correct": ref_correct,
                    "ref_fused_correct": sum(a for a, _ in pairs), "ref_discordant": sum(a != b for a, b in pairs)}
    return best


def _counts(values: Iterable[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return dict(sorted(out.items()))
