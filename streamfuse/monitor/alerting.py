"""Open alerts (episodes) and the rules between them: which alert inhibits which, which
modality counts as unhealthy, and how an alert's transition is worded.

Pure: the monitor's core calls it with plain values and event timestamps; the rollback
policy's decision on each published alert stays in the core.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from streamfuse.alerts.lifecycle import fingerprint
from streamfuse.events import Alert

SEVERITY = {"sensor_fault": "warning", "degradation": "critical", "drift": "warning", "dominance": "warning",
            "fusion_regression": "critical", "command_unacked": "critical", "action_suppressed": "warning",
            "upstream_outage": "critical"}
AGREEMENT = {"evidence": "agreement"}  # the extra label of the label-free degradation alert


@dataclass
class Episode:
    """An open alert: when it started, its labels, and what its firing message said."""

    start: int
    labels: dict[str, str]
    inhibited: bool
    line: str | None = None
    what: str = ""


class Episodes:
    """The open alerts, by fingerprint (checkpointed with :meth:`state_dict`)."""

    def __init__(self) -> None:
        self.open: dict[str, Episode] = {}  # fingerprint -> open episode

    def get(self, labels: dict[str, str]) -> Episode | None:
        """The open episode of the alert with these labels."""
        return self.open.get(fingerprint(labels))

    def unhealthy(self, only: str | None = None, exclude: str | None = None) -> bool:
        """Whether a degradation or sensor fault is open for ``only`` (or any modality but ``exclude``)."""
        for e in self.open.values():
            lab = e.labels
            if lab["kind"] in ("degradation", "sensor_fault") and (
                    lab["modality"] == only if only is not None else lab["modality"] != exclude):
                return True
        return False

    def measured_broken(self, line_id: str, modality: str) -> bool:
        """An open labelled degradation of ``modality`` on ``line_id`` or fleet-wide."""
        for e in self.open.values():
            lab = e.labels
            if (lab["kind"] == "degradation" and "evidence" not in lab and lab["modality"] == modality
                    and (lab["scope"] == "global" or (lab["scope"] == "line" and lab["scope_id"] == line_id))):
                return True
        return False

    def inhibited(self, labels: dict[str, str]) -> bool:
        """A sensor fault inhibits the degradation of its modality in every scope holding
        its asset; a line's degradation inhibits the fleet-wide one of the same modality
        (act on the narrowest scope that explains it); the label-free degradation of a
        scope inhibits the labelled one there (the labels only confirm it)."""
        kind, modality, scope, scope_id = labels["kind"], labels["modality"], labels["scope"], labels["scope_id"]
        if kind != "degradation":
            return False
        for e in self.open.values():
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

    def transition(self, labels: dict[str, str], status: str, at_ms: int, value, threshold, what: str,
                   line: str | None = None) -> Alert | None:
        """Open (``status="firing"``) or close the episode of ``labels``; the alert to
        publish, or ``None`` when it is inhibited (or closes nothing that was published).
        ``line``: the line of an asset-scoped alert (sensor faults inhibit by line)."""
        kind, modality, scope, scope_id = labels["kind"], labels["modality"], labels["scope"], labels["scope_id"]
        fp = fingerprint(labels)
        if status == "firing":
            inhibited = self.inhibited(labels)
            self.open[fp] = Episode(at_ms, labels, inhibited, line, what)
            if inhibited:
                return None
            start, ends = at_ms, None
        else:
            episode = self.open.pop(fp, None)
            if episode is None or episode.inhibited:
                return None
            start, ends, what = episode.start, at_ms, f"recovered (was: {episode.what or what})"
        where = "fleet" if scope == "global" else f"{scope} {scope_id}"
        return Alert(fingerprint=fp, alert_id=f"{fp}@{start}", status=status, kind=kind,
                     severity=SEVERITY[kind], modality=modality, scope=scope, scope_id=scope_id,
                     starts_ms=start, event_ms=at_ms, ends_ms=ends, summary=f"{where}: {modality} {what}",
                     labels=labels, value=value, threshold=threshold)

    def published(self) -> list[str]:
        """Fingerprints of the open alerts that were published (not inhibited)."""
        return sorted(fp for fp, e in self.open.items() if not e.inhibited)

    def state_dict(self) -> dict[str, Any]:
        return {fp: dataclasses.asdict(e) for fp, e in self.open.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.open = {fp: Episode(**e) for fp, e in state.items()}
