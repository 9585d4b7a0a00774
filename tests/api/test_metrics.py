"""/metrics in Prometheus format, X-Request-ID, and one JSON log line per request."""

from __future__ import annotations

import json
import logging
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.logs import JsonFormatter
from tests.conftest import SEED_STEP
from tests.e2e.server import Server

SEED_SESSION = {k: SEED_STEP[k] for k in ("model", "loss", "optimizer")}


def scrape(
    client: TestClient | httpx.Client,
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_the_counters_move_under_load(client: TestClient) -> None:
    before = scrape(client)
    sid = client.post("/v1/sessions", json=SEED_SESSION).json()["id"]
    for _ in range(20):
        assert client.post(f"/v1/sessions/{sid}/step", json={"batch": {"x": 1, "y": 3}}).is_success
    client.post(f"/v1/sessions/{sid}/step", json={"batch": {"x": "no"}})
    after = scrape(client)
    route = {"route": "/v1/sessions/{session_id}/step", "method": "POST"}
    counted = "gradsvc_http_requests_total"
    assert (
        value(after, counted, **route, status="200") - value(before, counted, **route, status="200")
        == 20
    )
    assert (
        value(after, counted, **route, status="422") - value(before, counted, **route, status="422")
        == 1
    )
    latency = "gradsvc_http_request_duration_seconds_count"
    assert value(after, latency, **route) - value(before, latency, **route) == 21
    assert value(after, "gradsvc_steps_total") - value(before, "gradsvc_steps_total") >= 20
    for histogram in (
        "gradsvc_compute_seconds",
        "gradsvc_queue_wait_seconds",
        "gradsvc_batch_size",
    ):
        assert value(after, f"{histogram}_count") - value(before, f"{histogram}_count") >= 21
    assert value(after, "gradsvc_store_seconds_count", op="commit_many") > value(
        before, "gradsvc_store_seconds_count", op="commit_many"
    )
    assert value(after, "gradsvc_workers_up") >= 1
    assert value(after, "gradsvc_worker_restarts_total", worker="0") == 0


def test_request_ids_are_honoured_or_made(client: TestClient) -> None:
    given = client.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert given.headers["X-Request-ID"] == "abc-123"
    made = client.get("/healthz")
    assert len(made.headers["X-Request-ID"]) == 32
    odd = client.get("/healthz", headers={"X-Request-ID": "no spaces\tor tabs"})
    assert odd.headers["X-Request-ID"] != "no spaces\tor tabs"
    problem = client.get("/v1/sessions/s_none", headers={"X-Request-ID": "req-404"})
    assert problem.status_code == 404 and problem.headers["X-Request-ID"] == "req-404"


def test_each_request_is_one_json_log_line(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="gradsvc.access"):
        client.post("/v1/step", json=SEED_STEP, headers={"X-Request-ID": "log-me"})
    (record,) = [r for r in caplog.records if r.name == "gradsvc.access"]
    line = json.loads(JsonFormatter().format(record))
    assert line["request_id"] == "log-me"
    assert (line["method"], line["route"], line["status"]) == ("POST", "/v1/step", 200)
    assert line["level"] == "info" and line["duration_ms"] > 0 and line["ts"].endswith("Z")


def test_a_served_process_logs_json_and_keys_guard_metrics(tmp_path: Any) -> None:
    with Server("--store", "memory://", "--api-keys", "k1", "--admin-keys", "ops") as server:
        assert httpx.get(server.url + "/metrics").status_code == 401
        with httpx.Client(base_url=server.url, headers={"Authorization": "Bearer k1"}) as http:
            http.post("/v1/step", json=SEED_STEP, headers={"X-Request-ID": "served-1"})
            assert http.get("/metrics").status_code == 404  # a tenant's key: not for tenants
        with httpx.Client(base_url=server.url, headers={"Authorization": "Bearer ops"}) as http:
            assert value(scrape(http), "gradsvc_workers_up") == 1
        lines = [json.loads(line) for line in server.output().splitlines() if line.startswith("{")]
    assert any(entry.get("request_id") == "served-1" and entry["status"] == 200 for entry in lines)
    assert any(entry["logger"] == "gradsvc.pool" and "up on cpu" in entry["msg"] for entry in lines)
