"""Rollback policy: which command an alert transition calls for. Pure and config-driven."""

from __future__ import annotations

from dataclasses import dataclass

from streamfuse.events import Alert, Command


@dataclass(frozen=True)
class PolicyConfig:
    dry_run: bool = False  # alert only
    act_on_scopes: tuple[str, ...] = ("global",)  # masks apply fleet-wide, so act on fleet-wide evidence


class RollbackPolicy:
    """Degraded modality → ``mask_modality`` (fusion continues without it); the alert
    resolving → ``unmask_modality``.

    Command ids derive from the alert episode, so a monitor that re-processes the same
    input after a restart issues the same ids and workers apply each command once.

    Examples:
        >>> from streamfuse.events import Alert
        >>> a = Alert("fp1", "fp1@5000", "firing", "degradation", "warning", "image", "global", "", 5000, 9000)
        >>> [(c.command_id, c.action, c.modality) for c in RollbackPolicy().decide(a)]
        [('fp1@5000:mask_modality', 'mask_modality', 'image')]
        >>> RollbackPolicy(PolicyConfig(dry_run=True)).decide(a)
        []
    """

    def __init__(self, config: PolicyConfig = PolicyConfig()) -> None:
        self.config = config

    def decide(self, alert: Alert) -> list[Command]:
        if self.config.dry_run or alert.scope not in self.config.act_on_scopes:
            return []
        if alert.kind != "degradation":
            return []
        action = "mask_modality" if alert.status == "firing" else "unmask_modality"
        return [
            Command(
                command_id=f"{alert.alert_id}:{action}",
                action=action,
                issued_ms=alert.event_ms,
                modality=alert.modality,
                alert_id=alert.alert_id,
                reason=f"{alert.kind} {alert.status}: {alert.summary}",
            )
        ]
