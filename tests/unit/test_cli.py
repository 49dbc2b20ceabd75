"""Every command and sub-command of `streamfuse` renders its help (nothing is left out)."""

from __future__ import annotations

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
    assert result.exit_code != 0
    assert "camera" in str(result.exception) or "camera" in result.output


def test_ingest_without_a_mapping_file_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("STREAMFUSE_INGEST__MAPPING", raising=False)
    result = CliRunner().invoke(app, ["ingest", "mqtt"])
    assert result.exit_code != 0
    assert "no mapping file: pass --mapping FILE or set STREAMFUSE_INGEST__MAPPING" in str(result.exception)
