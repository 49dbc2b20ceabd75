"""Crash points for the chaos tests.

A process started with ``STREAMFUSE_FAULTPOINT=NAME`` exits at once (``os._exit``, no
clean-up, like a SIGKILL) the first time it reaches :func:`reached` with that name. The
tests use it to kill a process at an exact step, e.g. ``monitor-after-produce``: after
the broker acknowledged an alert, before its claim is written to Redis. Unset (always,
outside the tests) it costs one dictionary lookup. It is deliberately not a
:class:`~streamfuse.config.Settings` field: no deployment should ever set it.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)
EXIT_CODE = 86  # distinct from a crash (1) and a signal (negative / 128+n)
POINTS = ("monitor-after-produce",)


def reached(name: str) -> None:
    """Exit the process now when ``STREAMFUSE_FAULTPOINT`` names ``name``."""
    if os.environ.get("STREAMFUSE_FAULTPOINT") == name:
        log.warning("fault point %s reached: exiting with %d", name, EXIT_CODE)
        logging.shutdown()
        os._exit(EXIT_CODE)
