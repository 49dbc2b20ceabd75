"""How close does the worker get to the models' own speed, in time and in CPU?

One run, on this machine, with the demo models:

1. model_only_sps — forward passes of the same models at the same batch size on tensors
   already in memory, run as the worker runs them (``Bundle.forward``: traced on the CPU)
   — the ceiling: no Kafka, no decoding, no fusion, no encoding. The eager models' rate
   is reported too (``model_only_eager_sps``). Its process CPU time per sample is
   ``model_cpu_ms``: measured before the worker runs and again right after, the mean of
   the two (``model_cpu_ms_runs``), because on a shared machine it drifts by ±15 % over
   minutes;
2. worker_sps — Kafka in → predictions out on the embedded broker: a backlog of samples
   drained by one InferenceWorker (measured between its first and last prediction; the
   predictions are read after the worker stopped, so nothing else runs in its process).
   Its process CPU time per sample (every thread of it: intake, models, outbox), from its
   first batch to its last like ``worker_sps``, less the bench's own polling thread, is
   ``worker_cpu_ms`` (with the start-up —
   model tracing, joining the group — spread over the samples:
   ``worker_cpu_ms_with_startup``); ``cpu_ratio = model_cpu_ms / worker_cpu_ms`` is the share of the
   worker's CPU that goes to the models. The broker runs in its own process, on the same
   cores: ``ratio`` (wall) pays for it, ``cpu_ratio`` does not. ``cpu_breakdown_ms`` says
   where the worker's CPU goes, per thread: the models measured in place (the thread CPU
   of its forward passes, ``model_cpu_ms_in_place``; ``cpu_ratio_in_place`` is its share),
   the rest of the worker thread (decoding, fusion, contributions, encoding, producing),
   the intake thread and librdkafka's threads;
3. capacity with the publisher running (``capacity_with_publisher_sps``): a publisher in
   its own process offers ``worker_sps`` samples/s on the same cores; the worker's rate
   until the publisher ends. Then latency p50 / p99 at 50 % and 80 % of that capacity:
   samples published at that rate by a separate process, latency = prediction produce
   time − sample publish time. The bound for p99 at 50 %: ``max_delay + 3 x`` one batch's compute time in the
   worker (``batch / worker_sps``: decode, models, fusion, encode), both printed. Where the
   time goes (``latency.<load>.stages``, p50 / p99 / mean ms): ``before_worker`` per
   sample (publisher, broker and fetch, up to its batch's first record reaching the
   worker), and per batch ``batch_wait``, ``compute`` and ``ack`` (:class:`BatchTimes`).

``--threads N`` sets torch's intra-op threads for both 1 and 2 (default: the worker's,
``STREAMFUSE_WORKER__THREADS``; 0 = one per core).

Prints the ratios and writes JSON (``--json PATH``).

    python bench/worker_efficiency.py --samples 2000 --json out/worker_efficiency.json
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import os
import statistics
import threading
import time
import uuid
from pathlib import Path

import torch

from streamfuse.config import Settings
from streamfuse.models.bootstrap import ensure_demo_bundle
from streamfuse.embedded import EmbeddedBroker
from streamfuse.events import MSGPACK, Prediction, decode, encode, headers
from streamfuse.inference.worker import InferenceWorker
from streamfuse.kafka import make_consumer, make_producer
from streamfuse.models.bundle_io import load_bundle
from streamfuse.models.preprocess import batch_tensor
from streamfuse.models.runtime import autocast, resolve_device
from streamfuse.sim.plant import Plant, PlantConfig
from streamfuse.topics import Topics, delete_topics, ensure_topics
from report import emit, machine


def model_only(bundle, samples, batch: int, repeats: int, eager: bool = False) -> tuple[float, float]:
    """Samples per second of the models alone on pre-built tensors, and CPU-ms per sample."""
    tensors = {m: [batch_tensor(bundle.configs[m], [s.readings[m] for s in samples[i:i + batch]], bundle.device)
                   for i in range(0, len(samples), batch)] for m in bundle.modalities}
    n = sum(t.shape[0] for t in tensors[bundle.modalities[0]])

    def once() -> None:
        for m in bundle.modalities:
            for x in tensors[m]:
                if eager:
                    with torch.inference_mode(), autocast(bundle.device):
                        bundle.models[m](x).float().softmax(-1)
                else:
                    bundle.forward(m, x)[1].float().softmax(-1)
        if bundle.device.type == "cuda":
            torch.cuda.synchronize()

    once()  # warm-up
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        once()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return n * repeats / wall, 1000 * cpu / (n * repeats)


def thread_cpu() -> dict[str, float]:
    """CPU seconds (user + system) so far of each thread of this process, by role: the
    worker's Python threads by name, librdkafka's by its ``rdk:`` names, the rest (torch's
    OpenMP pool) as ``native``."""
    tick = os.sysconf("SC_CLK_TCK")
    names = {t.native_id: t.name for t in threading.enumerate()}
    out: dict[str, float] = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            stat = Path(f"/proc/self/task/{tid}/stat").read_text()
        except OSError:  # the thread ended
            continue
        comm, fields = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
        role = names.get(int(tid)) or ("librdkafka" if comm.startswith("rdk:") else "native")
        role = {"MainThread": "bench (polling)", "sf-feeder": "intake (feeder)"}.get(role, role)
        out[role] = out.get(role, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


class ModelClock:
    """The CPU time of the models' forward passes inside the worker: the calling thread's
    CPU around ``Bundle.forward`` (exact with one torch thread; with more, the pool's
    threads run the models too and are reported as ``native``)."""

    def __init__(self, bundle) -> None:
        self.seconds, self._forward = 0.0, bundle.forward
        bundle.forward = self

    def __call__(self, modality, x):
        t = time.thread_time()
        try:
            return self._forward(modality, x)
        finally:
            self.seconds += time.thread_time() - t


def collect_predictions(settings: Settings, n: int, timeout_s: float) -> list[Prediction]:
    consumer = make_consumer(settings, None, "bench-reader")
    from kafka import TopicPartition

    topic = Topics(settings.topic_prefix).predictions
    tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or {0})]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    out: list[Prediction] = []
    deadline = time.monotonic() + timeout_s
    while len(out) < n and time.monotonic() < deadline:
        for msgs in consumer.poll(timeout_ms=200).values():
            out.extend(decode(m.value, check_payloads=False) for m in msgs)
    consumer.close()
    return out


class BatchTimes:
    """Where each batch's time went in the worker (wall ms): ``batch_wait`` (its first record
    arriving to its compute starting), ``compute`` (decode, models, fusion, contributions,
    encoding, handing to the producer) and ``ack`` (handed to the producer to the broker's
    acknowledgement of its last prediction), from the worker's own ``Delivery`` stamps."""

    def __init__(self, worker: InferenceWorker) -> None:
        self.rows: list[tuple[float, float, object]] = []
        process = worker._process

        def timed(batch, out, delivery) -> None:
            started = time.monotonic()
            process(batch, out, delivery)
            if batch.samples:
                self.rows.append((started - batch.first_at, delivery.handed_at - started, delivery))

        worker._process = timed

    def summary(self) -> dict[str, dict[str, float]]:
        stages = {"batch_wait": [w for w, _, _ in self.rows], "compute": [c for _, c, _ in self.rows],
                  "ack": [d.acked_at - d.handed_at for _, _, d in self.rows if d.acked_at >= d.handed_at > 0]}
        return {k: percentiles([1000 * v for v in vs]) for k, vs in stages.items() if vs}


def percentiles(values: list[float]) -> dict[str, float]:
    v = sorted(values)
    return {"p50_ms": round(statistics.median(v), 1), "p99_ms": round(v[min(len(v) - 1, int(0.99 * len(v)))], 1),
            "mean_ms": round(statistics.fmean(v), 1), "n": len(v)}


def run_worker(settings: Settings, bundle, n: int, times: bool = False):
    """The worker on its own thread (with :class:`BatchTimes` when ``times``)."""
    worker = InferenceWorker(settings, bundle, worker_id="bench")
    worker.times = BatchTimes(worker) if times else None
    thread = threading.Thread(target=worker.run, kwargs={"max_samples": n}, daemon=True, name="worker")
    thread.start()
    return worker, thread


def publish_paced(settings: Settings, samples, rate: float) -> None:
    """Publish ``samples`` at ``rate`` per second, each stamped with its publish time (run
    in its own process, like a real producer)."""
    producer = make_producer(settings, "bench-latency")
    topic, hdrs = Topics(settings.topic_prefix).samples, headers(MSGPACK)
    t0 = time.time()
    for i, s in enumerate(samples):
        wait = t0 + i / rate - time.time()
        if wait > 0:
            time.sleep(wait)
        s = dataclasses.replace(s, ts_ms=int(time.time() * 1000), sample_id=f"lat-{i}")
        producer.send(topic, key=s.asset_id.encode(), value=encode(s), headers=hdrs)
    producer.flush()
    producer.close()


def capacity_with_publisher(settings: Settings, bundle, samples, offered: float, seconds: float, tag: str) -> float:
    """The worker's rate while a publisher (its own process) offers ``offered`` samples/s
    on the same cores: predictions produced from the first one until the publisher ends."""
    cap = settings.model_copy(update={"topic_prefix": f"benchcap{tag}.",
                                      "worker": settings.worker.model_copy(update={"group": f"benchcap-{tag}"})})
    ensure_topics(cap)
    n = max(500, int(offered * seconds))
    worker, thread = run_worker(cap, bundle, n)
    time.sleep(2.0)  # let the consumer group settle
    publisher = multiprocessing.get_context("spawn").Process(
        target=publish_paced, args=(cap, [samples[i % len(samples)] for i in range(n)], offered))
    publisher.start()
    publisher.join()
    ended_ms = time.time() * 1000
    thread.join(timeout=300)
    produced = sorted(p.produced_ms for p in collect_predictions(cap, n, timeout_s=60))
    # Each phase's topics go when it ends: the embedded broker keeps every record in memory
    # and its CPU grows with what it holds (about a core at 600 MB); this phase publishes ~150 MB.
    delete_topics(cap)
    during = [t for t in produced if t <= ended_ms]
    if len(during) < 64:
        raise SystemExit("too few predictions while the publisher ran to measure a capacity")
    first_batch = sum(1 for t in during if t == during[0])
    return (len(during) - first_batch) / max(1e-3, (during[-1] - during[0]) / 1000)


def publish(settings: Settings, samples) -> None:
    producer = make_producer(settings, "bench-producer")
    hdrs = headers(MSGPACK)
    topic = Topics(settings.topic_prefix).samples
    for s in samples:
        producer.send(topic, key=s.asset_id.encode(), value=encode(s), headers=hdrs)
    producer.flush()
    producer.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-delay-ms", type=int, default=20)
    ap.add_argument("--latency-seconds", type=float, default=20.0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: the worker's, STREAMFUSE_WORKER__THREADS; 0 = one per core)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    threads = Settings().worker.threads if args.threads is None else args.threads
    if threads:
        torch.set_num_threads(threads)

    device = resolve_device(args.device)
    base = Settings()
    bundle_dir = ensure_demo_bundle(base)
    bundle = load_bundle(bundle_dir, device)
    plant = Plant(PlantConfig(assets=8, lines=2, seed=5), run_id=f"bench{uuid.uuid4().hex[:6]}")
    samples = [s for s, _ in plant.dataset(args.samples, seed=7)]

    ref, model_cpu_ms = model_only(bundle, samples, args.batch, repeats=3)
    ref_eager, _ = model_only(bundle, samples, args.batch, repeats=3, eager=True)
    print(f"model-only forward: {ref:8.1f} samples/s as served (eager {ref_eager:.1f}), {model_cpu_ms:.3f} CPU-ms "
          f"per sample  (batch {args.batch}, {device}, {torch.get_num_threads()} threads)")

    with EmbeddedBroker() as broker:
        tag = uuid.uuid4().hex[:6]
        settings = base.model_copy(update={
            "kafka_bootstrap": broker.bootstrap, "broker": "tansu", "topic_prefix": f"bench{tag}.",
            "worker": base.worker.model_copy(update={"group": f"bench-{tag}", "max_batch": args.batch,
                                                     "max_delay_ms": args.max_delay_ms, "device": str(device)}),
        })
        ensure_topics(settings)
        publish(settings, samples)  # a backlog: the worker runs flat out
        c0 = time.process_time()
        clock = ModelClock(bundle)
        worker, thread = run_worker(settings, bundle, len(samples))
        # (process CPU s, samples processed, per-thread CPU, models' CPU) at the first and the last batch
        first = last = None
        deadline = time.monotonic() + 600
        while thread.is_alive() and time.monotonic() < deadline:
            done, cpu = worker.processed, time.process_time()
            if done and first is None:
                first = (cpu, done, thread_cpu(), clock.seconds)
            if first is not None and done > (last or first)[1]:
                last = (cpu, done, thread_cpu(), clock.seconds)
            time.sleep(0.05)  # the bench's own polling runs in the worker's process: keep it rare
        bundle.forward = clock._forward
        thread.join(timeout=5)
        startup_cpu_ms = 1000 * (time.process_time() - c0) / len(samples)
        if first is None or last is None or last[1] <= first[1]:
            raise SystemExit("the worker did not process its backlog")
        # Steady state, as worker_sps: from its first batch to its last (start-up excluded)
        n_steady = last[1] - first[1]
        # Where the worker's CPU goes (per sample): the models measured in place, the rest
        # of the worker thread, the intake thread, librdkafka's threads; the bench's own
        # polling runs in this process too, and is not the worker's.
        breakdown = {k: 1000 * (v - first[2].get(k, 0.0)) / n_steady for k, v in last[2].items()}
        polling_ms = breakdown.pop("bench (polling)", 0.0)
        worker_cpu_ms = 1000 * (last[0] - first[0]) / n_steady - polling_ms
        in_situ_ms = 1000 * (last[3] - first[3]) / n_steady
        breakdown["models (in place)"] = in_situ_ms
        breakdown["worker thread, besides the models"] = breakdown.pop("worker", 0.0) - in_situ_ms
        breakdown = {k: round(v, 4) for k, v in sorted(breakdown.items(), key=lambda kv: -kv[1]) if v > 0}
        # The models alone once more, right after the drain: their CPU per sample drifts by
        # ±15 % over minutes on this shared machine, so the reference is the mean of the
        # measurements around the worker's (both printed).
        ref_after, model_cpu_after = model_only(bundle, samples, args.batch, repeats=3)
        model_cpu_runs = [round(model_cpu_ms, 4), round(model_cpu_after, 4)]
        model_cpu_ms, ref = (model_cpu_ms + model_cpu_after) / 2, (ref + ref_after) / 2
        print(f"model-only forward after the drain: {ref_after:8.1f} samples/s, {model_cpu_after:.3f} CPU-ms per sample"
              f" -> reference {ref:.1f} samples/s, {model_cpu_ms:.3f} CPU-ms (the mean)")
        preds = collect_predictions(settings, len(samples), timeout_s=60)
        delete_topics(settings)
        produced = sorted(p.produced_ms for p in preds)
        first_batch = sum(1 for t in produced if t == produced[0])
        worker_sps = (len(produced) - first_batch) / max(1e-3, (produced[-1] - produced[0]) / 1000)
        cpu_ratio = model_cpu_ms / worker_cpu_ms
        print(f"worker (Kafka in -> out): {worker_sps:8.1f} samples/s  ratio {worker_sps / ref:.3f};  "
              f"{worker_cpu_ms:.3f} CPU-ms per sample  cpu_ratio {cpu_ratio:.3f}  "
              f"(with the start-up {startup_cpu_ms:.3f} CPU-ms per sample)")
        print("  where the worker's CPU goes, ms per sample: "
              + ", ".join(f"{k} {v:.3f}" for k, v in breakdown.items())
              + f"  (the bench's own polling, not counted: {polling_ms:.3f})")
        print(f"  models in place / worker: {in_situ_ms / worker_cpu_ms:.3f} (in place the models take "
              f"{in_situ_ms / model_cpu_ms:.2f}x their CPU alone)")

        batch_ms = 1000 * args.batch / worker_sps
        bound_ms = args.max_delay_ms + 3 * batch_ms
        capacity = capacity_with_publisher(settings, bundle, samples, worker_sps, args.latency_seconds / 2, tag)
        print(f"capacity with the publisher running (offered {worker_sps:.0f} samples/s): {capacity:.1f} samples/s")
        latency = {}
        for load in (0.5, 0.8):  # each in a fresh namespace
            rate = load * capacity
            n_lat = max(200, int(rate * args.latency_seconds))
            pct = int(load * 100)
            lat_settings = settings.model_copy(update={
                "topic_prefix": f"benchlat{pct}{tag}.",
                "worker": settings.worker.model_copy(update={"group": f"benchlat{pct}-{tag}"})})
            ensure_topics(lat_settings)
            lat_samples = [samples[i % len(samples)] for i in range(n_lat)]
            worker2, thread2 = run_worker(lat_settings, bundle, n_lat, times=True)
            time.sleep(2.0)  # let the consumer group settle before the clock starts
            publisher = multiprocessing.get_context("spawn").Process(
                target=publish_paced, args=(lat_settings, lat_samples, rate))
            publisher.start()
            publisher.join()
            thread2.join(timeout=120)
            lat_preds = collect_predictions(lat_settings, n_lat, timeout_s=60)
            delete_topics(lat_settings)
            lat = sorted(p.produced_ms - p.ts_ms for p in lat_preds)
            p50, p99 = statistics.median(lat), lat[min(len(lat) - 1, int(0.99 * len(lat)))]
            # Per sample: before the worker (publisher, broker, fetch: up to its batch's first
            # record arriving) = sample -> prediction less the prediction's time in the worker.
            stages = {"before_worker": percentiles([p.produced_ms - p.ts_ms - p.latency_ms for p in lat_preds]),
                      **worker2.times.summary()}
            latency[pct] = {"rate_sps": round(rate, 1), "p50_ms": p50, "p99_ms": p99, "n": len(lat), "stages": stages}
            print(f"latency at {rate:.0f} samples/s ({pct} % capacity): p50 {p50:.0f} ms, p99 {p99:.0f} ms; where "
                  "it goes, p50 / p99 ms: " + ", ".join(f"{k} {v['p50_ms']:.0f} / {v['p99_ms']:.0f}"
                                                       for k, v in stages.items()))
        print(f"p99 bound at 50 %: max_delay {args.max_delay_ms} ms + 3 x batch {batch_ms:.1f} ms = {bound_ms:.0f} ms "
              f"-> {'met' if latency[50]['p99_ms'] <= bound_ms else 'NOT met'}")

    result = {
        "model_only_sps": round(ref, 1),
        "model_only_eager_sps": round(ref_eager, 1),
        "worker_sps": round(worker_sps, 1),
        "ratio": round(worker_sps / ref, 3),
        "model_cpu_ms": round(model_cpu_ms, 4),
        "model_cpu_ms_runs": model_cpu_runs,
        "worker_cpu_ms": round(worker_cpu_ms, 4),
        "worker_cpu_ms_with_startup": round(startup_cpu_ms, 4),
        "cpu_ratio": round(cpu_ratio, 3),
        "cpu_breakdown_ms": breakdown,
        "model_cpu_ms_in_place": round(in_situ_ms, 4),
        "cpu_ratio_in_place": round(in_situ_ms / worker_cpu_ms, 3),
        "bench_polling_cpu_ms": round(polling_ms, 4),
        "capacity_with_publisher_sps": round(capacity, 1),
        "p99_ms": latency[50]["p99_ms"],
        "p99_bound_ms": round(bound_ms, 1),
        "batch_ms": round(batch_ms, 1),
        "latency": latency,
        "samples": len(samples),
        "batch": args.batch,
        "max_delay_ms": args.max_delay_ms,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "bundle": bundle.version,
        **machine(),
    }
    emit(result, args.json)


if __name__ == "__main__":
    main()
