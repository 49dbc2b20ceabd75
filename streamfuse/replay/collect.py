"""Reads a replay's outputs: :class:`streamfuse.demo.Observer` plus what the replay needs
to pace itself (which samples are resolved, which windows the monitor closed, every
prediction for its shadow of the monitor) and compact prediction rows for the evaluation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from streamfuse.demo import Observer
from streamfuse.errors import InvalidEvent
from streamfuse.events import Ack, Alert, Command, DeadLetter, KpiSnapshot, Prediction, decode

BARRIER_WORKER = "replay-barrier"  # worker id of the replay's own barrier acks (not a worker)
FLUSH_PREFIX = "replay-flush:"  # sample ids of the end-of-recording flush samples


@dataclass(frozen=True, slots=True)
class Row:
    """What the evaluation needs of one prediction."""

    sample_id: str
    asset_id: str
    line_id: str
    ts_ms: int
    fused: str
    labels: dict[str, str]  # modality -> its own argmax
    contributions: dict[str, float]
    masked: tuple[str, ...]
    missing: tuple[str, ...]
    fusion_mode: str
    versions: dict[str, str]


def row_of(p: Prediction) -> Row:
    labels = {m: p.classes[max(range(len(v)), key=v.__getitem__)] for m, v in p.modality_probs.items()}
    return Row(p.sample_id, p.asset_id, p.line_id, p.ts_ms, p.fused_label, labels, dict(p.contributions),
               tuple(p.masked), tuple(p.missing), p.fusion_mode, dict(p.versions))


class _Tee:
    """A consumer whose polled records also go to ``sink``."""

    def __init__(self, consumer, sink) -> None:
        self._consumer, self._sink = consumer, sink

    def poll(self, *args, **kwargs):
        out = self._consumer.poll(*args, **kwargs)
        self._sink(out)
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._consumer, name)


class Collector(Observer):
    """An :class:`~streamfuse.demo.Observer` of the replay namespace that also keeps:

    * ``rows``: one :class:`Row` per predicted sample (flush samples excluded);
    * ``dead_at``: ``(partition, offset) -> reason`` of the worker's dead letters for
      the samples topic (a sample that will never get a prediction is resolved by them);
    * ``part_max``: the largest prediction event time per predictions partition;
    * ``closed``: KPI windows whose global snapshot the monitor published;
    * the typed alerts, commands and acks (barrier acks left out).

    ``on_prediction(prediction, partition)`` is called for each prediction in the order
    read (the replay's shadow of the monitor).
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        self.consumer = _Tee(self.consumer, self._see)
        self.on_prediction = None
        self.rows: dict[str, Row] = {}
        self.dead_at: dict[tuple[int, int], str] = {}
        self.part_max: dict[int, int] = {}
        self.closed: set[int] = set()
        self.estimates: list[tuple[str, float | None, float | None, int]] = []  # (unit, est, labelled, n)
        self.alert_events: list[Alert] = []
        self.command_events: list[Command] = []
        self.ack_events: list[Ack] = []

    def poll(self, timeout_ms: int = 200) -> None:
        super().poll(timeout_ms)
        self.predictions.clear()  # rows keep what is needed; full predictions would grow without bound
        self.acks = [a for a in self.acks if a["worker_id"] != BARRIER_WORKER]

    def _see(self, polled) -> None:
        samples_topic = f"{self.settings.topic_prefix}samples"
        for msgs in polled.values():
            for msg in msgs:
                try:
                    ev = decode(msg.value, check_payloads=False)
                except InvalidEvent:
                    continue  # the Observer counts it; nothing here to pace by
                if isinstance(ev, Prediction):
                    self.part_max[msg.partition] = max(self.part_max.get(msg.partition, ev.ts_ms), ev.ts_ms)
                    if self.on_prediction is not None:
                        self.on_prediction(ev, msg.partition)
                    if not ev.sample_id.startswith(FLUSH_PREFIX):
                        self.rows[ev.sample_id] = row_of(ev)
                elif isinstance(ev, DeadLetter):
                    if ev.component == "worker" and ev.source_topic == samples_topic:
                        self.dead_at.setdefault((ev.partition, ev.offset), ev.reason)
                elif isinstance(ev, KpiSnapshot):
                    if ev.scope == "global" and ev.modality == "fused":
                        self.closed.add(ev.window_start_ms)
                    if ev.scope != "asset":  # label-free estimate vs labelled accuracy, per window
                        self.estimates.append((ev.modality, ev.est_accuracy, ev.accuracy, ev.n_labelled))
                elif isinstance(ev, Alert):
                    self.alert_events.append(ev)
                elif isinstance(ev, Command):
                    self.command_events.append(ev)
                elif isinstance(ev, Ack) and ev.worker_id != BARRIER_WORKER:
                    self.ack_events.append(ev)
