"""The service as a user runs it: a real process, the README's curl, SIGTERM."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from typing import Any

import httpx
import pytest

from tests.e2e.server import ROOT, Server

pytestmark = pytest.mark.slow


def test_the_seed_curl_against_a_real_process(seed_step: dict[str, Any]) -> None:
    with Server() as server:
        r = httpx.post(server.url + "/v1/step", json=seed_step, timeout=30)
        assert r.status_code == 200
        body = r.json()
        assert (body["loss"], body["grads"], body["params"], body["outputs"]) == (
            0.5,
            {"w": [-1.0]},
            {"w": [1.1]},
            2.0,
        )
        assert httpx.get(server.url + "/healthz").json() == {"status": "ok"}
        assert server.terminate() == 0


def test_environment_variables_configure_it() -> None:
    server = Server(env={"GRADSVC_MAX_EXPRESSION_LENGTH": "5"})
    with server:
        body = {"model": {"type": "expression", "expression": "w * x + 1"}, "batch": {"x": 1}}
        r = httpx.post(server.url + "/v1/forward", json=body, timeout=30)
        assert r.status_code == 422
        assert "limit is 5" in r.json()["detail"]


def test_sigterm_finishes_requests_in_flight() -> None:
    """A step in flight when SIGTERM arrives still gets its answer, then the process exits 0."""
    big = {
        "model": {
            "type": "sequential",
            "layers": [
                {"type": "linear", "in_features": 256, "out_features": 1024},
                {"type": "relu"},
                {"type": "linear", "in_features": 1024, "out_features": 1},
            ],
        },
        "loss": "mse",
        "optimizer": {"type": "adam"},
        "batch": {
            "x": {"shape": [4096, 256], "data": [0.5] * (4096 * 256)},
            "y": {"shape": [4096, 1], "data": [1.0] * 4096},
        },
    }
    server = Server().start()
    try:
        results: list[int] = []
        payload = json.dumps(big)

        def send() -> None:
            r = httpx.post(
                server.url + "/v1/step",
                content=payload,
                headers={"content-type": "application/json"},
                timeout=60,
            )
            results.append(r.status_code)

        threads = [threading.Thread(target=send) for _ in range(3)]
        for t in threads:
            t.start()
        # Let the requests reach the server (headers read, bodies uploading or computing)
        # before the signal; a connection with a request under way is drained, not dropped.
        time.sleep(0.5)
        assert server.terminate(timeout=60) == 0
        for t in threads:
            t.join(60)
        assert results == [200, 200, 200]
    finally:
        server.stop()


def test_openapi_command_prints_the_document() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "service", "openapi"],
        cwd=ROOT,
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout
    committed = json.loads((ROOT / "openapi" / "openapi.json").read_text())
    assert json.loads(out) == committed
