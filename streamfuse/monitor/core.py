"""The monitor's logic in one pure object: predictions and labels in; KPI snapshots,
alerts and commands out. The faust app only decodes, calls this and emits."""

from __future__ import annotations

from dataclasses import dataclass, field

from streamfuse.alerts.lifecycle import fingerprint
from streamfuse.config import MonitorSettings
from streamfuse.errors import ConfigError
from streamfuse.events import Alert, Command, KpiSnapshot, Label, Prediction
from streamfuse.monitor.detectors import AccuracyDegradation
from streamfuse.monitor.kpis import KpiEngine
from streamfuse.monitor.policy import PolicyConfig, RollbackPolicy

# Asset-level label accuracy over one window is too noisy to act on: a fogged camera
# whose model guesses one class looks perfect while the machine is in that state.
DETECT_SCOPES = ("global",)


@dataclass
class Outputs:
    kpis: list[KpiSnapshot] = field(default_factory=list)
    alerts: list[Alert] = field(default_factory=list)
    commands: list[Command] = field(default_factory=list)


class MonitorCore:
    """Args:
        baselines: ``{modality: {"top1": ..., "macro_f1": ...}}`` from the model bundle.
        settings: window, grace and detector settings.
    """

    def __init__(self, baselines: dict[str, dict[str, float]], settings: MonitorSettings) -> None:
        self.baselines = {m: b for m, b in baselines.items() if m != "fused"}
        self.settings = settings
        for m, b in self.baselines.items():
            if not settings.degradation_margin < b["top1"] <= 1.0:
                raise ConfigError(
                    f"baseline top-1 {b['top1']:.3f} of modality {m!r} leaves no room for the degradation "
                    f"margin {settings.degradation_margin}: retrain the model or lower "
                    "STREAMFUSE_MONITOR__DEGRADATION_MARGIN"
                )
        self.kpis = KpiEngine(settings.kpi_window_ms, settings.label_grace_ms, settings.max_pending_labels)
        self.policy = RollbackPolicy(PolicyConfig(dry_run=settings.dry_run))
        self._detectors: dict[tuple[str, str, str], AccuracyDegradation] = {}
        self._episodes: dict[str, int] = {}  # fingerprint -> start of the firing episode

    def on_label(self, label: Label) -> Outputs:
        self.kpis.add_label(label)
        return Outputs()

    def on_prediction(self, pred: Prediction, source: str = "") -> Outputs:
        out = Outputs(kpis=self.kpis.add_prediction(pred, source))
        for snap in out.kpis:
            alert = self._detect(snap)
            if alert is not None:
                out.alerts.append(alert)
                out.commands.extend(self.policy.decide(alert))
        return out

    def open_alerts(self) -> list[str]:
        return sorted(self._episodes)

    def _detect(self, snap: KpiSnapshot) -> Alert | None:
        base = self.baselines.get(snap.modality)
        if base is None or snap.scope not in DETECT_SCOPES or snap.accuracy is None:
            return None
        key = (snap.scope, snap.scope_id, snap.modality)
        det = self._detectors.get(key)
        if det is None:
            s = self.settings
            det = self._detectors[key] = AccuracyDegradation(
                baseline=base["top1"], margin=s.degradation_margin, z=s.confidence_z, min_n=s.min_labelled,
                fire_windows=s.fire_windows, resolve_windows=s.resolve_windows,
            )
        det.update(round(snap.accuracy * snap.n_labelled), snap.n_labelled)
        if not det.changed:
            return None
        labels = {"kind": "degradation", "modality": snap.modality, "scope": snap.scope, "scope_id": snap.scope_id}
        fp = fingerprint(labels)
        acc = det.last[0] if det.last else None
        if det.firing:
            start = self._episodes[fp] = snap.window_end_ms
            status, ends = "firing", None
            summary = (f"{snap.modality} accuracy {acc:.2f} < {det.threshold:.2f} "
                       f"(baseline {det.baseline:.2f} - margin {det.margin:.2f}) for {det.fire_windows} windows")
        else:
            start = self._episodes.pop(fp, snap.window_end_ms)
            status, ends = "resolved", snap.window_end_ms
            summary = f"{snap.modality} accuracy back to {acc:.2f} >= {det.threshold:.2f}"
        where = "fleet" if snap.scope == "global" else f"{snap.scope} {snap.scope_id}"
        return Alert(
            fingerprint=fp,
            alert_id=f"{fp}@{start}",
            status=status,
            kind="degradation",
            severity="critical" if snap.scope == "global" else "warning",
            modality=snap.modality,
            scope=snap.scope,
            scope_id=snap.scope_id,
            starts_ms=start,
            event_ms=snap.window_end_ms,
            ends_ms=ends,
            summary=f"{where}: {summary}",
            labels=labels,
            value=acc,
            threshold=det.threshold,
        )
