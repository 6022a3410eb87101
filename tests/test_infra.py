"""infra/: the Prometheus configuration and alert rules, checked and unit-tested by
promtool (Debian's prometheus package), and the Grafana dashboard's shape."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

INFRA = Path(__file__).resolve().parent.parent / "infra"
PROMTOOL = shutil.which("promtool")
METRIC = re.compile(r"(?<![\w\"=-])((?:cellgate|haproxy)_[a-z_]+)\b")  # names, not label values


def promtool(*args: str) -> str:
    if PROMTOOL is None:
        pytest.fail("promtool is missing: install Debian's prometheus package (.ci/run does)")
    done = subprocess.run([PROMTOOL, *args], cwd=INFRA, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_prometheus_config_is_valid() -> None:
    assert "SUCCESS" in promtool("check", "config", "prometheus.yml")


def test_alert_rules_are_valid_and_pass_their_tests() -> None:
    assert "SUCCESS: 8 rules found" in promtool("check", "rules", "alerts.yml")
    assert "SUCCESS" in promtool("test", "rules", "alerts.test.yml")


def dashboard_metrics() -> set[str]:
    dashboard = json.loads((INFRA / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    return {m for e in exprs for m in METRIC.findall(e)}


def alert_metrics() -> set[str]:
    return set(METRIC.findall((INFRA / "alerts.yml").read_text()))


def test_dashboard_panels_each_have_a_query_and_a_place() -> None:
    dashboard = json.loads((INFRA / "grafana-dashboard.json").read_text())
    titles = [p["title"] for p in dashboard["panels"]]
    assert len(titles) == len(set(titles))
    for wanted in ("Sessions", "Executions", "latency", "Kernels by state", "Errors by code", "Redis"):
        assert any(wanted in t for t in titles), wanted
    assert all(p["targets"] and p["gridPos"]["w"] > 0 for p in dashboard["panels"])
