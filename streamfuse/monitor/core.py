"""The monitor's logic in one pure object: predictions, labels and acks in; KPI
snapshots, alerts and commands out. The faust app only decodes, calls this and emits.

The core ties together the KPI windows (:mod:`~streamfuse.monitor.kpis`), the judgment of
closed windows (:mod:`~streamfuse.monitor.windows`), the label-free evidence and its
sequential detectors (:mod:`~streamfuse.monitor.labelfree`,
:mod:`~streamfuse.monitor.sequential`), the open alerts and their inhibition rules
(:mod:`~streamfuse.monitor.alerting`) and the rollback policy
(:mod:`~streamfuse.monitor.policy`); it owns their checkpoint (:meth:`MonitorCore.state_dict`).

Label-free, per sample (:mod:`streamfuse.monitor.sequential`), when the bundle carries a
calibration: each modality's agreement with the others, and its reading's signal spread
against the validation range (:mod:`~streamfuse.monitor.spread`), feed a CUSUM per
(fleet | line, modality) under the one false-alarm budget; a firing one is a ``degradation`` alert
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

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

from streamfuse.config import MonitorSettings
from streamfuse.errors import ConfigError
from streamfuse.events import Ack, Alert, Command, KpiSnapshot, Label, Prediction
from streamfuse.monitor import sensor_faults as sf
from streamfuse.monitor.alerting import AGREEMENT, Episodes
from streamfuse.monitor.detector_bank import DetectorBank, DetKey
from streamfuse.monitor.evidence import Calibration
from streamfuse.monitor.kpis import FUSED, KpiEngine, Sink, sensors_of
from streamfuse.monitor.labelfree import MIN_ANSWERS, SampleEvidence, answers
from streamfuse.monitor.policy import PolicyConfig, PolicyContext, RollbackPolicy
from streamfuse.monitor.sequential import SeqKey, SequentialDetection, Transition
from streamfuse.monitor.spread import ranges_from_baselines, spread_evidence
from streamfuse.monitor.windows import WindowDetection

log = logging.getLogger(__name__)


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
        calibration = Calibration.from_baselines(baselines)
        self.evidence = SampleEvidence(calibration)
        self.spread_ranges = ranges_from_baselines(baselines)
        self.baselines_of = baselines_of
        self._baseline_versions: dict[str, str] | None = None  # the unit versions the baselines belong to
        self._catch_up = False  # evidence recovered from the KPI records at a restore, not judged yet
        self._sensed: dict[str, int] = {}  # asset -> newest event time its sensor checks took
        self._unsensed: list[tuple[int, str]] = []  # records a restore found newer than that, to check
        self.episodes = Episodes()
        estimator = self.evidence.estimate if calibration is not None else None
        self.kpis = KpiEngine(s.kpi_window_ms, s.label_grace_ms, s.max_pending_labels, s.flat_std, sink, estimator,
                              self._flagged if estimator is not None else None)
        self.policy = RollbackPolicy(PolicyConfig.from_settings(s))
        self.sequential = SequentialDetection(s.false_alarms_per_day, s.decision_step_ms, s.attribution_alpha,
                                              max(1, len(self.baselines)), self.evidence.llr,
                                              MIN_ANSWERS, self.episodes.measured_broken, self._spread_llr) \
            if calibration else None
        self.detectors = DetectorBank()
        self.windows = WindowDetection(s, self.baselines, self.detectors, self.episodes, self._emit,
                                       self._labels_overrule)
        self._versions: dict[str, str] = {}  # modality -> version seen in predictions
        self._version_changes: dict[str, tuple[str, str, int]] = {}
        self._workers: dict[str, int] = {}  # worker id -> last prediction event time
        self._lines: dict[str, str] = {}  # asset id -> line id
        self._pending: dict[str, dict[str, Any]] = {}  # command id -> {issued, expected, acked, alerted}

    # ------------------------------------------------------------------ inputs

    def on_label(self, label: Label) -> Outputs:
        self.kpis.add_label(label)
        return self.release()

    def release(self) -> Outputs:
        """What a held watermark (the KPI engine's ``input_behind``) lets go now, one window
        at a time: each window judged, and the label-free steps up to it taken, before the
        next, in the order they would have come live."""
        out = Outputs()
        while True:
            before = self.kpis.watermark
            step = Outputs(kpis=self.kpis.release())
            if self.kpis.watermark == before:
                break
            self.windows.judge(step)
            if self.sequential is not None:
                for t in self.sequential.advance(self.kpis.watermark):
                    self._on_sequential(step, t)
            out.extend(step)
        if out.kpis and self.sequential is not None:
            out.estimates = self.kpis.provisional(self.kpis.watermark)
        return out

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
            for key, det in self.detectors.items():
                if key.kind == "degradation" and key.modality == m:
                    det.baseline = b["top1"]
        calibration = Calibration.from_baselines(baselines)
        if calibration is not None:
            self.evidence.recalibrate(calibration)
        # the given modalities take their new versions' ranges (none for a version without one)
        kept = {m: r for m, r in self.spread_ranges.items() if m not in baselines}
        self.spread_ranges = kept | ranges_from_baselines(baselines)

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
        self._recheck_sensors(out)
        if self._catch_up and self.sequential is not None:  # evidence recovered at a restore
            self._catch_up = False
            for t in self.sequential.advance(self.kpis.watermark or pred.ts_ms):
                self._on_sequential(out, t)
        self.windows.judge(out)
        # A flat or frozen signal is the sensor's fault (judged per reading here and
        # reported per asset), not evidence about its model or the others.
        dead = self._dead_signals(pred, out) if fresh else set()
        if self.sequential is not None:
            if fresh:
                labels, conf = answers(pred, dead)
                self.sequential.add(pred.ts_ms, pred.sample_id, pred.line_id, labels, conf, pred.signal_std)
            for t in self.sequential.advance(self.kpis.watermark or pred.ts_ms):
                self._on_sequential(out, t)
            out.estimates = self.kpis.provisional(self.kpis.watermark or pred.ts_ms)
        out.extend(self.release())
        return out

    def _dead_signals(self, pred: Prediction, out: Outputs) -> set[str]:
        """Modalities whose reading in ``pred`` is flat (std at or below ``flat_std``) or
        the same as the asset's previous one (a frozen sensor); each sensor's
        ``flatline`` / ``stuck`` fault is judged here, reading by reading
        (:class:`~streamfuse.monitor.detectors.RecentRate`), not per window."""
        rec = self.kpis.record(pred.sample_id)  # judged flat or frozen (restart-safe) when recorded
        if rec is None:
            self._sensor_checks(pred.asset_id, pred.ts_ms, sensors_of(pred), set(), set(), out)
            return set()
        flat, stuck = set(rec.flat), set(rec.stuck)
        self._sensor_checks(pred.asset_id, pred.ts_ms, rec.sensors, flat, stuck, out)
        return flat | stuck

    def _sensor_checks(self, asset: str, ts: int, sensors: dict[str, bool], flat: set[str], stuck: set[str],
                       out: Outputs) -> None:
        """One reading of each of an asset's ``sensors`` (name -> whether it had a digest,
        which the frozen check needs) into its ``flatline`` / ``stuck`` detectors."""
        s = self.settings
        for check, bad in (("flatline", flat), ("stuck", stuck)):
            for m, digested in sensors.items():
                if check == "stuck" and not digested:
                    continue
                det = self.detectors.get(DetKey("sensor_fault", check, "asset", asset, m),
                                         lambda: sf.RecentRate(s.sensor_fault_readings, s.sensor_fault_rate))
                det.update(m in bad)
                if det.changed:
                    n = round(det.last * len(det.state_dict()["recent"]))
                    self._emit(out, "sensor_fault", "firing" if det.firing else "resolved", m, "asset", asset, ts,
                               det.last, s.sensor_fault_rate,
                               f"{check}: {n} of the latest {s.sensor_fault_readings} readings", {"fault": check})
        self._sensed[asset] = max(self._sensed.get(asset, ts), ts)

    def _recheck_sensors(self, out: Outputs) -> None:
        """After a restore: the sensor checks of the recorded readings the checkpoint had not
        seen (their predictions are not delivered again, or only as duplicates), in event
        time order, before anything newer — so a sensor fault fires at the reading it did in
        the uninterrupted monitor, under the same alert id."""
        pending, self._unsensed = self._unsensed, []
        for _, sid in pending:
            rec = self.kpis.record(sid)
            if rec is not None:
                self._sensor_checks(rec.asset_id, rec.ts, rec.sensors, set(rec.flat), set(rec.stuck), out)

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
        return self.episodes.published()

    # ------------------------------------------------------------------ label-free evidence

    def _spread_llr(self, spread: dict[str, float]) -> dict[str, float]:
        return spread_evidence(self.spread_ranges, spread)

    def _flagged(self, line_id: str, unit: str, ts: int) -> bool:
        return self.sequential is not None and self.sequential.flagged(line_id, unit, ts)

    def _labels_overrule(self, out: Outputs, k: KpiSnapshot, det: Any) -> None:
        """The labels are the ground truth: a label-free alarm on a modality whose labelled
        accuracy met its expectation for ``resolve_windows`` windows in a row is resolved.
        (Two broken sensors stuck on the same answer can make a healthy third one look like
        the odd one out; its labels clear it.) Not while most of the modality's readings
        since the alarm were out of their spread range: a fogged camera stuck on the class
        its line's machines are in is right by coincidence."""
        if self.sequential is None or k.scope not in ("global", "line"):
            return
        good = det.state_dict()["good"]
        if det.firing or good < self.settings.resolve_windows:
            return
        episode = self.episodes.get({"kind": "degradation", "modality": k.modality, "scope": k.scope,
                                     "scope_id": k.scope_id, **AGREEMENT})
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
        what = why or (f"label-free evidence (its answers against the other sensors', its signal spread against "
                       f"the validation range): {t.statistic:.1f} >= {t.threshold:.1f} nats "
                       f"({how}, budget {self.settings.false_alarms_per_day:g} false alarms/day)")
        self._emit(out, "degradation", "firing" if t.firing else "resolved", k.modality, k.scope, k.scope_id,
                   t.at_ms, round(t.statistic, 3), round(t.threshold, 3), what, AGREEMENT)

    # ------------------------------------------------------------------ alerts

    def _emit(self, out: Outputs, kind: str, status: str, modality: str, scope: str, scope_id: str, at_ms: int,
              value, threshold, what: str, extra: dict[str, str] | None = None, decide: bool = True) -> None:
        """Open or close an episode; publish its alert (unless inhibited) and the policy's commands."""
        labels = {"kind": kind, "modality": modality, "scope": scope, "scope_id": scope_id, **(extra or {})}
        line = self._lines.get(scope_id) if scope == "asset" else None
        alert = self.episodes.transition(labels, status, at_ms, value, threshold, what, line)
        if alert is None:
            return
        out.alerts.append(alert)
        if decide:
            out.commands.extend(self.policy.decide(alert, PolicyContext(at_ms, dict(self._version_changes),
                                                                        tuple(sorted(self.baselines)))))

    # ------------------------------------------------------------------ persistence

    def state_dict(self) -> dict[str, Any]:
        return {
            "kpis": self.kpis.state_dict(),
            "detectors": self.detectors.state_dict(),
            "episodes": self.episodes.state_dict(),
            "sequential": self.sequential.state_dict() if self.sequential is not None else None,
            "versions": self._versions,
            "baseline_versions": self._baseline_versions,
            "version_changes": {m: list(v) for m, v in self._version_changes.items()},
            "workers": self._workers,
            "lines": self._lines,
            "pending": self._pending,
            "policy": self.policy.state_dict(),
            "sensed": dict(self._sensed),
        }

    def load_state_dict(self, state: dict[str, Any], entries) -> None:
        """Continue from a :meth:`state_dict` plus the KPI sink's entries."""
        self.kpis.restore(state.get("kpis"), entries)
        self.episodes.load_state_dict(state.get("episodes", {}))
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
                 {m: c for m, c in r.conf.items() if r.live(m)}, r.spread) for sid, r in self.kpis.open_records()]) > 0
        # Detectors are made lazily (their settings come from the baselines); each takes
        # its saved state when it is made.
        self.detectors.load_state_dict(state.get("detectors", []))
        if "sensed" in state:  # (a checkpoint from before this field: nothing to compare with)
            self._sensed = dict(state["sensed"])
            self._unsensed = sorted((r.ts, sid) for sid, r in self.kpis.open_records()
                                    if r.ts > self._sensed.get(r.asset_id, r.ts - 1))
