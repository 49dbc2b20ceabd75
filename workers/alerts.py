#!/usr/bin/env python3
"""Process entry point: ``python workers/alerts.py [OPTIONS]`` is ``streamfuse alerts dispatch [OPTIONS]``, for
process managers that start a script. Installed, ``python -m streamfuse alerts dispatch`` is the same."""

import sys
from pathlib import Path

# The checkout beside this folder, not the folder itself: its sync.py, monitor.py, ... would
# shadow top-level modules of those names.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from streamfuse.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.argv[1:1] = ["alerts", "dispatch"]
    main()
