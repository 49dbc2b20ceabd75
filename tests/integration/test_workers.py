"""Inference workers on the embedded broker: scale-out, SIGKILL takeover, every command
kind applied and acknowledged by every worker, a broken model version refused while
serving continues."""

from __future__ import annotations

import signal
import threading
import time
import uuid
from pathlib import Path

import pytest

from conftest import add_image_version
from streamfuse.demo import Observer
from streamfuse.procs import spawn, stop_children
from streamfuse.events import Command, encode, headers
from streamfuse.inference.worker import MAX_BATCHES_IN_FLIGHT
from streamfuse.kafka import make_producer
from streamfuse.models.registry import Registry
from streamfuse.sim.publish import SimPublisher
from streamfuse.topics import Topics, ensure_topics

pytestmark = pytest.mark.integration
START_MS = 1_800_000_000_000


def wait_for(predicate, observer: Observer, procs: dict, what: str, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        observer.poll(200)
        for name, p in procs.items():
            if p.returncode is None and p.poll() is not None:
                raise AssertionError(f"{name} exited with {p.returncode} while waiting for {what}")
        if predicate():
            return
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def worker_id(proc) -> str:
    import socket

    return f"{socket.gethostname()}-{proc.pid}"


def test_two_workers_split_partitions_and_survive_a_sigkill(settings, tmp_path: Path):
    ensure_topics(settings)
    procs = {"a": spawn("worker", settings, tmp_path / "a"), "b": spawn("worker", settings, tmp_path / "b")}
    observer = Observer(settings, START_MS)
    sim = SimPublisher(settings, start_ms=START_MS, speed=6.0, run_id="so")
    thread = threading.Thread(target=sim.run, kwargs={"duration_s": 90}, daemon=True)
    try:
        thread.start()
        ids = {worker_id(p) for p in procs.values()}
        wait_for(lambda: {w for ws in observer.served_by.values() for w in ws} >= ids, observer, procs,
                 "both workers to serve (each owns partitions)")
        victim = procs["a"]
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        killed = worker_id(victim)
        thread.join()
        wait_for(lambda: set(observer.prediction_counts) >= set(sim.stats.sample_ids), observer,
                 {"b": procs["b"]}, "a prediction for every sample after the takeover")
    finally:
        sim.stop()
        stop_children(list(procs.values()))
        observer.consumer.close()
    assert set(observer.prediction_counts) == set(sim.stats.sample_ids)
    dups = {sid: ws for sid, ws in observer.served_by.items() if len(ws) > 1}
    # at-least-once: only the killed worker's last, uncommitted batches are predicted twice
    assert len(dups) <= (MAX_BATCHES_IN_FLIGHT + 2) * settings.worker.max_batch
    assert all(ws[0] == killed and ws[-1] == worker_id(procs["b"]) for ws in dups.values()), dups
    late = [sid for sid, ws in observer.served_by.items() if ws[-1] == worker_id(procs["b"])]
    assert len(late) > len(observer.served_by) // 3  # the survivor took over the victim's partitions


def send(settings, *commands: Command) -> None:
    producer = make_producer(settings, "test-control")
    for c in commands:
        producer.send(Topics(settings.topic_prefix).control, key=(c.modality or "").encode(), value=encode(c),
                      headers=headers())
    producer.flush()
    producer.close()


def cmd(action: str, **kw) -> Command:
    return Command(f"test-{action}-{uuid.uuid4().hex[:6]}", action, issued_ms=0, **kw)


def test_every_command_kind_is_applied_and_acked_by_every_worker(settings, tmp_path: Path):
    ensure_topics(settings)
    registry = Registry(settings)
    good = registry.active()["image"]
    bad = add_image_version(settings, tmp_path, seed=7)
    broken = add_image_version(settings, tmp_path, corrupt=True, seed=8)
    procs = {"a": spawn("worker", settings, tmp_path / "a"), "b": spawn("worker", settings, tmp_path / "b")}
    workers = {worker_id(p) for p in procs.values()}
    observer = Observer(settings, START_MS)
    sim = SimPublisher(settings, start_ms=START_MS, speed=1.0, run_id="cmd")
    thread = threading.Thread(target=sim.run, kwargs={"duration_s": 600}, daemon=True)

    def acked(c: Command) -> dict[str, dict]:
        return {a["worker_id"]: a for a in observer.acks if a["command_id"] == c.command_id}

    def run(c: Command, status: str) -> dict[str, dict]:
        send(settings, c)
        wait_for(lambda: set(acked(c)) >= workers, observer, procs, f"acks of {c.action}")
        got = acked(c)
        assert {a["status"] for a in got.values()} == {status}, got
        return got

    try:
        thread.start()
        wait_for(lambda: len(observer.prediction_counts) > 20, observer, procs, "serving")
        # masks, global and scoped, and their removal
        got = run(cmd("mask_modality", modality="image"), "applied")
        assert all(a["masked"] == ["image"] for a in got.values())
        got = run(cmd("mask_modality", modality="audio", scope="line", scope_id="line-0"), "applied")
        assert all(a["masked"] == ["audio@line:line-0", "image"] for a in got.values())
        run(cmd("unmask_modality", modality="image"), "applied")
        run(cmd("unmask_modality", modality="audio", scope="line", scope_id="line-0"), "applied")
        run(cmd("mask_modality", modality="smell"), "rejected")
        # fusion modes
        # (the demo bundle's head is quality-aware fusion: it offers "quality" and "ume", not "weighted")
        run(cmd("set_fusion_mode", fusion_mode="ume"), "applied")
        run(cmd("set_fusion_mode", fusion_mode="telepathy"), "rejected")
        run(cmd("set_fusion_mode", fusion_mode="weighted"), "rejected")
        run(cmd("set_fusion_mode", fusion_mode="quality"), "applied")
        # model versions: activate a new one, roll it back, refuse a broken one
        got = run(cmd("activate_model", modality="image", version=bad), "applied")
        assert all(a["versions"]["image"] == bad for a in got.values())
        assert registry.active()["image"] == bad
        got = run(cmd("rollback_model", modality="image", version=good), "applied")
        assert all(a["versions"]["image"] == good for a in got.values())
        got = run(cmd("activate_model", modality="image", version=broken), "rejected")
        assert all("does not load" in a["reason"] and a["versions"]["image"] == good for a in got.values())
        assert registry.active()["image"] == good
        got = run(cmd("rollback_fusion"), "rejected")  # one fusion version only: nothing to go back to
        assert all("previous" in a["reason"] for a in got.values())
        # a command id seen before is not applied twice
        again = cmd("mask_modality", modality="series")
        run(again, "applied")
        send(settings, again)
        wait_for(lambda: sum(a["command_id"] == again.command_id for a in observer.acks) >= 4, observer, procs,
                 "acks of the repeated command")
        assert sorted(a["status"] for a in observer.acks if a["command_id"] == again.command_id) == [
            "applied", "applied", "duplicate", "duplicate"]
        # serving went on all along, with the good image model
        before = len(observer.prediction_counts)
        wait_for(lambda: len(observer.prediction_counts) > before + 10, observer, procs, "more predictions")
        recent = list(observer.predictions.values())[-5:]
        assert all(p.versions["image"] == good and "series" in p.masked for p in recent)
    finally:
        sim.stop()
        stop_children(list(procs.values()))
        observer.consumer.close()


def test_a_sample_with_no_usable_modality_is_dead_lettered_not_predicted(settings, tmp_path: Path):
    import dataclasses

    from streamfuse.sim.plant import Plant, PlantConfig

    ensure_topics(settings)
    (good, _), (bad, _) = Plant(PlantConfig(), run_id="nu").dataset(2, seed=3)
    broken = {m: dataclasses.replace(ev, payload=b"\xff\xd8\xff nope" if m == "image" else b"\x01")
              for m, ev in bad.readings.items()}
    bad = dataclasses.replace(bad, readings=broken)
    producer = make_producer(settings, "test")
    for s in (bad, good):
        producer.send(Topics(settings.topic_prefix).samples, key=s.asset_id.encode(), value=encode(s),
                      headers=headers())
    producer.flush()
    producer.close()
    procs = {"w": spawn("worker", settings, tmp_path)}
    observer = Observer(settings, START_MS)
    try:
        wait_for(lambda: good.sample_id in observer.prediction_counts and len(observer.dead_reasons) >= 4,
                 observer, procs, "the good prediction and the dead letters")
    finally:
        stop_children(list(procs.values()))
        observer.consumer.close()
    assert bad.sample_id not in observer.prediction_counts
    assert sorted(observer.dead_reasons) == [("bad_audio", "audio"), ("bad_image", "image"),
                                             ("bad_series", "series"), ("no_usable_modality", None)]
