"""The process entry points in workers/: scripts beside the package, never installed as one."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from setuptools import find_packages

ROOT = Path(__file__).resolve().parents[2]


def test_only_streamfuse_is_installed() -> None:
    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    packages = find_packages(str(ROOT), include=find["include"])
    assert "streamfuse" in packages
    assert not [p for p in packages if not p.startswith("streamfuse")]


@pytest.mark.parametrize(("script", "command"), [("inference", "worker"), ("sync", "sync"),
                                                  ("monitor", "monitor"), ("alerts", "alerts dispatch")])
def test_worker_scripts_run_their_command(script: str, command: str, tmp_path: Path) -> None:
    # From another directory and without PYTHONPATH: the script finds the checkout beside it.
    out = subprocess.run([sys.executable, str(ROOT / "workers" / f"{script}.py"), "--help"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert f"{script}.py {command} [OPTIONS]" in out.stdout
