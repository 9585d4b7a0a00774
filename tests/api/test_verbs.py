"""The training verbs over HTTP (the shared in-process app on SQLite): the documented
answers, nothing-accumulated, Idempotency-Key replays without adding twice, If-Match, and
bad bodies refused with nothing changed."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.api import examples
from tests.conftest import SEED_STEP, assert_problem

SEED = {k: SEED_STEP[k] for k in ("model", "loss", "optimizer")}  # w = 1, SGD, lr 0.1
FIRST = {"batch": {"x": 1, "y": 3}}


def create(client: TestClient) -> str:
    r = client.post("/v1/sessions", json=SEED)
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def verb(client: TestClient, sid: str, name: str, body: Any, **headers: str) -> Any:
    return client.post(f"/v1/sessions/{sid}/{name}", json=body, headers=headers)


def test_the_documented_answers_and_nothing_accumulated(client: TestClient) -> None:
    sid = create(client)
    assert_problem(verb(client, sid, "apply", {}), 409)["type"].endswith("nothing-accumulated")
    r = verb(client, sid, "accumulate", FIRST)
    assert r.status_code == 200, r.text
    assert r.json() == examples.SESSION_ACCUMULATE["first"]
    session = client.get(f"/v1/sessions/{sid}").json()
    assert (session["step"], session["version"], session["params"]) == (0, 2, {"w": [1.0]})
    r = verb(client, sid, "apply", {})
    assert r.json() == examples.SESSION_APPLY["sum"]
    rows = client.get(f"/v1/sessions/{sid}/history").json()["items"]
    assert [(row["step"], row["loss"]) for row in rows] == [(1, 0.5)]
    problem = assert_problem(verb(client, sid, "apply", {}), 409)  # the accumulator is empty
    assert problem["type"].endswith("nothing-accumulated") and "accumulate" in problem["detail"]


def test_an_idempotency_key_replays_an_accumulate_without_adding_twice(
    client: TestClient,
) -> None:
    sid = create(client)
    first = verb(client, sid, "accumulate", FIRST, **{"Idempotency-Key": "acc-1"})
    again = verb(client, sid, "accumulate", FIRST, **{"Idempotency-Key": "acc-1"})
    assert again.headers.get("Idempotent-Replayed") == "true"
    assert again.json() == first.json() and first.json()["accumulated"] == 1
    assert verb(client, sid, "accumulate", FIRST).json()["accumulated"] == 2
    applied = verb(client, sid, "apply", {"scale": 0.5}, **{"Idempotency-Key": "apply-1"})
    replayed = verb(client, sid, "apply", {"scale": 0.5}, **{"Idempotency-Key": "apply-1"})
    assert replayed.json() == applied.json() and applied.json()["step"] == 1
    assert applied.json()["params"] == {"w": [1.1]}  # the mean of two equal gradients: -1
    assert client.get(f"/v1/sessions/{sid}").json()["step"] == 1


def test_if_match_stale_is_412_and_changes_nothing(client: TestClient) -> None:
    sid = create(client)
    ok = verb(client, sid, "accumulate", FIRST, **{"If-Match": f'"{sid}:1"'})
    assert ok.status_code == 200, ok.text
    stale = verb(client, sid, "accumulate", FIRST, **{"If-Match": f'"{sid}:1"'})
    assert_problem(stale, 412)
    assert_problem(verb(client, sid, "apply", {}, **{"If-Match": f'"{sid}:1"'}), 412)
    assert verb(client, sid, "apply", {}, **{"If-Match": ok.headers["ETag"]}).json()["applied"] == 1


@pytest.mark.parametrize(
    ("name", "body"),
    [
        ("accumulate", {"batch": {"x": 1, "y": 3}, "grad_outputs": 1.0}),
        ("accumulate", {"batch": {"x": 1}, "grad_outputs": 1.0}),
        ("accumulate", {"batch": {"x": 1, "y": [3, 4]}}),
        ("apply", {"scale": "half"}),
        ("apply", {"scale": 1, "extra": True}),
    ],
    ids=["both", "grad-outputs-later", "shape", "scale", "extra"],
)
def test_a_bad_body_is_422_and_changes_nothing(client: TestClient, name: str, body: Any) -> None:
    sid = create(client)
    if name == "apply":
        verb(client, sid, "accumulate", FIRST)
    before = client.get(f"/v1/sessions/{sid}").json()
    problem = assert_problem(verb(client, sid, name, body), 422)
    assert problem["detail"]
    assert client.get(f"/v1/sessions/{sid}").json()["version"] == before["version"]
