"""`streamfuse broker` leaves no process behind (SIGTERM, Ctrl-C, even SIGKILL of the CLI),
and refuses a port that is taken instead of reporting ready against another process."""

from __future__ import annotations

import random
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from chaoslib import wait_until
from streamfuse.embedded import EmbeddedBroker, free_port

pytestmark = pytest.mark.integration


def unshared_port() -> int:
    """A free port below the kernel's ephemeral range (``ip_local_port_range``): the test
    stops a broker and binds its port again, and a port from that range can be taken in
    between by any outgoing connection on the machine (seen once in CI)."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(max(1024, low - 12_000), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    return free_port()


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def running(pid: int) -> bool:
    """Exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def start_cli(port: int, tmp_path: Path) -> tuple[subprocess.Popen, int]:
    out = open(tmp_path / f"broker-{port}.out", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "streamfuse", "broker", "--port", str(port)],
                            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    wait_until(lambda: "broker ready" in (tmp_path / f"broker-{port}.out").read_text() or proc.poll() is not None,
               30, "broker ready")
    assert proc.poll() is None, (tmp_path / f"broker-{port}.out").read_text()
    kids = children(proc.pid)
    assert len(kids) == 1, kids
    return proc, kids[0]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_stopping_the_broker_command_leaves_no_process(sig, tmp_path):
    port = unshared_port()
    proc, tansu = start_cli(port, tmp_path)
    proc.send_signal(sig)
    proc.wait(10)
    wait_until(lambda: not running(tansu), 5, f"the broker child {tansu} to be gone after {sig.name}")
    # the port is free again: a new broker there starts cleanly
    with EmbeddedBroker(port=port) as b:
        assert b.bootstrap.endswith(f":{port}")


def test_a_taken_port_is_an_error_naming_it_and_never_ready(tmp_path):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        run = subprocess.run([sys.executable, "-m", "streamfuse", "broker", "--port", str(port)],
                             capture_output=True, text=True, timeout=60)
    assert run.returncode != 0
    assert f"port {port}" in run.stdout + run.stderr and "already in use" in run.stdout + run.stderr
    assert "broker ready" not in run.stdout + run.stderr


def test_a_second_broker_on_the_port_of_a_running_one_fails(tmp_path):
    with EmbeddedBroker() as first:
        with pytest.raises(Exception, match=f"port {first.port}"):
            EmbeddedBroker(port=first.port).start()
        assert running(first.pid)
