"""Pipeline processes as children: ``streamfuse <command>`` with the parent's settings.

The demo, the replay and the tests start workers, monitors, synchronizers and
dispatchers the same way: the child reads its settings from the environment
(:func:`child_env`), logs to a file of its own, and is stopped with SIGTERM, then
SIGKILL after a deadline (:func:`stop_children`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from streamfuse.config import Settings
from streamfuse.errors import StreamfuseError


class ChildExited(StreamfuseError):
    """A child process that should still run has exited; its log says why.

    Attributes:
        component: the ``streamfuse`` command it ran.
        returncode: its exit status.
        log: its log file.
    """

    def __init__(self, component: str, returncode: int, log: Path) -> None:
        super().__init__(f"{component} exited with {returncode}; see {log}")
        self.component, self.returncode, self.log = component, returncode, log


def child_env(settings: Settings) -> dict[str, str]:
    """Environment that gives a child process the same effective settings."""
    env = dict(os.environ)
    env.update({
        "STREAMFUSE_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "STREAMFUSE_BROKER": settings.broker_kind,
        "STREAMFUSE_TOPIC_PREFIX": settings.topic_prefix,
        "STREAMFUSE_PARTITIONS": str(settings.partitions),
        "STREAMFUSE_REDIS_URL": settings.redis_url,
        "STREAMFUSE_REDIS_PREFIX": settings.redis_prefix,
        "STREAMFUSE_MODEL_DIR": str(Path(settings.model_dir).resolve()),
        "STREAMFUSE_BUNDLE": settings.bundle,
        "STREAMFUSE_MONITOR": settings.monitor.model_dump_json(),
        "STREAMFUSE_WORKER": settings.worker.model_dump_json(),
        "STREAMFUSE_ALERTS": settings.alerts.model_dump_json(),
        "STREAMFUSE_SIM": settings.sim.model_dump_json(),
        "PYTHONUNBUFFERED": "1",
    })
    env.update(settings.secret_env())  # the JSON dumps above mask secrets; these set them
    return env


def spawn(component: str, settings: Settings, log_dir: Path, *args: str) -> subprocess.Popen:
    """Start ``streamfuse <component> [args]`` as a child process logging to
    ``log_dir/<component>.log`` (appended)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / f"{component}.log", "ab") as logf:  # the child holds its own copy
        return subprocess.Popen([sys.executable, "-m", "streamfuse", component, *args], env=child_env(settings),
                                stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def stop_children(procs: list[subprocess.Popen], timeout_s: float = 15.0) -> None:
    """SIGTERM every child still running, then SIGKILL those not gone within ``timeout_s``
    (one deadline for all)."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + timeout_s
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
