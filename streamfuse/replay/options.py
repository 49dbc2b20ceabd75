"""What a replay is asked to do: :class:`ReplayOptions`, the one place its defaults live."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from streamfuse.replay.errors import ReplayError

STALL_S = 120.0
"""A replay's wait (for predictions, commands, the synchronizer) that sees no progress
this long fails: a pipeline process is stuck, not slow."""


@dataclass(frozen=True)
class ReplayOptions:
    """The options of one :func:`~streamfuse.replay.replayer.replay` (all optional).

    Args:
        namespace: topic prefix of the replay (default ``replay-<random>.``); never the
            live one.
        speed: event-time seconds per wall second; None = as fast as the pipeline goes.
        models: unit -> version to serve (default: the live active versions).
        policy_overrides: ``MonitorSettings`` fields to change (windows, thresholds...).
        report_dir: write ``summary.json`` and ``report.html`` here.
        time_range: ``(from_s, to_s)`` seconds from the recording's first event.
        assets: only these asset ids.
        keep: keep the namespace's topics and Redis keys (to inspect them).
        bundle: a bundle directory whose units to import and serve.
        max_batch: the replay worker's micro-batch limit; None = the live setting. Either
            way every number is bit-for-bit reproducible: the worker cuts stream batches
            (by the records, never the clock; see :mod:`streamfuse.inference.feeder`).
        progress: show a progress bar (events/s, ETA).
        verify: check the recording's checksums first.
        title: a name for the report.

    Raises:
        ReplayError: ``speed`` is not positive.

    Examples:
        >>> ReplayOptions(speed=2.0, report_dir="out/fog").keep
        False
        >>> ReplayOptions(speed=0)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        streamfuse.replay.errors.ReplayError: speed must be > 0 (event seconds per wall second), got 0; ...
    """

    namespace: str | None = None
    speed: float | None = None
    models: Mapping[str, str] | None = None
    policy_overrides: Mapping[str, Any] | None = None
    report_dir: str | Path | None = None
    time_range: tuple[float | None, float | None] | None = None
    assets: Sequence[str] | None = None
    keep: bool = False
    bundle: str | Path | None = None
    max_batch: int | None = None
    progress: bool = False
    verify: bool = True
    title: str | None = None

    def __post_init__(self) -> None:
        if self.speed is not None and self.speed <= 0:
            raise ReplayError(f"speed must be > 0 (event seconds per wall second), got {self.speed}; "
                              "or use --max-speed")

