"""/metrics in Prometheus format, X-Request-ID, and one JSON log line per request."""

from __future__ import annotations

import json
import logging
import zlib
from importlib import metadata
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service import __version__
from service.api.metrics import Metrics
from service.errors import StoreUnavailable
from service.logs import JsonFormatter
from service.store import trouble
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
        "gradsvc_compute_seconds_per_item",
        "gradsvc_queue_wait_seconds",
        "gradsvc_batch_items",
    ):
        assert value(after, f"{histogram}_count") - value(before, f"{histogram}_count") >= 20
    assert value(after, "gradsvc_store_seconds_count", op="commit_many") > value(
        before, "gradsvc_store_seconds_count", op="commit_many"
    )
    assert value(after, "gradsvc_workers_up") >= 1
    assert value(after, "gradsvc_worker_restarts_total", worker="0") == 0


def test_a_bulk_step_over_one_signature_is_one_call_of_its_items(client: TestClient) -> None:
    """50 sessions of one model, stepped in one POST /v1/sessions/step on one worker: one
    vmapped call, so one observation of 50 items (not 50 batches of one), and its time
    shared out as 50 per-item observations."""
    workers = len(client.app.state.pool.workers)  # type: ignore[attr-defined]
    by_worker: dict[int, list[str]] = {}
    while not any(len(ids) >= 50 for ids in by_worker.values()):
        sid = client.post("/v1/sessions", json=SEED_SESSION).json()["id"]
        by_worker.setdefault(zlib.crc32(sid.encode()) % workers, []).append(sid)  # its worker
    (ids,) = [ids[:50] for ids in by_worker.values() if len(ids) >= 50]
    before = scrape(client)
    items = [{"session": sid, "batch": {"x": 1, "y": 3}} for sid in ids]
    stepped = client.post("/v1/sessions/step", json={"items": items, "include": ["loss"]})
    assert stepped.status_code == 200, stepped.text
    assert [item["status"] for item in stepped.json()["items"]] == [200] * 50
    after = scrape(client)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    # Any other call is of fewer items (a training job's step is one): only ours is over 32.
    assert (
        moved("gradsvc_batch_items_bucket", le="64.0")
        - moved("gradsvc_batch_items_bucket", le="32.0")
        == 1
    )
    assert moved("gradsvc_batch_items_count") - moved("gradsvc_batch_items_bucket", le="32.0") == 1
    assert moved("gradsvc_compute_seconds_per_item_count") >= 50


def test_the_registry_has_the_usual_collectors_and_no_noise(client: TestClient) -> None:
    text = client.get("/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert {"process_cpu_seconds", "process_resident_memory_bytes", "python_info"} <= set(families)
    assert "python_gc_objects_collected" in families
    assert "_created" not in text
    labels = {name for f in families.values() for s in f.samples for name in s.labels}
    assert "key" not in labels  # no series per API key
    (build,) = families["gradsvc_build_info"].samples
    assert build.value == 1 and build.labels == {
        "version": __version__,
        "torch": metadata.version("torch"),
        "devices": "cpu",
    }
    samples = scrape(client)
    assert value(samples, "gradsvc_ready") == 1
    assert value(samples, "gradsvc_jobs_running") == 0
    assert ("gradsvc_worker_recycled_total", ()) in samples
    assert value(samples, "gradsvc_store_errors_total", kind="locked") >= 0
    assert not any(name.startswith("gradsvc_cuda_") for name, _ in samples)  # on the CPU


def test_store_trouble_is_counted_once_by_kind() -> None:
    @trouble.translated(trouble.sqlite_trouble)
    class Store:
        def outer(self) -> None:
            self.inner()

        def inner(self) -> None:
            import sqlite3

            raise sqlite3.OperationalError("database is locked")

    trouble.drain_met()
    with pytest.raises(StoreUnavailable):
        Store().outer()
    metrics = Metrics()
    samples = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    assert value(samples, "gradsvc_store_errors_total", kind="locked") == 1
    assert value(samples, "gradsvc_store_errors_total", kind="full") == 0


def test_cuda_memory_is_summed_over_a_device_s_workers() -> None:
    """The collector alone, over a pool whose workers said what they hold on two devices
    (the real thing: tests/gpu/test_gpu_metrics.py)."""

    def worker(device: str, cuda: tuple[int, int] | None) -> SimpleNamespace:
        return SimpleNamespace(
            index=0, state="up", restarts=0, depth=0, held=0, running=1, cuda=cuda,
            config=SimpleNamespace(device=device),
        )  # fmt: skip

    metrics = Metrics()
    metrics.pool = SimpleNamespace(  # type: ignore[assignment]
        layout=SimpleNamespace(devices=("cuda:0", "cuda:0", "cuda:1")),
        workers=[worker("cuda:0", (10, 20)), worker("cuda:0", (1, 2)), worker("cuda:1", None)],
        recycled=0,
    )
    samples = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    assert value(samples, "gradsvc_cuda_memory_allocated_bytes", device="cuda:0") == 11
    assert value(samples, "gradsvc_cuda_memory_reserved_bytes", device="cuda:0") == 22
    assert ("gradsvc_cuda_memory_allocated_bytes", (("device", "cuda:1"),)) not in samples
    assert value(samples, "gradsvc_jobs_running") == 3


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
