"""The replay report rendered by headless Chromium (skipped where Chromium is not installed)."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

from streamfuse.replay.report import render_report

pytestmark = pytest.mark.skipif(shutil.which("chromium") is None and shutil.which("chromium-browser") is None,
                                reason="chromium is not installed (apt-get install chromium)")


def load_checker():
    path = Path(__file__).resolve().parents[2] / "scripts" / "check_report.py"
    spec = importlib.util.spec_from_file_location("check_report", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_plots_and_alert_timeline_render_in_chromium(tmp_path):
    from test_replay_eval import summary_of, synthetic_run  # the evaluation tests' synthetic run

    checker = load_checker()
    report = tmp_path / "report.html"
    report.write_text(render_report(summary_of(synthetic_run()), "browser check"))
    result = checker.inspect_report(report, tmp_path)
    assert checker.problems(result) == []
    assert result["timeline"]["bars"] == 1 + 2 and result["title"] == "browser check"
