"""Wall-clock time in the unit events carry: integer milliseconds since the Unix epoch.

Pure logic never calls it: the synchronizer, KPI windows, detectors and policy take the
time as an argument. The processes around them read the clock here.
"""

from __future__ import annotations

import time


def now_ms() -> int:
    """Wall-clock time, integer ms since the Unix epoch.

    Examples:
        >>> now_ms() > 1_700_000_000_000
        True
    """
    return int(time.time() * 1000)
