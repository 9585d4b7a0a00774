"""Every limit at its edge: just under is accepted, just over gets the documented status."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.config import Settings
from tests.conftest import SEED_STEP, assert_problem, ready
from tests.e2e.server import ROOT

KEY = {"Authorization": "Bearer edge-key"}
LIMITS = {
    "max_body_bytes": 4096,
    "max_tensor_elements": 100,
    "max_batch_elements": 150,
    "max_activation_elements": 400,
    "max_model_elements": 50,
    "max_expression_length": 40,
    "max_expression_depth": 5,
    "max_expression_nodes": 9,
    "max_layers": 3,
    "max_layer_width": 8,
    "max_sessions_per_key": 2,
}


@pytest.fixture(scope="module")
def edge() -> Iterator[TestClient]:
    settings = Settings(store="memory://", api_keys="edge-key", rate_limit=0, **LIMITS)
    with TestClient(create_app(settings), raise_server_exceptions=False, headers=KEY) as c:
        ready(c)
        yield c


def _forward(expression: str, x: Any, params: dict[str, Any] | None = None) -> dict[str, Any]:
    model = {"type": "expression", "expression": expression, "params": params or {}}
    return {"model": model, "batch": {"x": x}}


def _ok(r: Any) -> None:
    assert r.status_code == 200, r.text


def _over(r: Any, status: int = 422) -> str:
    return str(assert_problem(r, status)["detail"])


def test_body_bytes(edge: TestClient) -> None:
    text = json.dumps(SEED_STEP)
    exact = text + " " * (4096 - len(text))  # JSON allows trailing white space
    headers = {"content-type": "application/json"}
    _ok(edge.post("/v1/step", content=exact, headers=headers))
    assert "4096 bytes" in _over(edge.post("/v1/step", content=exact + " ", headers=headers), 413)

    def chunks(total: int) -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        data = exact.encode() + b" " * (total - 4096)
        for i in range(0, len(data), 1000):
            yield data[i : i + 1000]

    _ok(edge.post("/v1/step", content=chunks(4096), headers=headers))
    _over(edge.post("/v1/step", content=chunks(4097), headers=headers), 413)


def test_tensor_elements(edge: TestClient) -> None:
    _ok(edge.post("/v1/forward", json=_forward("x * 2", [1.0] * 100)))
    assert "limit is 100" in _over(edge.post("/v1/forward", json=_forward("x * 2", [1.0] * 101)))


def test_batch_elements(edge: TestClient) -> None:
    _ok(edge.post("/v1/forward", json=_forward("u + v", {"u": [1.0] * 75, "v": [1.0] * 75})))
    r = edge.post("/v1/forward", json=_forward("u + v", {"u": [1.0] * 76, "v": [1.0] * 75}))
    assert "limit is 150" in _over(r)


def test_activation_elements(edge: TestClient) -> None:
    def outer(rows: int, cols: int) -> dict[str, Any]:
        # Summed: the 400 products are computed, one number is answered.
        return _forward("sum(u * v)", {"u": [[1.0]] * rows, "v": [[1.0] * cols]})

    _ok(edge.post("/v1/forward", json=outer(20, 20)))  # 400 elements
    assert "limit is 400" in _over(edge.post("/v1/forward", json=outer(20, 21)))


def test_model_elements(edge: TestClient) -> None:
    def linear(n_in: int, n_out: int) -> dict[str, Any]:
        model = {"type": "linear", "in_features": n_in, "out_features": n_out}
        return {"model": model, "batch": {"x": [[0.0] * n_in]}}

    _ok(edge.post("/v1/forward", json=linear(5, 8)))  # 5 × 8 + 8 = 48
    assert "50 parameters" in _over(edge.post("/v1/forward", json=linear(6, 8)))  # 56


def test_model_elements_edge(edge: TestClient) -> None:
    def expression(n: int) -> dict[str, Any]:
        return _forward("sum(w) * x", 1.0, {"w": {"shape": [n], "init": "ones"}})

    _ok(edge.post("/v1/forward", json=expression(50)))
    assert "50 parameters" in _over(edge.post("/v1/forward", json=expression(51)))


@pytest.mark.parametrize(
    ("under", "over", "words"),
    [
        ("a" * 40, "a" * 41, "41 characters long; the limit is 40"),
        ("-(-(-(-x)))", "-(-(-(-(-x))))", "deeper than 5"),  # a tree 5 deep, then 6
        ("(x + x) + (x + x) + x", "-(x + x) + (x + x) + x", "more than 9 nodes"),  # 9, then 10
    ],
)
def test_expression_limits(edge: TestClient, under: str, over: str, words: str) -> None:
    _ok(edge.post("/v1/forward", json=_forward(under, 1.0)))
    assert words in _over(edge.post("/v1/forward", json=_forward(over, 1.0)))


def test_answer_and_explain_sizes(edge: TestClient) -> None:
    _ok(edge.post("/v1/forward", json=_forward("x * 2", [1.0] * 100)))
    r = edge.post("/v1/forward", json=_forward("u * v", {"u": [[1.0]] * 10, "v": [[1.0] * 11]}))
    assert "110 outputs" in _over(r)  # computed within limits, but too big an answer


def test_layers_and_width(edge: TestClient) -> None:
    def sequential(layers: list[dict[str, Any]], width: int = 2) -> dict[str, Any]:
        return {"model": {"type": "sequential", "layers": layers}, "batch": {"x": [[0.0] * width]}}

    lin = {"type": "linear", "in_features": 2, "out_features": 2}
    _ok(edge.post("/v1/forward", json=sequential([lin, {"type": "relu"}, lin])))
    r = edge.post("/v1/forward", json=sequential([lin, {"type": "relu"}, lin, {"type": "relu"}]))
    assert "limit is 3" in _over(r)
    wide = {"type": "linear", "in_features": 8, "out_features": 1}
    _ok(edge.post("/v1/forward", json=sequential([wide], 8)))
    wider = {"type": "linear", "in_features": 9, "out_features": 1}
    assert "wider than the limit 8" in _over(edge.post("/v1/forward", json=sequential([wider], 9)))


def test_sessions_per_key(edge: TestClient) -> None:
    spec = {k: SEED_STEP[k] for k in ("model", "loss", "optimizer")}
    first = edge.post("/v1/sessions", json=spec)
    assert first.status_code == 201 and edge.post("/v1/sessions", json=spec).status_code == 201
    third = edge.post("/v1/sessions", json=spec)
    assert "2 sessions" in _over(third, 429) and third.json()["type"] == "quota-exceeded"
    assert "retry-after" not in third.headers  # a quota: waiting does not lift it
    assert edge.delete(f"/v1/sessions/{first.json()['id']}").status_code == 204
    assert edge.post("/v1/sessions", json=spec).status_code == 201


def test_requests_per_second_per_key() -> None:
    # One token per 100 s: the three steps cannot earn a fourth, however slow the machine.
    settings = Settings(store="memory://", api_keys="a,b", rate_limit=0.01, rate_burst=3)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        ready(client)
        for _ in range(3):
            _ok(client.post("/v1/step", json=SEED_STEP, headers={"Authorization": "Bearer a"}))
        r = client.post("/v1/step", json=SEED_STEP, headers={"Authorization": "Bearer a"})
        assert_problem(r, 429)
        assert int(r.headers["retry-after"]) >= 1
        # Another key has its own bucket; open routes are not counted.
        _ok(client.post("/v1/step", json=SEED_STEP, headers={"Authorization": "Bearer b"}))
        assert client.get("/healthz").status_code == 200


def _serve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service", "serve", "--port", "1", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_refuses_a_public_address_without_keys() -> None:
    done = _serve("--host", "0.0.0.0")
    assert done.returncode == 2
    assert "--api-keys" in done.stderr and "--insecure" in done.stderr


@pytest.mark.slow
def test_starts_on_a_public_address_when_told_insecure_or_given_keys() -> None:
    from tests.e2e.server import Server

    for args in (("--insecure",), ("--api-keys", "k")):
        with Server("--host", "0.0.0.0", "--store", "memory://", *args) as server:
            assert server.proc is not None and server.proc.poll() is None


def test_explain_budget() -> None:
    settings = Settings(store="memory://", max_explain_elements=60)
    body = {**SEED_STEP, "explain": True}
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        ready(client)
        _ok(client.post("/v1/step", json=body))  # the seed's trace shows a few dozen numbers
        body["batch"] = {"x": [1.0] * 20, "y": [3.0] * 20}
        assert "more than 60 numbers" in _over(client.post("/v1/step", json=body))
        body.pop("explain")
        _ok(client.post("/v1/step", json=body))
