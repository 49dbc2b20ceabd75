"""Which OPC-UA readings are new, and which were missed while disconnected.

An OPC-UA subscription reports a value when it changes, and re-subscribing reports each
node's current value again. So after a reconnect the first notification of a node may be
the value the gateway already forwarded (``stale``: not a new reading, never re-emitted),
and the readings between the last one before the loss and the first new one after it
were never received: a :class:`Gap`, sized by the node's update period. Nothing is
filled in; the gap is reported (dead-letter topic, ``missing_readings``; a metric) and
the synchronizer marks the modality missing in every sample that has other readings.

Pure logic: times are passed in.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Gap:
    """No readings of ``node`` strictly between ``after_ms`` and ``before_ms``."""

    node: str
    after_ms: int  # the last reading before the connection was lost
    before_ms: int  # the first new reading after it came back
    missed: int  # readings expected in between at the node's period


class GapTracker:
    """Per node, the time of the last reading forwarded; see the module docstring.

    Examples:
        >>> t = GapTracker()
        >>> t.observe("n1", 1000, 200), t.observe("n1", 1200, 200)
        (('new', None), ('new', None))
        >>> t.disconnected()
        >>> t.observe("n1", 1200, 200)  # the current value, reported again on re-subscribe
        ('stale', None)
        >>> t.observe("n1", 2200, 200)
        ('new', Gap(node='n1', after_ms=1200, before_ms=2200, missed=4))
        >>> t.observe("n1", 2400, 200)
        ('new', None)
    """

    def __init__(self) -> None:
        self.last: dict[str, int] = {}
        self._after_loss: set[str] = set()

    def disconnected(self) -> None:
        """The connection was lost: each node's next new reading closes a possible gap."""
        self._after_loss = set(self.last)

    def observe(self, node: str, ts_ms: int, period_ms: float) -> tuple[str, Gap | None]:
        """Classify a reading of ``node`` at ``ts_ms``: ``new`` (forward it) or ``stale``.

        Returns:
            The outcome and, for the first new reading after a loss, the gap before it
            (None when no reading is missing).
        """
        last = self.last.get(node)
        if last is not None and ts_ms <= last:
            return "stale", None
        gap = None
        if node in self._after_loss:
            self._after_loss.discard(node)
            missed = max(0, round((ts_ms - last) / period_ms) - 1) if period_ms > 0 else 0
            if missed:
                gap = Gap(node, last, ts_ms, missed)
        self.last[node] = ts_ms
        return "new", gap
