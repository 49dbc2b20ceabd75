"""Alerts delivered to a real Alertmanager (Debian's prometheus-alertmanager) show up in its
API with our labels, and resolve."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request

import pytest

from streamfuse.alerts.subscriptions import SubscriptionStore
from alertlib import (
    DispatcherThread,
    cleanup,
    isolated_settings,
    make_alert,
    publish,
    resolved,
    wait_until,
)
from streamfuse.embedded import free_port
from streamfuse.store import connect

BINARY = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
pytestmark = [
    pytest.mark.integration,
    # CI (STREAMFUSE_REQUIRE_TOOLS=1) installs it, so there a missing binary fails the test instead.
    pytest.mark.skipif(BINARY is None and os.environ.get("STREAMFUSE_REQUIRE_TOOLS") != "1",
                       reason="Alertmanager is not installed: apt-get install -y "
                              "--no-install-recommends prometheus-alertmanager"),
]
CONFIG = """
route:
  receiver: blackhole
  group_by: [alertname]
receivers:
  - name: blackhole
"""


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


@pytest.fixture
def alertmanager(tmp_path):
    port = free_port()
    (tmp_path / "am.yml").write_text(CONFIG)
    log = open(tmp_path / "alertmanager.log", "wb")
    proc = subprocess.Popen(
        [BINARY, f"--config.file={tmp_path / 'am.yml'}", f"--storage.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address=", "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"alertmanager exited: {(tmp_path / 'alertmanager.log').read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{base}/-/ready", timeout=1) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    try:
        wait_until(ready, 30, "Alertmanager to be ready", poll_s=0.1)
        yield base
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def test_alerts_appear_in_alertmanager_with_our_labels_and_resolve(broker, alertmanager):
    s = isolated_settings(broker.bootstrap)
    fire = make_alert(modality="audio", scope="asset", scope_id="asset-7", severity="critical",
                      summary="asset asset-7: audio accuracy 0.41 < 0.60")
    other = make_alert(modality="image", scope="asset", scope_id="asset-8")
    query = f"{alertmanager}/api/v2/alerts?" + urllib.parse.urlencode({"filter": 'alertname=~"streamfuse_.*"'})

    def ours() -> dict[str, dict]:
        return {a["labels"]["scope_id"]: a for a in get_json(query)}

    try:
        SubscriptionStore(connect(s), s.redis_prefix, s.alerts).create(alertmanager, 0, receiver="alertmanager",
                                                                       sub_id="am")
        with DispatcherThread(s):
            publish(s, [fire, other])
            wait_until(lambda: set(ours()) == {"asset-7", "asset-8"}, 30, "both alerts in Alertmanager")
            got = ours()["asset-7"]
            assert got["labels"] == {"alertname": "streamfuse_degradation", "kind": "degradation",
                                     "severity": "critical", "modality": "audio", "scope": "asset",
                                     "scope_id": "asset-7", "asset": "asset-7"}
            assert got["annotations"]["summary"] == "asset asset-7: audio accuracy 0.41 < 0.60"
            assert got["annotations"]["value"] == "0.41" and got["status"]["state"] == "active"
            assert got["fingerprint"] and got["receivers"][0]["name"] == "blackhole"
            publish(s, [resolved(fire)])
            wait_until(lambda: set(ours()) == {"asset-8"}, 30, "the resolved alert to leave the active list")
            publish(s, [resolved(other)])
            wait_until(lambda: ours() == {}, 30, "every alert resolved")
    finally:
        cleanup(s)
