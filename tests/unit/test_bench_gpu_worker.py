"""Smoke test of bench/gpu_worker.py: its CPU fallback runs end to end with tiny models."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
KEYS = {"device", "gpu", "dtype", "batch", "model_only_sps", "full_sps", "ratio", "p50_ms", "p99_ms", "stages",
        "torch", "date"}


def test_gpu_worker_bench_runs_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "x.json"
    cmd = [sys.executable, str(ROOT / "bench" / "gpu_worker.py"), "--device", "cpu", "--tiny", "--duration", "1",
           "--threads", "1", "--json", str(out)]  # one thread: a busy 2-core host stalls two for long
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "CPU fallback" in run.stdout
    result = json.loads(out.read_text())
    assert KEYS <= set(result)
    assert (result["device"], result["gpu"], result["dtype"], result["decode"]) == ("cpu", None, "fp32", "cpu")
    assert result["ratio"] > 0 and result["full_sps"] > 0 and result["model_only_sps"] > 0
    assert set(result["stages"]) == {"decode", "copy", "compute", "to_host"}
    assert result["p99_ms"] >= result["p50_ms"] > 0
