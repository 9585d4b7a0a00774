"""Idempotency-Key: what names a request (include and encoding too), the whole-request key of
POST /v1/sessions/step, and item keys kept apart from request keys."""

from __future__ import annotations

import uuid

from fastapi.testclient import TestClient

from tests.api.test_many_sessions import make
from tests.conftest import assert_problem

BATCH = {"x": 1, "y": 3}


def key() -> dict[str, str]:
    return {"Idempotency-Key": f"k-{uuid.uuid4().hex}"}


def test_include_and_encoding_are_part_of_the_request(client: TestClient) -> None:
    sid = make(client)
    headers = key()
    first = client.post(f"/v1/sessions/{sid}/step", json={"batch": BATCH}, headers=headers)
    assert first.status_code == 200, first.text
    b64 = {"batch": BATCH, "encoding": "b64"}
    other = client.post(f"/v1/sessions/{sid}/step", json=b64, headers=headers)
    assert assert_problem(other, 422)["type"] == "idempotency-key-reused"
    # The same body with a query that shapes the answer is another request, too.
    shaped = client.post(
        f"/v1/sessions/{sid}/step?encoding=b64", json={"batch": BATCH}, headers=headers
    )
    assert assert_problem(shaped, 422)["type"] == "idempotency-key-reused"
    assert client.get(f"/v1/sessions/{sid}").json()["step"] == 1

    # An item key names the request's include and encoding, which shape its answer.
    item = {"session": sid, "batch": BATCH, "idempotency_key": f"item-{uuid.uuid4().hex}"}
    assert client.post("/v1/sessions/step", json={"items": [item]}).json()["items"][0]["step"] == 2
    narrowed = client.post("/v1/sessions/step", json={"items": [item], "include": ["loss"]})
    problem = narrowed.json()["items"][0]["problem"]
    assert problem["type"] == "idempotency-key-reused"
    assert client.get(f"/v1/sessions/{sid}").json()["step"] == 2


def test_the_header_key_covers_the_whole_bulk_request(client: TestClient) -> None:
    a, b = make(client), make(client)
    headers = key()
    body = {"items": [{"session": a, "batch": BATCH}, {"session": "s_missing", "batch": BATCH}]}
    first = client.post("/v1/sessions/step", json=body, headers=headers)
    assert first.status_code == 200, first.text
    assert [i["status"] for i in first.json()["items"]] == [200, 404]

    # Another body under the same key: refused as a whole, nothing applied.
    other = {"items": [{"session": b, "batch": BATCH}, *body["items"]]}
    reused = client.post("/v1/sessions/step", json=other, headers=headers)
    assert assert_problem(reused, 422)["type"] == "idempotency-key-reused"
    assert client.get(f"/v1/sessions/{b}").json()["step"] == 0
    narrowed = client.post("/v1/sessions/step", json={**body, "include": ["loss"]}, headers=headers)
    assert assert_problem(narrowed, 422)["type"] == "idempotency-key-reused"

    # The same request: every item as first answered, the failed one too.
    again = client.post("/v1/sessions/step", json=body, headers=headers)
    assert again.status_code == 200
    assert again.headers["Idempotent-Replayed"] == "true"
    strip = [{k: v for k, v in i.items() if k != "replayed"} for i in again.json()["items"]]
    assert strip == first.json()["items"]
    assert client.get(f"/v1/sessions/{a}").json()["step"] == 1


def test_item_keys_and_request_keys_do_not_collide(client: TestClient) -> None:
    a, b = make(client), make(client)
    shared = f"same-{uuid.uuid4().hex}"
    single = client.post(
        f"/v1/sessions/{a}/step", json={"batch": BATCH}, headers={"Idempotency-Key": shared}
    )
    assert single.status_code == 200
    # An item key equal to that request key is its own key: applied, not refused or replayed.
    item = {"session": b, "batch": {"x": 2, "y": 5}, "idempotency_key": shared}
    got = client.post("/v1/sessions/step", json={"items": [item]}).json()["items"][0]
    assert got["status"] == 200 and got["step"] == 1 and "replayed" not in got
    # An item key equal to what a header key's item would be ("<key>#0") is no collision.
    header = f"h-{uuid.uuid4().hex}"
    bulk = {"items": [{"session": a, "batch": BATCH}]}
    assert client.post("/v1/sessions/step", json=bulk, headers={"Idempotency-Key": header})
    forged = {"session": b, "batch": BATCH, "idempotency_key": f"{header}#0"}
    got = client.post("/v1/sessions/step", json={"items": [forged]}).json()["items"][0]
    assert got["status"] == 200 and got["step"] == 2 and "replayed" not in got
    # And the single step's key still replays the single step.
    again = client.post(
        f"/v1/sessions/{a}/step", json={"batch": BATCH}, headers={"Idempotency-Key": shared}
    )
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json() == single.json()
