"""The shipped deploy configuration is valid and agrees with the metrics the worker exports.

Checks Prometheus (config, alert rules and their unit tests) with promtool, Alertmanager
(config, routing, inhibition) with amtool and a real Alertmanager, the Grafana dashboard
structurally, and docker-compose.yml against the files it mounts. promtool, amtool and
Alertmanager come from Debian's prometheus and prometheus-alertmanager packages; when they are
missing these tests fail rather than skip, so CI cannot silently stop checking the configs.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from app.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
PROMETHEUS_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
RULES = PROMETHEUS_DIR / "riskwatch-rules.yml"
RULE_TESTS = PROMETHEUS_DIR / "riskwatch-rules.test.yml"
ALERTMANAGER_CONFIG = ROOT / "deploy" / "alertmanager" / "alertmanager.yml"
GRAFANA_DIR = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "riskwatch.json"
COMPOSE = ROOT / "docker-compose.yml"

# The alerts the runbooks and the on-call rota rely on; more may be added, none removed.
REQUIRED_ALERTS = {
    "RiskwatchWorkerDown",
    "RiskwatchConsumerLagGrowing",
    "RiskwatchEventTimeLagHigh",
    "RiskwatchDeadLetterSpike",
    "RiskwatchDetectorSilent",
    "RiskwatchEngineStuck",
    "RiskwatchScoreDrift",
    "RiskwatchAlertStorm",
    "RiskwatchEscalations",
    "RiskwatchOverduePlans",
}
# Grafana variables, replaced by something PromQL parses.
_GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__range": "1h",
    "$__interval": "15s",
    "$instance": ".*",
    "$detector": ".*",
}
_INSTALL_HINT = "run `apt-get install prometheus prometheus-alertmanager`"

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_RANGE = re.compile(r"\[[^\]]*\]")
_IDENTIFIER = re.compile(r"(?<![\w:$.])[A-Za-z_:][A-Za-z0-9_:]*")


# --------------------------------------------------------------------------- helpers
def _tool(*names: str) -> str:
    """Return the path of the first of `names` on PATH; fail (never skip) when none is."""
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    pytest.fail(
        f"{' / '.join(names)} not found on PATH, so the deploy configs cannot be checked: {_INSTALL_HINT}",
        pytrace=False,
    )


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, (
        f"`{' '.join(args)}` exited with {result.returncode}:\n{result.stdout}\n{result.stderr}"
    )
    return result


def _load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _exported_series() -> set[str]:
    """Every series name app.metrics.Metrics can export, with the suffixes Prometheus sees."""
    names: set[str] = set()
    for family in Metrics(registry=CollectorRegistry()).registry.collect():
        if family.type == "counter":
            names.add(f"{family.name}_total")
        elif family.type == "histogram":
            names |= {f"{family.name}_bucket", f"{family.name}_sum", f"{family.name}_count"}
        elif family.type == "summary":
            names |= {family.name, f"{family.name}_sum", f"{family.name}_count"}
        else:
            names.add(family.name)
    return names


def _metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: riskwatch_*, recorded (level:metric:op) and up."""
    bare = _RANGE.sub("", _STRING.sub('""', expr))
    return {name for name in _IDENTIFIER.findall(bare) if name.startswith("riskwatch_") or ":" in name or name == "up"}


def _rules() -> list[dict[str, Any]]:
    return [rule for group in _load_yaml(RULES)["groups"] for rule in group["rules"]]


def _alerts() -> dict[str, dict[str, Any]]:
    return {rule["alert"]: rule for rule in _rules() if "alert" in rule}


def _recorded() -> set[str]:
    return {rule["record"] for rule in _rules() if "record" in rule}


def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _graph_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel that draws something: rows are containers (their nested panels count)."""
    found = []
    for panel in dashboard["panels"]:
        if panel.get("type") == "row":
            found.extend(panel.get("panels", []))
        else:
            found.append(panel)
    return found


def _dashboard_exprs(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    exprs = [
        (panel["title"], target.get("expr", ""))
        for panel in _graph_panels(dashboard)
        for target in panel.get("targets", [])
    ]
    exprs += [(f"annotation {a['name']}", a["expr"]) for a in dashboard["annotations"]["list"] if "expr" in a]
    return exprs


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --------------------------------------------------------------------------- Prometheus
def test_promtool_check_config_on_a_localhost_copy(tmp_path: Path) -> None:
    promtool = _tool("promtool")
    config = _load_yaml(PROMETHEUS_CONFIG)
    rewritten = []
    for block in [*config["scrape_configs"], *config["alerting"]["alertmanagers"]]:
        for static in block.get("static_configs", []):
            rewritten += static["targets"]
            static["targets"] = [f"127.0.0.1:{target.rsplit(':', 1)[1]}" for target in static["targets"]]
    config["rule_files"] = [str(PROMETHEUS_DIR / name) for name in config["rule_files"]]
    copy = tmp_path / "prometheus.yml"
    copy.write_text(yaml.safe_dump(config))

    out = _run(promtool, "check", "config", str(copy)).stdout
    assert {"worker:9108", "alertmanager:9093"} <= set(rewritten)
    assert "SUCCESS: 1 rule files found" in out


def test_prometheus_config_scrapes_riskwatch_every_5s_and_alerts_to_alertmanager() -> None:
    config = _load_yaml(PROMETHEUS_CONFIG)
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["riskwatch"]["scrape_interval"] == "5s"
    assert jobs["riskwatch"]["static_configs"][0]["targets"] == ["worker:9108"]
    assert config["rule_files"] == [RULES.name]
    assert config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == ["alertmanager:9093"]


def test_promtool_check_rules() -> None:
    _run(_tool("promtool"), "check", "rules", str(RULES))


def test_promtool_rule_unit_tests_pass() -> None:
    _run(_tool("promtool"), "test", "rules", str(RULE_TESTS))


def test_every_alert_has_a_firing_unit_test() -> None:
    tested: dict[str, int] = {}
    for case in _load_yaml(RULE_TESTS)["tests"]:
        for check in case.get("alert_rule_test", []):
            tested[check["alertname"]] = tested.get(check["alertname"], 0) + bool(check.get("exp_alerts"))
    alerts = set(_alerts())
    assert REQUIRED_ALERTS <= alerts
    assert {name for name in alerts if not tested.get(name)} == set(), "alerts without a firing test"
    assert set(tested) <= alerts, "tests for alerts that do not exist"


def test_every_alert_says_what_is_wrong_what_to_do_and_where_the_runbook_is() -> None:
    for name, rule in _alerts().items():
        assert rule["labels"]["severity"] in {"critical", "warning"}, name
        assert rule["labels"]["team"] == "riskwatch-sre", name
        annotations = rule["annotations"]
        assert annotations["summary"].strip() and len(annotations["description"]) > 80, name
        assert annotations["runbook"] == f"README.md#{name.lower()}", name


def test_rule_and_rule_test_metric_names_exist_in_app_metrics() -> None:
    exported, recorded = _exported_series(), _recorded()
    exprs = [(rule.get("alert") or rule["record"], rule["expr"]) for rule in _rules()]
    exprs += [
        (case["name"], series["series"])
        for case in _load_yaml(RULE_TESTS)["tests"]
        for series in case.get("input_series", [])
    ]
    for where, expr in exprs:
        names = _metric_names(expr)
        assert names, f"{where}: {expr!r} names no metric"
        unknown = {n for n in names if n.startswith("riskwatch_")} - exported
        assert not unknown, f"{where}: {sorted(unknown)} not exported by app.metrics.Metrics"
        unrecorded = {n for n in names if ":" in n} - recorded
        assert not unrecorded, f"{where}: {sorted(unrecorded)} is not a recording rule in {RULES.name}"


# --------------------------------------------------------------------------- Alertmanager
def test_amtool_check_config() -> None:
    out = _run(_tool("amtool"), "check-config", str(ALERTMANAGER_CONFIG)).stdout
    assert "SUCCESS" in out


_WARNING = "alertname=RiskwatchWarning entity_type=account entity_id=acc-1 category=velocity plan=p"


@pytest.mark.parametrize(
    ("labels", "receivers"),
    [
        (f"{_WARNING} level=critical team=fraud-ops", "risk-duty,fraud-ops"),
        (f"{_WARNING} level=critical team=no-such-team", "risk-duty"),
        (f"{_WARNING} level=high team=treasury", "treasury"),
        (f"{_WARNING} level=medium team=compliance", "compliance"),
        (f"{_WARNING} level=low team=market-risk", "market-risk"),
        (f"{_WARNING} level=high", "risk-duty"),
        ("alertname=RiskwatchWorkerDown severity=critical team=riskwatch-sre", "riskwatch-sre-page"),
        ("alertname=RiskwatchScoreDrift severity=warning team=riskwatch-sre", "riskwatch-sre"),
        ("alertname=SomethingElse", "default"),
    ],
    ids=[
        "critical-to-duty-desk-and-team",
        "critical-unknown-team-to-duty-desk",
        "high-to-team",
        "medium-to-team",
        "low-to-team",
        "no-team-to-duty-desk",
        "watcher-critical-pages",
        "watcher-warning",
        "anything-else-to-default",
    ],
)
def test_alertmanager_routes_by_team_and_level(labels: str, receivers: str) -> None:
    _run(
        _tool("amtool"),
        "config",
        "routes",
        "test",
        f"--config.file={ALERTMANAGER_CONFIG}",
        f"--verify.receivers={receivers}",
        *labels.split(),
    )


@pytest.fixture
def alertmanager(tmp_path: Path) -> Iterator[str]:
    """A real Alertmanager with the shipped config on a free port; yields its v2 API base URL."""
    binary = _tool("prometheus-alertmanager", "alertmanager")
    port = _free_port()
    log = (tmp_path / "alertmanager.log").open("w")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={ALERTMANAGER_CONFIG}",
            f"--storage.path={tmp_path}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 15
        while True:
            try:
                urllib.request.urlopen(f"{base}/-/ready", timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"Alertmanager did not start:\n{(tmp_path / 'alertmanager.log').read_text()}")
                time.sleep(0.05)
        yield f"{base}/api/v2"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_critical_warning_inhibits_medium_and_low_warnings_on_the_same_entity(alertmanager: str) -> None:
    def warning(level: str, entity_id: str, category: str, entity_type: str = "account") -> dict[str, Any]:
        return {
            "labels": {
                "alertname": "RiskwatchWarning",
                "level": level,
                "category": category,
                "entity_type": entity_type,
                "entity_id": entity_id,
                "plan": "freeze_account",
                "team": "fraud-ops",
            },
            "annotations": {"summary": "test", "reasons": "test", "runbook": "test"},
        }

    sent = [
        warning("critical", "acc-1", "fund_isolation"),
        warning("high", "acc-1", "structuring"),
        warning("medium", "acc-1", "velocity"),
        warning("low", "acc-1", "large_transaction"),
        warning("medium", "acc-2", "velocity"),
        warning("medium", "acc-1", "price_drop", "instrument"),
    ]
    request = urllib.request.Request(
        f"{alertmanager}/alerts",
        data=json.dumps(sent).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    urllib.request.urlopen(request, timeout=5).close()

    expected = {
        ("critical", "account", "acc-1"): "active",
        ("high", "account", "acc-1"): "active",
        ("medium", "account", "acc-1"): "suppressed",
        ("low", "account", "acc-1"): "suppressed",
        ("medium", "account", "acc-2"): "active",
        ("medium", "instrument", "acc-1"): "active",
    }
    deadline = time.monotonic() + 10
    while True:
        with urllib.request.urlopen(f"{alertmanager}/alerts", timeout=5) as response:
            states = {
                (a["labels"]["level"], a["labels"]["entity_type"], a["labels"]["entity_id"]): a["status"]["state"]
                for a in json.load(response)
            }
        if states == expected or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert states == expected


def test_a_liquidity_run_holds_back_account_pages_on_withdrawals_and_redemptions_only(alertmanager: str) -> None:
    from models.lifecycle import Lifecycle
    from models.pages import page_labels

    def page(alert_id: str, category: str, level: str, txn_type: str = "", entity_type: str = "account",
             entity_id: str = "acc-1") -> dict[str, Any]:
        # The labels the pager sends for such a warning (models.pages), not a hand-written copy.
        s = Lifecycle(alert_id=alert_id, entity_type=entity_type, entity_id=entity_id, category=category,
                      level=level, txn_type=txn_type)  # type: ignore[arg-type]
        return {"labels": page_labels(s, "plan"), "annotations": {"summary": "test"}}

    def post(alerts: list[dict[str, Any]]) -> None:
        request = urllib.request.Request(f"{alertmanager}/alerts", data=json.dumps(alerts).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=5).close()

    def states(expected: dict[str, str]) -> dict[str, str]:
        deadline = time.monotonic() + 10
        while True:
            with urllib.request.urlopen(f"{alertmanager}/alerts", timeout=5) as response:
                got = {a["labels"]["alert_id"]: a["status"]["state"] for a in json.load(response)}
            if got == expected or time.monotonic() > deadline:
                return got
            time.sleep(0.05)

    accounts = [
        page("spike-withdrawal", "amount_spike", "high", "withdrawal"),
        page("spike-redemption", "amount_spike", "high", "redemption", entity_id="acc-2"),
        page("odd-withdrawal", "anomaly", "medium", "withdrawal", entity_id="acc-3"),
        page("spike-payment", "amount_spike", "high", "payment", entity_id="acc-4"),
        page("large-withdrawal", "large_transaction", "medium", "withdrawal", entity_id="acc-5"),
        page("velocity-withdrawal", "velocity", "high", "withdrawal", entity_id="acc-6"),
        page("spike-unknown-type", "amount_spike", "high", entity_id="acc-7"),  # raised before txn_type was kept
    ]
    post(accounts)
    quiet = {a["labels"]["alert_id"]: "active" for a in accounts}
    assert states(quiet) == quiet, "without a run every account warning pages"

    post([page("run", "liquidity_run", "critical", entity_type="platform", entity_id="platform")])
    held = {**quiet, "run": "active", "spike-withdrawal": "suppressed", "spike-redemption": "suppressed",
            "odd-withdrawal": "suppressed"}
    assert states(held) == held


# --------------------------------------------------------------------------- Grafana
def test_dashboard_panels_are_well_formed() -> None:
    dashboard = _dashboard()
    assert dashboard["uid"] == "riskwatch" and dashboard["schemaVersion"] >= 36
    ids = [panel["id"] for panel in dashboard["panels"]] + [
        nested["id"] for panel in dashboard["panels"] for nested in panel.get("panels", [])
    ]
    assert len(ids) == len(set(ids)), "panel ids must be unique"

    placed: list[tuple[str, tuple[int, int, int, int]]] = []
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        box = (grid["x"], grid["y"], grid["x"] + grid["w"], grid["y"] + grid["h"])
        for title, other in placed:
            overlap = box[0] < other[2] and other[0] < box[2] and box[1] < other[3] and other[1] < box[3]
            assert not overlap, f"panels {title!r} and {panel['title']!r} overlap"
        placed.append((panel["title"], box))

    for panel in _graph_panels(dashboard):
        assert panel.get("targets"), f"panel {panel['title']!r} has no targets"
        assert panel["datasource"]["uid"] == "prometheus", panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "prometheus", panel["title"]
            assert target.get("expr", "").strip(), f"panel {panel['title']!r} has a target without expr"


def test_dashboard_metric_names_exist_in_app_metrics() -> None:
    exported, recorded = _exported_series(), _recorded()
    for where, expr in _dashboard_exprs(_dashboard()):
        names = _metric_names(expr)
        assert names, f"{where}: {expr!r} names no metric"
        unknown = {n for n in names if n.startswith("riskwatch_")} - exported
        assert not unknown, f"{where}: {sorted(unknown)} not exported by app.metrics.Metrics"
        assert {n for n in names if ":" in n} <= recorded, f"{where}: unknown recorded series"


def test_dashboard_exprs_parse_as_promql(tmp_path: Path) -> None:
    # promtool parses every rule's expression: wrap each panel query in a recording rule.
    promtool = _tool("promtool")
    exprs = _dashboard_exprs(_dashboard())
    records = []
    for i, (_, expr) in enumerate(exprs):
        for variable, value in _GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, f"unknown Grafana variable in {expr!r}"
        records.append({"record": f"dashboard:expr_{i}:check", "expr": expr})
    rules = tmp_path / "dashboard-rules.yml"
    rules.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": records}]}))
    _run(promtool, "check", "rules", str(rules))


def test_grafana_provisioning_points_at_the_dashboard() -> None:
    datasource = _load_yaml(GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml")["datasources"][0]
    assert (datasource["uid"], datasource["type"]) == ("prometheus", "prometheus")
    provider = _load_yaml(GRAFANA_DIR / "provisioning" / "dashboards" / "riskwatch.yml")["providers"][0]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"


# --------------------------------------------------------------------------- docker compose
def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """Bind mounts of a compose service as {container path: host path relative to the repo}."""
    found = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            found[target] = source
    return found


def test_docker_compose_wires_the_stack() -> None:
    compose = _load_yaml(COMPOSE)
    services = compose["services"]
    assert {"kafka", "worker", "demo-producer", "prometheus", "alertmanager", "grafana"} <= set(services)

    kafka = services["kafka"]
    assert kafka["image"] == "apache/kafka:4.1.1"
    assert "broker,controller" in kafka["environment"]["KAFKA_PROCESS_ROLES"]
    assert "PLAINTEXT://kafka:9092" in kafka["environment"]["KAFKA_ADVERTISED_LISTENERS"].split(",")

    worker = services["worker"]
    assert worker["build"] == "." and worker["command"] == ["riskwatch", "worker"]
    assert worker["environment"]["RISKWATCH_KAFKA_BOOTSTRAP"] == "kafka:9092"
    assert worker["environment"]["RISKWATCH_WEB_HOST"] == "0.0.0.0"
    assert {"9108:9108", "6066:6066"} <= set(worker["ports"])
    assert services["demo-producer"]["command"] == ["riskwatch", "demo", "--produce-only"]
    assert services["demo-producer"]["init"] is True, "without an init it ignores SIGTERM as PID 1"
    assert services["demo-producer"]["environment"]["RISKWATCH_KAFKA_BOOTSTRAP"] == "kafka:9092"

    # What Prometheus scrapes and alerts to are services of this stack.
    prometheus = _load_yaml(PROMETHEUS_CONFIG)
    scrape = {job["job_name"]: job for job in prometheus["scrape_configs"]}["riskwatch"]
    assert scrape["static_configs"][0]["targets"] == [f"worker:{worker['environment']['RISKWATCH_METRICS_PORT']}"]
    assert prometheus["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"][0].split(":")[0] in services

    datasource = _load_yaml(GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml")["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090"

    assert _mounts(services["prometheus"])["/etc/prometheus"] == "./deploy/prometheus"
    assert _mounts(services["alertmanager"])["/etc/alertmanager"] == "./deploy/alertmanager"
    grafana = _mounts(services["grafana"])
    assert grafana["/etc/grafana/provisioning"] == "./deploy/grafana/provisioning"
    assert grafana["/var/lib/grafana/dashboards"] == "./deploy/grafana/dashboards"
    assert services["grafana"]["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    for name, service in services.items():
        for source in _mounts(service).values():
            assert (ROOT / source).exists(), f"{name} mounts {source}, which is not in the repo"


def test_dockerfile_installs_the_package_and_runs_the_worker() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    # The base is an argument (a local one where python:3.11-slim cannot be pulled), the package in a venv.
    assert re.search(r"^ARG BASE=python:3\.11-slim\nFROM \$\{BASE\}$", dockerfile, re.M)
    assert "/opt/venv/bin/pip install ." in dockerfile
    assert re.search(r"^ENV PATH=/opt/venv/bin:\$PATH", dockerfile, re.M)
    assert 'CMD ["riskwatch", "worker"]' in dockerfile
    assert re.search(r"^EXPOSE 9108 6066$", dockerfile, re.M)
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".git" in ignored and ".venv" in ignored and "deploy" not in ignored
