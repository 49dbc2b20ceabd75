"""What every benchmark writes: the machine it ran on, and its JSON result.

The scripts in ``bench/`` run as ``python bench/NAME.py``, so this module is importable
as ``report`` (the script's folder is first on ``sys.path``).
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any


def cpu_name() -> str:
    """The CPU model from ``/proc/cpuinfo`` (else what ``platform`` knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """Where and when a result was measured, for its JSON and for docs/BENCHMARKS.md."""
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": cpu_name(),
            "cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}


def emit(result: dict[str, Any], path: Path | None, show: bool = True) -> None:
    """Print ``result`` as JSON (unless ``show`` is False) and write it to ``path`` if given."""
    text = json.dumps(result, indent=2, default=str)
    if show:
        print(text)
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
