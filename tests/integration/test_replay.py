"""Record a simulator run, replay it beside the live pipeline, evaluate: the embedded
broker, the real Redis, real worker / monitor / sync processes.

One recording (4 assets at 5 Hz, 30 s of event time, an injected fog on line 0) is
shared by the tests of this module; the live pipeline (worker + monitor on the live
prefix) runs through all of them.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import uuid
from pathlib import Path

import pytest

from conftest import delete_topics
from streamfuse.clock import now_ms
from streamfuse.config import Settings
from streamfuse.models.bootstrap import ensure_models
from streamfuse.procs import spawn, stop_children
from streamfuse.events import BATCH_END
from streamfuse.kafka import make_consumer
from streamfuse.replay import Recording, ReplayOptions, decisions, fault_annotations, record, replay
from streamfuse.replay.collect import Collector
from streamfuse.replay.namespace import drop_namespace
from streamfuse.sim.faults import parse_fault
from streamfuse.sim.publish import ReadingDisorder, SimPublisher
from streamfuse.store import StatusStore, connect
from streamfuse.topics import ensure_topics

pytestmark = pytest.mark.integration

START_MS = 1_800_000_000_000
FAULTS = ["image:fog@10-22/asset-0", "image:fog@10-22/asset-2"]  # line-0 holds assets 0 and 2


def live_settings(broker, bundle: Path, tag: str, **sim) -> Settings:
    return Settings(
        kafka_bootstrap=broker.bootstrap, broker="tansu", topic_prefix=f"t{tag}.",
        redis_prefix=f"streamfuse-test:{tag}:",
        model_dir=bundle.parent, bundle=bundle.name,
        worker={"group": f"workers-{tag}", "max_batch": 16, "max_delay_ms": 20, "device": "cpu", "threads": 1},
        monitor={"app_id": f"monitor-{tag}", "kpi_window_ms": 2000, "label_grace_ms": 4000, "min_labelled": 10,
                 "cooldown_ms": 0},
        sim={"assets": 4, "lines": 2, "rate_hz": 5.0, "label_delay_ms": 1000, **sim})


def delete_live(s: Settings) -> None:
    StatusStore(connect(s), s.redis_prefix).clear()
    delete_topics(s)


def topic_digest(s: Settings) -> dict[str, tuple[int, str]]:
    """Per live topic-partition: record count and a hash of every key, value, header and timestamp."""
    from kafka import TopicPartition

    c = make_consumer(s, None, "it-digest", fetch_max_wait_ms=20)
    try:
        names = [n for n in c.topics() if n.startswith(s.topic_prefix)]
        tps = [TopicPartition(n, p) for n in names for p in sorted(c.partitions_for_topic(n))]
        c.assign(tps)
        c.seek_to_beginning(*tps)
        ends = c.end_offsets(tps)
        h = {tp: hashlib.sha256() for tp in tps}
        n = dict.fromkeys(tps, 0)
        while any(c.position(tp) < ends[tp] for tp in tps):
            for tp, msgs in c.poll(timeout_ms=100).items():
                for m in msgs:
                    n[tp] += 1
                    h[tp].update(repr((m.offset, m.key, m.value, m.headers, m.timestamp)).encode())
        return {f"{tp.topic}:{tp.partition}": (n[tp], h[tp].hexdigest()) for tp in tps}
    finally:
        c.close()


def read_topic(s: Settings, topic: str) -> dict[int, list[tuple]]:
    from kafka import TopicPartition

    c = make_consumer(s, None, "it-read", fetch_max_wait_ms=20)
    try:
        tps = [TopicPartition(topic, p) for p in sorted(c.partitions_for_topic(topic))]
        c.assign(tps)
        c.seek_to_beginning(*tps)
        ends = c.end_offsets(tps)
        out: dict[int, list[tuple]] = {tp.partition: [] for tp in tps}
        while any(c.position(tp) < ends[tp] for tp in tps):
            for tp, msgs in c.poll(timeout_ms=100).items():
                out[tp.partition] += [(m.key, m.value, list(m.headers), m.timestamp) for m in msgs]
        return {p: rows for p, rows in out.items() if rows}
    finally:
        c.close()


def recorded(rec: Recording, topic: str) -> dict[int, list[tuple]]:
    return {p: [(r["key"], r["value"], [tuple(h) for h in r["headers"]], r["timestamp_ms"])
                for r in rec.records(topic, p)] for p in rec.partitions(topic)}


def is_flush(value: bytes) -> bool:
    from streamfuse.events import decode

    try:
        return decode(value, check_payloads=False).sample_id.startswith("replay-flush:")
    except Exception:  # a malformed record of the recording
        return False


def wait_until(cond, what: str, timeout_s: float, poll=None) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        if poll is not None:
            poll()
        else:
            threading.Event().wait(0.1)  # polling Redis; there is nothing to block on


def settle_live(s: Settings, obs: Collector, samples: int) -> None:
    """Wait until the live pipeline has nothing left to publish: every sample predicted,
    every window the watermark passed closed, the monitor done with that close (it has
    handled an ack published afterwards), every command acknowledged."""
    from streamfuse.events import MSGPACK, Ack, encode, headers
    from streamfuse.kafka import make_producer

    w, g = s.monitor.kpi_window_ms, s.monitor.label_grace_ms
    wait_until(lambda: len(obs.rows) >= samples, "the live pipeline to serve the run", 120, lambda: obs.poll(100))
    wm = min(obs.part_max.values())
    due = {r.ts_ms - r.ts_ms % w for r in obs.rows.values() if r.ts_ms - r.ts_ms % w + w + g <= wm}
    wait_until(lambda: due <= obs.closed, "the live monitor to close its windows", 60, lambda: obs.poll(100))
    p = make_producer(s)
    p.send(f"{s.topic_prefix}control.acks", key=b"it", value=encode(Ack("it-marker", "it", "x", 0)),
           headers=headers(MSGPACK))
    p.close()
    r = connect(s)
    wait_until(lambda: r.hget(f"{s.redis_prefix}workers", "it") is not None, "the live monitor", 60,
               lambda: obs.poll(100))
    wait_until(lambda: {c.command_id for c in obs.command_events} <= {a.command_id for a in obs.ack_events},
               "the live worker to acknowledge every command", 60, lambda: obs.poll(100))


@pytest.fixture(scope="module")
def live(broker, trained_bundle, tmp_path_factory):
    """A simulator run on the live prefix, recorded, then served by a live worker and
    monitor (which keep running beside every replay of this module)."""

    tag = uuid.uuid4().hex[:8]
    s = live_settings(broker, trained_bundle, tag)
    ensure_models(s)
    ensure_topics(s)
    root = tmp_path_factory.mktemp("replay")
    wall0 = now_ms()
    stats = SimPublisher(s, tuple(map(parse_fault, FAULTS)), start_ms=START_MS, speed=None, run_id="rt",
                         malformed_every=150).run(duration_s=30)
    record(s, root / "rec", annotations=fault_annotations(FAULTS, START_MS), meta={"sim": s.sim.model_dump()})
    procs = [spawn("worker", s, root / "live-logs"), spawn("monitor", s, root / "live-logs")]
    obs = Collector(s, START_MS)
    try:
        settle_live(s, obs, stats.samples)
        obs.consumer.close()
        yield {"settings": s, "root": root, "stats": stats, "procs": procs, "wall0": wall0}
    finally:
        stop_children(procs)
        delete_live(s)


@pytest.fixture(scope="module")
def first_replay(live):
    """Replay A (namespace kept for inspection) beside the running live pipeline, with the
    live topics' contents digested before and after."""
    s, root = live["settings"], live["root"]
    before = topic_digest(s)
    active_before = connect(s).hgetall(f"{s.redis_prefix}registry:active")
    ns = f"replay-it{uuid.uuid4().hex[:6]}"
    t0 = time.monotonic()
    summary = replay(root / "rec", s, ReplayOptions(namespace=ns, keep=True, report_dir=root / "report-a"))
    wall = time.monotonic() - t0
    yield {"summary": summary, "namespace": ns + ".", "before": before, "after": topic_digest(s),
           "active": (active_before, connect(s).hgetall(f"{s.redis_prefix}registry:active")), "wall": wall}
    drop_namespace(s, ns)


def test_round_trip_replayed_inputs_are_byte_identical(live, first_replay):
    s = live["settings"]
    rec = Recording(live["root"] / "rec")
    ns = s.model_copy(update={"topic_prefix": first_replay["namespace"]})
    # The replay adds one flush sample per partition at the end (it closes the last windows),
    # and marks the last sample before each wait with a batch-end header for the worker.
    replayed = read_topic(ns, ns.topic_prefix + "samples")
    assert all(is_flush(rows[-1][1]) for rows in replayed.values())
    marked = sum(1 for rows in replayed.values() for r in rows if (BATCH_END, b"1") in r[2])
    assert marked >= len(replayed) * 2  # at least a few steps per partition
    got = {p: [(k, v, [h for h in hdrs if h[0] != BATCH_END], ts) for k, v, hdrs, ts in rows if not is_flush(v)]
           for p, rows in replayed.items()}
    assert got == recorded(rec, "samples")
    # Labels are re-timed (they enter with their sample when they arrived in time), so
    # their order within a partition may change; every record is there, unchanged.
    got, want = read_topic(ns, ns.topic_prefix + "labels"), recorded(rec, "labels")
    assert {p: sorted(v) for p, v in got.items()} == {p: sorted(v) for p, v in want.items()}
    summary = first_replay["summary"]
    assert summary["counts"]["predictions"] == live["stats"].samples
    assert summary["replay"]["lockstep_verified"], summary["replay"]["lockstep_differences"]


def test_the_replay_finds_the_injected_fault_and_reports_it(live, first_replay):
    summary = first_replay["summary"]
    det = summary["fault_detection"]
    assert all(d["detected"] and d["alert"]["scope_id"] == "line-0" for d in det), det
    assert 0 < det[0]["delay_ms"] <= 3 * 2000
    assert [(c["action"], c["scope_id"]) for c in summary["commands"]][:1] == [("mask_modality", "line-0")]
    assert summary["masked"]["image"]["masked_ms"] > 0
    html = (live["root"] / "report-a" / "report.html").read_text()
    assert html.count("<svg") == 5 and 'id="alert-timeline"' in html


def test_isolation_the_live_topics_do_not_change(first_replay):
    assert first_replay["after"] == first_replay["before"]
    assert first_replay["active"][0] == first_replay["active"][1]


def test_determinism_two_replays_decide_the_same(live, first_replay):
    again = replay(live["root"] / "rec", live["settings"], ReplayOptions(report_dir=live["root"] / "report-b"))
    a, b = decisions(first_replay["summary"]), decisions(again)
    assert a["alerts"] and a["commands"]
    assert a == b
    assert again["metrics"] == first_replay["summary"]["metrics"]  # bit for bit: stream batches of up to 16
    assert again["replay"]["lockstep_verified"]


def test_a_namespace_equal_to_the_live_prefix_is_refused(live):
    from streamfuse.replay import ReplayError

    with pytest.raises(ReplayError, match="overlaps the live topic prefix"):
        replay(live["root"] / "rec", live["settings"], ReplayOptions(namespace=live["settings"].topic_prefix))


def test_per_modality_recording_replays_through_the_synchronizer(broker, trained_bundle, tmp_path):
    """Readings on sensor topics with jitter, reordering and drops: the replay runs the
    synchronizer first; every slot with a reading gets its prediction."""
    tag = uuid.uuid4().hex[:8]
    s = live_settings(broker, trained_bundle, tag, assets=2)
    ensure_models(s)
    ensure_topics(s)
    try:
        stats = SimPublisher(s, start_ms=START_MS, speed=None, run_id="pm", per_modality_topics=True,
                             disorder=ReadingDisorder(jitter_ms=20, reorder_prob=0.05, reorder_ms=200,
                                                      drop_prob=0.03, seed=3)).run(duration_s=12)
        record(s, tmp_path / "rec", meta={"sim": s.sim.model_dump()})
        summary = replay(tmp_path / "rec", s, ReplayOptions(namespace=f"replay-pm{tag}", keep=True))
        assert summary["replay"]["synchronizer"]
        got = {sid for sid in summary_ids(summary, s, f"replay-pm{tag}.")}
        assert got == set(stats.slot_modalities)
        ns = s.model_copy(update={"topic_prefix": f"replay-pm{tag}.sync."})
        rec = Recording(tmp_path / "rec")
        for m in ("image", "audio", "series"):
            assert read_topic(ns, f"{ns.topic_prefix}sensor.{m}") == recorded(rec, f"sensor.{m}")
    finally:
        drop_namespace(s, f"replay-pm{tag}")
        delete_live(s)


def summary_ids(summary, s: Settings, prefix: str) -> set[str]:
    from streamfuse.events import decode

    ns = s.model_copy(update={"topic_prefix": prefix})
    return {decode(v, check_payloads=False).sample_id for rows in read_topic(ns, prefix + "predictions").values()
            for _, v, _, _ in rows if not decode(v, check_payloads=False).sample_id.startswith("replay-flush")}


def test_record_demo_takes_inputs_and_outputs_since_the_start(live, tmp_path):
    from streamfuse.replay import record_demo

    s = live["settings"]
    man = record_demo(s, tmp_path / "demo", start_ms=live["wall0"], faults=FAULTS)
    assert man["counts"]["samples"] == Recording(live["root"] / "rec").topics["samples"]["records"]
    assert man["counts"]["predictions"] >= live["stats"].samples and man["counts"]["alerts"] > 0
    assert [a["fault"] for a in man["annotations"]] == FAULTS and man["meta"]["sim"]["rate_hz"] == 5.0
    assert record_demo(s, tmp_path / "later", start_ms=now_ms() + 60_000)["counts"]["samples"] == 0
    # Following from now for a second records nothing (the live topics are quiet); a set stop returns at once.
    assert sum(record(s, tmp_path / "now", from_now=True, duration_s=1.0)["counts"].values()) == 0
    stop = threading.Event()
    stop.set()
    assert sum(record(s, tmp_path / "stopped", topics=["all"], stop=stop)["counts"].values()) == 0


def test_cli_compare_two_image_versions_on_part_of_the_recording(live, tmp_path, monkeypatch):
    """`replay REC --compare live image=<bad> --policy dry-run --from --to --report`: A/B
    through the CLI. Dry run: the policy would otherwise roll the bad version back."""
    import typer
    from typer.testing import CliRunner

    from conftest import add_image_version
    from streamfuse.procs import child_env
    from streamfuse.replay.cli import replay as replay_cmd

    s = live["settings"]
    bad = add_image_version(s, tmp_path)
    for k, v in child_env(s).items():
        if k.startswith("STREAMFUSE_"):
            monkeypatch.setenv(k, v)
    app = typer.Typer(rich_markup_mode=None)
    app.command()(replay_cmd)
    app.command("noop")(lambda: None)  # two commands: `replay` stays a subcommand, as in the main app
    (tmp_path / "policy.toml").write_text("[monitor]\ndry_run = true\n")
    out = CliRunner().invoke(app, ["replay", str(live["root"] / "rec"), "--compare", "live", f"image={bad}",
                                   "--policy", str(tmp_path / "policy.toml"), "--from", "4", "--to", "24",
                                   "--report", str(tmp_path / "ab")])
    assert out.exit_code == 0, out.output
    result = json.loads((tmp_path / "ab" / "compare.json").read_text())
    a, b = result["a"], result["b"]
    assert b["models"]["image"] == bad and a["models"]["image"] != bad
    # 4 assets at 5 Hz for 20 s, plus the simulator's broken-image samples in that range
    assert a["counts"]["predictions"] == b["counts"]["predictions"] == 20 * 4 * 5 + 3
    assert result["differences"]["scores"]["image"]["macro_f1"] < -0.2  # random weights: one class (top-1 can tie)
    assert a["monitor"]["dry_run"] and not b["commands"]
    html = (tmp_path / "ab" / "compare.html").read_text()
    assert 'class="num worse"' in html and (tmp_path / "ab" / "A" / "report.html").is_file()
