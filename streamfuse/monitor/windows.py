"""Judging closed KPI windows, in this order within a window: an upstream outage
(global), sensor faults per asset (dropout, clock skew), labelled degradation per scope,
the label-free proxies (drift, dominance: global), fusion regression (global).

Pure, like the core it serves (:class:`~streamfuse.monitor.core.MonitorCore`): the open
alerts decide what is inhibited, the core's ``emit`` publishes a transition and asks the
rollback policy, and its ``overrule`` lets the labels clear a label-free alarm.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from streamfuse.config import MonitorSettings
from streamfuse.events import KpiSnapshot
from streamfuse.monitor import detectors as d
from streamfuse.monitor import sensor_faults as sf
from streamfuse.monitor.alerting import Episodes
from streamfuse.monitor.detector_bank import DetectorBank, DetKey
from streamfuse.monitor.kpis import FUSED, UME
from streamfuse.monitor.paired import FusionRegression

if TYPE_CHECKING:
    from streamfuse.monitor.core import Outputs

SCOPE_RANK = {"asset": 0, "line": 1, "global": 2}
Emit = Callable[..., None]  # MonitorCore._emit(out, kind, status, modality, scope, scope_id, at_ms, value, ...)


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


class WindowDetection:
    """The window detectors' rules.

    Args:
        settings: windows, thresholds, scopes.
        baselines: the core's baselines by modality (the same dict: it follows the models).
        detectors: where the detectors live (checkpointed by the core).
        episodes: the open alerts (inhibition, which modality is unhealthy).
        emit: the core's ``_emit``: open or close an alert, publish it, ask the policy.
        overrule: the core's check that lets good labelled windows clear a label-free alarm.
    """

    def __init__(self, settings: MonitorSettings, baselines: dict[str, dict[str, Any]], detectors: DetectorBank,
                 episodes: Episodes, emit: Emit, overrule: Callable[[Outputs, KpiSnapshot, Any], None]) -> None:
        self.settings = settings
        self.baselines = baselines
        self.detectors = detectors
        self.episodes = episodes
        self.emit = emit
        self.overrule = overrule

    def _detector(self, key: DetKey, factory: Callable[[], Any]) -> Any:
        return self.detectors.get(key, factory)

    def judge(self, out: Outputs) -> None:
        """Judge the windows whose snapshots are in ``out.kpis``, oldest first; alerts and
        commands go to ``out``."""
        windows: dict[int, list[KpiSnapshot]] = {}
        for k in out.kpis:
            windows.setdefault(k.window_start_ms, []).append(k)
        for start in sorted(windows):
            snaps = windows[start]
            outage = self._outage(out, snaps)
            self._sensors(out, snaps, outage)  # first: they inhibit degradations of the same window
            self._degradation(out, snaps)
            self._label_free(out, snaps)  # last, once this window's degradations are known
            self._fusion(out, snaps)

    def _outage(self, out: Outputs, snaps: list[KpiSnapshot]) -> bool:
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
        det = self._detector(DetKey("upstream_outage", "", "global", "", ""), lambda: sf.UpstreamOutage(
            fire_windows=1, resolve_windows=s.resolve_windows))
        det.update(sum(quiet.values()), len(quiet))
        if det.changed:
            self.emit(out, "upstream_outage", "firing" if det.firing else "resolved", "", "global", "",
                       glob.window_end_ms, det.last, None,
                       f"every asset went quiet at once ({sum(quiet.values())}/{len(quiet)}): the broker or an "
                       "upstream gateway, not the sensors; no sensor is masked for it")
        return det.firing or bool(quiet and all(quiet.values()) and len(quiet) >= 2)

    def _sensors(self, out: Outputs, snaps: list[KpiSnapshot], outage: bool) -> None:
        s = self.settings
        for k in snaps:
            if k.scope != "asset" or k.modality in (FUSED, UME):
                continue
            total = k.n + k.n_missing
            for check, events, n in (("dropout", k.n_missing, total),):  # flatline, stuck: per reading
                det = self._detector(DetKey("sensor_fault", check, "asset", k.scope_id, k.modality),
                                     lambda: sf.RateAlarm(threshold=s.sensor_fault_rate, fire_windows=s.fire_windows,
                                                         resolve_windows=s.resolve_windows,
                                                         min_n=max(1, s.min_labelled // 2)))
                if check == "dropout" and outage and not det.firing:
                    det.reset()  # quiet because the pipe is down: no evidence against the sensor
                    continue
                det.update(events, n)
                self._transition(out, det, "sensor_fault", k, events / n if n else None, s.sensor_fault_rate,
                                 f"{check}: {events}/{n} readings", {"fault": check})
            det = self._detector(DetKey("sensor_fault", "clock_skew", "asset", k.scope_id, k.modality),
                                 lambda: sf.SkewAlarm(max_abs_skew_ms=s.max_abs_skew_ms, fire_windows=s.fire_windows,
                                                     resolve_windows=s.resolve_windows))
            det.update(k.mean_abs_skew_ms, k.n)
            self._transition(out, det, "sensor_fault", k, k.mean_abs_skew_ms, s.max_abs_skew_ms,
                             f"clock skew {k.mean_abs_skew_ms} ms", {"fault": "clock_skew"})

    def _degradation(self, out: Outputs, snaps: list[KpiSnapshot]) -> None:
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
            self.overrule(out, k, det)
            acc = "-" if k.accuracy is None else f"{k.accuracy:.2f}"
            why = (f"expected {expected:.2f} for this window's classes, baseline {base['top1']:.2f}"
                   if expected != base["top1"] else f"baseline {base['top1']:.2f}")
            self._transition(out, det, "degradation", k, k.accuracy, round(threshold, 4),
                             f"accuracy {acc} < {threshold:.2f} ({why})")

    def _label_free(self, out: Outputs, snaps: list[KpiSnapshot]) -> None:
        s = self.settings
        for k in snaps:
            if k.scope != "global" or k.modality not in self.baselines:
                continue
            # Agreement and contribution depend on the other modalities too: while another
            # one is known to be broken they say nothing about this one.
            others_ok = not self.episodes.unhealthy(exclude=k.modality)
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
                share = None if self.episodes.unhealthy(only=k.modality) else k.mean_contribution
                det.update(share, others_ok)
                self._transition(out, det, "dominance", k, k.mean_contribution, s.dominance_share,
                                 f"contribution share {k.mean_contribution:.2f}")

    def _fusion(self, out: Outputs, snaps: list[KpiSnapshot]) -> None:
        s = self.settings
        fused = next((k for k in snaps if k.scope == "global" and k.modality == FUSED), None)
        if fused is None or not fused.ref_modality:
            return
        det = self._detector(DetKey("fusion_regression", "", "global", "", ""), lambda: FusionRegression(
            margin=s.fusion_margin, z=s.confidence_z, min_n=s.min_labelled,
            fire_windows=s.fire_windows, resolve_windows=s.resolve_windows))
        det.update(fused.ref_fused_correct, fused.ref_correct, fused.ref_n, fused.ref_discordant)
        self._transition(out, det, "fusion_regression", fused, fused.accuracy, None,
                         f"accuracy {fused.ref_fused_correct}/{fused.ref_n} below "
                         f"{fused.ref_modality} {fused.ref_correct}/{fused.ref_n}")

    def _transition(self, out: Outputs, det, kind: str, k: KpiSnapshot, value, threshold, what: str,
                    extra: dict[str, str] | None = None) -> None:
        if det.changed:
            self.emit(out, kind, "firing" if det.firing else "resolved", k.modality, k.scope, k.scope_id,
                       k.window_end_ms, value, threshold, what, extra)
