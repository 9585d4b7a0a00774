"""deploy/prometheus and deploy/grafana: the alert rules pass promtool's check and their own
unit tests, and every metric the rules and the dashboard name is exported by a real server."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import SEED_STEP
from tests.deploy.tools import ROOT, tool
from tests.e2e.server import Server

PROMETHEUS = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "gradsvc.json"
# A name in PromQL that is ours (or the default process/python collectors'); label values are
# in quotes and dropped before matching.
_METRIC = re.compile(r"\b((?:gradsvc|process|python)_[a-zA-Z0-9_]+)")
_SUFFIXES = ("_bucket", "_count", "_sum", "_total", "_created")


def _promtool() -> str:
    return tool("promtool", install="apt-get install prometheus (.ci/run does)")


@pytest.mark.parametrize(
    "args",
    [["check", "rules", "alerts.yml"], ["test", "rules", "alerts.test.yml"]],
    ids=["check", "test"],
)
def test_promtool(args: list[str]) -> None:
    result = subprocess.run(
        [_promtool(), *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_every_alert_has_a_unit_test() -> None:
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text(encoding="utf-8"))
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    tests = yaml.safe_load((PROMETHEUS / "alerts.test.yml").read_text(encoding="utf-8"))
    tested = {
        case["alertname"]
        for test in tests["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert alerts == tested, alerts ^ tested


def _dashboard_exprs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "definition") and isinstance(value, str):
                yield value
            else:
                yield from _dashboard_exprs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _dashboard_exprs(item)


def _referenced() -> dict[str, set[str]]:
    """Every metric name the rules and the dashboard use, with where."""
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text(encoding="utf-8"))
    exprs = {"alerts.yml": [r["expr"] for g in rules["groups"] for r in g["rules"]]}
    exprs["gradsvc.json"] = list(_dashboard_exprs(json.loads(DASHBOARD.read_text("utf-8"))))
    found: dict[str, set[str]] = {}
    for where, texts in exprs.items():
        assert texts, where
        for text in texts:
            for name in _METRIC.findall(re.sub(r'"[^"]*"', '""', text)):
                found.setdefault(name, set()).add(where)
    return found


def test_the_dashboard_is_grafana_json() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert dashboard["uid"] == "gradsvc" and dashboard["panels"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["targets"] and panel["datasource"]["uid"] == "${datasource}", panel


@pytest.fixture(scope="module")
def exported() -> tuple[set[str], set[str]]:
    """(sample names, declared family names) of a keyless loopback server's /metrics after
    one computation, so the histograms have series."""
    with Server("--store", "memory://", "--devices", "cpu", "--workers-per-device", "1") as s:
        with httpx.Client(base_url=s.url, timeout=60) as http:
            assert http.post("/v1/step", json=SEED_STEP).status_code == 200
            response = http.get("/metrics")
    assert response.status_code == 200, response.text
    samples: set[str] = set()
    families: set[str] = set()
    for family in text_string_to_metric_families(response.text):
        families.add(family.name)
        samples.update(sample.name for sample in family.samples)
    return samples, families


def test_every_metric_named_is_exported(exported: tuple[set[str], set[str]]) -> None:
    import torch

    samples, families = exported
    missing = {}
    for name, where in sorted(_referenced().items()):
        # CUDA memory is exported per CUDA device: a CPU-only server has none to report.
        if "cuda" in name and not torch.cuda.is_available():
            continue
        family = name
        for suffix in _SUFFIXES:
            family = family.removesuffix(suffix)
        if name not in samples and family not in families:
            missing[family] = sorted(where)
    assert not missing, f"named but not exported: {missing}"
