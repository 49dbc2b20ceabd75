"""Sequential detection on per-sample, label-free evidence, under one false-alarm budget.

Each prediction gives every computed modality one evidence value: the log-likelihood
ratio of its agreement category, broken vs healthy (:mod:`streamfuse.monitor.evidence`,
calibrated on the validation split), plus that of its reading's signal spread against the
split's healthy range (:mod:`streamfuse.monitor.spread`: a fogged camera stuck on the
class its machine is in agrees, but its picture is out of range). Page's CUSUM (:class:`Cusum`) adds them up per
(scope, modality) and raises the alarm at a threshold ``h``.

**The budget.** For a CUSUM of exact log-likelihood ratios the mean time between false
alarms on healthy data is at least ``e^h`` samples (Lorden, 1971). With ``D`` detectors,
detector ``d`` seeing ``r_d`` samples a second and a budget of ``B`` false alarms a day
for the whole monitor (``STREAMFUSE_MONITOR__FALSE_ALARMS_PER_DAY``), each detector gets
``B / D`` (Bonferroni) and so ``h_d = ln(D · r_d · 86400 / B)``
(:func:`budget_threshold`). Nobody tunes a per-window threshold.

**Fleet and line at once.** The fleet detector pools the evidence of every line, so a
fault on every line crosses its threshold ``L`` times sooner than one line alone. When
it fires, every line whose own statistic already holds ``ln(L / α)`` nats of evidence
(α = ``attribution_alpha``) is alerted at the same moment (attribution: conditional on a
fleet alarm, which the budget already pays for). A line also fires on its own
threshold, for a fault on one line only. While a fleet alarm lasts and its modality is
stuck on one answer, a line's statistic counts only what tells that fault apart: that
answer against the others (up) and agreement in other answers (down).

**Deterministic order.** Evidence is buffered and consumed in event-time steps of
``step_ms``: when the watermark passes ``T``, every buffered sample with ``ts < T`` is
processed in ``(ts, sample_id)`` order. So a replay that advances in the same steps
decides exactly the same, whatever the arrival order across partitions.

Pure logic: no I/O, no clock.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from streamfuse.errors import ConfigError
from streamfuse.monitor.base import _check_range
from streamfuse.monitor.cusum import Cusum, budget_threshold, check_budget

__all__ = ["Cusum", "SeqKey", "SequentialDetection", "Transition", "budget_threshold", "check_budget"]
MAX_EPISODES = 20  # alarm episodes kept per detector (for the estimate of past windows)


@dataclass(frozen=True, order=True)
class SeqKey:
    """One sequential detector: a modality in a scope (``global`` with id ``""``, or a line)."""

    scope: str
    scope_id: str
    modality: str

    def to_list(self) -> list[str]:
        return [self.scope, self.scope_id, self.modality]


@dataclass(frozen=True)
class Transition:
    """A sequential detector fired or resolved at event time ``at_ms``."""

    key: SeqKey
    firing: bool
    at_ms: int
    statistic: float
    threshold: float
    attributed: bool = False


@dataclass
class _Rate:
    n: int = 0
    first_ms: int = 0
    last_ms: int = 0

    def add(self, ts: int) -> None:
        if self.n == 0:
            self.first_ms = ts
        self.n += 1
        self.last_ms = max(self.last_ms, ts)

    def per_s(self, step_ms: int) -> float:
        return self.n / max(1.0, (self.last_ms - self.first_ms + step_ms) / 1000)


class SequentialDetection:
    """Per (scope, modality) CUSUMs on per-sample evidence, pooled fleet-wide with
    per-line attribution (see the module docstring).

    Args:
        false_alarms_per_day: the budget of the whole monitor.
        step_ms: event-time step in which evidence is consumed (and decisions made).
        attribution_alpha: error level of attributing a fleet alarm to a line.
        modalities_hint: how many modalities count toward ``D`` before they are seen.
        evidence: ``(labels, confidences) -> {modality: LLR}`` of one sample (the
            calibration's, see :func:`streamfuse.monitor.evidence.sample_evidence`).
        spread: ``{modality: signal spread} -> {modality: LLR}`` of one sample's readings
            (see :func:`streamfuse.monitor.spread.spread_evidence`), added to the above; it
            needs no partner, so it counts in samples with fewer than ``min_answers`` too.
        measured_broken: ``(line, modality) -> bool``: judged broken by other means there
            (its labelled accuracy); left out of the others' evidence like a firing one.
        min_answers: a sample with fewer answers is no evidence (the monitor uses 3: when
            only two answers are left, a disagreement cannot say which of them is wrong).

    A modality already judged broken on a line (or fleet-wide) is left out of the others'
    evidence there: a fogged camera must not make the microphone look like the odd one out.
    While it is judged broken, agreeing with the others in the answer it has given at least
    half the time since is not evidence that it recovered: a fogged camera that always says
    "imbalance" agrees whenever the machine is imbalanced (the machine's state persists, so
    such runs are long); recovery is shown by agreeing on the other answers.

    Examples:
        >>> def evidence(labels, conf):                # toy: "fog" is the broken answer
        ...     return {m: 2.5 if y == "fog" else -0.9 for m, y in labels.items()}
        >>> seq = SequentialDetection(false_alarms_per_day=1.0, step_ms=1000, evidence=evidence)
        >>> for i in range(80):                       # 2 lines, 8 samples/s, image broken from 5 s
        ...     t = i * 125
        ...     seq.add(t, f"s{i}", f"line-{i % 2}", {"image": "fog" if t >= 5000 else "ok", "audio": "ok"}, {})
        >>> [(x.key.scope, x.key.scope_id, x.at_ms, x.attributed) for x in seq.advance(10_000)]
        [('line', 'line-0', 6000, True), ('line', 'line-1', 6000, True), ('global', '', 6000, False)]
    """

    def __init__(self, false_alarms_per_day: float = 1.0, step_ms: int = 1000, attribution_alpha: float = 0.01,
                 modalities_hint: int = 3, evidence: Callable[[dict, dict], dict[str, float]] | None = None,
                 min_answers: int = 2, measured_broken: Callable[[str, str], bool] | None = None,
                 spread: Callable[[dict[str, float]], dict[str, float]] | None = None) -> None:
        self.false_alarms_per_day = check_budget(false_alarms_per_day)
        if isinstance(step_ms, bool) or not isinstance(step_ms, int) or step_ms < 1:
            raise ConfigError(f"step_ms must be an integer >= 1, got {step_ms!r}")
        _check_range("attribution_alpha", attribution_alpha, 0.0, 1.0, low_open=True, high_open=True)
        self.step_ms = step_ms
        self.attribution_alpha = attribution_alpha
        self.modalities_hint = modalities_hint
        self.min_answers = max(2, min_answers)
        self.measured_broken = measured_broken or (lambda line_id, modality: False)
        self.evidence = evidence or (lambda labels, conf: {})
        self.spread = spread or (lambda values: {})
        self.reset()

    def reset(self) -> None:
        self._det: dict[SeqKey, Cusum] = {}
        self._reported: dict[SeqKey, bool] = {}  # firing state as of the last tick
        self._zero_at: dict[SeqKey, int] = {}  # last sample time the statistic was 0 (change-point estimate)
        self._episodes: dict[SeqKey, list[list[int | None]]] = {}  # [change point, resolved at | None]
        self._rates: dict[tuple[str, str], _Rate] = {}
        self._buffer: dict[str, tuple[int, str, dict[str, str], dict[str, float], dict[str, float]]] = {}
        # sample id -> (ts, line, labels, confidences, signal spreads)
        self._next_tick: int | None = None
        self._answers: dict[SeqKey, dict[str, int]] = {}  # firing detector -> its modality's answers since
        self._out: dict[SeqKey, list[int]] = {}  # firing detector -> [readings out of range, judged] since
        self._vetoed: set[SeqKey] = set()  # lines the labels cleared: no attribution until the fleet resolves

    # ------------------------------------------------------------------ input

    def add(self, ts_ms: int, sample_id: str, line_id: str, labels: dict[str, str], conf: dict[str, float],
            spread: dict[str, float] | None = None) -> None:
        """Buffer one sample's answers (modality -> label, confidence) and its readings'
        signal spreads; :meth:`advance` consumes them."""
        spread = {m: v for m, v in (spread or {}).items() if m in labels}
        if sample_id in self._buffer or (len(labels) < self.min_answers and not self.spread(spread)):
            return
        self._buffer[sample_id] = (int(ts_ms), line_id, dict(labels), dict(conf), spread)
        if self._next_tick is None:
            self._next_tick = (int(ts_ms) // self.step_ms + 1) * self.step_ms

    def recover(self, samples: list[tuple]) -> int:
        """After a restore from a checkpoint older than the predictions it has records of:
        buffer each ``(ts, sample id, line, labels, confidences, spreads)`` that the checkpoint had not
        seen (at or after its position, not buffered), so their evidence is not lost.
        Returns how many were buffered."""
        position = None if self._next_tick is None else self._next_tick - self.step_ms
        n = 0
        for ts, sid, line, labels, conf, *spread in sorted(samples, key=lambda s: (s[0], s[1])):
            if (position is None or ts >= position) and sid not in self._buffer:
                before = len(self._buffer)
                self.add(ts, sid, line, labels, conf, *spread)
                n += len(self._buffer) - before
        return n

    def advance(self, watermark: int) -> list[Transition]:
        """Consume the evidence of every step whose end the watermark passed."""
        out: list[Transition] = []
        while self._next_tick is not None and self._next_tick <= watermark:
            tick = self._next_tick
            due = sorted((entry[0], sid) for sid, entry in self._buffer.items() if entry[0] < tick)
            for ts, sid in due:
                self._consume(ts, *self._buffer.pop(sid)[1:])
            out += self._decide(tick)
            self._next_tick = tick + self.step_ms
        return out

    @property
    def detectors(self) -> dict[SeqKey, Cusum]:
        return dict(self._det)

    def firing(self, scope: str, scope_id: str, modality: str) -> bool:
        det = self._det.get(SeqKey(scope, scope_id, modality))
        return det is not None and det.firing

    # ------------------------------------------------------------------ decisions

    def _cusum(self, key: SeqKey) -> Cusum:
        det = self._det.get(key)
        if det is None:
            det = self._det[key] = Cusum(threshold=1.0)
        return det

    def _llr(self, line_id: str, labels: dict[str, str], conf: dict[str, float],
             own: dict[str, float]) -> dict[str, float]:
        """modality -> evidence of one sample: its answer's (with enough partners) plus its
        reading's (``own``, from :attr:`spread`)."""
        out = self._agreement(line_id, labels, conf) if len(labels) >= self.min_answers else {}
        for m, value in own.items():
            out[m] = out.get(m, 0.0) + value
        return out

    def _agreement(self, line_id: str, labels: dict[str, str], conf: dict[str, float]) -> dict[str, float]:
        broken = {m for m in labels if self.firing("line", line_id, m) or self.firing("global", "", m)
                  or self.measured_broken(line_id, m)}
        if not broken:
            return self.evidence(labels, conf)
        out = {}
        healthy = [o for o in labels if o not in broken]
        for m in labels:  # each judged against the modalities not known to be broken
            if m not in broken and len(healthy) < 3:
                continue  # one partner left: a disagreement cannot say which of the two is at fault
            value = self.evidence({o: y for o, y in labels.items() if o == m or o not in broken}, conf).get(m)
            if value is not None:
                out[m] = value
        return out

    def _consume(self, ts: int, line_id: str, labels: dict[str, str], conf: dict[str, float],
                 spread: dict[str, float]) -> None:
        self._rates.setdefault(("global", ""), _Rate()).add(ts)
        self._rates.setdefault(("line", line_id), _Rate()).add(ts)
        own = self.spread(spread)
        for m, value in sorted(self._llr(line_id, labels, conf, own).items()):
            fleet = SeqKey("global", "", m)
            for key in (fleet, SeqKey("line", line_id, m)):
                det = self._cusum(key)
                if key.scope == "line" and not det.firing and self._unrelated(fleet, labels[m], value):
                    continue
                if det.firing:
                    if m in own:  # [readings out of range, readings judged] since it fired
                        counts = self._out.setdefault(key, [0, 0])
                        counts[0] += own[m] > 0
                        counts[1] += 1
                    answers = self._answers.setdefault(key, {})
                    if value < 0 and self._stuck_on(answers) == labels[m]:
                        answers[labels[m]] += 1
                        continue  # agreeing by coincidence: the machine is in the state it is stuck on
                    answers[labels[m]] = answers.get(labels[m], 0) + 1
                det.threshold = self.threshold(key)
                det.update(value)
                if not det.firing:
                    self._answers.pop(key, None)
                    self._out.pop(key, None)
                    if det.statistic == 0.0:
                        self._zero_at[key] = ts

    def _unrelated(self, fleet: SeqKey, answer: str, value: float) -> bool:
        """Whether a sample says nothing about a line having the fault of its modality's
        firing fleet alarm, which is stuck on one answer ``y``: agreeing in ``y`` happens
        whether the line's model is stuck or right (the machine is in state ``y``), and a
        disagreement in another answer is not that fault. Counting them would hide the
        fault on a line whose machine sits in ``y`` (and attribute it to a healthy line
        whose model errs there), so the line's statistic skips them while the fleet fires."""
        if not self.firing(fleet.scope, fleet.scope_id, fleet.modality):
            return False
        stuck = self._stuck_on(self._answers.get(fleet, {}))
        return stuck is not None and (value < 0) == (answer == stuck)

    @staticmethod
    def _stuck_on(answers: dict[str, int]) -> str | None:
        """The answer a firing modality gave at least half the time since it fired, if any."""
        total = sum(answers.values())
        if not total:
            return None
        label, n = max(sorted(answers.items()), key=lambda kv: kv[1])
        return label if 2 * n >= total else None

    def out_of_range(self, key: SeqKey) -> bool:
        """Whether at least half of a firing detector's readings since it fired were out of
        their spread range."""
        out, n = self._out.get(key, (0, 0))
        return n > 0 and 2 * out >= n

    def clear(self, key: SeqKey, at_ms: int) -> Transition | None:
        """Resolve a firing detector from outside (the labels showed the modality healthy
        there): both statistics restart from zero, and a line is not alerted again by
        attribution while the fleet alarm of that modality lasts (its own threshold still
        counts). None when it was not firing, or when its readings are out of range
        (:meth:`out_of_range`): right answers from a sensor whose picture is gone are the
        machine sitting in the class it is stuck on, not a recovery."""
        det = self._det.get(key)
        if det is None or not det.firing or self.out_of_range(key):
            return None
        out = Transition(key, False, at_ms, det.statistic, det.threshold)
        det.load_state_dict({"s": 0.0, "r": 0.0, "n": det.n, "firing": False})
        self._reported[key] = False
        if key.scope == "line":  # not attributed again while this fleet alarm lasts
            self._vetoed.add(key)
        self._answers.pop(key, None)
        self._out.pop(key, None)
        self._episode(key, False, at_ms)
        return out

    def threshold(self, key: SeqKey) -> float:
        """``h`` of one detector from the budget, the number of detectors and its rate."""
        lines = sum(1 for scope, _ in self._rates if scope == "line")
        modalities = max(self.modalities_hint, len({k.modality for k in self._det}))
        rate = self._rates.get((key.scope, key.scope_id))
        per_s = rate.per_s(self.step_ms) if rate is not None else 1.0
        return budget_threshold(self.false_alarms_per_day, modalities * (1 + lines), per_s)

    def _episode(self, key: SeqKey, firing: bool, tick: int) -> None:
        eps = self._episodes.setdefault(key, [])
        if firing:
            eps.append([min(self._zero_at.get(key, tick), tick), None])
            del eps[:-MAX_EPISODES]
        elif eps and eps[-1][1] is None:
            eps[-1][1] = tick

    def flagged(self, line_id: str, modality: str, ts: int) -> bool:
        """Whether ``modality`` was judged broken on ``line_id`` (or fleet-wide) at event time
        ``ts``: from the CUSUM's change-point estimate (its last zero) until it resolved."""
        if not self._episodes:
            return False
        for key in (SeqKey("line", line_id, modality), SeqKey("global", "", modality)):
            for start, end in self._episodes.get(key, ()):
                if start <= ts and (end is None or ts < end):
                    return True
        return False

    def attribution_threshold(self) -> float:
        lines = max(1, sum(1 for scope, _ in self._rates if scope == "line"))
        return math.log(lines / self.attribution_alpha)

    def _decide(self, tick: int) -> list[Transition]:
        # Decisions are taken (and reported) at the tick: compare with the last tick's state.
        changed = [k for k, d in sorted(self._det.items()) if d.firing != self._reported.get(k, False)]
        for k in changed:
            self._reported[k] = self._det[k].firing
            self._episode(k, self._det[k].firing, tick)
        lines_first: list[Transition] = []
        fleet: list[Transition] = []
        for k in changed:
            d = self._det[k]
            t = Transition(k, d.firing, tick, d.statistic, d.threshold)
            (fleet if k.scope == "global" else lines_first).append(t)
        # Attribution: a firing fleet detector alerts every line with enough evidence of its own.
        h_attr = self.attribution_threshold()
        for k, d in sorted(self._det.items()):
            if k.scope != "global":
                continue
            if not d.firing:
                self._vetoed -= {v for v in self._vetoed if v.modality == k.modality}
                continue
            for lk, ld in sorted(self._det.items()):
                if (lk.scope == "line" and lk.modality == k.modality and not ld.firing and ld.statistic >= h_attr
                        and lk not in self._vetoed):
                    ld.fire()
                    self._reported[lk] = True
                    self._episode(lk, True, tick)
                    lines_first.append(Transition(lk, True, tick, ld.statistic, h_attr, attributed=True))
        return lines_first + fleet

    # ------------------------------------------------------------------ persistence

    def state_dict(self) -> dict[str, Any]:
        return {
            "detectors": [[*k.to_list(), d.state_dict()] for k, d in sorted(self._det.items())],
            "rates": [[s, i, r.n, r.first_ms, r.last_ms] for (s, i), r in sorted(self._rates.items())],
            "buffer": [[sid, *entry] for sid, entry in sorted(self._buffer.items())],
            "next_tick": self._next_tick,
            "zero_at": [[*k.to_list(), t] for k, t in sorted(self._zero_at.items())],
            "episodes": [[*k.to_list(), eps] for k, eps in sorted(self._episodes.items())],
            "answers": [[*k.to_list(), dict(a)] for k, a in sorted(self._answers.items())],
            "out_of_range": [[*k.to_list(), list(c)] for k, c in sorted(self._out.items())],
            "vetoed": [k.to_list() for k in sorted(self._vetoed)],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reset()
        for scope, scope_id, m, st in state.get("detectors", []):
            det = self._cusum(SeqKey(scope, scope_id, m))
            det.load_state_dict(st)
            self._reported[SeqKey(scope, scope_id, m)] = det.firing  # checkpoints are taken between ticks
        self._rates = {(s, i): _Rate(n, f, la) for s, i, n, f, la in state.get("rates", [])}
        self._buffer = {sid: (int(ts), line, dict(lab), dict(conf), dict(spread[0]) if spread else {})
                        for sid, ts, line, lab, conf, *spread in state.get("buffer", [])}
        self._next_tick = state.get("next_tick")
        self._zero_at = {SeqKey(a, b, c): int(t) for a, b, c, t in state.get("zero_at", [])}
        self._episodes = {SeqKey(a, b, c): [list(e) for e in eps] for a, b, c, eps in state.get("episodes", [])}
        self._answers = {SeqKey(a, b, c): {str(y): int(n) for y, n in ans.items()}
                         for a, b, c, ans in state.get("answers", [])}
        self._vetoed = {SeqKey(*k) for k in state.get("vetoed", [])}
        self._out = {SeqKey(a, b, c): [int(n) for n in counts] for a, b, c, counts in state.get("out_of_range", [])}
