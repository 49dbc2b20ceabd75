"""Predictions per second through the monitor, against the raw faust consume rate of
the same messages, in one run on the embedded broker.

Both sides are faust workers in their own processes reading the same backlog of
predictions and labels: the reference only counts events; the monitor decodes, joins
labels, keeps KPI windows, runs the detectors and checkpoints its tables. Each exposes
a Prometheus counter; the rate is measured between the first and the last event.

Each side runs ``--repeats`` times, interleaved (the broker shares the two cores, so one
run says little); the report has the medians of the rates and of each process's CPU per
event (``/proc``), and both ratios. Then ``--replicas`` redundant monitors (``streamfuse
monitor --replica``: each its own app id, each reads everything) run at once, each one's
rate and CPU per event reported.

    python bench/monitor_throughput.py --predictions 20000 --json out/monitor_throughput.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from streamfuse.config import Settings
from streamfuse.embedded import EmbeddedBroker, free_port
from streamfuse.events import MSGPACK, Label, Prediction, encode, headers
from streamfuse.kafka import make_producer
from streamfuse.topics import Topics, ensure_topics
from report import emit, machine

CLASSES = ("bearing", "imbalance", "normal", "overheat")
MODALITIES = ("audio", "image", "series")


def synthetic(n: int, seed: int = 0):
    """Predictions of 8 assets at 5 Hz, each with its label; the image model gets worse halfway."""
    rng = random.Random(seed)
    t0 = 1_800_000_000_000
    for i in range(n):
        asset = f"asset-{i % 8}"
        ts = t0 + (i // 8) * 200
        truth = rng.randrange(4)
        probs = {}
        for m in MODALITIES:
            good = rng.random() < (0.85 if not (m == "image" and i > n // 2) else 0.3)
            k = truth if good else rng.randrange(4)
            p = [0.1 / 3] * 4
            p[k] = 0.9
            probs[m] = tuple(p)
        fused = tuple(sum(probs[m][c] for m in MODALITIES) / 3 for c in range(4))
        y = max(range(4), key=fused.__getitem__)
        sid = f"b-{i}"
        pred = Prediction(sid, asset, ts, CLASSES, fused, CLASSES[y], "ume", probs, line_id=f"line-{i % 2}",
                          contributions={m: 1 / 3 for m in MODALITIES}, versions={m: "v1" for m in MODALITIES},
                          worker_id="bench", signal_std={m: 1.0 for m in MODALITIES},
                          digest={m: rng.getrandbits(32) for m in MODALITIES})
        yield pred, Label(sid, asset, ts, CLASSES[truth], line_id=f"line-{i % 2}")


RAW_APP = r"""
import os, sys
import faust
from prometheus_client import Counter, start_http_server
from streamfuse.config import Settings
from streamfuse.faust_transport import install
from streamfuse.kafka import faust_config
from streamfuse.topics import Topics
s = Settings()
start_http_server(int(os.environ["BENCH_PORT"]))
events = Counter("bench_events_total", "events")
app = faust.App("raw-" + s.monitor.app_id, **faust_config(s), web_enabled=False, autodiscover=False,
                datadir="/tmp/raw-" + s.monitor.app_id)
install(app)  # the broker profile's transport, as the monitor's app gets it
t = Topics(s.topic_prefix)
source = app.topic(t.predictions, t.labels, key_serializer="raw", value_serializer="raw")
@app.agent(source)
async def count(stream):
    async for event in stream.events():
        events.inc()
from faust.worker import Worker
worker = Worker(app, loglevel="warn")
worker.spinner = None  # as the monitor: no DEBUG root logger for the spinner
worker.execute_from_commandline()
"""


def scrape(port: int, name: str) -> float:
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1).read().decode()
    except OSError:
        return 0.0
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (``/proc/<pid>/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(cmd: list[str], env: dict, port: int, metric: str, total: int, timeout_s: float) -> tuple[float, float]:
    """Events per second between the first and the last event, and the process's CPU
    milliseconds per event over the same stretch (its ``metric`` scraped every 50 ms until
    the first event and over the last 10 %, every 0.5 s in between)."""
    proc = subprocess.Popen(cmd, env={**env, "BENCH_PORT": str(port)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT)
    try:
        first = last = None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            n = scrape(port, metric)
            now = time.monotonic()
            if n > 0 and first is None:
                first = (now, n, cpu_s(proc.pid))
            if n >= total:
                last = (now, n, cpu_s(proc.pid))
                break
            # Fine steps at both ends, where the times are read; coarse ones in between: a
            # scrape renders the process's whole registry (the monitor's has hundreds of
            # series), and 20 a second cost the monitor about 8 % of its CPU in this bench
            # (production scrapes every 15 s or so).
            time.sleep(0.05 if first is None or n >= 0.9 * total else 0.5)
        if first is None or last is None:
            raise SystemExit(f"{cmd[-1]}: did not consume {total} events within {timeout_s} s")
        events = last[1] - first[1]
        return events / max(1e-3, last[0] - first[0]), 1000 * (last[2] - first[2]) / max(1.0, events)
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--predictions", type=int, default=20000)
    ap.add_argument("--repeats", type=int, default=3, help="raw and monitor runs, interleaved; medians reported")
    ap.add_argument("--replicas", type=int, default=2,
                    help="then one run of this many redundant monitors at once (0: none)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    tag = uuid.uuid4().hex[:6]
    runs: dict[str, list[tuple[float, float]]] = {"raw": [], "monitor": []}
    with EmbeddedBroker() as broker:
        settings = Settings(kafka_bootstrap=broker.bootstrap, broker="tansu", topic_prefix=f"mbench{tag}.",
                            redis_prefix=f"mbench:{tag}:")
        ensure_topics(settings)
        producer = make_producer(settings, "bench")
        t, hdrs = Topics(settings.topic_prefix), headers(MSGPACK)
        for pred, label in synthetic(args.predictions):
            producer.send(t.predictions, key=pred.asset_id.encode(), value=encode(pred), headers=hdrs)
            producer.send(t.labels, key=label.asset_id.encode(), value=encode(label), headers=hdrs)
        producer.flush()
        producer.close()
        total = 2 * args.predictions
        baselines = json.dumps({m: {"top1": 0.85, "macro_f1": 0.85} for m in MODALITIES})
        monitor_cmd = [sys.executable, "-c", "import json,sys; from streamfuse.config import Settings; "
                       "from streamfuse.monitor.app import run_monitor; "
                       f"run_monitor(Settings(), json.loads({baselines!r}))"]
        for i in range(args.repeats):  # each run its own consumer group: the whole backlog again
            env = {**os.environ, "STREAMFUSE_KAFKA_BOOTSTRAP": broker.bootstrap, "STREAMFUSE_BROKER": "tansu",
                   "STREAMFUSE_TOPIC_PREFIX": settings.topic_prefix, "STREAMFUSE_REDIS_PREFIX": settings.redis_prefix,
                   "STREAMFUSE_MONITOR__APP_ID": f"mbench-{tag}-{i}", "STREAMFUSE_MONITOR__KPI_WINDOW_MS": "5000"}
            runs["raw"].append(measure([sys.executable, "-c", RAW_APP], env, free_port(), "bench_events_total",
                                       total, 600))
            port = free_port()
            runs["monitor"].append(measure(monitor_cmd, {**env, "STREAMFUSE_MONITOR__METRICS_PORT": str(port)}, port,
                                           "streamfuse_monitor_events_total", total, 600))
            print(f"run {i + 1}: raw {runs['raw'][-1][0]:6.0f} events/s ({runs['raw'][-1][1]:.3f} CPU-ms/event), "
                  f"monitor {runs['monitor'][-1][0]:6.0f} events/s ({runs['monitor'][-1][1]:.3f} CPU-ms/event)")
        replicas = []
        if args.replicas:  # redundant monitors (`streamfuse monitor --replica`): each reads everything
            with ThreadPoolExecutor(args.replicas) as pool:
                futures = []
                for r in range(args.replicas):
                    port = free_port()
                    futures.append(pool.submit(measure, monitor_cmd, {
                        **env, "STREAMFUSE_MONITOR__APP_ID": f"mbench-{tag}-replica-{r}",
                        "STREAMFUSE_MONITOR__METRICS_PORT": str(port)}, port, "streamfuse_monitor_events_total",
                        total, 900))
                replicas = [f.result() for f in futures]
            print(f"{args.replicas} redundant monitors at once: " + ", ".join(
                f"{r:.0f} events/s ({c:.3f} CPU-ms/event)" for r, c in replicas))
        from streamfuse.store import StatusStore, connect

        StatusStore(connect(settings), settings.redis_prefix).clear()
    raw, mon = (statistics.median(r for r, _ in runs[k]) for k in ("raw", "monitor"))
    raw_cpu, mon_cpu = (statistics.median(c for _, c in runs[k]) for k in ("raw", "monitor"))
    print(f"raw faust consume: {raw:9.0f} events/s  {raw_cpu:.3f} CPU-ms/event (median of {args.repeats})")
    print(f"monitor:           {mon:9.0f} events/s  {mon_cpu:.3f} CPU-ms/event "
          f"({mon / 2:.0f} predictions/s with their labels)")
    print(f"ratio monitor/raw: {mon / raw:.3f} (events/s), {raw_cpu / mon_cpu:.3f} (CPU per event)")
    result = {"raw_events_per_s": round(raw, 1), "monitor_events_per_s": round(mon, 1),
              "monitor_predictions_per_s": round(mon / 2, 1), "ratio": round(mon / raw, 3),
              "raw_cpu_ms_per_event": round(raw_cpu, 4), "monitor_cpu_ms_per_event": round(mon_cpu, 4),
              "cpu_ratio": round(raw_cpu / mon_cpu, 3), "repeats": args.repeats,
              "runs": {k: [[round(r, 1), round(c, 4)] for r, c in v] for k, v in runs.items()},
              "replicas": {"n": args.replicas, "events_per_s": [round(r, 1) for r, _ in replicas],
                           "cpu_ms_per_event": [round(c, 4) for _, c in replicas]},
              "predictions": args.predictions, **machine()}
    emit(result, args.json)


if __name__ == "__main__":
    main()
