"""Process entry point: `python -m workers.inference [OPTIONS]` is `streamfuse worker [OPTIONS]`
(for process managers and container images that start modules rather than scripts)."""

import sys

from streamfuse.cli import main

if __name__ == "__main__":
    sys.argv[1:1] = ['worker']
    main()
