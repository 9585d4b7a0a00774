"""The memory and answer budgets over HTTP: the issue's findings, each refused with the
estimate and the limit, and nothing changed.

The findings run against the default budget (2 GiB, 64 MiB answers) on the shared app; the
answer-size cases against an app with small budgets, so that their sessions stay small.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.config import Settings
from tests.conftest import assert_problem, ready

ELEMENTWISE = ["relu", "tanh", "sigmoid", "gelu"] * 4
DEEP = {
    "type": "sequential",
    "layers": [{"type": "linear", "in_features": 1, "out_features": 16384}]
    + [{"type": t} for t in ELEMENTWISE],
    "dtype": "float64",
}
"""The first finding's model: 16,384 features, then 16 elementwise layers, in float64."""
ROWS = {"x": [[0.5]] * 976, "y": [1] * 976}
"""976 rows (16M numbers a layer) and their classes: 10 kB of JSON."""
EIGHT_TERMS = "sum(" + "+".join(f"sin(w*v+{i})" for i in range(8)) + ")*x"
BROADCAST = {"w": {"shape": [4000, 1], "init": "normal"}, "v": {"shape": [4000], "init": "normal"}}


def _too_large(response: Any, limit: str) -> str:
    body = assert_problem(response, 422)
    assert body["type"] == "too-large", body
    detail = str(body["detail"])
    assert "would" in detail and limit in detail, detail
    return detail


def _sessions(client: TestClient) -> int:
    return len(client.get("/v1/sessions", params={"limit": 500}).json()["items"])


def test_a_deep_float64_batch_is_refused_before_it_computes(client: TestClient) -> None:
    """A 14 kB request took a worker to 2.2 GB: 17 layers of 16M float64 numbers kept for
    backward, summed, are over the budget before any is computed."""
    body = {"model": DEEP, "loss": "cross_entropy", "optimizer": {"type": "sgd"}, "batch": ROWS}
    assert len(json.dumps(body)) < 14_000
    detail = _too_large(client.post("/v1/step", json=body), "2.0 GiB (--max-request-bytes)")
    assert "GiB of memory" in detail and "activations" in detail and "smaller batch" in detail
    spec = {k: body[k] for k in ("model", "loss", "optimizer")}
    sid = client.post("/v1/sessions", json=spec).json()["id"]
    step = client.post(f"/v1/sessions/{sid}/step", json={"batch": ROWS})
    _too_large(step, "(--max-request-bytes)")
    after = client.get(f"/v1/sessions/{sid}")
    assert (after.json()["step"], after.headers["etag"]) == (0, f'"{sid}:1"')
    assert client.get(f"/v1/sessions/{sid}/history").json()["items"] == []


def test_eight_broadcast_terms_are_summed_node_by_node(client: TestClient) -> None:
    """A 310-byte expression: eight sin(w*v) terms on init-made [4000,1] x [4000] tensors,
    16M numbers a node, each node counted (the limits bound only the largest one)."""
    model = {"type": "expression", "expression": EIGHT_TERMS, "params": BROADCAST}
    body = {"model": {**model, "dtype": "float64"}, "loss": "mse", "batch": {"x": 1, "y": 1}}
    assert len(json.dumps(body)) <= 310
    _too_large(client.post("/v1/gradients", json=body), "(--max-request-bytes)")


def test_a_create_of_ten_million_parameters_is_refused_unbuilt(client: TestClient) -> None:
    """A 187-byte create answered 196 MB of JSON: its answer is estimated from the spec and
    refused before anything is built, and no session is made."""
    params = {"w": {"shape": [10_000_000], "init": "normal"}}
    model = {"type": "expression", "expression": "sum(w)*x", "params": params}
    body = {"model": model, "loss": "mse", "optimizer": {"type": "sgd"}}
    assert len(json.dumps(body)) < 190
    before = _sessions(client)
    detail = _too_large(client.post("/v1/sessions", json=body), "64.0 MiB (--max-answer-bytes)")
    assert "MiB of JSON" in detail
    assert _sessions(client) == before


def test_a_bulk_is_budgeted_as_a_whole(client: TestClient) -> None:
    """300 items on one session of 20k parameters, answering everything: each item alone
    fits, the request as a whole does not (here its answer); it is one 422, and nothing is
    applied. (Its memory as a whole: ``tests/workers/test_budget.py``.)"""
    spec = {
        "model": {"type": "linear", "in_features": 200, "out_features": 100},
        "loss": "mse",
        "optimizer": {"type": "adam"},
    }
    sid = client.post("/v1/sessions", json=spec).json()["id"]
    item = {"session": sid, "batch": {"x": [[0.5] * 200], "y": [[1.0] * 100]}}
    r = client.post("/v1/sessions/step", json={"items": [item] * 300})
    assert '"include"' in _too_large(r, "(--max-answer-bytes)")
    assert client.get(f"/v1/sessions/{sid}").json()["step"] == 0
    fewer = client.post("/v1/sessions/step", json={"items": [item] * 3, "include": ["loss"]})
    assert [i["step"] for i in fewer.json()["items"]] == [1, 2, 3], fewer.text


# --------------------------------------------------------------------------------------------
# Answers
# --------------------------------------------------------------------------------------------

ANSWER_LIMIT = 256 * 1024
MEMORY_LIMIT = 128 * 1024**2


@pytest.fixture(scope="module")
def tight() -> Iterator[TestClient]:
    settings = Settings(
        store="memory://",
        workers_per_device=1,
        max_answer_bytes=ANSWER_LIMIT,
        max_request_bytes=MEMORY_LIMIT,
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        yield ready(c)


def _vector(n: int) -> dict[str, Any]:
    """A session of n parameters (about 20 bytes each as JSON)."""
    params = {"w": {"shape": [n], "init": "normal"}}
    model = {"type": "expression", "expression": "sum(w * x)", "params": params}
    return {"model": model, "loss": "mse", "optimizer": {"type": "sgd", "lr": 0.1}}


def test_listings_are_summaries_unless_asked_for_params(tight: TestClient) -> None:
    """GET /v1/sessions answered every session's parameters (393 MB for two): now summaries;
    ?include=params adds them, within the answer limit."""
    ids = [tight.post("/v1/sessions", json=_vector(8000)).json()["id"] for _ in range(2)]
    listed = tight.get("/v1/sessions", params={"limit": 500})
    assert listed.status_code == 200 and len(listed.content) < 4096
    mine = [s for s in listed.json()["items"] if s["id"] in ids]
    assert [sorted(s) for s in mine] == [
        ["id", "job", "model_type", "name", "step", "updated_at"]
    ] * 2
    assert mine[0]["model_type"] == "expression" and mine[0]["step"] == 0
    one = tight.get("/v1/sessions", params={"limit": 1, "include": "params"})
    assert len(one.json()["items"][0]["params"]["w"]) == 8000
    detail = _too_large(
        tight.get("/v1/sessions", params={"limit": 500, "include": "params"}),
        "256.0 KiB (--max-answer-bytes)",
    )
    assert "checkpoint" in detail and "limit" in detail
    assert_problem(tight.get("/v1/sessions", params={"include": "grads"}), 422)


def test_an_answer_over_the_limit_points_to_b64_and_changes_nothing(tight: TestClient) -> None:
    """8000 parameters fit in a view; their gradients and new values together do not."""
    created = tight.post("/v1/sessions", json=_vector(8000))
    sid, etag = created.json()["id"], created.headers["etag"]
    step = tight.post(f"/v1/sessions/{sid}/step", json={"batch": {"x": 1.0, "y": 2.0}})
    assert '"encoding": "b64"' in _too_large(step, "(--max-answer-bytes)")
    got = tight.get(f"/v1/sessions/{sid}")
    assert got.headers["etag"] == etag and tight.get(f"/v1/sessions/{sid}/history").json() == {
        "items": [],
        "next": None,
    }
    b64 = tight.post(
        f"/v1/sessions/{sid}/step", json={"batch": {"x": 1.0, "y": 2.0}, "encoding": "b64"}
    )
    assert b64.status_code == 200 and b64.json()["step"] == 1
    stateless = {**_vector(8000), "batch": {"x": 1.0, "y": 2.0}}
    assert '"encoding": "b64"' in _too_large(tight.post("/v1/step", json=stateless), "256.0 KiB")


def test_a_checkpoint_whose_view_is_over_the_limit_is_not_restored(
    tight: TestClient, client: TestClient
) -> None:
    """A checkpoint from where answers may be larger: its restore here would answer a view
    over the limit, and is refused before it is built."""
    big = client.post("/v1/sessions", json=_vector(40_000)).json()["id"]
    data = client.get(f"/v1/sessions/{big}/checkpoint").content
    before = _sessions(tight)
    restored = tight.post(
        "/v1/sessions/restore",
        content=data,
        headers={"content-type": "application/octet-stream"},
    )
    _too_large(restored, "(--max-answer-bytes)")
    assert _sessions(tight) == before


def test_a_job_whose_mini_batch_is_over_the_budget_does_not_start(tight: TestClient) -> None:
    spec = {
        "model": {
            "type": "sequential",
            "layers": [
                {"type": "linear", "in_features": 1, "out_features": 4096},
                {"type": "tanh"},
                {"type": "tanh"},
                {"type": "tanh"},
            ],
        },
        "loss": "cross_entropy",
        "optimizer": {"type": "sgd"},
    }
    sid = tight.post("/v1/sessions", json=spec).json()["id"]
    dataset = {"x": [[0.5]] * 2048, "y": [0] * 2048}
    train = {"dataset": dataset, "epochs": 1, "batch_size": 2048}
    detail = _too_large(tight.post(f"/v1/sessions/{sid}/train", json=train), "128.0 MiB")
    assert "mini-batch" in detail
    assert tight.get(f"/v1/sessions/{sid}").json()["job"] is None
