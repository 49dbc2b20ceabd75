"""The monitor's logic in one pure object: predictions, labels and acks in; KPI
snapshots, alerts and commands out. The faust app only decodes, calls this and emits.

Label-free, per sample (:mod:`streamfuse.monitor.sequential`), when the bundle carries a
calibration: each modality's agreement with the others feeds a CUSUM per (fleet | line,
modality) under the one false-alarm budget; a firing one is a ``degradation`` alert
(label ``evidence=agreement``), decided in event-time steps of ``decision_step_ms``,
seconds after a fault starts and long before any label. Every window also carries the
label-free accuracy estimate (``est_accuracy``) beside the labelled one.

On closed KPI windows:

* ``upstream_outage`` (global): every asset quiet at once — the broker or a gateway;
  it holds back the per-sensor dropout alerts (and so their masks);
* ``sensor_fault`` per (asset, modality): flat or stuck signals, dropouts, clock skew —
  a broken sensor, not a broken model; it inhibits the degradation alert of that
  modality in every scope that contains the asset;
* ``degradation`` per (scope in ``detect_scopes``, modality): labelled accuracy below the
  bundle's stage-1 baseline with statistical confidence (inhibited while the label-free
  alert of the same scope is open: it confirms what is already known);
* ``drift`` (global, label-free): Page-Hinkley on each modality's confidence and
  agreement with the fused label;
* ``dominance`` (global): one modality's contribution share above a threshold while the
  others are healthy;
* ``fusion_regression`` (global): fused accuracy below the best single modality or UME;
* ``command_unacked``: a command some live worker did not acknowledge in time.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

from streamfuse.alerts.lifecycle import fingerprint
from streamfuse.config import MonitorSettings
from streamfuse.errors import ConfigError
from streamfuse.events import Ack, Alert, Command, KpiSnapshot, Label, Prediction
from streamfuse.monitor import detectors as d
from streamfuse.monitor.evidence import Calibration, sample_evidence
from streamfuse.monitor.kpis import FUSED, UME, KpiEngine, Sink
from streamfuse.monitor.policy import PolicyConfig, PolicyContext, RollbackPolicy
from streamfuse.monitor.sequential import SeqKey, SequentialDetection, Transition

log = logging.getLogger(__name__)

SCOPE_RANK = {"asset": 0, "line": 1, "global": 2}
SEVERITY = {"sensor_fault": "warning", "degradation": "critical", "drift": "warning", "dominance": "warning",
            "fusion_regression": "critical", "command_unacked": "critical", "action_suppressed": "warning",
            "upstream_outage": "critical"}
# Label-free blame needs a third opinion: with two answers that differ, nothing says which
# one is wrong (measured on a real two-modality dataset: attributing them anyway masked the
# healthy sensor under a confident fault, and cost fused accuracy). Bundles with two
# modalities rely on the labels and the per-reading sensor checks.
MIN_ANSWERS = 3
LLR_CACHE = 8192  # samples whose evidence is kept from the estimate for the sequential detector
AGREEMENT = {"evidence": "agreement"}  # the extra label of the label-free degradation alert
SENSOR_CHECKS = ("flatline", "stuck", "dropout")


@dataclass(frozen=True, order=True)
class DetKey:
    """One window detector: what it checks, where, and for which modality."""

    kind: str
    check: str  # flatline | stuck | dropout | clock_skew | a drift proxy | ""
    scope: str
    scope_id: str
    modality: str

    def to_list(self) -> list[str]:
        return [self.kind, self.check, self.scope, self.scope_id, self.modality]


@dataclass
class Episode:
    """An open alert: when it started, its labels, and what its firing message said."""

    start: int
    labels: dict[str, str]
    inhibited: bool
    line: str | None = None
    what: str = ""


@dataclass
class Outputs:
    kpis: list[KpiSnapshot] = field(default_factory=list)
    alerts: list[Alert] = field(default_factory=list)
    commands: list[Command] = field(default_factory=list)
    estimates: list[KpiSnapshot] = field(default_factory=list)  # provisional (label-free) global/line snapshots

    def extend(self, other: "Outputs") -> None:
        self.kpis += other.kpis
        self.alerts += other.alerts
        self.commands += other.commands
        self.estimates += other.estimates


def expected_accuracy(baseline: dict[str, Any], truth_counts: dict[str, int]) -> float:
    """The accuracy to expect of a window from its labelled samples' true classes: the
    mean of the unit's per-class validation recall (``baseline["recall"]``), else its Top-1.

    Examples:
        >>> base = {"top1": 0.83, "recall": {"normal": 0.99, "overheat": 0.51}}
        >>> expected_accuracy(base, {"overheat": 20}), expected_accuracy(base, {"normal": 10, "overheat": 10})
        (0.51, 0.75)
        >>> expected_accuracy(base, {}), expected_accuracy({"top1": 0.9}, {"normal": 3})
        (0.83, 0.9)
    """
    recall = baseline.get("recall") or {}
    n = sum(truth_counts.values())
    if not recall or not n:
        return baseline["top1"]
    return round(sum(c * recall.get(y, baseline["top1"]) for y, c in truth_counts.items()) / n, 6)


def _argmax_label(classes: tuple[str, ...], probs: tuple[float, ...]) -> str:
    return classes[max(range(len(probs)), key=probs.__getitem__)]


class MonitorCore:
    """Args:
        baselines: ``{modality: {"top1": ..., "macro_f1": ..., "calibration": {...}}}`` of
            the active models (``calibration``, optional, from the bundle's validation split).
        settings: windows, detector thresholds, budget, policy.
        sink: persistence of the KPI engine's records (see :mod:`streamfuse.monitor.kpis`).
    """

    def __init__(self, baselines: dict[str, dict[str, Any]], settings: MonitorSettings,
                 sink: Sink | None = None,
                 baselines_of: Callable[[dict[str, str]], dict[str, dict[str, Any]] | None] | None = None) -> None:
        self.settings = s = settings
        for m, b in baselines.items():
            if m != FUSED:
                self._check_baseline(m, b)
        self.baselines = {m: b for m, b in baselines.items() if m != FUSED}
        self.calibration = Calibration.from_baselines(baselines)
        self.baselines_of = baselines_of
        self._baseline_versions: dict[str, str] | None = None  # the unit versions the baselines belong to
        self._evidence: tuple[str, dict[str, tuple]] = ("", {})
        self._llr_cache: OrderedDict[tuple, dict[str, tuple]] = OrderedDict()  # (labels, conf) -> evidence
        self._catch_up = False  # evidence recovered from the KPI records at a restore, not judged yet
        estimator = self._estimate if self.calibration is not None else None
        self.kpis = KpiEngine(s.kpi_window_ms, s.label_grace_ms, s.max_pending_labels, s.flat_std, sink, estimator,
                              self._flagged if estimator is not None else None)
        self.policy = RollbackPolicy(PolicyConfig.from_settings(s))
        self.sequential = SequentialDetection(s.false_alarms_per_day, s.decision_step_ms, s.attribution_alpha,
                                              max(1, len(self.baselines)), self._llr,
                                              MIN_ANSWERS, self._measured_broken) \
            if self.calibration else None
        self._detectors: dict[DetKey, Any] = {}
        self._saved_detectors: dict[DetKey, dict[str, Any]] = {}  # restored state, applied when one is made
        self._episodes: dict[str, Episode] = {}  # fingerprint -> open episode
        self._versions: dict[str, str] = {}  # modality -> version seen in predictions
        self._version_changes: dict[str, tuple[str, str, int]] = {}
        self._workers: dict[str, int] = {}  # worker id -> last prediction event time
        self._lines: dict[str, str] = {}  # asset id -> line id
        self._pending: dict[str, dict[str, Any]] = {}  # command id -> {issued, expected, acked, alerted}

    # ------------------------------------------------------------------ inputs

    def on_label(self, label: Label) -> Outputs:
        self.kpis.add_label(label)
        return Outputs()

    def _check_baseline(self, modality: str, b: dict[str, Any]) -> None:
        if not self.settings.degradation_margin < b["top1"] <= 1.0:
            raise ConfigError(
                f"baseline top-1 {b['top1']:.3f} of modality {modality!r} leaves no room for the degradation "
                f"margin {self.settings.degradation_margin}: retrain the model or lower "
                "STREAMFUSE_MONITOR__DEGRADATION_MARGIN"
            )

    def _follow_versions(self, versions: dict[str, str]) -> None:
        """Baselines follow the models: when a prediction was served by other unit versions
        than the baselines belong to, take those versions' baselines (``baselines_of``,
        the registry's) — the degradation thresholds and the label-free calibration move
        with an activation, a rollback or a hot swap. The first prediction only says which
        versions the start-up baselines are; one ``baselines_of`` cannot answer (Redis
        down) is asked again on the next prediction."""
        if not versions or self._baseline_versions == versions:
            return
        if self._baseline_versions is None or self.baselines_of is None:
            self._baseline_versions = dict(versions)
            return
        fresh = self.baselines_of(dict(versions))
        if fresh is None:
            return
        self.set_baselines(fresh)
        self._baseline_versions = dict(versions)

    def set_baselines(self, baselines: dict[str, dict[str, Any]]) -> None:
        """Replace the baselines (and the calibration they carry) of the modalities given;
        live degradation detectors keep their state and take the new threshold. A baseline
        that leaves no room for the margin is refused for that modality (logged)."""
        for m, b in baselines.items():
            if m == FUSED or "top1" not in b:
                continue
            try:
                self._check_baseline(m, b)
            except ConfigError as exc:
                log.warning("%s; keeping the previous baseline of %s", exc, m)
                continue
            self.baselines[m] = b
            for key, det in self._detectors.items():
                if key.kind == "degradation" and key.modality == m:
                    det.baseline = b["top1"]
        calibration = Calibration.from_baselines(baselines)
        if calibration is not None:
            self.calibration = calibration
            self._evidence = ("", {})
            self._llr_cache.clear()

    def on_prediction(self, pred: Prediction, source: str = "") -> Outputs:
        self._follow_versions(pred.versions)
        for m, v in pred.versions.items():
            old = self._versions.get(m)
            if old is not None and old != v:
                self._version_changes[m] = (old, v, pred.ts_ms)
            self._versions[m] = v
        if pred.worker_id:
            self._workers[pred.worker_id] = pred.ts_ms
        self._lines[pred.asset_id] = pred.line_id
        seen = (self.kpis.duplicates, self.kpis.late_predictions)
        out = Outputs(kpis=self.kpis.add_prediction(pred, source))
        fresh = seen == (self.kpis.duplicates, self.kpis.late_predictions)
        if self._catch_up and self.sequential is not None:  # evidence recovered at a restore
            self._catch_up = False
            for t in self.sequential.advance(self.kpis.watermark or pred.ts_ms):
                self._on_sequential(out, t)
        self._detect(out)
        # A flat or frozen signal is the sensor's fault (judged per reading here and
        # reported per asset), not evidence about its model or the others.
        dead = self._dead_signals(pred, out) if fresh else set()
        if self.sequential is not None:
            if fresh:
                labels = {m: _argmax_label(pred.classes, p) for m, p in pred.modality_probs.items() if m not in dead}
                conf = {m: max(p) for m, p in pred.modality_probs.items() if m not in dead}
                self.sequential.add(pred.ts_ms, pred.sample_id, pred.line_id, labels, conf)
            for t in self.sequential.advance(self.kpis.watermark or pred.ts_ms):
                self._on_sequential(out, t)
            out.estimates = self.kpis.provisional(self.kpis.watermark or pred.ts_ms)
        return out

    def _dead_signals(self, pred: Prediction, out: Outputs) -> set[str]:
        """Modalities whose reading in ``pred`` is flat (std at or below ``flat_std``) or
        the same as the asset's previous one (a frozen sensor); each sensor's
        ``flatline`` / ``stuck`` fault is judged here, reading by reading
        (:class:`~streamfuse.monitor.detectors.RecentRate`), not per window."""
        s = self.settings
        rec = self.kpis.record(pred.sample_id)  # judged flat or frozen (restart-safe) when recorded
        flat, stuck = (set(rec.flat), set(rec.stuck)) if rec is not None else (set(), set())
        sensors = sorted(set(pred.signal_std) | set(pred.digest))
        for check, bad in (("flatline", flat), ("stuck", stuck)):
            for m in sensors:
                if check == "stuck" and m not in pred.digest:
                    continue
                det = self._detector(DetKey("sensor_fault", check, "asset", pred.asset_id, m),
                                     lambda: d.RecentRate(s.sensor_fault_readings, s.sensor_fault_rate))
                det.update(m in bad)
                if det.changed:
                    n = round(det.last * len(det.state_dict()["recent"]))
                    self._emit(out, "sensor_fault", "firing" if det.firing else "resolved", m, "asset",
                               pred.asset_id, pred.ts_ms, det.last, s.sensor_fault_rate,
                               f"{check}: {n} of the latest {s.sensor_fault_readings} readings", {"fault": check})
        return flat | stuck

    def on_ack(self, ack: Ack) -> None:
        p = self._pending.get(ack.command_id)
        if p is not None:
            p["acked"][ack.worker_id] = ack.status

    def tick(self, now_ms: int) -> Outputs:
        """Wall-clock housekeeping: alert on commands a live worker has not acked in time."""
        out = Outputs()
        for cid, p in list(self._pending.items()):
            missing = sorted(set(p["expected"]) - set(p["acked"]))
            if not missing:
                del self._pending[cid]
            elif now_ms - p["issued_wall"] >= self.settings.ack_timeout_ms and not p["alerted"]:
                p["alerted"] = True
                self._emit(out, "command_unacked", "firing", p["modality"] or "", "global", "",
                           self.kpis.watermark or 0, None, None, f"command {cid} not acknowledged by "
                           f"{', '.join(missing)}", {"command": cid}, decide=False)
        return out

    def issued(self, cmd: Command, now_ms: int) -> None:
        """The app published ``cmd`` at wall time ``now_ms``; expect acks from live workers."""
        live = [w for w, t in self._workers.items() if (self.kpis.watermark or t) - t <= 4 * self.settings.kpi_window_ms]
        self._pending[cmd.command_id] = {"issued_wall": now_ms, "expected": live, "acked": {},
                                         "alerted": False, "modality": cmd.modality}

    def open_alerts(self) -> list[str]:
        return sorted(fp for fp, e in self._episodes.items() if not e.inhibited)

    # ------------------------------------------------------------------ label-free evidence

    def _sample_evidence(self, pred: Prediction) -> dict[str, tuple]:
        """unit -> (P(right), LLR) of one sample; computed once per prediction."""
        if self._evidence[0] != pred.sample_id:
            labels = {m: _argmax_label(pred.classes, p) for m, p in pred.modality_probs.items()}
            conf = {m: max(p) for m, p in pred.modality_probs.items()}
            self._evidence = (pred.sample_id, sample_evidence(self.calibration, labels, pred.fused_label, conf))
            self._llr_cache[(tuple(sorted(labels.items())), tuple(sorted(conf.items())))] = self._evidence[1]
            if len(self._llr_cache) > LLR_CACHE:
                self._llr_cache.popitem(last=False)
        return self._evidence[1]

    def _estimate(self, pred: Prediction) -> dict[str, list]:
        return {u: [v[0], v[2]] for u, v in self._sample_evidence(pred).items() if v[0] is not None}

    def _llr(self, labels: dict[str, str], conf: dict[str, float]) -> dict[str, float]:
        key = (tuple(sorted(labels.items())), tuple(sorted(conf.items())))
        ev = self._llr_cache.get(key)  # computed with the estimate when nothing was left out
        if ev is None:
            ev = sample_evidence(self.calibration, labels, None, conf)
        return {m: v[1] for m, v in ev.items() if m != FUSED and v[1] is not None}

    def _flagged(self, line_id: str, unit: str, ts: int) -> bool:
        return self.sequential is not None and self.sequential.flagged(line_id, unit, ts)

    def _measured_broken(self, line_id: str, modality: str) -> bool:
        """An open labelled degradation of ``modality`` on ``line_id`` or fleet-wide."""
        for e in self._episodes.values():
            lab = e.labels
            if (lab["kind"] == "degradation" and "evidence" not in lab and lab["modality"] == modality
                    and (lab["scope"] == "global" or (lab["scope"] == "line" and lab["scope_id"] == line_id))):
                return True
        return False

    def _labels_overrule(self, out: Outputs, k: KpiSnapshot, det: Any) -> None:
        """The labels are the ground truth: a label-free alarm on a modality whose labelled
        accuracy met its expectation for ``resolve_windows`` windows in a row is resolved.
        (Two broken sensors stuck on the same answer can make a healthy third one look like
        the odd one out; its labels clear it.)"""
        if self.sequential is None or k.scope not in ("global", "line"):
            return
        good = det.state_dict()["good"]
        if det.firing or good < self.settings.resolve_windows:
            return
        episode = self._episodes.get(fingerprint({"kind": "degradation", "modality": k.modality, "scope": k.scope,
                                                  "scope_id": k.scope_id, **AGREEMENT}))
        streak_start = k.window_start_ms - (good - 1) * self.settings.kpi_window_ms
        if episode is None or streak_start < episode.start:
            return  # the good windows must all come after the alarm
        t = self.sequential.clear(SeqKey(k.scope, k.scope_id, k.modality), max(k.window_end_ms, self.kpis.watermark or 0))
        if t is not None:
            acc = "-" if k.accuracy is None else f"{k.accuracy:.2f}"
            self._on_sequential(out, t, f"labels show it healthy (accuracy {acc} in the last window)")

    def _on_sequential(self, out: Outputs, t: Transition, why: str = "") -> None:
        k = t.key
        how = "attributed from the fleet-wide evidence" if t.attributed else "label-free CUSUM"
        what = why or (f"disagrees with the other sensors: {t.statistic:.1f} >= {t.threshold:.1f} nats of evidence "
                       f"({how}, budget {self.settings.false_alarms_per_day:g} false alarms/day)")
        self._emit(out, "degradation", "firing" if t.firing else "resolved", k.modality, k.scope, k.scope_id,
                   t.at_ms, round(t.statistic, 3), round(t.threshold, 3), what, AGREEMENT)

    # ------------------------------------------------------------------ window detectors

    def _detector(self, key: DetKey, factory: Callable[[], Any]) -> Any:
        det = self._detectors.get(key)
        if det is None:
            det = self._detectors[key] = factory()
            saved = self._saved_detectors.pop(key, None)
            if saved is not None:
                det.load_state_dict(saved)
        return det

    def _detect(self, out: Outputs) -> None:
        windows: dict[int, list[KpiSnapshot]] = {}
        for k in out.kpis:
            windows.setdefault(k.window_start_ms, []).append(k)
        for start in sorted(windows):
            snaps = windows[start]
            outage = self._detect_outage(out, snaps)
            self._detect_sensors(out, snaps, outage)  # first: they inhibit degradations of the same window
            self._detect_degradation(out, snaps)
            self._detect_label_free(out, snaps)  # last, once this window's degradations are known
            self._detect_fusion(out, snaps)

    def _detect_outage(self, out: Outputs, snaps: list[KpiSnapshot]) -> bool:
        """Whether this window is (or is inside) an upstream outage."""
        s = self.settings
        quiet: dict[str, bool] = {}
        for k in snaps:
            if k.scope == "asset" and k.modality not in (FUSED, UME):
                total = k.n + k.n_missing
                quiet[k.scope_id] = quiet.get(k.scope_id, False) or bool(
                    total and k.n_missing / total >= s.sensor_fault_rate)
        glob = next((k for k in snaps if k.scope == "global" and k.modality == FUSED), None)
        if glob is None:
            return False
        det = self._detector(DetKey("upstream_outage", "", "global", "", ""), lambda: d.UpstreamOutage(
            fire_windows=1, resolve_windows=s.resolve_windows))
        det.update(sum(quiet.values()), len(quiet))
        if det.changed:
            self._emit(out, "upstream_outage", "firing" if det.firing else "resolved", "", "global", "",
                       glob.window_end_ms, det.last, None,
                       f"every asset went quiet at once ({sum(quiet.values())}/{len(quiet)}): the broker or an "
                       "upstream gateway, not the sensors; no sensor is masked for it")
        return det.firing or bool(quiet and all(quiet.values()) and len(quiet) >= 2)

    def _detect_sensors(self, out: Outputs, snaps: list[KpiSnapshot], outage: bool) -> None:
        s = self.settings
        for k in snaps:
            if k.scope != "asset" or k.modality in (FUSED, UME):
                continue
            total = k.n + k.n_missing
            for check, events, n in (("dropout", k.n_missing, total),):  # flatline, stuck: per reading
                det = self._detector(DetKey("sensor_fault", check, "asset", k.scope_id, k.modality),
                                     lambda: d.RateAlarm(threshold=s.sensor_fault_rate, fire_windows=s.fire_windows,
                                                         resolve_windows=s.resolve_windows,
                                                         min_n=max(1, s.min_labelled // 2)))
                if check == "dropout" and outage and not det.firing:
                    det.reset()  # quiet because the pipe is down: no evidence against the sensor
                    continue
                det.update(events, n)
                self._transition(out, det, "sensor_fault", k, events / n if n else None, s.sensor_fault_rate,
                                 f"{check}: {events}/{n} readings", {"fault": check})
            det = self._detector(DetKey("sensor_fault", "clock_skew", "asset", k.scope_id, k.modality),
                                 lambda: d.SkewAlarm(max_abs_skew_ms=s.max_abs_skew_ms, fire_windows=s.fire_windows,
                                                     resolve_windows=s.resolve_windows))
            det.update(k.mean_abs_skew_ms, k.n)
            self._transition(out, det, "sensor_fault", k, k.mean_abs_skew_ms, s.max_abs_skew_ms,
                             f"clock skew {k.mean_abs_skew_ms} ms", {"fault": "clock_skew"})

    def _detect_degradation(self, out: Outputs, snaps: list[KpiSnapshot]) -> None:
        s = self.settings
        # Narrow scopes first: a line's alert explains (and inhibits) the fleet-wide one.
        for k in sorted(snaps, key=lambda k: SCOPE_RANK.get(k.scope, 9)):
            base = self.baselines.get(k.modality)
            if base is None or k.scope not in s.detect_scopes:
                continue
            det = self._detector(DetKey("degradation", "", k.scope, k.scope_id, k.modality),
                                 lambda: d.AccuracyDegradation(
                                     baseline=base["top1"], margin=s.degradation_margin, z=s.confidence_z,
                                     min_n=s.min_labelled, fire_windows=s.fire_windows,
                                     resolve_windows=s.resolve_windows))
            # The model is not equally good on every class: the accuracy to expect of this
            # window is its per-class validation recall over the window's true classes
            # (a line that stays in the state the model finds hardest is no degradation).
            expected = expected_accuracy(base, k.truth_counts)
            threshold = expected - s.degradation_margin
            # A window in which the model was right on one class only cannot tell a
            # classifier from a constant guess (a fogged camera looks perfect while the
            # machine is normal): its good accuracy is no evidence; a bad one still is.
            informative = k.n_right_classes >= 2 or (k.accuracy is not None and k.accuracy < threshold)
            det.update(k.n_correct if informative else 0, k.n_labelled if informative else 0, expected)
            self._labels_overrule(out, k, det)
            acc = "-" if k.accuracy is None else f"{k.accuracy:.2f}"
            why = (f"expected {expected:.2f} for this window's classes, baseline {base['top1']:.2f}"
                   if expected != base["top1"] else f"baseline {base['top1']:.2f}")
            self._transition(out, det, "degradation", k, k.accuracy, round(threshold, 4),
                             f"accuracy {acc} < {threshold:.2f} ({why})")

    def _detect_label_free(self, out: Outputs, snaps: list[KpiSnapshot]) -> None:
        s = self.settings
        for k in snaps:
            if k.scope != "global" or k.modality not in self.baselines:
                continue
            # Agreement and contribution depend on the other modalities too: while another
            # one is known to be broken they say nothing about this one.
            others_ok = not self._unhealthy(exclude=k.modality)
            for proxy in ("mean_confidence", "agreement"):
                value = getattr(k, proxy) if proxy == "mean_confidence" or others_ok else None
                det = self._detector(DetKey("drift", proxy, "global", "", k.modality), lambda: d.PageHinkley(
                    delta=s.drift_delta, threshold=s.drift_threshold, direction="down",
                    min_n=s.min_labelled, resolve_windows=s.resolve_windows))
                det.update(value, k.n)  # None is no evidence (and clears `changed`)
                self._transition(out, det, "drift", k, value, None, f"{proxy} dropped (Page-Hinkley)",
                                 {"proxy": proxy})
            if k.mean_contribution is not None:
                det = self._detector(DetKey("dominance", "", "global", "", k.modality), lambda: d.Dominance(
                    threshold=s.dominance_share, fire_windows=s.fire_windows + 1, resolve_windows=s.resolve_windows))
                # A modality already known to be broken is not "dominating": its alert says more.
                share = None if self._unhealthy(only=k.modality) else k.mean_contribution
                det.update(share, others_ok)
                self._transition(out, det, "dominance", k, k.mean_contribution, s.dominance_share,
                                 f"contribution share {k.mean_contribution:.2f}")

    def _detect_fusion(self, out: Outputs, snaps: list[KpiSnapshot]) -> None:
        s = self.settings
        fused = next((k for k in snaps if k.scope == "global" and k.modality == FUSED), None)
        if fused is None or not fused.ref_modality:
            return
        det = self._detector(DetKey("fusion_regression", "", "global", "", ""), lambda: d.FusionRegression(
            margin=s.fusion_margin, z=s.confidence_z, min_n=s.min_labelled,
            fire_windows=s.fire_windows, resolve_windows=s.resolve_windows))
        det.update(fused.ref_fused_correct, fused.ref_correct, fused.ref_n, fused.ref_discordant)
        self._transition(out, det, "fusion_regression", fused, fused.accuracy, None,
                         f"accuracy {fused.ref_fused_correct}/{fused.ref_n} below "
                         f"{fused.ref_modality} {fused.ref_correct}/{fused.ref_n}")

    # ------------------------------------------------------------------ alerts

    def _unhealthy(self, only: str | None = None, exclude: str | None = None) -> bool:
        """Whether a degradation or sensor fault is open for ``only`` (or any modality but ``exclude``)."""
        for e in self._episodes.values():
            lab = e.labels
            if lab["kind"] in ("degradation", "sensor_fault") and (
                    lab["modality"] == only if only is not None else lab["modality"] != exclude):
                return True
        return False

    def _inhibited(self, labels: dict[str, str]) -> bool:
        """A sensor fault inhibits the degradation of its modality in every scope holding
        its asset; a line's degradation inhibits the fleet-wide one of the same modality
        (act on the narrowest scope that explains it); the label-free degradation of a
        scope inhibits the labelled one there (the labels only confirm it)."""
        kind, modality, scope, scope_id = labels["kind"], labels["modality"], labels["scope"], labels["scope_id"]
        if kind != "degradation":
            return False
        for e in self._episodes.values():
            lab = e.labels
            if lab["modality"] != modality or e.inhibited:
                continue
            if scope == "global" and lab["kind"] == "degradation" and lab["scope"] == "line":
                return True
            if (lab["kind"] == "degradation" and "evidence" not in labels and "evidence" in lab
                    and (lab["scope"], lab["scope_id"]) == (scope, scope_id)):
                return True
            if lab["kind"] == "sensor_fault" and (
                    scope == "global" or (scope == "asset" and lab["scope_id"] == scope_id)
                    or (scope == "line" and e.line == scope_id)):
                return True
        return False

    def _transition(self, out: Outputs, det, kind: str, k: KpiSnapshot, value, threshold, what: str,
                    extra: dict[str, str] | None = None) -> None:
        if det.changed:
            self._emit(out, kind, "firing" if det.firing else "resolved", k.modality, k.scope, k.scope_id,
                       k.window_end_ms, value, threshold, what, extra)

    def _emit(self, out: Outputs, kind: str, status: str, modality: str, scope: str, scope_id: str, at_ms: int,
              value, threshold, what: str, extra: dict[str, str] | None = None, decide: bool = True) -> None:
        """Open or close an episode; publish its alert (unless inhibited) and the policy's commands."""
        labels = {"kind": kind, "modality": modality, "scope": scope, "scope_id": scope_id, **(extra or {})}
        fp = fingerprint(labels)
        if status == "firing":
            inhibited = self._inhibited(labels)
            self._episodes[fp] = Episode(at_ms, labels, inhibited, self._lines.get(scope_id) if scope == "asset"
                                         else None, what)
            if inhibited:
                return
            start, ends = at_ms, None
        else:
            episode = self._episodes.pop(fp, None)
            if episode is None or episode.inhibited:
                return
            start, ends, what = episode.start, at_ms, f"recovered (was: {episode.what or what})"
        where = "fleet" if scope == "global" else f"{scope} {scope_id}"
        alert = Alert(fingerprint=fp, alert_id=f"{fp}@{start}", status=status, kind=kind,
                      severity=SEVERITY[kind], modality=modality, scope=scope, scope_id=scope_id,
                      starts_ms=start, event_ms=at_ms, ends_ms=ends, summary=f"{where}: {modality} {what}",
                      labels=labels, value=value, threshold=threshold)
        out.alerts.append(alert)
        if decide:
            out.commands.extend(self.policy.decide(alert, PolicyContext(at_ms, dict(self._version_changes),
                                                                        tuple(sorted(self.baselines)))))

    # ------------------------------------------------------------------ persistence

    def state_dict(self) -> dict[str, Any]:
        return {
            "kpis": self.kpis.state_dict(),
            "detectors": [[*k.to_list(), type(v).__name__, v.state_dict()] for k, v in sorted(self._detectors.items())],
            "episodes": {fp: dataclasses.asdict(e) for fp, e in self._episodes.items()},
            "sequential": self.sequential.state_dict() if self.sequential is not None else None,
            "versions": self._versions,
            "baseline_versions": self._baseline_versions,
            "version_changes": {m: list(v) for m, v in self._version_changes.items()},
            "workers": self._workers,
            "lines": self._lines,
            "pending": self._pending,
            "policy": self.policy.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any], entries) -> None:
        """Continue from a :meth:`state_dict` plus the KPI sink's entries."""
        self.kpis.restore(state.get("kpis"), entries)
        self._episodes = {fp: Episode(**e) for fp, e in state.get("episodes", {}).items()}
        self._versions = dict(state.get("versions", {}))
        saved = state.get("baseline_versions")
        if saved is not None:  # continue with the baselines of the versions it had followed
            self._baseline_versions = None if self.baselines_of is None else {}
            self._follow_versions(dict(saved))
        self._version_changes = {m: tuple(v) for m, v in state.get("version_changes", {}).items()}
        self._workers = dict(state.get("workers", {}))
        self._lines = dict(state.get("lines", {}))
        self._pending = dict(state.get("pending", {}))
        self.policy.load_state_dict(state.get("policy", {}))
        if self.sequential is not None and state.get("sequential"):
            self.sequential.load_state_dict(state["sequential"])
        if self.sequential is not None:
            # The KPI records can be newer than the checkpoint (a kill between the two): the
            # evidence of the predictions the checkpoint had not seen comes from them (their
            # redelivered events are duplicates), and is judged before anything else.
            self._catch_up = self.sequential.recover([
                (r.ts, sid, r.line_id, {m: y for m, y in r.labels.items() if r.live(m)},
                 {m: c for m, c in r.conf.items() if r.live(m)}) for sid, r in self.kpis.open_records()]) > 0
        # Detectors are made lazily (their settings come from the baselines); each takes
        # its saved state when it is made.
        self._detectors = {}
        self._saved_detectors = {DetKey(*row[:5]): row[6] for row in state.get("detectors", [])
                                 if isinstance(row, list)}
