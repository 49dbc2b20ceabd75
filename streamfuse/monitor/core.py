"""The monitor's logic in one pure object: predictions, labels and acks in; KPI
snapshots, alerts and commands out. The faust app only decodes, calls this and emits.

Detectors run on closed KPI windows:

* ``sensor_fault`` per (asset, modality): flat or stuck signals, dropouts, clock skew —
  a broken sensor, not a broken model; it inhibits the degradation alert of that
  modality in every scope that contains the asset;
* ``degradation`` per (scope in ``detect_scopes``, modality): accuracy below the
  bundle's stage-1 baseline with statistical confidence;
* ``drift`` (global, label-free): Page-Hinkley on each modality's confidence and
  agreement with the fused label;
* ``dominance`` (global): one modality's contribution share above a threshold while the
  others are healthy;
* ``fusion_regression`` (global): fused accuracy below the best single modality or UME;
* ``command_unacked``: a command some live worker did not acknowledge in time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from streamfuse.alerts.lifecycle import fingerprint
from streamfuse.config import MonitorSettings
from streamfuse.errors import ConfigError
from streamfuse.events import Ack, Alert, Command, KpiSnapshot, Label, Prediction
from streamfuse.monitor import detectors as d
from streamfuse.monitor.kpis import FUSED, UME, KpiEngine, Sink
from streamfuse.monitor.policy import PolicyConfig, PolicyContext, RollbackPolicy

SCOPE_RANK = {"asset": 0, "line": 1, "global": 2}
SEVERITY = {"sensor_fault": "warning", "degradation": "critical", "drift": "warning", "dominance": "warning",
            "fusion_regression": "critical", "command_unacked": "critical", "action_suppressed": "warning"}


@dataclass
class Outputs:
    kpis: list[KpiSnapshot] = field(default_factory=list)
    alerts: list[Alert] = field(default_factory=list)
    commands: list[Command] = field(default_factory=list)

    def extend(self, other: "Outputs") -> None:
        self.kpis += other.kpis
        self.alerts += other.alerts
        self.commands += other.commands


class MonitorCore:
    """Args:
        baselines: ``{modality: {"top1": ..., "macro_f1": ...}}`` of the active models.
        settings: windows, detector thresholds, policy.
        sink: persistence of the KPI engine's records (see :mod:`streamfuse.monitor.kpis`).
    """

    def __init__(self, baselines: dict[str, dict[str, float]], settings: MonitorSettings,
                 sink: Sink | None = None) -> None:
        self.baselines = {m: b for m, b in baselines.items() if m != FUSED}
        self.settings = s = settings
        for m, b in self.baselines.items():
            if not s.degradation_margin < b["top1"] <= 1.0:
                raise ConfigError(
                    f"baseline top-1 {b['top1']:.3f} of modality {m!r} leaves no room for the degradation "
                    f"margin {s.degradation_margin}: retrain the model or lower "
                    "STREAMFUSE_MONITOR__DEGRADATION_MARGIN"
                )
        self.kpis = KpiEngine(s.kpi_window_ms, s.label_grace_ms, s.max_pending_labels, s.flat_std, sink)
        self.policy = RollbackPolicy(PolicyConfig(
            dry_run=s.dry_run, cooldown_ms=s.cooldown_ms, max_actions_per_hour=s.max_actions_per_hour,
            rollback_after_activation_ms=s.rollback_after_activation_ms, fusion_action=s.fusion_action))
        self._detectors: dict[str, Any] = {}
        self._episodes: dict[str, dict[str, Any]] = {}  # fingerprint -> {start, labels, inhibited}
        self._versions: dict[str, str] = {}  # modality -> version seen in predictions
        self._version_changes: dict[str, tuple[str, str, int]] = {}
        self._workers: dict[str, int] = {}  # worker id -> last prediction event time
        self._lines: dict[str, str] = {}  # asset id -> line id
        self._saved_detectors: dict[str, Any] = {}  # restored state, applied when a detector is made
        self._episode_what: dict[str, str] = {}  # fingerprint -> what the firing alert said
        self._pending: dict[str, dict[str, Any]] = {}  # command id -> {issued, expected, acked, alerted}

    # ------------------------------------------------------------------ inputs

    def on_label(self, label: Label) -> Outputs:
        self.kpis.add_label(label)
        return Outputs()

    def on_prediction(self, pred: Prediction, source: str = "") -> Outputs:
        for m, v in pred.versions.items():
            old = self._versions.get(m)
            if old is not None and old != v:
                self._version_changes[m] = (old, v, pred.ts_ms)
            self._versions[m] = v
        if pred.worker_id:
            self._workers[pred.worker_id] = pred.ts_ms
        self._lines[pred.asset_id] = pred.line_id
        out = Outputs(kpis=self.kpis.add_prediction(pred, source))
        self._detect(out)
        return out

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
                out.alerts.append(self._alert("command_unacked", "firing", p["modality"] or "", "global", "",
                                              self.kpis.watermark or 0, None, None,
                                              f"command {cid} not acknowledged by {', '.join(missing)}",
                                              extra={"command": cid}))
        return out

    def issued(self, cmd: Command, now_ms: int) -> None:
        """The app published ``cmd`` at wall time ``now_ms``; expect acks from live workers."""
        live = [w for w, t in self._workers.items() if (self.kpis.watermark or t) - t <= 4 * self.settings.kpi_window_ms]
        self._pending[cmd.command_id] = {"issued_wall": now_ms, "expected": live, "acked": {},
                                         "alerted": False, "modality": cmd.modality}

    def open_alerts(self) -> list[str]:
        return sorted(fp for fp, e in self._episodes.items() if not e["inhibited"])

    # ------------------------------------------------------------------ detection

    def _detector(self, key: str, factory):
        det = self._detectors.get(key)
        if det is None:
            det = self._detectors[key] = factory()
            saved = self._saved_detectors.pop(key, None)
            if saved is not None:
                det.load_state_dict(saved[1])
        return det

    def _detect(self, out: Outputs) -> None:
        s = self.settings
        snaps = out.kpis
        # Sensor faults first: they inhibit degradation alerts decided in the same window.
        for k in snaps:
            if k.scope != "asset" or k.modality in (FUSED, UME):
                continue
            total = k.n + k.n_missing
            checks = [("flatline", k.n_flat, k.n), ("stuck", k.n_stuck, k.n), ("dropout", k.n_missing, total)]
            for fault, events, n in checks:
                det = self._detector(f"sensor|{fault}|{k.scope_id}|{k.modality}", lambda: d.RateAlarm(
                    threshold=s.sensor_fault_rate, fire_windows=s.fire_windows, resolve_windows=s.resolve_windows,
                    min_n=max(1, s.min_labelled // 2)))
                det.update(events, n)
                self._transition(out, det, "sensor_fault", k, events / n if n else None, s.sensor_fault_rate,
                                 f"{fault}: {events}/{n} readings", {"fault": fault})
            det = self._detector(f"sensor|clock_skew|{k.scope_id}|{k.modality}", lambda: d.SkewAlarm(
                max_abs_skew_ms=s.max_abs_skew_ms, fire_windows=s.fire_windows, resolve_windows=s.resolve_windows))
            det.update(k.mean_abs_skew_ms, k.n)
            self._transition(out, det, "sensor_fault", k, k.mean_abs_skew_ms, s.max_abs_skew_ms,
                             f"clock skew {k.mean_abs_skew_ms} ms", {"fault": "clock_skew"})
        glob = {k.modality: k for k in snaps if k.scope == "global"}
        # Narrow scopes first: a line's alert explains (and inhibits) the fleet-wide one.
        for k in sorted(snaps, key=lambda k: SCOPE_RANK.get(k.scope, 9)):
            base = self.baselines.get(k.modality)
            if base is None:
                continue
            if k.scope in s.detect_scopes:
                det = self._detector(f"degradation|{k.scope}|{k.scope_id}|{k.modality}", lambda: d.AccuracyDegradation(
                    baseline=base["top1"], margin=s.degradation_margin, z=s.confidence_z, min_n=s.min_labelled,
                    fire_windows=s.fire_windows, resolve_windows=s.resolve_windows))
                # A window whose labels are all one class cannot tell a classifier from a
                # constant guess (a fogged camera looks perfect while the machine is
                # normal): its good accuracy is no evidence; a bad one still is.
                informative = k.n_truth_classes >= 2 or (k.accuracy is not None and k.accuracy < det.threshold)
                det.update(k.n_correct if informative else 0, k.n_labelled if informative else 0)
                acc = "-" if k.accuracy is None else f"{k.accuracy:.2f}"
                self._transition(out, det, "degradation", k, k.accuracy, det.threshold,
                                 f"accuracy {acc} < {det.threshold:.2f} (baseline {base['top1']:.2f})")
        # Label-free detectors last, once this window's degradations are known.
        for k in snaps:
            if k.scope != "global" or k.modality not in self.baselines:
                continue
            # Agreement and contribution depend on the other modalities too: while another
            # one is known to be broken they say nothing about this one.
            others_ok = not self._unhealthy(exclude=k.modality)
            for proxy in ("mean_confidence", "agreement"):
                value = getattr(k, proxy) if proxy == "mean_confidence" or others_ok else None
                det = self._detector(f"drift|{proxy}|{k.modality}", lambda: d.PageHinkley(
                    delta=s.drift_delta, threshold=s.drift_threshold, direction="down",
                    min_n=s.min_labelled, resolve_windows=s.resolve_windows))
                det.update(value, k.n)  # None is no evidence (and clears `changed`)
                self._transition(out, det, "drift", k, value, None, f"{proxy} dropped (Page-Hinkley)",
                                 {"proxy": proxy})
            if k.mean_contribution is not None:
                det = self._detector(f"dominance|{k.modality}", lambda: d.Dominance(
                    threshold=s.dominance_share, fire_windows=s.fire_windows + 1, resolve_windows=s.resolve_windows))
                # A modality already known to be broken is not "dominating": its alert says more.
                share = None if self._unhealthy(only=k.modality) else k.mean_contribution
                det.update(share, others_ok)
                self._transition(out, det, "dominance", k, k.mean_contribution, s.dominance_share,
                                 f"contribution share {k.mean_contribution:.2f}")
        fused = glob.get(FUSED)
        if fused is not None and fused.ref_modality:
            det = self._detector("fusion_regression", lambda: d.FusionRegression(
                margin=s.fusion_margin, z=s.confidence_z, min_n=s.min_labelled,
                fire_windows=s.fire_windows, resolve_windows=s.resolve_windows))
            det.update(fused.ref_fused_correct, fused.ref_correct, fused.ref_n, fused.ref_discordant)
            self._transition(out, det, "fusion_regression", fused, fused.accuracy, None,
                             f"accuracy {fused.ref_fused_correct}/{fused.ref_n} below "
                             f"{fused.ref_modality} {fused.ref_correct}/{fused.ref_n}")

    def _unhealthy(self, only: str | None = None, exclude: str | None = None) -> bool:
        """Whether a degradation or sensor fault is open for ``only`` (or any modality but ``exclude``)."""
        for e in self._episodes.values():
            lab = e["labels"]
            if lab["kind"] in ("degradation", "sensor_fault") and (
                    lab["modality"] == only if only is not None else lab["modality"] != exclude):
                return True
        return False

    def _inhibited(self, kind: str, modality: str, scope: str, scope_id: str) -> bool:
        """A sensor fault inhibits the degradation of its modality in every scope holding
        its asset; a line's degradation inhibits the fleet-wide one of the same modality
        (act on the narrowest scope that explains it)."""
        if kind != "degradation":
            return False
        for e in self._episodes.values():
            lab = e["labels"]
            if lab["modality"] != modality or e["inhibited"]:
                continue
            if scope == "global" and lab["kind"] == "degradation" and lab["scope"] == "line":
                return True
            if lab["kind"] == "sensor_fault" and (
                    scope == "global" or (scope == "asset" and lab["scope_id"] == scope_id)
                    or (scope == "line" and e.get("line") == scope_id)):
                return True
        return False

    def _transition(self, out: Outputs, det, kind: str, k: KpiSnapshot, value, threshold, what: str,
                    extra: dict[str, str] | None = None) -> None:
        if not det.changed:
            return
        alert = self._alert(kind, "firing" if det.firing else "resolved", k.modality, k.scope, k.scope_id,
                            k.window_end_ms, value, threshold, what, extra)
        if alert is None:
            return
        out.alerts.append(alert)
        out.commands.extend(self.policy.decide(alert, PolicyContext(k.window_end_ms, dict(self._version_changes))))

    def _alert(self, kind: str, status: str, modality: str, scope: str, scope_id: str, at_ms: int,
               value, threshold, what: str, extra: dict[str, str] | None = None) -> Alert | None:
        labels = {"kind": kind, "modality": modality, "scope": scope, "scope_id": scope_id, **(extra or {})}
        fp = fingerprint(labels)
        if status == "firing":
            inhibited = self._inhibited(kind, modality, scope, scope_id)
            self._episodes[fp] = {"start": at_ms, "labels": labels, "inhibited": inhibited,
                                  "line": self._line_of(scope_id) if scope == "asset" else None}
            if inhibited:
                return None
            start, ends = at_ms, None
        else:
            episode = self._episodes.pop(fp, None)
            if episode is None or episode["inhibited"]:
                return None
            start, ends = episode["start"], at_ms
        where = "fleet" if scope == "global" else f"{scope} {scope_id}"
        if status == "resolved":
            what = f"recovered (was: {self._episode_what.pop(fp, what)})"
        else:
            self._episode_what[fp] = what
        return Alert(fingerprint=fp, alert_id=f"{fp}@{start}", status=status, kind=kind,
                     severity=SEVERITY[kind], modality=modality, scope=scope, scope_id=scope_id,
                     starts_ms=start, event_ms=at_ms, ends_ms=ends, summary=f"{where}: {modality} {what}",
                     labels=labels, value=value, threshold=threshold)

    def _line_of(self, asset_id: str) -> str | None:
        return self._lines.get(asset_id)

    # ------------------------------------------------------------------ persistence

    def state_dict(self) -> dict[str, Any]:
        return {
            "kpis": self.kpis.state_dict(),
            "detectors": {k: [type(v).__name__, v.state_dict()] for k, v in self._detectors.items()},
            "episodes": self._episodes,
            "versions": self._versions,
            "version_changes": {m: list(v) for m, v in self._version_changes.items()},
            "workers": self._workers,
            "lines": self._lines,
            "pending": self._pending,
            "policy": self.policy.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any], entries) -> None:
        """Continue from a :meth:`state_dict` plus the KPI sink's entries."""
        self.kpis.restore(state.get("kpis"), entries)
        self._episodes = dict(state.get("episodes", {}))
        self._versions = dict(state.get("versions", {}))
        self._version_changes = {m: tuple(v) for m, v in state.get("version_changes", {}).items()}
        self._workers = dict(state.get("workers", {}))
        self._lines = dict(state.get("lines", {}))
        self._pending = dict(state.get("pending", {}))
        self.policy.load_state_dict(state.get("policy", {}))
        # Detectors are made lazily (their settings come from the baselines); each takes
        # its saved state when it is made.
        self._detectors = {}
        self._saved_detectors = dict(state.get("detectors", {}))
