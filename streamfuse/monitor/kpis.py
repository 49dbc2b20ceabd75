"""Rolling per-modality KPIs over event-time windows, with the late-label join.

Pure logic: plain values and event timestamps in, :class:`KpiSnapshot` values out. A
window ``[start, start + window_ms)`` closes once the watermark (the largest prediction
event time seen) passes its end plus ``grace_ms``, the time it waits for late labels.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from streamfuse.events import KpiSnapshot, Label, Prediction
from streamfuse.monitor.stats import macro_f1, wilson_interval

FUSED = "fused"
UME = "ume"  # the Uni-Modal Ensemble recomputed from per-modality probabilities


@dataclass
class _Record:
    asset_id: str
    line_id: str
    fused: str
    fused_conf: float
    ume: str | None
    labels: dict[str, str]  # modality -> its own argmax label (computed modalities only)
    conf: dict[str, float]
    contributions: dict[str, float]
    missing: tuple[str, ...]
    masked: tuple[str, ...]
    latency_ms: float
    truth: str | None = None


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

    def __init__(self, window_ms: int, grace_ms: int, max_pending_labels: int = 100_000) -> None:
        if window_ms <= 0 or grace_ms < 0 or max_pending_labels <= 0:
            raise ValueError("window_ms > 0, grace_ms >= 0 and max_pending_labels > 0 are required")
        self.window_ms = window_ms
        self.grace_ms = grace_ms
        self.max_pending_labels = max_pending_labels
        self.reset()

    def reset(self) -> None:
        self._windows: dict[int, _Window] = {}
        self._index: dict[str, int] = {}  # sample_id -> window start, open windows only
        self._pending: OrderedDict[str, str] = OrderedDict()
        self._closed_before = None  # windows starting before this are closed
        self.watermark: int | None = None
        self._source_max: dict[str, int] = {}
        self.late_predictions = 0
        self.late_labels = 0
        self.evicted_labels = 0
        self.duplicates = 0

    @property
    def pending_labels(self) -> int:
        return len(self._pending)

    def add_label(self, label: Label) -> None:
        start = self._index.get(label.sample_id)
        if start is not None:
            self._windows[start].records[label.sample_id].truth = label.label
            return
        if self._closed_before is not None and label.ts_ms < self._closed_before:
            self.late_labels += 1  # its window already closed
            return
        self._pending[label.sample_id] = label.label
        if len(self._pending) > self.max_pending_labels:
            self._pending.popitem(last=False)
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
            window = self._windows.setdefault(start, _Window(start))
            window.records[pred.sample_id] = self._record(pred)
            self._index[pred.sample_id] = start
        self._source_max[source] = max(self._source_max.get(source, pred.ts_ms), pred.ts_ms)
        self.watermark = min(self._source_max.values())
        return self.advance(self.watermark)

    def advance(self, watermark: int) -> list[KpiSnapshot]:
        """Close every window whose end + grace is at or before ``watermark``."""
        out: list[KpiSnapshot] = []
        for start in sorted(self._windows):
            if start + self.window_ms + self.grace_ms > watermark:
                break
            window = self._windows.pop(start)
            for sid in window.records:
                self._index.pop(sid, None)
            self._closed_before = start + self.window_ms
            out.extend(self._snapshots(window))
        # Windows that got nothing are closed too: a prediction for one now is late.
        passed = (watermark - self.grace_ms) // self.window_ms * self.window_ms
        self._closed_before = max(self._closed_before or passed, passed)
        return out

    def _record(self, pred: Prediction) -> _Record:
        fused, fused_conf = _argmax(pred.classes, pred.fused_probs)
        labels, conf = {}, {}
        for m, probs in pred.modality_probs.items():
            labels[m], conf[m] = _argmax(pred.classes, probs)
        ume = None
        if pred.modality_probs:
            k = len(pred.modality_probs)
            mean = tuple(sum(p[i] for p in pred.modality_probs.values()) / k for i in range(len(pred.classes)))
            ume = _argmax(pred.classes, mean)[0]
        return _Record(
            pred.asset_id, pred.line_id, fused, fused_conf, ume, labels, conf, dict(pred.contributions),
            pred.missing, pred.masked, pred.latency_ms, self._pending.pop(pred.sample_id, None),
        )

    def _snapshots(self, window: _Window) -> list[KpiSnapshot]:
        groups: dict[tuple[str, str], list[_Record]] = {}
        for r in window.records.values():
            for key in (("global", ""), ("line", r.line_id), ("asset", r.asset_id)):
                groups.setdefault(key, []).append(r)
        out = []
        end = window.start + self.window_ms
        for (scope, scope_id), recs in sorted(groups.items()):
            modalities = sorted({m for r in recs for m in (*r.labels, *r.missing)})
            for m in (FUSED, *modalities, UME):
                out.append(_snapshot(scope, scope_id, m, window.start, end, recs))
        return out


def _snapshot(scope: str, scope_id: str, m: str, start: int, end: int, recs: list[_Record]) -> KpiSnapshot:
    if m == FUSED:
        pairs = [(r.fused, r.fused, r.fused_conf, r) for r in recs]
    elif m == UME:
        pairs = [(r.ume, r.fused, None, r) for r in recs if r.ume is not None]
    else:
        pairs = [(r.labels[m], r.fused, r.conf[m], r) for r in recs if m in r.labels]
    n = len(pairs)
    labelled = [(pred, r.truth) for pred, _, _, r in pairs if r.truth is not None]
    correct = sum(p == t for p, t in labelled)
    low, high = wilson_interval(correct, len(labelled)) if labelled else (None, None)
    confs = [c for _, _, c, _ in pairs if c is not None]
    lat = [r.latency_ms for r in recs]
    in_fusion = [r for _, _, _, r in pairs if m not in r.masked]
    contrib = [r.contributions.get(m, 0.0) for r in in_fusion] if m not in (FUSED, UME) else []
    return KpiSnapshot(
        scope=scope,
        scope_id=scope_id,
        modality=m,
        window_start_ms=start,
        window_end_ms=end,
        n=n,
        n_labelled=len(labelled),
        accuracy=correct / len(labelled) if labelled else None,
        accuracy_low=low,
        accuracy_high=high,
        macro_f1=macro_f1([t for _, t in labelled], [p for p, _ in labelled]) if labelled else None,
        agreement=(sum(p == f for p, f, _, _ in pairs) / n) if n and m != FUSED else None,
        mean_confidence=sum(confs) / len(confs) if confs else None,
        mean_contribution=sum(contrib) / len(contrib) if contrib else None,
        missing_rate=sum(m in r.missing for r in recs) / len(recs) if m not in (FUSED, UME) else 0.0,
        masked_rate=sum(m in r.masked for r in recs) / len(recs) if m not in (FUSED, UME) else 0.0,
        mean_latency_ms=sum(lat) / len(lat) if lat and m == FUSED else None,
    )
