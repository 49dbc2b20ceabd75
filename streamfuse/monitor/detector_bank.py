"""The monitor's window detectors, one per :class:`DetKey`: made lazily (their settings
come from the baselines), each taking its checkpointed state when it is made.

The checkpoint rows are ``[kind, check, scope, scope_id, modality, class name, state]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


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


class DetectorBank:
    """Detectors by key.

    Examples:
        >>> from streamfuse.monitor.sensor_faults import UpstreamOutage
        >>> bank = DetectorBank()
        >>> key = DetKey("upstream_outage", "", "global", "", "")
        >>> bank.get(key, UpstreamOutage).update(2, 2)
        >>> rows = bank.state_dict()
        >>> rows[0][:6]
        ['upstream_outage', '', 'global', '', '', 'UpstreamOutage']
        >>> again = DetectorBank()
        >>> again.load_state_dict(rows)
        >>> again.get(key, UpstreamOutage).firing
        True
    """

    def __init__(self) -> None:
        self._detectors: dict[DetKey, Any] = {}
        self._saved: dict[DetKey, dict[str, Any]] = {}  # restored state, applied when one is made

    def get(self, key: DetKey, factory: Callable[[], Any]) -> Any:
        """The detector of ``key``, made by ``factory`` (with its saved state) on first use."""
        det = self._detectors.get(key)
        if det is None:
            det = self._detectors[key] = factory()
            saved = self._saved.pop(key, None)
            if saved is not None:
                det.load_state_dict(saved)
        return det

    def items(self):
        return self._detectors.items()

    def state_dict(self) -> list[list]:
        return [[*k.to_list(), type(v).__name__, v.state_dict()] for k, v in sorted(self._detectors.items())]

    def load_state_dict(self, rows: list) -> None:
        self._detectors = {}
        self._saved = {DetKey(*row[:5]): row[6] for row in rows if isinstance(row, list)}
