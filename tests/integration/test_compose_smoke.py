"""Compose smoke test: the stack docker-compose.yml declares really runs.

No Docker engine here, so every streamfuse service runs as a local process with the
command and environment compose gives it, only re-pointed the way a container network
would be: the `kafka` host is the embedded broker (with its broker profile), `redis` is
the local Redis, `/models` and `/data` are temporary directories, published and metrics
ports are free local ones, and names get this test's topic prefix, Redis prefix, consumer
groups and monitor app id. On top, a few timings are shortened (KPI windows, the
simulator's speed) and the receiver's loopback address is allowed. Then a fault injected
by the simulator must reach a webhook receiver, subscribed through the alerts API
service, as a signed alert, and every service's own healthcheck must pass.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from webhook_receiver import WebhookReceiver
from streamfuse.alerts.sealing import generate_key
from streamfuse.procs import stop_children
from streamfuse.embedded import free_port
from test_compose import COMPOSE_FILE, ONE_SHOT, _env, _load_yaml

# Seven processes (one with torch) start on the test machine: 31 s on a 2-core box beside
# a benchmark, so it runs in every `make test`.
pytestmark = pytest.mark.integration
TOKEN = "smoke-token"
FAULT = "series:flatline@8"
FASTER = {  # timings only; every other value comes from docker-compose.yml
    "STREAMFUSE_MONITOR__KPI_WINDOW_MS": "2000", "STREAMFUSE_MONITOR__LABEL_GRACE_MS": "3000",
    "STREAMFUSE_SIM__LABEL_DELAY_MS": "1000", "STREAMFUSE_ALERTS__GROUP_WAIT_S": "0.5",
    "STREAMFUSE_WORKER__DEVICE": "cpu", "STREAMFUSE_WORKER__THREADS": "1",
}
_VAR = re.compile(r"\$\{(\w+)(?::?[-?][^}]*)?\}")


class Stack:
    """The compose services as local processes."""

    def __init__(self, settings, broker, tmp: Path) -> None:
        self.settings, self.broker, self.tmp = settings, broker, tmp
        self.compose = _load_yaml(COMPOSE_FILE)["services"]
        self.ports: dict[str, str] = {}  # a port compose uses -> the free local one
        self.host_env = {"STREAMFUSE_API_TOKEN": TOKEN, "STREAMFUSE_SECRET_KEY": generate_key()}
        self.procs: dict[str, subprocess.Popen] = {}

    def services(self) -> list[str]:
        return [n for n, svc in self.compose.items() if svc.get("image") == "streamfuse:latest"]

    def port(self, port: str) -> str:
        return self.ports.setdefault(port, str(free_port()))

    def env(self, name: str) -> dict[str, str]:
        s = self.settings
        env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMFUSE_")}
        for key, value in _env(self.compose[name]).items():
            env[key] = _VAR.sub(lambda m: self.host_env[m.group(1)], value)
        assert env["STREAMFUSE_KAFKA_BOOTSTRAP"] == "kafka:9092"
        env["STREAMFUSE_KAFKA_BOOTSTRAP"] = self.broker.bootstrap
        env["STREAMFUSE_BROKER"] = "tansu"  # the embedded broker's client profile
        env["STREAMFUSE_REDIS_URL"] = env["STREAMFUSE_REDIS_URL"].replace("//redis:", "//127.0.0.1:")
        for key, value in list(env.items()):
            if key.endswith("METRICS_PORT"):
                env[key] = self.port(value)
            elif value.startswith(("/models", "/data")):
                env[key] = str(self.tmp / value.lstrip("/"))
        env["STREAMFUSE_MODEL_DIR"], env["STREAMFUSE_BUNDLE"] = str(s.model_dir), s.bundle
        env.update({"STREAMFUSE_TOPIC_PREFIX": s.topic_prefix, "STREAMFUSE_REDIS_PREFIX": s.redis_prefix,
                    "STREAMFUSE_WORKER__GROUP": s.worker.group, "STREAMFUSE_MONITOR__APP_ID": s.monitor.app_id,
                    "STREAMFUSE_ALERTS__GROUP": f"{s.monitor.app_id}-alerts",
                    "STREAMFUSE_ALERTS__ALLOW_PRIVATE_TARGETS": "true", "PYTHONUNBUFFERED": "1", **FASTER})
        return env

    def argv(self, args: list[str]) -> list[str]:
        """A compose command or healthcheck with the local ports, prefix and interpreter."""
        out = []
        for i, a in enumerate(args):
            a = str(a)
            if i and args[i - 1] in ("--metrics-port", "--port"):
                a = self.port(a)
            a = re.sub(r"(?<=127\.0\.0\.1:)(\d+)", lambda m: self.port(m.group(1)), a)
            out.append(self.settings.topic_prefix + a[3:] if a.startswith("sf.") else a)
        return [sys.executable, "-m", "streamfuse", *out[1:]] if out[0] == "streamfuse" else out

    def start(self, name: str, extra: tuple[str, ...] = ()) -> subprocess.Popen:
        cmd = self.argv(["streamfuse", *self.compose[name]["command"], *extra])
        log = open(self.tmp / f"{name}.log", "ab")
        self.procs[name] = subprocess.Popen(cmd, env=self.env(name), stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL)
        return self.procs[name]

    def healthcheck(self, name: str) -> subprocess.CompletedProcess:
        test = self.compose[name]["healthcheck"]["test"]
        assert test[0] == "CMD", (name, test)
        return subprocess.run(self.argv(test[1:]), env=self.env(name), capture_output=True, text=True, timeout=60)

    def alive(self) -> None:
        for name, p in self.procs.items():
            if name not in ONE_SHOT and p.poll() is not None:
                tail = (self.tmp / f"{name}.log").read_text(errors="replace")[-3000:]
                raise AssertionError(f"service {name} exited with {p.returncode}:\n{tail}")

    def wait(self, predicate, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            self.alive()
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
            time.sleep(0.2)


def metrics(stack: Stack, name: str) -> str:
    port = stack.env(name)[f"STREAMFUSE_{name.upper()}__METRICS_PORT"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return resp.read().decode()


def subscribe(stack: Stack, url: str, secret: str) -> dict:
    api = f"http://127.0.0.1:{stack.port('9095')}"
    body = json.dumps({"url": url, "secret": secret, "matchers": ["modality=series"]}).encode()
    req = urllib.request.Request(f"{api}/subscriptions", data=body, method="POST", headers={
        "Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def test_a_simulated_fault_becomes_an_alert_through_the_compose_services(settings, broker, tmp_path):
    stack = Stack(settings, broker, tmp_path)
    assert set(stack.services()) >= {"topics", "sync", "worker", "monitor", "alerts-dispatcher", "alerts-api",
                                     "simulator"}
    topics = stack.start("topics")
    assert topics.wait(timeout=60) == 0, (tmp_path / "topics.log").read_text()
    with WebhookReceiver(secret="smoke-secret") as rx:
        try:
            for name in ("worker", "monitor", "sync", "alerts-dispatcher", "alerts-api"):
                stack.start(name)
            stack.wait(lambda: stack.healthcheck("alerts-api").returncode == 0, 60, "the alerts API's healthcheck")
            assert subscribe(stack, rx.url, "smoke-secret")["signed"] is True
            stack.start("simulator", ("--fault", FAULT, "--speed", "3"))
            stack.wait(lambda: any(a["status"] == "firing" and a["labels"]["modality"] == "series"
                                   for d in rx.deliveries for a in d.body["alerts"]),
                       150, f"a firing alert for {FAULT} at the webhook")
            assert all(d.signed for d in rx.deliveries)
            unhealthy = {}
            for name in stack.procs.keys() - ONE_SHOT:
                result = stack.healthcheck(name)
                if result.returncode != 0:
                    unhealthy[name] = result.stdout + result.stderr
            assert unhealthy == {}
            # The series the alert rules read are there (deploy/rules/streamfuse.rules.yml).
            exposed = {name: metrics(stack, name) for name in ("worker", "monitor")}
            assert re.search(r"^streamfuse_worker_consumer_lag_records \d", exposed["worker"], re.M)
            assert re.search(r"^streamfuse_monitor_watermark_seconds 1\.\d+e\+09", exposed["monitor"], re.M)
            stack.alive()
        finally:
            stop_children(list(stack.procs.values()))
