"""Every command and sub-command of `streamfuse` renders its help (nothing is left out)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

from streamfuse.cli import app

EXPECTED = {"demo", "broker", "topics", "simulate", "sync", "worker", "monitor", "status", "train", "dataset",
            "record", "replay",
            "models", "alerts",
            "control", "health", "ingest"}


def walk(cmd, path=()):
    yield path, cmd
    for name, sub in getattr(cmd, "commands", {}).items():
        yield from walk(sub, (*path, name))


def test_help_lists_every_command():
    root = typer.main.get_command(app)
    assert set(root.commands) == EXPECTED
    runner = CliRunner()
    for path, _ in walk(root):
        result = runner.invoke(app, [*path, "--help"])
        assert result.exit_code == 0, (path, result.output)
        assert "Usage" in result.output


def test_bad_fault_spec_is_a_clear_error():
    result = CliRunner().invoke(app, ["simulate", "--fault", "camera:fog@10", "--duration", "1"])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: bad fault spec 'camera:fog@10'") and result.stdout == ""


def test_bad_fault_spec_through_the_entry_point_is_an_error_on_stderr_not_a_traceback(tmp_path):
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    out = subprocess.run([sys.executable, "-m", "streamfuse", "simulate", "--fault", "nonsense", "--duration", "1"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("error: bad fault spec 'nonsense': missing '@START'"), out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""


def test_ingest_without_a_mapping_file_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("STREAMFUSE_INGEST__MAPPING", raising=False)
    result = CliRunner().invoke(app, ["ingest", "mqtt"])
    assert result.exit_code == 2
    assert "error: no mapping file: pass --mapping FILE or set STREAMFUSE_INGEST__MAPPING" in result.stderr


@pytest.mark.parametrize(("args", "words"), [
    (["simulate", "--assets", "0"], "error: --assets 0: input should be greater than or equal to 1"),
    (["simulate", "--rate", "0"], "error: --rate 0: input should be greater than 0"),
    (["demo", "--assets", "0", "--rate", "-1"], "error: --assets 0: input should be greater than or equal to 1; "
                                                "--rate -1: input should be greater than 0"),
])
def test_zero_assets_or_rate_is_refused_not_ignored(args, words):
    result = CliRunner().invoke(app, [*args, "--duration", "1"])
    assert result.exit_code == 2 and result.stderr.strip() == words


def test_sync_reports_the_samples_it_produced_when_interrupted(monkeypatch):
    import signal

    import streamfuse.sync.app

    def interrupted_run(settings, *, stop, **kwargs):
        signal.raise_signal(signal.SIGINT)  # Ctrl-C while it runs
        assert stop.wait(5)
        return 7

    monkeypatch.setattr(streamfuse.sync.app, "run_sync", interrupted_run)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        result = CliRunner().invoke(app, ["sync"])
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    assert result.exit_code == 0, result.output
    assert "sync stopped after 7 samples" in result.stdout


def test_every_command_group_has_the_one_error_path():
    from streamfuse.cli_errors import ErrorsGroup

    groups = [(path, cmd) for path, cmd in walk(typer.main.get_command(app)) if hasattr(cmd, "commands")]
    assert len(groups) > 5
    assert [path for path, cmd in groups if not isinstance(cmd, ErrorsGroup)] == []
