"""Process entry point: `python -m workers.alerts [OPTIONS]` is `streamfuse alerts dispatch [OPTIONS]`
(for process managers and container images that start modules rather than scripts)."""

import sys

from streamfuse.cli import main

if __name__ == "__main__":
    sys.argv[1:1] = ['alerts', 'dispatch']
    main()
