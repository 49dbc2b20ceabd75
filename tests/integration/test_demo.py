"""`streamfuse demo` end to end, as a user runs it: a webhook subscribed beforehand with
`streamfuse alerts subscribe` gets the demo's alerts, signed; the summary has the fault's
alert after the fault and none before, its command chain, and the notification count."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from webhook_receiver import WebhookReceiver
from streamfuse.alerts.sealing import generate_key
from streamfuse.store import StatusStore, connect
from streamfuse.config import Settings

pytestmark = pytest.mark.integration
FAULT_S = 15


def test_demo_with_a_subscribed_webhook(trained_bundle: Path, tmp_path: Path):
    tag = uuid.uuid4().hex[:8]
    env = {**os.environ, "STREAMFUSE_REDIS_PREFIX": f"streamfuse-demo-test:{tag}:",
           "STREAMFUSE_MODEL_DIR": str(trained_bundle.parent), "STREAMFUSE_BUNDLE": trained_bundle.name,
           "STREAMFUSE_ALERTS__ALLOW_PRIVATE_TARGETS": "true", "STREAMFUSE_ALERTS__GROUP_WAIT_S": "0.5",
           "STREAMFUSE_SIM__RATE_HZ": "4", "STREAMFUSE_KAFKA_BOOTSTRAP": "",
           "STREAMFUSE_ALERTS__SECRET_KEY": generate_key()}
    cli = [sys.executable, "-m", "streamfuse"]
    summary = tmp_path / "summary.json"
    with WebhookReceiver(secret="s3cret") as receiver:
        sub = subprocess.run([*cli, "alerts", "subscribe", "--url", receiver.url, "--secret", "s3cret",
                              "--match", "kind=degradation"], env=env, capture_output=True, text=True, timeout=60)
        assert sub.returncode == 0, sub.stdout + sub.stderr
        try:
            run = subprocess.run([*cli, "demo", "--duration", "45", "--fault", f"image:fog@{FAULT_S}",
                                  "--summary", str(summary), "--logs", str(tmp_path / "logs")],
                                 env=env, capture_output=True, text=True, timeout=400)
            assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
            s = json.loads(summary.read_text())
            c = s["counts"]
            assert c["samples"] == c["predictions"] > 0 and c["dead_letter"] > 0 and c["kpi_snapshots"] > 0
            firing = [a for a in s["alerts"] if a["status"] == "firing"]
            assert firing and all(a["t_s"] > FAULT_S for a in s["alerts"])
            assert any(a["modality"] == "image" and a["kind"] == "degradation" for a in firing)
            chain = next(ch for ch in s["chains"] if ch["commands"])
            assert chain["commands"][0]["acks"] and chain["commands"][0]["acks"][0]["status"] == "applied"
            fault = s["fault_detection"][0]
            assert fault["detection_delay_windows"] is not None and fault["fused_accuracy"]["before"] > 0.8
            assert c["notifications_sent"] >= 1
            receiver.wait_for(lambda r: r.deliveries, 10, "the demo's alerts")
            assert all(d.signed for d in receiver.deliveries)
            body = receiver.deliveries[0].body
            assert body["version"] == "4" and body["alerts"][0]["labels"]["kind"] == "degradation"
        finally:
            settings = Settings(redis_prefix=env["STREAMFUSE_REDIS_PREFIX"])
            StatusStore(connect(settings), settings.redis_prefix).clear()
