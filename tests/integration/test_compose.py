"""The compose stack's files agree with each other and pass their tools' own checks.

No Docker engine is needed: `docker-compose config` validates the compose file against
its schema, `promtool` checks the Prometheus config and the dashboard's PromQL, and the
rest cross-checks names, ports and mounts between docker-compose.yml, the Dockerfile,
deploy/prometheus.yml and the Grafana provisioning. Each tool test is skipped only when
its binary is absent, and fails instead when STREAMFUSE_REQUIRE_TOOLS=1 (.ci/run sets it
after installing Debian's `docker-compose` and `prometheus`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml  # PyYAML; a dependency of timm

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
PROMETHEUS_FILE = ROOT / "deploy" / "prometheus.yml"
GRAFANA_DIR = ROOT / "deploy" / "grafana"
DASHBOARD_FILE = GRAFANA_DIR / "dashboards" / "streamfuse.json"
DASHBOARD_FILES = sorted((GRAFANA_DIR / "dashboards").glob("*.json"))

PROJECT_IMAGE = "streamfuse:latest"
PROJECT_SERVICES = {"topics", "sync", "worker", "monitor", "alerts-dispatcher", "alerts-api", "simulator"}
ONE_SHOT = {"topics"}
# service -> (settings variable or CLI option naming its /metrics port, the port Prometheus scrapes)
METRICS_PORTS = {
    "worker": ("STREAMFUSE_WORKER__METRICS_PORT", 9100),
    "monitor": ("STREAMFUSE_MONITOR__METRICS_PORT", 9101),
    "sync": ("--metrics-port", 9102),
    "alerts-dispatcher": ("STREAMFUSE_ALERTS__METRICS_PORT", 9103),
    "ingest-mqtt": ("STREAMFUSE_INGEST__METRICS_PORT", 9104),
}
# What `docker-compose config` needs from the environment (the alerts API's token).
COMPOSE_ENV = {"STREAMFUSE_API_TOKEN": "compose-test-token"}
# dashboard file -> metrics it must chart
DASHBOARD_METRICS = {
    "streamfuse.json": ("streamfuse_worker_samples_total", "streamfuse_worker_batch_size",
                        "streamfuse_monitor_kpi_value"),
    # alerts, commands, masks, dead letters, latency
    "streamfuse-operations.json": (
        "streamfuse_monitor_alerts_firing", "streamfuse_monitor_alerts_total", "streamfuse_alerts_notifications_total",
        "streamfuse_monitor_commands_total", "streamfuse_worker_commands_total", "streamfuse_worker_modality_masked",
        "streamfuse_worker_rejected_total", "streamfuse_sync_rejected_total", "streamfuse_monitor_rejected_total",
        "streamfuse_worker_queue_wait_seconds", "streamfuse_worker_compute_seconds",
        "streamfuse_alerts_delivery_seconds"),
}
TOOL_TIMEOUT_S = 60


def require_tool(name: str, package: str) -> None:
    """Skip when ``name`` is not installed; fail in CI (STREAMFUSE_REQUIRE_TOOLS=1), where a
    missing tool means the install step broke and the check would silently not run."""
    if shutil.which(name) is not None:
        return
    message = f"{name} not installed (apt-get install {package})"
    if os.environ.get("STREAMFUSE_REQUIRE_TOOLS") == "1":
        pytest.fail(message + "; STREAMFUSE_REQUIRE_TOOLS=1 wants it")
    pytest.skip(message)


def _load_yaml(path: Path) -> dict:
    with path.open(encoding="utf-8") as fh:
        return yaml.safe_load(fh)  # safe_load resolves the `<<: *anchor` merges too


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # compose also allows ["KEY=value", ...]
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def _run_tool(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, cwd=ROOT, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, check=False,
        env=None if env is None else {**os.environ, **env},
    )


def _container_path(service: dict, host_path: str) -> str:
    """Where a service mounts a path of this repository (short `src:dst[:mode]` syntax)."""
    for volume in service.get("volumes", []):
        src, dst = volume.split(":")[:2]
        if (ROOT / src).resolve() == (ROOT / host_path).resolve():
            return dst
    raise AssertionError(f"{host_path} is not mounted; volumes: {service.get('volumes')}")


@pytest.fixture(scope="module")
def compose() -> dict:
    return _load_yaml(COMPOSE_FILE)


@pytest.fixture(scope="module")
def services(compose: dict) -> dict[str, dict]:
    return compose["services"]


@pytest.fixture(scope="module")
def prometheus() -> dict:
    return _load_yaml(PROMETHEUS_FILE)


@pytest.fixture(scope="module", params=DASHBOARD_FILES, ids=lambda p: p.name)
def dashboard(request) -> dict:
    return {**json.loads(request.param.read_text(encoding="utf-8")), "_file": request.param.name}


def test_every_dashboard_is_checked_and_uids_are_unique() -> None:
    assert {p.name for p in DASHBOARD_FILES} == set(DASHBOARD_METRICS)
    uids = [json.loads(p.read_text(encoding="utf-8"))["uid"] for p in DASHBOARD_FILES]
    assert len(set(uids)) == len(uids), uids


# --- docker-compose.yml ----------------------------------------------------------------


def test_compose_file_validates_with_docker_compose() -> None:
    require_tool("docker-compose", "docker-compose")
    result = _run_tool("docker-compose", "-f", str(COMPOSE_FILE), "config", "-q", env=COMPOSE_ENV)
    assert result.returncode == 0, result.stderr
    # Closed by default: without a token for the alerts API the stack does not start.
    unset = {k: v for k, v in os.environ.items() if k != "STREAMFUSE_API_TOKEN"}
    result = subprocess.run(["docker-compose", "-f", str(COMPOSE_FILE), "config", "-q"], cwd=ROOT, env=unset,
                            capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, check=False)
    assert result.returncode != 0 and "set STREAMFUSE_API_TOKEN" in result.stderr, result.stderr


def test_every_long_running_service_has_a_healthcheck(services: dict[str, dict]) -> None:
    for name, svc in services.items():
        if name in ONE_SHOT:
            continue
        test = svc.get("healthcheck", {}).get("test")
        assert test and test[0] in ("CMD", "CMD-SHELL"), f"{name} has no healthcheck"
        if name in PROJECT_SERVICES:
            assert test[1:3] == ["streamfuse", "health"], (name, test)


def test_state_dirs_are_writable_by_the_image_user(services: dict[str, dict]) -> None:
    """Every directory a project service writes is created and chowned for the image's
    non-root user (so a named volume mounted there starts out writable), or is its home."""
    text = DOCKERFILE.read_text(encoding="utf-8")
    user = re.findall(r"^USER\s+(\S+)", text, re.M)[-1]
    owned = set()
    for dirs in re.findall(rf"chown {user}:{user} ([^\n\\&]+)", text):
        owned |= set(dirs.split())
    home = re.search(r"--home-dir (\S+)", text).group(1)
    assert owned, "the Dockerfile chowns no directory for the runtime user"
    for name in PROJECT_SERVICES:
        env = _env(services[name])
        for var in ("STREAMFUSE_MODEL_DIR", "STREAMFUSE_MONITOR__DATA_DIR"):
            path = env.get(var)
            if path is None or (var == "STREAMFUSE_MODEL_DIR" and name != "worker"):
                continue  # only the worker writes the model dir (the monitor mounts it read-only)
            assert any(path == d or path.startswith(d + "/") for d in owned | {home}), (name, var, path)
            mounts = [v.split(":") for v in services[name].get("volumes", [])]
            assert any(path == m[1] or path.startswith(m[1] + "/") for m in mounts if len(m) < 3 or m[2] != "ro"), \
                f"{name}: {path} is not on a writable volume (it would be lost with the container)"
    monitor = _env(services["monitor"])
    assert "STREAMFUSE_MONITOR__DATA_DIR" in monitor, "the monitor's faust data dir would be under / (not writable)"


def test_project_services_share_one_image_and_build(services: dict[str, dict]) -> None:
    built = {name for name, svc in services.items() if "build" in svc}
    assert PROJECT_SERVICES <= built, f"not built from the Dockerfile: {PROJECT_SERVICES - built}"
    builds = {json.dumps(services[name]["build"], sort_keys=True) for name in built}
    assert len(builds) == 1, f"project services differ in build: {builds}"
    images = {name: services[name].get("image") for name in built}
    assert set(images.values()) == {PROJECT_IMAGE}, images

    build = services["worker"]["build"]
    context = build if isinstance(build, str) else build["context"]
    dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
    assert (ROOT / context / dockerfile).resolve() == DOCKERFILE


def test_kafka_is_single_node_kraft(services: dict[str, dict]) -> None:
    assert not [
        name for name, svc in services.items()
        if "zookeeper" in name.lower() or "zookeeper" in str(svc.get("image", "")).lower()
    ], "KRaft mode needs no ZooKeeper service"
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    env = _env(kafka)
    assert not any("ZOOKEEPER" in key for key in env), sorted(env)
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}

    node_id = env["KAFKA_NODE_ID"]
    controller = env["KAFKA_CONTROLLER_LISTENER_NAMES"]
    listeners = dict(
        item.split("://", 1) for item in env["KAFKA_LISTENERS"].split(",")
    )  # name -> ":port"
    assert controller in listeners, listeners
    controller_port = listeners[controller].rsplit(":", 1)[1]
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{node_id}@kafka:{controller_port}"

    protocol_map = dict(item.split(":") for item in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    assert set(listeners) <= set(protocol_map), (listeners, protocol_map)
    for key in ("KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR", "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR"):
        assert env[key] == "1", f"{key} must be 1 on a single broker"
    assert "healthcheck" in kafka


def test_clients_use_the_advertised_listener_and_redis_service(services: dict[str, dict]) -> None:
    kafka_env = _env(services["kafka"])
    advertised = dict(
        item.split("://", 1) for item in kafka_env["KAFKA_ADVERTISED_LISTENERS"].split(",")
    )
    internal = advertised[kafka_env.get("KAFKA_INTER_BROKER_LISTENER_NAME", "PLAINTEXT")]
    for name in PROJECT_SERVICES:
        env = _env(services[name])
        assert env["STREAMFUSE_KAFKA_BOOTSTRAP"] == internal, name
        redis_url = urlsplit(env["STREAMFUSE_REDIS_URL"])
        assert (redis_url.scheme, redis_url.hostname) == ("redis", "redis"), name


def test_pipeline_waits_for_healthy_kafka_redis_and_created_topics(services: dict[str, dict]) -> None:
    for name in ("kafka", "redis"):
        assert "healthcheck" in services[name], f"{name} needs a healthcheck"
    assert services["topics"]["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert services["topics"]["command"] == ["topics", "create"]
    assert services["topics"].get("restart") == "no", "a one-shot service must not restart"
    for name in PROJECT_SERVICES - {"topics", "alerts-api"}:  # the API needs Redis only
        depends_on = services[name]["depends_on"]
        assert depends_on["topics"]["condition"] == "service_completed_successfully", name


def test_models_volume_is_mounted_at_the_model_dir(compose: dict, services: dict[str, dict]) -> None:
    assert "models" in compose["volumes"]
    for name in ("worker", "monitor"):
        model_dir = _env(services[name])["STREAMFUSE_MODEL_DIR"]
        mounts = [v.split(":") for v in services[name].get("volumes", [])]
        assert any(m[0] == "models" and m[1] == model_dir for m in mounts), (name, mounts)


# --- Dockerfile ------------------------------------------------------------------------


def test_dockerfile_runs_streamfuse_as_non_root() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.M)
    assert re.search(r'^ENTRYPOINT \["streamfuse"\]\s*$', text, re.M)
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0"), users
    assert re.search(r"^ARG TORCH_INDEX_URL=https://download\.pytorch\.org/whl/cpu\s*$", text, re.M)
    assert "pip install --no-cache-dir ." in text


def test_dockerfile_copies_only_what_dockerignore_lets_in() -> None:
    """The .dockerignore is an allow-list; a COPY of anything not on it fails the build."""
    allowed = {
        line[1:].rstrip("/")
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.startswith("!")
    }
    text = DOCKERFILE.read_text(encoding="utf-8")
    for line in re.findall(r"^COPY\s+(?!--from)(.+)$", text, re.M):
        sources = [s for s in line.split()[:-1] if not s.startswith("--")]
        for src in sources:
            assert (ROOT / src).exists(), f"COPY source {src} missing"
            assert any(src == a or src.startswith(a + "/") for a in allowed), (
                f"COPY {src}: not allowed in by .dockerignore ({sorted(allowed)})"
            )


def test_dockerfile_torch_pins_come_from_pyproject() -> None:
    result = _run_tool(
        sys.executable, "deploy/requirements_from_pyproject.py", "--only", "torch", "torchvision", "torchaudio"
    )
    assert result.returncode == 0, result.stderr
    pins = result.stdout.split()
    assert [p.split("==")[0] for p in pins] == ["torch", "torchvision", "torchaudio"], pins
    assert all(re.fullmatch(r"[a-z]+==\d+(\.\d+)*", p) for p in pins), pins
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert all(f'"{p}"' in pyproject for p in pins)


# --- Prometheus ------------------------------------------------------------------------


def _scrape_targets(prometheus: dict) -> dict[str, set[tuple[str, int]]]:
    """job -> {(host, port)} from static_configs and dns_sd_configs."""
    jobs: dict[str, set[tuple[str, int]]] = {}
    for job in prometheus["scrape_configs"]:
        targets = jobs.setdefault(job["job_name"], set())
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host, port = target.rsplit(":", 1)
                targets.add((host, int(port)))
        for dns in job.get("dns_sd_configs", []):
            targets.update((name, int(dns["port"])) for name in dns["names"])
    return jobs


def test_prometheus_targets_match_compose_services(prometheus: dict, services: dict[str, dict]) -> None:
    targets = set().union(*_scrape_targets(prometheus).values())
    for name, (variable, port) in METRICS_PORTS.items():
        assert (name, port) in targets, f"{name}:{port} not scraped; targets: {sorted(targets)}"
        if variable.startswith("--"):
            command = services[name]["command"]
            assert command[command.index(variable) + 1] == str(port), f"{name} must run with {variable} {port}"
        else:
            assert _env(services[name]).get(variable) == str(port), f"{name} must set {variable}={port}"
    for host, port in targets - {("localhost", 9090)}:
        assert host in services, f"scrape target {host}:{port} is not a compose service"
        assert host in METRICS_PORTS and METRICS_PORTS[host][1] == port, (host, port)


def test_prometheus_config_passes_promtool() -> None:
    require_tool("promtool", "prometheus")
    result = _run_tool("promtool", "check", "config", str(PROMETHEUS_FILE))
    assert result.returncode == 0, result.stdout + result.stderr


# --- Grafana ---------------------------------------------------------------------------


def test_grafana_provisioning_matches_mounts(services: dict[str, dict]) -> None:
    grafana = services["grafana"]
    assert _container_path(grafana, "deploy/grafana/provisioning") == "/etc/grafana/provisioning"
    dashboards_dir = _container_path(grafana, "deploy/grafana/dashboards")

    datasources = _load_yaml(GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml")
    (prom,) = [d for d in datasources["datasources"] if d["type"] == "prometheus"]
    url = urlsplit(prom["url"])
    assert url.hostname == "prometheus" and "prometheus" in services, prom["url"]

    providers = _load_yaml(GRAFANA_DIR / "provisioning" / "dashboards" / "streamfuse.yml")
    paths = [p["options"]["path"] for p in providers["providers"]]
    assert dashboards_dir in paths, (dashboards_dir, paths)


def test_dashboard_has_panels_with_queries_on_the_pipeline_metrics(dashboard: dict) -> None:
    datasources = _load_yaml(GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml")
    datasource_uids = {d["uid"] for d in datasources["datasources"]}
    assert dashboard["uid"] and dashboard["title"]
    assert isinstance(dashboard["schemaVersion"], int)
    panels = dashboard["panels"]
    assert panels, "dashboard has no panels"
    assert len({p["id"] for p in panels}) == len(panels), "panel ids must be unique"

    exprs = []
    for panel in panels:
        assert panel["type"] and panel["title"], panel
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]), panel["title"]
        assert panel["datasource"]["uid"] in datasource_uids, panel["title"]
        assert panel["targets"], f"panel {panel['title']!r} has no targets"
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(set(ref_ids)) == len(ref_ids), panel["title"]
        for target in panel["targets"]:
            assert isinstance(target["expr"], str) and target["expr"].strip(), panel["title"]
            exprs.append(target["expr"])

    cells = [(x, y) for p in panels for x in range(p["gridPos"]["x"], p["gridPos"]["x"] + p["gridPos"]["w"])
             for y in range(p["gridPos"]["y"], p["gridPos"]["y"] + p["gridPos"]["h"])]
    assert len(set(cells)) == len(cells), "panels overlap"
    assert all(p["gridPos"]["x"] + p["gridPos"]["w"] <= 24 for p in panels), "a panel is wider than the grid"
    for metric in DASHBOARD_METRICS[dashboard["_file"]]:
        # A histogram is queried through its _bucket / _sum / _count series.
        pattern = rf"\b{metric}(_bucket|_sum|_count)?\b"
        assert any(re.search(pattern, e) for e in exprs), f"no panel queries {metric}"


def _exposed_series_names() -> set[str]:
    """Series names that streamfuse.metrics exposes, e.g. foo_total, foo_bucket."""
    from prometheus_client import CollectorRegistry

    from streamfuse import metrics

    suffixes = {
        "counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
        "summary": ("", "_sum", "_count"), "info": ("_info",), "gauge": ("",),
    }
    registry = CollectorRegistry()
    for name, obj in vars(metrics).items():
        if isinstance(obj, type) and name.endswith("Metrics") and obj.__module__ == metrics.__name__:
            obj(registry)
    return {
        family.name + suffix
        for family in registry.collect()
        for suffix in suffixes.get(family.type, ("",))
    }


def test_dashboard_queries_only_metrics_streamfuse_exposes(dashboard: dict) -> None:
    exposed = _exposed_series_names()
    assert exposed, "streamfuse.metrics defines no *Metrics class"
    queried = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"\bstreamfuse_\w+", target["expr"])
    }
    assert queried - exposed == set(), f"dashboard queries series nobody exposes: {queried - exposed}"


def test_dashboard_queries_are_valid_promql(dashboard: dict, tmp_path: Path) -> None:
    require_tool("promtool", "prometheus")
    # promtool parses PromQL offline only inside rule files, so wrap each query in a
    # recording rule; Grafana's own interval variables become a fixed range first.
    rules = []
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = re.sub(r"\$__(rate_)?interval\b|\$\{__(rate_)?interval\}", "1m", target["expr"])
            rules.append({"record": f"dashboard:panel{panel['id']}_{target['refId'].lower()}", "expr": expr})
    rule_file = tmp_path / "dashboard-rules.yml"
    rule_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = _run_tool("promtool", "check", "rules", str(rule_file))
    assert result.returncode == 0, result.stdout + result.stderr
