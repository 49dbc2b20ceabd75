"""`streamfuse simulate --dataset` → sync → worker on the embedded broker: every sample
streamed from a dataset's rows gets a prediction, its label is the row's, and an injected
fault changes the recorded readings from its onset."""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from typer.testing import CliRunner

from conftest import add_image_version
from streamfuse.cli import app
from streamfuse.demo import Observer, serve_models
from streamfuse.procs import child_env
from streamfuse.events import Label, SensorEvent, decode
from streamfuse.inference.worker import InferenceWorker
from streamfuse.kafka import make_consumer
from streamfuse.models.dataset import UnknownLabelError, export_sim
from streamfuse.models.registry import Registry
from streamfuse.sim.dataset_plant import DatasetPlant, load_rows
from streamfuse.sync.app import run_sync
from streamfuse.topics import Topics, ensure_topics

pytestmark = pytest.mark.integration

DURATION_S, FAULT_AT_S = 8, 4


class Inputs:
    """Reads the labels and the camera readings the simulator published, from the start."""

    def __init__(self, settings) -> None:
        from kafka import TopicPartition

        t = Topics(settings.topic_prefix)
        self.consumer = make_consumer(settings, None, "it-dataset-inputs")
        tps = [TopicPartition(n, p) for n in (t.labels, t.sensor("image")) for p in range(settings.partitions)]
        self.consumer.assign(tps)
        self.consumer.seek_to_beginning(*tps)
        self.labels: dict[str, Label] = {}
        self.images: list[SensorEvent] = []

    def poll(self) -> None:
        for msgs in self.consumer.poll(timeout_ms=200).values():
            for msg in msgs:
                ev = decode(msg.value, check_payloads=False)
                if isinstance(ev, Label):
                    self.labels[ev.sample_id] = ev
                else:
                    self.images.append(ev)


class Pipeline:
    """The synchronizer and an inference worker, each in a thread of this process (it has
    torch loaded already: no process start-up in the test's time)."""

    def __init__(self, settings) -> None:
        registry = Registry(settings)
        self.worker = InferenceWorker(settings, registry.load_active("cpu"), model_registry=registry)
        self.stop, self.errors = threading.Event(), []
        self.threads = [threading.Thread(target=self._guard, args=(fn,), daemon=True)
                        for fn in (lambda: run_sync(settings, stop=self.stop), self.worker.run)]
        for t in self.threads:
            t.start()

    def _guard(self, fn) -> None:
        try:
            fn()
        except BaseException as exc:  # reported by wait_for
            self.errors.append(exc)

    def wait_for(self, predicate, what: str, poll, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if self.errors or not all(t.is_alive() for t in self.threads):
                raise AssertionError(f"sync or worker stopped ({self.errors!r}) while waiting for {what}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
            poll()

    def close(self) -> None:
        self.stop.set()
        self.worker.stop()
        for t in self.threads:
            t.join(30)
        assert not self.errors, self.errors


def test_simulate_dataset_through_sync_and_worker(settings, tmp_path: Path):
    root = export_sim(tmp_path / "data", 60, seed=3).parent  # test split: 9 rows
    ensure_topics(settings)
    pipeline, observer, inputs = Pipeline(settings), Observer(settings, 0), Inputs(settings)
    try:
        run = CliRunner().invoke(app, ["simulate", "--dataset", str(root), "--max-speed", "--duration",
                                       str(DURATION_S), "--per-modality-topics", "--fault", f"image:fog@{FAULT_AT_S}"],
                                 env=child_env(settings))
        assert run.exit_code == 0, (run.output, run.exception)
        assert re.search(r"9\s+test\s+rows", run.output), run.output
        n = int(re.search(r"published (\d+) samples", run.output).group(1))
        assert n == DURATION_S * settings.sim.rate_hz * settings.sim.assets
        pipeline.wait_for(lambda: len(inputs.labels) >= n, "a label per sample", inputs.poll)
        pipeline.wait_for(lambda: set(observer.served_by) >= set(inputs.labels), "a prediction per sample",
                          observer.poll)
    finally:
        pipeline.close()
        inputs.consumer.close()
        observer.consumer.close()

    # Every sample was predicted once; the labels are the streamed rows' labels.
    assert set(observer.served_by) == set(inputs.labels) and max(observer.prediction_counts.values()) == 1
    plant = DatasetPlant(root, assets=settings.sim.assets, seed=settings.sim.seed)
    ticks = range(int(DURATION_S * settings.sim.rate_hz))
    rows = [plant.row_at(i, k) for k in ticks for i in range(settings.sim.assets)]
    assert {r.sample_id for r in rows} == {r.sample_id for r in plant.data.rows}  # every row was streamed
    assert Counter(lab.label for lab in inputs.labels.values()) == Counter(r.label for r in rows)

    # Camera readings are the rows' files until the fault, fogged after it.
    assert len(inputs.images) >= 0.9 * n  # a few are dropped by the simulated disorder
    onset = FAULT_AT_S * settings.sim.rate_hz
    for ev in inputs.images:
        asset, seq = re.fullmatch(r"sim-asset-(\d+)-(\d+)-image", ev.event_id).groups()
        clean = plant.row_at(int(asset), int(seq)).readings["image"].payload
        assert (ev.payload != clean) == (int(seq) >= onset), ev.event_id

    # The served models see the rows: right before the fog, the camera's model wrong in it.
    def image_top1(after: bool) -> float:
        preds = [p for p in observer.predictions.values() if (p.ts_ms >= start_ms + FAULT_AT_S * 1000) == after
                 and "image" in p.modality_probs]
        hits = [p.classes[int(np.argmax(p.modality_probs["image"]))] == inputs.labels[p.sample_id].label
                for p in preds]
        return sum(hits) / len(hits)

    start_ms = min(lab.ts_ms for lab in inputs.labels.values())
    fused = [p.fused_label == inputs.labels[p.sample_id].label for p in observer.predictions.values()]
    assert sum(fused) / len(fused) > 0.7
    assert image_top1(after=False) > image_top1(after=True) + 0.3


def test_demo_models_bundle_is_served_and_the_rows_labels_checked(settings, trained_bundle, tmp_path: Path):
    registry = Registry(settings)
    served = registry.active()
    registry.activate("image", add_image_version(settings, tmp_path), actor="test")  # something else is active
    root = export_sim(tmp_path / "data", 20, seed=4).parent
    rows = load_rows(root)

    out = serve_models(settings, None, rows, trained_bundle)  # demo --dataset DIR --models BUNDLE
    assert out.bundle_dir == trained_bundle.resolve() and registry.active() == served

    meta = root / "metadata.csv"  # the same data, with a class the served models do not know
    meta.write_text(meta.read_text().replace(",overheat,", ",overheated,"))
    line = next(i for i, t in enumerate(meta.read_text().splitlines(), 1) if ",test,overheated," in t)
    with pytest.raises(UnknownLabelError, match=rf"line {line}: label 'overheated' of '[^']+' \(test\) is not one "
                                                r"of the served models' classes .*--models M"):
        serve_models(settings, None, load_rows(root), None)
