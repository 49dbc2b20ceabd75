"""Process helpers shared by the chaos tests: a private redis-server that can be stopped
and restarted on the same port, freezing a process, waiting with a deadline, and
:class:`ChaosRun`, the whole pipeline as child processes with its outputs counted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Callable

from streamfuse.embedded import free_port


class RedisServer:
    """A redis-server of the test's own, on a free port (never the shared 6379)."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        import redis

        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
             "--appendfsync", "always", "--dir", str(self.workdir)],
            stdout=open(self.workdir / "redis.log", "ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url, socket_timeout=1)
        wait_until(lambda: _pings(client), 10, f"redis-server on port {self.port} to answer")
        return self

    def stop(self) -> None:
        """Stop it (SIGTERM); its append-only file keeps the data for the next start, as a
        production Redis with persistence would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _pings(client) -> bool:
    import redis

    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str, every_s: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def freeze(pid: int) -> None:
    os.kill(pid, signal.SIGSTOP)


def thaw(pid: int) -> None:
    os.kill(pid, signal.SIGCONT)


# ---------------------------------------------------------------- the pipeline under chaos

CHAOS_START_MS = 1_800_000_000_000
CHAOS_WINDOW_MS = 2_000


def chaos_settings(settings, **updates):
    """The scenario settings of the chaos tests: a small plant, 2 s KPI windows, short
    session and retry timings (the broker profile already gives 2 s sessions)."""
    s = settings.model_copy(update={
        "sim": settings.sim.model_copy(update={"assets": 2, "lines": 2, "rate_hz": 5.0, "label_delay_ms": 1000}),
        "monitor": settings.monitor.model_copy(update={
            "kpi_window_ms": CHAOS_WINDOW_MS, "label_grace_ms": 4_000, "min_labelled": 10, "cooldown_ms": 0}),
        "alerts": settings.alerts.model_copy(update={
            "group": f"alerts-{settings.topic_prefix.strip('.')}", "allow_private_targets": True,
            "group_wait_s": 0.1, "group_interval_s": 0.1, "backoff_initial_s": 0.2, "backoff_max_s": 1.0,
            "request_timeout_s": 2.0}),
    })
    return s.model_copy(update=updates)


class ChaosRun:
    """Worker, monitor and alert dispatcher as child processes, the simulated plant in a
    thread, an observer of every output topic, and a webhook receiver subscribed to every
    alert. ``run()`` waits (with a deadline) until every sample has a prediction and
    ``until`` holds, calling each ``(condition, action)`` chaos step once its condition
    holds, and fails at once when a process that should be alive is not."""

    def __init__(self, settings, log_dir: Path, faults: list[str], duration_s: float, speed: float = 4.0,
                 processes: tuple[str, ...] = ("worker", "monitor", "dispatcher"), run_id: str = "ch",
                 env: dict[str, dict[str, str]] | None = None, sim_options: dict | None = None) -> None:
        from webhook_receiver import WebhookReceiver
        from streamfuse.alerts.subscriptions import SubscriptionStore
        from streamfuse.demo import Observer
        from streamfuse.sim.faults import parse_fault
        from streamfuse.sim.publish import SimPublisher
        from streamfuse.store import connect
        from streamfuse.topics import ensure_topics

        self.settings, self.log_dir, self.duration_s, self.speed = settings, log_dir, duration_s, speed
        ensure_topics(settings)
        self.rx = WebhookReceiver().start()
        SubscriptionStore(connect(settings), settings.redis_prefix, settings.alerts).create(self.rx.url, 0,
                                                                                             sub_id="chaos")
        self.procs = {name: self.spawn(name, (env or {}).get(name)) for name in processes}
        self.observer = Observer(settings, CHAOS_START_MS)
        self.sim = SimPublisher(settings, tuple(parse_fault(f) for f in faults), start_ms=CHAOS_START_MS,
                                speed=speed, run_id=run_id, **(sim_options or {}))
        self.thread = threading.Thread(target=self.sim.run, kwargs={"duration_s": duration_s}, daemon=True)

    def spawn(self, name: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        from streamfuse.procs import child_env

        args = {"worker": ["worker"], "monitor": ["monitor"], "dispatcher": ["alerts", "dispatch", "-v"],
                "sync": ["sync"]}[name]
        self.log_dir.mkdir(parents=True, exist_ok=True)
        out = open(self.log_dir / f"{name}.log", "ab")
        return subprocess.Popen([sys.executable, "-m", "streamfuse", *args], env={**child_env(self.settings),
                                **(env or {})}, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def restart(self, name: str, sig: int = signal.SIGKILL, env: dict[str, str] | None = None) -> None:
        p = self.procs[name]
        if p.poll() is None:
            p.send_signal(sig)
        p.wait(30)
        self.procs[name] = self.spawn(name, env)

    def log(self, name: str) -> str:
        return (self.log_dir / f"{name}.log").read_text(errors="replace")

    def check_alive(self) -> None:
        for name, p in self.procs.items():
            if p.poll() is not None:
                raise AssertionError(f"{name} exited with {p.returncode}:\n{self.log(name)[-3000:]}")

    def run(self, steps=(), until=lambda run: True, timeout_s: float = 150.0, every_sample: bool = True) -> "ChaosRun":
        """Run the steps until ``until(run)`` holds (and, with ``every_sample``, every sample
        of the plant was predicted); AssertionError after ``timeout_s``."""
        steps = list(steps)
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.observer.poll(200)
            for step in list(steps):
                if step[0](self):
                    step[1](self)
                    steps.remove(step)
            self.check_alive()
            if (not steps and not self.thread.is_alive()
                    and (not every_sample or self.predicted >= set(self.sim.stats.sample_ids)) and until(self)):
                break
        else:
            raise AssertionError(f"chaos run did not complete in {timeout_s:.0f} s: {self.summary()}; "
                                 f"steps left {len(steps)}")
        for _ in range(3):
            self.observer.poll(200)
        return self

    @property
    def predicted(self) -> set[str]:
        return set(self.observer.prediction_counts)

    def received(self) -> Counter:
        """(fingerprint, status, startsAt) -> how many times the receiver got it."""
        with self.rx._lock:
            return Counter((a["fingerprint"], a["status"], a["startsAt"]) for d in self.rx.deliveries
                           for a in d.body.get("alerts", []))

    def published(self) -> Counter:
        """(alert_id, status) -> how many times it is on the alerts topic."""
        return Counter((a["alert_id"], a["status"]) for a in self.observer.alerts)

    def summary(self) -> str:
        ids = set(self.sim.stats.sample_ids)
        counts = self.observer.prediction_counts
        dup = sum(n - 1 for n in counts.values())
        return (f"samples {len(ids)}, predicted {len(ids & set(counts))}, lost {len(ids - set(counts))}, "
                f"duplicate predictions {dup}, alerts published {len(self.observer.alerts)} "
                f"({sum(self.published().values()) - len(self.published())} repeated), "
                f"at the receiver {sum(self.received().values())} "
                f"({sum(self.received().values()) - len(self.received())} repeated), "
                f"commands {len(self.observer.commands)}")

    def close(self) -> None:
        """Kill every process (what they did is already counted) and reap it."""
        self.sim.stop()
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
            p.wait(10)
        self.thread.join(10)
        self.observer.consumer.close()
        self.rx.close()

    def assert_healthy(self, max_duplicate_predictions: int, kinds: tuple[str, ...] = ("sensor_fault",)) -> None:
        """0 samples lost, bounded duplicate predictions, every process alive, and every alert
        of ``kinds`` that the monitor published at the receiver exactly once (alerts of other
        kinds may be muted by inhibition, so only their count is checked: at most once)."""
        self.check_alive()
        ids = set(self.sim.stats.sample_ids)
        counts = self.observer.prediction_counts
        assert ids <= set(counts), f"{len(ids - set(counts))} samples never predicted: {self.summary()}"
        assert sum(n - 1 for n in counts.values()) <= max_duplicate_predictions, self.summary()
        got = self.received()
        assert all(n == 1 for n in got.values()), {k: n for k, n in got.items() if n > 1}
        assert self.published_of(kinds), f"no {kinds} alert was published: {self.summary()}"
        assert not self.undelivered(kinds), f"published but never received: {self.undelivered(kinds)}"

    def published_of(self, kinds: tuple[str, ...] = ("sensor_fault",)) -> set[tuple[str, str, str]]:
        """(fingerprint, status, startsAt) of every alert of ``kinds`` on the alerts topic."""
        from streamfuse.alerts.formats import iso

        return {(a["alert_id"].split("@")[0], a["status"], iso(int(a["alert_id"].split("@")[1])))
                for a in self.observer.alerts if a["kind"] in kinds}

    def undelivered(self, kinds: tuple[str, ...] = ("sensor_fault",)) -> set[tuple[str, str, str]]:
        """Alerts of ``kinds`` published but not (yet) at the receiver."""
        return self.published_of(kinds) - set(self.received())


class Timed:
    """Chaos steps in sequence: ``start`` when ``when(run)`` holds, ``end`` ``hold_s`` seconds
    later (the length of the fault, not a synchronization) once ``also(run)`` holds too
    (e.g. "an alert was published during the fault")."""

    def __init__(self, when, start, end, hold_s: float, also=lambda run: True) -> None:
        self.when, self.start, self.end, self.hold_s, self.also = when, start, end, hold_s, also
        self.started: float | None = None
        self.ended: float | None = None

    def steps(self) -> list:
        def begin(run) -> None:
            self.start(run)
            self.started = time.monotonic()

        def finish(run) -> None:
            self.end(run)
            self.ended = time.monotonic()

        def due(run) -> bool:
            return self.started is not None and time.monotonic() - self.started >= self.hold_s and self.also(run)

        return [(self.when, begin), (due, finish)]
