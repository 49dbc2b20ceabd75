"""Rollback policy: which commands an alert transition calls for. Pure and config-driven.

The policy sees alert transitions (firing / resolved) and answers with commands; time
is the event time it is given, never the clock. Its memory (cooldowns, the actions of
the last hour, the masks it holds, the versions it rolled back) serializes with
``state_dict()`` so that a restarted monitor decides exactly as the old one would have.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

from streamfuse.config import MonitorSettings
from streamfuse.errors import ConfigError
from streamfuse.events import SCOPES, Alert, Command

_DEFAULTS = MonitorSettings.model_fields  # one source for the policy's defaults: the monitor's settings
FUSION_ACTIONS = ("set_fusion_mode", "rollback_fusion")
MASKING_KINDS = ("degradation", "sensor_fault")  # kinds whose firing masks the modality
HOUR_MS = 3_600_000


@dataclass(frozen=True)
class PolicyConfig:
    """How the policy acts.

    Args:
        dry_run: decide as usual (cooldowns, cap and masks are tracked as if the commands
            were sent) but return no command; every would-be command is reported in
            :attr:`RollbackPolicy.suppressed` with reason ``"dry_run"``.
        act_on_scopes: alert scopes that lead to commands; alerts of other scopes are
            alert-only.
        cooldown_ms: after an action on a (modality, scope, scope id), the same action on
            it is suppressed for this long.
        max_actions_per_hour: commands issued in any rolling hour, beyond which further
            commands are suppressed (``unmask_modality`` is exempt and not counted).
        rollback_after_activation_ms: a degradation that fires at most this long after
            the modality's model version changed rolls the model back instead of masking it.
        fusion_action: the answer to a fusion regression, ``"set_fusion_mode"`` (to
            ``fusion_mode``) or ``"rollback_fusion"``.
        fusion_mode: the fusion mode ``set_fusion_mode`` switches to.

    Raises:
        ConfigError: a value outside its valid range; the message lists the valid values.
    """

    dry_run: bool = _DEFAULTS["dry_run"].default
    act_on_scopes: tuple[str, ...] = SCOPES
    cooldown_ms: int = _DEFAULTS["cooldown_ms"].default
    max_actions_per_hour: int = _DEFAULTS["max_actions_per_hour"].default
    rollback_after_activation_ms: int = _DEFAULTS["rollback_after_activation_ms"].default
    fusion_action: str = _DEFAULTS["fusion_action"].default
    fusion_mode: str = "ume"

    @classmethod
    def from_settings(cls, s: MonitorSettings) -> PolicyConfig:
        """The policy the monitor's settings describe (``STREAMFUSE_MONITOR__*``)."""
        return cls(dry_run=s.dry_run, cooldown_ms=s.cooldown_ms, max_actions_per_hour=s.max_actions_per_hour,
                   rollback_after_activation_ms=s.rollback_after_activation_ms, fusion_action=s.fusion_action)

    def __post_init__(self) -> None:
        scopes = tuple(self.act_on_scopes)
        object.__setattr__(self, "act_on_scopes", scopes)
        unknown = [s for s in scopes if s not in SCOPES]
        if unknown:
            raise ConfigError(f"act_on_scopes has {unknown}; valid scopes are {', '.join(SCOPES)}")
        if self.fusion_action not in FUSION_ACTIONS:
            raise ConfigError(f"fusion_action must be one of {', '.join(FUSION_ACTIONS)}, got {self.fusion_action!r}")
        for name, low in (("cooldown_ms", 0), ("max_actions_per_hour", 1), ("rollback_after_activation_ms", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
        if not self.fusion_mode:
            raise ConfigError("fusion_mode must name a fusion mode, e.g. 'ume'")


@dataclass(frozen=True)
class PolicyContext:
    """What the monitor knows besides the alert.

    Args:
        now_ms: event time of the decision (cooldowns and the hourly cap run on it).
        version_changes: modality -> (previous version, current version, event time of
            the change), as observed in the predictions.
    """

    now_ms: int
    version_changes: dict[str, tuple[str, str, int]] = field(default_factory=dict)
    modalities: tuple[str, ...] = ()  # the served modalities (a mask never takes the last one out)


class Suppressed(NamedTuple):
    """A command the policy decided on but did not issue."""

    alert_id: str
    action: str
    modality: str
    reason: str  # "cooldown" | "rate_cap" | "dry_run" | "modality_masked" | "model_version_changed" | "rollback_in_flight"
    # | "last_modality"


class RollbackPolicy:
    """Alert transitions → commands, per unit.

    Firing:

    * ``degradation`` → ``mask_modality`` for the alert's scope (fusion continues
      without the modality there); but if the modality's model version changed at most
      ``rollback_after_activation_ms`` before the alert, → ``rollback_model`` to the
      previous version instead (model versions are fleet-wide, so the command's scope is
      global). A version the policy has rolled back *from* is never rolled back *to*: if
      the degradation persists after a rollback, the policy masks instead of flipping
      between versions.
    * but a label-free ``degradation`` (label ``evidence=agreement``) shortly after
      *another* modality's model version changed (within ``rollback_after_activation_ms``;
      reason ``"model_version_changed"``) → no mask: the alarm compares this modality's
      answers with the others', one of which is the new release (its own degradation rolls
      it back). The alert stays open; a labelled alarm on the modality still masks it.
    * ``sensor_fault`` → ``mask_modality`` for the alert's scope (never a rollback: the
      model is not at fault).
    * Never a mask that would leave no modality in a scope's fusion (reason
      ``"last_modality"``, with ``ctx.modalities``): the alert stays open for an operator.
    * ``fusion_regression`` → ``config.fusion_action`` (``set_fusion_mode`` to
      ``config.fusion_mode``, or ``rollback_fusion``), fleet-wide; but not while this
      policy holds a mask (reason ``"modality_masked"``): a broken modality drags the
      fused accuracy below the best single one, and changing the fusion step cannot fix
      a modality's input; the mask can. Nor after a modality's model version changed
      (within ``rollback_after_activation_ms``; reason ``"model_version_changed"``): the
      new version is the likelier cause, and its degradation rolls it back.
    * anything else (``dominance``, ``drift``...) → alert only.

    Resolved: ``degradation`` / ``sensor_fault`` → ``unmask_modality``, only where this
    policy masked the modality for that alert, and only once every alert that held the
    mask (say a dropout and a flatline fault on the same asset) has resolved. Nothing is
    undone for other kinds: a rollback or a fusion-mode change stays until an operator
    changes it.

    Limits: a cooldown per (action, modality, scope, scope id), and at most
    ``max_actions_per_hour`` commands in any rolling hour. ``unmask_modality`` is exempt
    from both: it only undoes a mask this policy issued (so it is bounded by the masks)
    and holding it back would leave a modality masked with no alert open. Commands held
    back are listed in :attr:`suppressed` after each :meth:`decide`, so that the monitor
    can raise an alert about them.

    Command ids are ``f"{alert.alert_id}:{action}"``: a monitor that re-processes the
    same input after a restart issues the same ids and workers apply each command once.

    Examples:
        >>> from streamfuse.events import Alert
        >>> a = Alert("fp1", "fp1@5000", "firing", "degradation", "warning", "image", "line", "L1", 5000, 9000)
        >>> policy = RollbackPolicy()
        >>> [(c.command_id, c.action, c.modality, c.scope, c.scope_id) for c in policy.decide(a)]
        [('fp1@5000:mask_modality', 'mask_modality', 'image', 'line', 'L1')]
        >>> ctx = PolicyContext(now_ms=9000, version_changes={"image": ("v1", "v2", 8000)})
        >>> [(c.action, c.version) for c in RollbackPolicy().decide(a, ctx)]
        [('rollback_model', 'v1')]
        >>> dry = RollbackPolicy(PolicyConfig(dry_run=True))
        >>> dry.decide(a), dry.suppressed
        ([], [Suppressed(alert_id='fp1@5000', action='mask_modality', modality='image', reason='dry_run')])
    """

    def __init__(self, config: PolicyConfig = PolicyConfig()) -> None:
        self.config = config
        self.reset()

    def reset(self) -> None:
        self._last_action: dict[tuple[str, str, str, str], int] = {}  # (action, modality, scope, id) -> ms
        self._recent: list[int] = []  # event times of the capped commands of the last hour
        self._masks: dict[tuple[str, str, str], list[str]] = {}  # (modality, scope, id) -> holding alert ids
        self._inferred: set[str] = set()  # alerts from label-free evidence that hold masks
        self._rolled_back: dict[str, list[str]] = {}  # modality -> versions rolled back from
        self._suppressed: list[Suppressed] = []

    @property
    def suppressed(self) -> list[Suppressed]:
        """Commands the last :meth:`decide` held back, with the reason."""
        return list(self._suppressed)

    @property
    def masks(self) -> dict[tuple[str, str, str], list[str]]:
        """(modality, scope, scope id) -> the alerts holding the masks this policy issued."""
        return {k: list(v) for k, v in self._masks.items()}

    def decide(self, alert: Alert, context: PolicyContext | None = None) -> list[Command]:
        """The commands ``alert``'s transition calls for (possibly none).

        Args:
            alert: a firing or resolved alert.
            context: the decision time and recent model-version changes; without it the
                time is ``alert.event_ms`` and no version change is known.
        """
        self._suppressed = []
        ctx = context if context is not None else PolicyContext(alert.event_ms)
        now = ctx.now_ms
        if alert.scope not in self.config.act_on_scopes:
            return []
        self._prune(now)
        planned = self._plan(alert, ctx)
        if planned is None:
            return []
        action, scope, scope_id, extra = planned
        refused = self._throttle(alert, action, scope, scope_id, now)
        if refused is not None:
            return refused
        released = self._release(alert, extra.get("release", ()), scope, scope_id)
        self._record(alert, action, scope, scope_id, extra)
        if self.config.dry_run:
            return self._suppress(alert, action, "dry_run")
        return released + [self._command(alert, action, scope, scope_id, extra)]

    def _plan(self, alert: Alert, ctx: PolicyContext) -> tuple[str, str, str, dict[str, Any]] | None:
        if alert.status == "firing":
            return self._plan_firing(alert, ctx)
        if alert.status == "resolved":
            return self._plan_resolved(alert)
        return None

    def _throttle(self, alert: Alert, action: str, scope: str, scope_id: str, now: int) -> list[Command] | None:
        """The cooldown per (action, unit, scope) and the hourly cap: the suppression when
        one holds ``action`` back, else ``None`` and the action counts against both
        (issued or, in a dry run, as good as issued). Unmasking is exempt from both."""
        if action == "unmask_modality":
            return None
        unit = "" if action in FUSION_ACTIONS else alert.modality  # the fusion step is one unit
        key = (action, unit, scope, scope_id)
        if now - self._last_action.get(key, now - self.config.cooldown_ms) < self.config.cooldown_ms:
            return self._suppress(alert, action, "cooldown")
        if len(self._recent) >= self.config.max_actions_per_hour:
            return self._suppress(alert, action, "rate_cap")
        self._last_action[key] = now
        self._recent.append(now)
        return None

    def _release(self, alert: Alert, others, scope: str, scope_id: str) -> list[Command]:
        """Unmask ``others``, whose masks only label-free evidence held, now that a fault is measured."""
        released = []
        for other in others:
            del self._masks[(other, scope, scope_id)]
            released.append(Command(
                command_id=f"{alert.alert_id}:unmask_modality:{other}", action="unmask_modality",
                issued_ms=alert.event_ms, modality=other, alert_id=alert.alert_id, scope=scope, scope_id=scope_id,
                reason=f"{alert.kind} {alert.status}: {alert.summary} (measured: releases the mask of {other} "
                       "that only label-free evidence held, so the fusion keeps a modality)"))
        return released

    def _record(self, alert: Alert, action: str, scope: str, scope_id: str, extra: dict[str, Any]) -> None:
        """The masks and rolled-back versions that ``action`` leaves in place."""
        if action == "mask_modality":
            self._masks[(alert.modality, scope, scope_id)] = [alert.alert_id]
            if alert.labels.get("evidence") == "agreement":
                self._inferred.add(alert.alert_id)
        elif action == "unmask_modality":
            del self._masks[(alert.modality, scope, scope_id)]
        elif action == "rollback_model":
            versions = self._rolled_back.setdefault(alert.modality, [])
            if extra["from_version"] not in versions:
                versions.append(extra["from_version"])

    @staticmethod
    def _command(alert: Alert, action: str, scope: str, scope_id: str, extra: dict[str, Any]) -> Command:
        return Command(
            command_id=f"{alert.alert_id}:{action}",
            action=action,
            issued_ms=alert.event_ms,
            modality=None if action in FUSION_ACTIONS else alert.modality,
            version=extra.get("version"),
            fusion_mode=extra.get("fusion_mode"),
            alert_id=alert.alert_id,
            reason=f"{alert.kind} {alert.status}: {alert.summary}{extra.get('why', '')}",
            scope=scope,
            scope_id=scope_id,
        )

    def _plan_firing(self, alert: Alert, ctx: PolicyContext) -> tuple[str, str, str, dict[str, Any]] | None:
        if alert.kind == "fusion_regression":
            action = self.config.fusion_action
            if self._masks:
                self._suppress(alert, action, "modality_masked")
                return None
            changed = sorted(m for m, (_, _, at) in ctx.version_changes.items() if m != "fusion"
                             and 0 <= alert.event_ms - at <= self.config.rollback_after_activation_ms)
            if changed:  # a new model version explains it: its degradation rolls it back
                self._suppress(alert, action, "model_version_changed")
                return None
            extra = {"fusion_mode": self.config.fusion_mode} if action == "set_fusion_mode" else {}
            return action, "global", "", extra
        if alert.kind not in MASKING_KINDS:
            return None
        if alert.kind == "degradation":
            change = ctx.version_changes.get(alert.modality)
            if change is not None:
                previous, current, changed_at = change
                recent = 0 <= alert.event_ms - changed_at <= self.config.rollback_after_activation_ms
                rolled = self._rolled_back.get(alert.modality, [])
                if recent and current in rolled:
                    # Already rolled back from this version (e.g. a second line's alert of the
                    # same release): the command is on its way; don't send another.
                    self._suppress(alert, "rollback_model", "rollback_in_flight")
                    return None
                if recent and previous != current and previous not in rolled:
                    why = f" (version {current} activated at {changed_at}; back to {previous})"
                    return "rollback_model", "global", "", {"version": previous, "from_version": current, "why": why}
            if alert.labels.get("evidence") == "agreement" and self._released_beside(alert, ctx):
                self._suppress(alert, "mask_modality", "model_version_changed")
                return None
        key = (alert.modality, alert.scope, alert.scope_id)
        holders = self._masks.get(key)
        if holders is not None:  # already masked by this policy: share the mask, send nothing
            if alert.alert_id not in holders:
                holders.append(alert.alert_id)
            return None
        others = [m for m in ctx.modalities if m != alert.modality]
        if others and all(self._masked_at(m, alert.scope, alert.scope_id) for m in others):
            # Measured beats inferred: a labelled (or sensor) fault releases masks that only
            # label-free alerts hold here; otherwise fusing nothing is worse than anything.
            inferred = [m for m in others if self._inferred_only(m, alert.scope, alert.scope_id)]
            if alert.labels.get("evidence") == "agreement" or len(inferred) != len(others):
                self._suppress(alert, "mask_modality", "last_modality")
                return None
            return "mask_modality", alert.scope, alert.scope_id, {"release": inferred}
        return "mask_modality", alert.scope, alert.scope_id, {}

    def _released_beside(self, alert: Alert, ctx: PolicyContext) -> list[str]:
        """Other modalities whose model version changed within ``rollback_after_activation_ms``
        before ``alert``: a label-free alarm judges a modality against the others' answers,
        so a bad release of one of them makes a healthy one look like the odd one out."""
        window = self.config.rollback_after_activation_ms
        return sorted(m for m, (previous, current, at) in ctx.version_changes.items()
                      if m not in (alert.modality, "fusion") and previous != current
                      and 0 <= alert.event_ms - at <= window)

    def _inferred_only(self, modality: str, scope: str, scope_id: str) -> bool:
        holders = self._masks.get((modality, scope, scope_id))
        return bool(holders) and all(h in self._inferred for h in holders)

    def _masked_at(self, modality: str, scope: str, scope_id: str) -> bool:
        return (modality, "global", "") in self._masks or (modality, scope, scope_id) in self._masks

    def _plan_resolved(self, alert: Alert) -> tuple[str, str, str, dict[str, Any]] | None:
        if alert.kind not in MASKING_KINDS:
            return None
        key = (alert.modality, alert.scope, alert.scope_id)
        holders = self._masks.get(key)
        if holders is None or alert.alert_id not in holders:
            return None
        if len(holders) > 1:  # another open alert still needs the mask
            holders.remove(alert.alert_id)
            return None
        return "unmask_modality", alert.scope, alert.scope_id, {}

    def _suppress(self, alert: Alert, action: str, reason: str) -> list[Command]:
        self._suppressed.append(Suppressed(alert.alert_id, action, alert.modality, reason))
        return []

    def _prune(self, now: int) -> None:
        # Keeps the state bounded; entries older than these horizons cannot matter again.
        self._recent = [t for t in self._recent if now - t < HOUR_MS]
        self._last_action = {k: t for k, t in self._last_action.items() if now - t < self.config.cooldown_ms}

    def state_dict(self) -> dict[str, Any]:
        """The policy's memory as plain JSON-able values."""
        return {
            "last_action": [[*k, t] for k, t in sorted(self._last_action.items())],
            "recent": list(self._recent),
            "masks": [[*k, list(v)] for k, v in sorted(self._masks.items())],
            "rolled_back": {m: list(v) for m, v in sorted(self._rolled_back.items())},
            "inferred": sorted(self._inferred & {h for v in self._masks.values() for h in v}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`; an empty mapping is a fresh policy."""
        self.reset()
        self._last_action = {(a, m, s, i): int(t) for a, m, s, i, t in state.get("last_action", [])}
        self._recent = [int(t) for t in state.get("recent", [])]
        self._masks = {(m, s, i): list(v) for m, s, i, v in state.get("masks", [])}
        self._inferred = set(state.get("inferred", []))
        self._rolled_back = {m: list(v) for m, v in state.get("rolled_back", {}).items()}
