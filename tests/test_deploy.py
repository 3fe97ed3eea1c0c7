"""deploy/: the alert rules and the dashboard parse, carry what operators need, and only use metrics the
daemon really exposes; promtool validates the rules when it is installed; systemd/compose are coherent."""

from __future__ import annotations

import configparser
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from scanner.daemon.metrics import DaemonMetrics

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
RULES = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "scanner.json"
_METRIC = re.compile(r"\b(scanner_[a-z_]+)\b")


@pytest.fixture(scope="module")
def exposed() -> set[str]:
    """Sample names of a fresh daemon's exposition, parsed back with prometheus-client's parser."""
    registry = CollectorRegistry()
    DaemonMetrics(registry)
    text = generate_latest(registry).decode()
    return {s.name for fam in text_string_to_metric_families(text) for s in fam.samples}


def _rules() -> list[dict]:
    doc = yaml.safe_load(RULES.read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def test_alert_rules_cover_the_required_alerts_with_annotations() -> None:
    rules = _rules()
    exprs = {r["alert"]: r["expr"] for r in rules}
    assert 'verdict="backdoored"' in exprs["ScannerBackdooredModelFound"]
    assert 'verdict="unsafe"' in exprs["ScannerUnsafeFileFound"]
    assert 'verdict="error"' in exprs["ScannerHighErrorRate"]
    assert "scanner_queue_depth" in exprs["ScannerQueueNotDraining"]
    assert "scanner_last_success_timestamp_seconds" in exprs["ScannerNoSuccessfulScan"]
    assert 'up{job="scanner"}' in exprs["ScannerDaemonDown"]
    for rule in rules:
        ann = rule["annotations"]
        assert ann["summary"] and ann["description"], rule["alert"]
        anchor = ann["runbook_url"].rpartition("#")[2]
        assert anchor and f"## {anchor}" in (DEPLOY / "RUNBOOK.md").read_text(), rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}


def test_every_metric_in_rules_and_dashboard_is_exposed(exposed: set[str]) -> None:
    used: set[str] = set()
    for rule in _rules():
        used |= set(_METRIC.findall(rule["expr"]))
    dash = json.loads(DASHBOARD.read_text())
    for panel in dash["panels"]:
        for target in panel["targets"]:
            used |= set(_METRIC.findall(target["expr"]))
    assert used, "no scanner metric found in deploy/"
    missing = sorted(m for m in used if m not in exposed)
    assert not missing, f"used in deploy/ but not exposed by the daemon: {missing}"
    # the metric names the issue asks for
    for name in (
        "scanner_scans_total",
        "scanner_scan_duration_seconds_bucket",
        "scanner_quarantined_total",
        "scanner_queue_depth",
        "scanner_last_success_timestamp_seconds",
        "scanner_errors_total",
        "scanner_build_info",
        "scanner_reconcile_runs_total",
        "scanner_overflows_total",
    ):
        assert name in exposed, name


def test_dashboard_has_the_required_panels() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"]
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p["targets"])
    for needle in ("scanner_scans_total", "scanner_scan_duration_seconds_bucket", "scanner_queue_depth",
                   "scanner_quarantined_total", "scanner_errors_total"):  # fmt: skip
        assert needle in exprs, needle
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        assert p["datasource"]["uid"] == "prometheus"  # the provisioned datasource's uid
        assert {"x", "y", "w", "h"} <= set(p["gridPos"])


def test_compose_provisions_prometheus_and_grafana_from_files_that_exist() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"scanner", "prometheus", "grafana"} <= set(services)
    for svc in ("prometheus", "grafana"):
        for volume in services[svc]["volumes"]:
            host = volume.split(":")[0]
            assert (DEPLOY / host).exists(), volume
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert prom["rule_files"] == ["/etc/prometheus/alerts.yml"]
    assert prom["scrape_configs"][0]["job_name"] == "scanner"  # the job the DaemonDown alert watches
    ds = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert ds["datasources"][0]["uid"] == "prometheus"
    prov = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "provider.yml").read_text())
    assert prov["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    assert "--webhook-secret-file=/run/secrets/webhook_secret" in services["scanner"]["command"]


def test_systemd_unit_is_sandboxed() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string((DEPLOY / "scanner-daemon.service").read_text())
    service = unit["Service"]
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "PrivateTmp": "yes",
        "ProtectHome": "yes",
        "KillSignal": "SIGTERM",
    }.items():
        assert service[key] == value, key
    assert "/srv/registry/quarantine" in service["ReadWritePaths"]
    assert "scanner daemon" in service["ExecStart"] and "--webhook-secret-file" in service["ExecStart"]
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_dockerfile_runs_the_daemon_unprivileged() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^USER scanner$", text, re.M)
    assert 'ENTRYPOINT ["scanner", "daemon"]' in text
    assert "gpu" in text.lower()  # notes for the GPU extra


@pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool not installed (apt-get install prometheus)"
)
def test_promtool_accepts_the_rules() -> None:
    result = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in result.stdout
