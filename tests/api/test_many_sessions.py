"""POST /v1/sessions/step: many sessions, one request, each item as its own /step would be."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

from tests.conftest import SEED_STEP, assert_problem

SEED_SESSION = {k: SEED_STEP[k] for k in ("model", "loss", "optimizer")}


def make(client: TestClient, **changes: Any) -> str:
    response = client.post("/v1/sessions", json={**SEED_SESSION, **changes})
    assert response.status_code == 201, response.text
    sid: str = response.json()["id"]
    return sid


def test_items_equal_their_own_steps_in_request_order(client: TestClient) -> None:
    batches = [{"x": 1, "y": 3}, {"x": 2, "y": 5}, {"x": -1, "y": 0.5}]
    many = [make(client) for _ in batches]
    alone = [make(client) for _ in batches]
    items = [{"session": s, "batch": b} for s, b in zip(many, batches, strict=True)]
    # The first session twice: its items apply in order, after each other.
    items.append({"session": many[0], "batch": {"x": 3, "y": 1}})
    response = client.post("/v1/sessions/step", json={"items": items})
    assert response.status_code == 200, response.text
    got = response.json()["items"]
    assert [g["session"] for g in got] == [i["session"] for i in items]
    expected = []
    for sid, batch in [*zip(alone, batches, strict=True), (alone[0], {"x": 3, "y": 1})]:
        one = client.post(f"/v1/sessions/{sid}/step", json={"batch": batch})
        expected.append({"status": 200, **one.json()})
    for g, e in zip(got, expected, strict=True):
        assert {k: v for k, v in g.items() if k != "session"} == e
    assert [g["step"] for g in got] == [1, 1, 1, 2]
    assert client.get(f"/v1/sessions/{many[0]}").json()["params"] == {
        "w": [got[3]["params"]["w"][0]]
    }


def test_include_trims_the_answers_and_problems_are_per_item(client: TestClient) -> None:
    good = make(client)
    other_dtype = make(client, model={**SEED_STEP["model"], "dtype": "float32"})
    body = {
        "items": [
            {"session": good, "batch": {"x": 1, "y": 3}},
            {"session": "s_nope", "batch": {"x": 1, "y": 3}},
            {"session": "../etc", "batch": {"x": 1, "y": 3}},
            {"session": other_dtype, "batch": {"x": [[1.0, 2.0]], "y": 3}},
            {"session": other_dtype, "batch": {"x": 1, "y": 3}},
        ],
        "include": ["loss"],
    }
    got = client.post("/v1/sessions/step", json=body).json()["items"]
    assert got[0] == {
        "session": good,
        "status": 200,
        "step": 1,
        "lr": 0.1,
        "loss": 0.5,
        "grad_norm": 1.0,
    }
    assert [g["status"] for g in got] == [200, 404, 404, 422, 200]
    assert got[1]["problem"]["type"] == "not-found"
    assert got[3]["problem"]["type"] == "shape-mismatch"
    assert got[3]["problem"]["errors"][0]["loc"][:3] == ["body", "items", 3]
    assert got[4]["step"] == 1  # the failed item changed nothing


def test_retries_apply_each_item_once(client: TestClient) -> None:
    sessions = [make(client) for _ in range(3)]
    body = {
        "items": [{"session": s, "batch": {"x": 1, "y": 3}} for s in sessions],
        "include": ["loss", "params"],
    }
    headers = {"Idempotency-Key": "many-1"}
    first = client.post("/v1/sessions/step", json=body, headers=headers)
    again = client.post("/v1/sessions/step", json=body, headers=headers)
    assert first.status_code == again.status_code == 200
    assert again.headers["Idempotent-Replayed"] == "true"
    assert [i["step"] for i in again.json()["items"]] == [1, 1, 1]
    assert all(i["replayed"] for i in again.json()["items"])
    # Per-item keys work without the header, and a key names one item's request only.
    keyed = {"items": [{**body["items"][0], "idempotency_key": "item-a"}]}
    assert client.post("/v1/sessions/step", json=keyed).json()["items"][0]["step"] == 2
    assert client.post("/v1/sessions/step", json=keyed).json()["items"][0]["step"] == 2
    reused = {"items": [{"session": sessions[1], "batch": {"x": 9}, "idempotency_key": "item-a"}]}
    item = client.post("/v1/sessions/step", json=reused).json()["items"][0]
    assert item["problem"]["type"] == "idempotency-key-reused"
    assert client.get(f"/v1/sessions/{sessions[0]}").json()["step"] == 2


def test_the_request_is_validated_as_a_whole(client: TestClient) -> None:
    assert_problem(client.post("/v1/sessions/step", json={"items": []}), 422)
    bad = {"items": [{"session": "s", "batch": {"x": 1}}], "include": ["weights"]}
    assert_problem(client.post("/v1/sessions/step", json=bad), 422)
