"""Faults with a real server and real worker processes: a worker killed mid-request, a full
queue, a computation over the timeout, SIGTERM under load."""

from __future__ import annotations

import base64
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.conftest import assert_problem
from tests.e2e.server import Server

# A step of this model on this batch takes seconds here (about 400 GFLOP); on two rows, ms.
ROWS, FEATURES, WIDTH = 60_000, 64, 1024
HEAVY_SESSION = {
    "model": {
        "type": "sequential",
        "layers": [
            {"type": "linear", "in_features": FEATURES, "out_features": WIDTH},
            {"type": "relu"},
            {"type": "linear", "in_features": WIDTH, "out_features": WIDTH},
            {"type": "relu"},
            {"type": "linear", "in_features": WIDTH, "out_features": 1},
        ],
        "seed": 7,
    },
    "loss": "mse",
    "optimizer": {"type": "sgd", "lr": 0.001},
}
_x = np.random.default_rng(0).standard_normal((ROWS, FEATURES), dtype=np.float32)
HEAVY_BATCH = {
    "batch": {
        "x": {"dtype": "float32", "shape": [ROWS, FEATURES], "b64": base64.b64encode(_x).decode()},
        "y": {
            "dtype": "float32",
            "shape": [ROWS, 1],
            "b64": base64.b64encode(np.ones((ROWS, 1), np.float32)).decode(),
        },
    },
    "encoding": "b64",
}
LIGHT_BATCH = {"batch": {"x": _x[:2].tolist(), "y": [[1.0], [1.0]]}, "encoding": "b64"}


def workers(server: Server) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = httpx.get(server.url + "/v1/workers").json()["items"]
    return items


def wait_until(predicate: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def ready(server: Server) -> bool:
    try:
        return httpx.get(server.url + "/readyz").status_code == 200
    except httpx.TransportError:
        return False


@pytest.fixture
def server(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Server]:
    args = getattr(request, "param", ())
    store = f"sqlite:///{tmp_path / 'faults.db'}"
    limits = ("--max-activation-elements", "100000000")
    cpu = ("--devices", "cpu", "--workers-per-device", "1")
    with Server("--store", store, *cpu, *limits, *args) as s:
        yield s


def heavy_session(server: Server, http: httpx.Client) -> tuple[str, dict[str, Any]]:
    created = http.post(server.url + "/v1/sessions", json=HEAVY_SESSION)
    assert created.status_code == 201, created.text
    sid = created.json()["id"]
    step = http.post(f"{server.url}/v1/sessions/{sid}/step", json=LIGHT_BATCH)
    assert step.status_code == 200, step.text
    return sid, http.get(f"{server.url}/v1/sessions/{sid}").json()


def in_background(fn: Any) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    thread.start()
    return thread, out


def test_a_killed_worker_fails_its_request_with_503_and_comes_back(server: Server) -> None:
    with httpx.Client(timeout=120) as http:
        sid, before = heavy_session(server, http)
        (pid,) = [w["pid"] for w in workers(server)]
        assert pid != server.proc.pid if server.proc else True
        thread, out = in_background(
            lambda: http.post(f"{server.url}/v1/sessions/{sid}/step", json=HEAVY_BATCH)
        )
        wait_until(lambda: workers(server)[0]["queue_depth"] >= 1)
        time.sleep(0.3)  # well inside the step, which takes seconds
        os.kill(pid, signal.SIGKILL)
        thread.join(60)
        problem = assert_problem(out[0], 503)
        assert "Retry-After" in out[0].headers
        assert "worker" in problem["detail"]

        wait_until(lambda: ready(server))
        (info,) = workers(server)
        assert info["pid"] != pid and info["restarts"] == 1 and info["state"] == "up"
        after = http.get(f"{server.url}/v1/sessions/{sid}").json()
        assert after["step"] == before["step"] == 1
        assert after["params"] == before["params"]
        step = http.post(f"{server.url}/v1/sessions/{sid}/step", json=LIGHT_BATCH)
        assert step.status_code == 200 and step.json()["step"] == 2


@pytest.mark.parametrize("server", [("--queue-size", "1")], indirect=True)
def test_a_full_queue_is_503_with_retry_after(server: Server) -> None:
    with httpx.Client(timeout=120) as http:
        sid, _ = heavy_session(server, http)
        thread, out = in_background(
            lambda: http.post(f"{server.url}/v1/sessions/{sid}/step", json=HEAVY_BATCH)
        )
        wait_until(lambda: workers(server)[0]["queue_depth"] >= 1)
        full = http.post(f"{server.url}/v1/step", json={**LIGHT_BATCH, **HEAVY_SESSION})
        problem = assert_problem(full, 503)
        assert int(full.headers["Retry-After"]) >= 1
        assert "queue" in problem["detail"]
        thread.join(60)
        assert out[0].status_code == 200, out[0].text


@pytest.mark.parametrize("server", [("--compute-timeout", "2")], indirect=True)
def test_over_the_compute_timeout_is_504_and_changes_nothing(server: Server) -> None:
    with httpx.Client(timeout=120) as http:
        sid, before = heavy_session(server, http)
        slow = http.post(f"{server.url}/v1/sessions/{sid}/step", json=HEAVY_BATCH)
        problem = assert_problem(slow, 504)
        assert problem["type"] == "compute-timeout"
        wait_until(lambda: ready(server))
        after = http.get(f"{server.url}/v1/sessions/{sid}").json()
        assert (after["step"], after["version"]) == (before["step"], before["version"])
        assert after["params"] == before["params"]
        history = http.get(f"{server.url}/v1/sessions/{sid}/history").json()["items"]
        assert [row["step"] for row in history] == [1]


def test_sigterm_under_load_finishes_in_flight_work_and_exits_0(server: Server) -> None:
    with httpx.Client(timeout=120) as http:
        sid, _ = heavy_session(server, http)
        light = http.post(server.url + "/v1/sessions", json=HEAVY_SESSION).json()["id"]
    statuses: list[int] = []
    stop = threading.Event()

    def hammer() -> None:
        with httpx.Client(timeout=120) as client:
            while not stop.is_set():
                try:
                    r = client.post(f"{server.url}/v1/sessions/{light}/step", json=LIGHT_BATCH)
                except httpx.TransportError:
                    return  # the server stopped listening: that is how it ends
                statuses.append(r.status_code)

    hammers = [threading.Thread(target=hammer, daemon=True) for _ in range(4)]
    for t in hammers:
        t.start()
    with httpx.Client(timeout=120) as http:
        thread, out = in_background(
            lambda: http.post(f"{server.url}/v1/sessions/{sid}/step", json=HEAVY_BATCH)
        )
        wait_until(lambda: len(statuses) > 20 and workers(server)[0]["queue_depth"] >= 1)
        assert server.terminate(timeout=60) == 0
        thread.join(60)
    stop.set()
    for t in hammers:
        t.join(10)
    assert out and out[0].status_code == 200, out
    assert out[0].json()["step"] == 2
    assert set(statuses) <= {200, 503}, sorted(set(statuses))
    assert statuses.count(200) > 20
