"""How much faster than real time does a recording replay, with the demo models?

One run, on this machine:

1. a simulated plant with the demo's settings (4 assets at 2 Hz, 5 s KPI windows, 8 s
   label grace, an image fault) is published at full speed and recorded;
2. reference — ``worker_ceiling_x``: one worker (the replay's settings) drains the
   recorded samples as a backlog, no monitor, no lock-step; its samples/s divided by
   the plant's samples/s is the fastest any replay on this machine could go;
3. ``streamfuse replay --max-speed`` of the recording: ``default`` (stream batches up to
   the live batch size; every number reproducible) and, for comparison, ``batch_1``
   (micro-batches of one sample).

Speeds are event seconds per wall second after the pipeline's start-up (model loading,
consumer group joins), which is reported separately. Prints each replay's ratio to the
reference and writes JSON (``--json PATH``).

    python bench/replay_speed.py --duration 180 --json out/replay_speed.json
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid
from pathlib import Path

from streamfuse.config import Settings
from streamfuse.models.bootstrap import ensure_models
from streamfuse.procs import spawn, stop_children
from streamfuse.embedded import EmbeddedBroker
from streamfuse.replay import ReplayOptions, fault_annotations, record, replay
from streamfuse.replay.collect import Collector
from streamfuse.replay.format import Recording
from streamfuse.replay.namespace import make_namespace
from streamfuse.sim.faults import parse_fault
from streamfuse.sim.publish import SimPublisher
from streamfuse.topics import ensure_topics
from report import emit, machine

START_MS = 1_800_000_000_000


def worker_ceiling(settings: Settings, rec_dir: Path, logs: Path, max_batch: int) -> tuple[float, int]:
    """Samples/s of one worker draining the recording's samples (first to last prediction)."""
    from streamfuse.kafka import make_producer

    ns = make_namespace(settings, f"bench-drain-{uuid.uuid4().hex[:6]}", settings.partitions)
    s = ns.settings.model_copy(update={"worker": ns.settings.worker.model_copy(update={"max_batch": max_batch})})
    rec = Recording(rec_dir)
    try:
        ensure_topics(s)
        ensure_models(s)
        proc = spawn("worker", s, logs)
        col = Collector(s, START_MS)
        producer = make_producer(s)
        n = 0
        for p in rec.partitions("samples"):
            for r in rec.records("samples", p):
                producer.send(f"{s.topic_prefix}samples", key=r["key"], value=r["value"],
                              headers=[tuple(h) for h in r["headers"]], partition=p)
                n += 1
        producer.flush()
        first = None
        deadline = time.monotonic() + 600
        while len(col.prediction_counts) + len(col.dead_at) < n and time.monotonic() < deadline:
            col.poll(50)
            if first is None and col.prediction_counts:
                first = (time.monotonic(), len(col.prediction_counts))
        done = time.monotonic()
        stop_children([proc])
        col.consumer.close()
        producer.close()
        return (len(col.prediction_counts) - first[1]) / (done - first[0]), len(col.prediction_counts)
    finally:
        ns.delete()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=180.0, help="seconds of event time to record")
    ap.add_argument("--fault", default="image:fog@60-120/asset-0")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-replay-"))
    with EmbeddedBroker() as broker:
        tag = uuid.uuid4().hex[:6]
        live = Settings(kafka_bootstrap=broker.bootstrap, broker="tansu", topic_prefix=f"bench{tag}.",
                        redis_prefix=f"streamfuse-bench:{tag}:",
                        worker={"group": f"bench{tag}", "device": args.device, "threads": 1},
                        monitor={"app_id": f"bench{tag}-monitor"})
        ensure_models(live)
        ensure_topics(live)
        faults = (parse_fault(args.fault),)
        stats = SimPublisher(live, faults, start_ms=START_MS, speed=None, run_id="bench").run(args.duration)
        record(live, work / "rec", annotations=fault_annotations(faults, START_MS),
               meta={"sim": live.sim.model_dump()})
        plant_sps = live.sim.assets * live.sim.rate_hz
        worker_sps, _ = worker_ceiling(live, work / "rec", work / "logs", live.worker.max_batch)
        ceiling = worker_sps / plant_sps
        print(f"reference: one worker drains a backlog at {worker_sps:.0f} samples/s = {ceiling:.1f}x real time "
              f"(plant: {plant_sps:g} samples/s)")
        runs = {}
        for mode, max_batch in (("default", None), ("batch_1", 1)):
            s = replay(work / "rec", live, ReplayOptions(max_batch=max_batch, report_dir=work / mode))
            r = s["replay"]
            runs[mode] = {"speed_x": r["speed_x"], "speed_x_with_startup": r["speed_x_with_startup"],
                          "startup_s": round(r["startup_s"] or 0, 2), "wall_s": r["wall_s"], "event_s": r["event_s"],
                          "max_batch": r["max_batch"], "ratio_to_worker_ceiling": round(r["speed_x"] / ceiling, 3),
                          "alerts": s["counts"]["alerts"], "commands": s["counts"]["commands"],
                          "lockstep_verified": r["lockstep_verified"]}
            print(f"replay {mode:7s} (max_batch {r['max_batch']}): {r['speed_x']:.1f}x real time after a "
                  f"{r['startup_s']:.1f} s start-up ({r['speed_x_with_startup']:.1f}x with it); "
                  f"ratio to the worker ceiling {r['speed_x'] / ceiling:.2f}")
        from streamfuse.store import StatusStore, connect

        StatusStore(connect(live), live.redis_prefix).clear()
    import torch

    out = {**machine(), "device": args.device, "torch": torch.__version__, "duration_s": args.duration, "samples": stats.samples,
           "plant_samples_per_s": plant_sps, "worker_ceiling_x": round(ceiling, 2),
           "worker_ceiling_samples_per_s": round(worker_sps, 1), "replays": runs}
    emit(out, args.json)


if __name__ == "__main__":
    main()
