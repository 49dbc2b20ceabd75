"""The Prometheus alert rules in deploy/rules: promtool's unit tests pass, every metric a
rule uses is one streamfuse exports, and Prometheus (compose) loads them."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from test_compose import (
    COMPOSE_FILE, PROMETHEUS_FILE, ROOT, _container_path, _exposed_series_names, _load_yaml, _run_tool, require_tool,
)

RULES_DIR = ROOT / "deploy" / "rules"
RULES_FILE = RULES_DIR / "streamfuse.rules.yml"
TESTS_FILE = RULES_DIR / "streamfuse.rules.test.yml"
PROMETHEUS_OWN = {"up"}  # series Prometheus itself writes for every target
# Every situation the rules must cover (issue 13), by alert name.
ALERTS = {"StreamfuseWorkerDown", "StreamfuseNoWorker", "StreamfuseConsumerLagGrowing", "StreamfuseDeadLetterSpike",
          "StreamfuseNoPredictions", "StreamfuseModalityMaskedTooLong", "StreamfuseRedisDown",
          "StreamfuseMonitorBehind"}
PROMQL_WORDS = {"sum", "rate", "or", "vector", "and", "absent", "delta", "avg_over_time", "offset", "increase",
                "max", "by", "time", "on", "without", "ignoring"}


def rules() -> list[dict]:
    return [r for g in _load_yaml(RULES_FILE)["groups"] for r in g["rules"]]


def test_promtool_unit_tests_pass():
    require_tool("promtool", "prometheus")
    result = _run_tool("promtool", "test", "rules", str(TESTS_FILE))
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr


def test_every_alert_is_covered_and_unit_tested():
    alerts = {r["alert"] for r in rules() if "alert" in r}
    assert alerts == ALERTS
    tested = {t["alertname"] for case in yaml.safe_load(TESTS_FILE.read_text())["tests"]
              for t in case["alert_rule_test"] if t["exp_alerts"]}
    assert tested == alerts, f"alerts never seen firing in a unit test: {alerts - tested}"
    for r in rules():
        if "alert" in r:
            assert r["labels"]["severity"] in ("warning", "critical") and r["annotations"]["summary"], r["alert"]


def test_every_metric_a_rule_uses_is_exported_by_streamfuse():
    exposed = _exposed_series_names()
    recorded = {r["record"] for r in rules() if "record" in r}
    used: set[str] = set()
    for r in rules():
        # drop matchers, strings, ranges and grouping labels: what is left names series
        expr = re.sub(r'\{[^}]*\}|"[^"]*"|\[[^\]]*\]|\b(by|without|on|ignoring)\s*\([^)]*\)', "", r["expr"])
        used |= set(re.findall(r"\b[a-zA-Z_:][a-zA-Z0-9_:]*\b", expr)) - PROMQL_WORDS
    unknown = {m for m in used if not re.fullmatch(r"\d+[smhd]?", m)} - exposed - recorded - PROMETHEUS_OWN
    assert unknown == set(), f"rules use series nobody exports: {unknown}"
    assert {m for m in used if m.startswith("streamfuse_")} >= {
        "streamfuse_worker_consumer_lag_records", "streamfuse_redis_up", "streamfuse_monitor_watermark_seconds"}


def test_prometheus_loads_the_rules_in_compose(tmp_path: Path):
    globs = _load_yaml(PROMETHEUS_FILE)["rule_files"]
    assert any(RULES_FILE in PROMETHEUS_FILE.parent.glob(g) for g in globs), globs
    assert not any(TESTS_FILE in PROMETHEUS_FILE.parent.glob(g) for g in globs), "the unit tests are not rules"
    prometheus = _load_yaml(COMPOSE_FILE)["services"]["prometheus"]
    config_dir = Path(_container_path(prometheus, "deploy/prometheus.yml")).parent
    assert _container_path(prometheus, "deploy/rules") == str(config_dir / "rules")
