"""API keys: every route but the open ones needs one, and a key sees only its own sessions."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.config import Settings
from tests.conftest import SEED_STEP, assert_problem, ready

ALICE, BOB = "alice-key-0123456789", "bob-key-9876543210"
SESSION = {k: SEED_STEP[k] for k in ("model", "loss", "optimizer")}
OPEN = {"/healthz", "/readyz", "/openapi.json", "/docs", "/redoc"}


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    folder = tmp_path_factory.mktemp("keys")
    keys_file = folder / "keys.txt"
    bob_digest = hashlib.sha256(BOB.encode()).hexdigest()
    keys_file.write_text(f"# operators' keys\n{bob_digest} bob\n\n")
    settings = Settings(
        api_keys=ALICE,
        api_keys_file=str(keys_file),
        store=f"sqlite:///{folder / 'gradsvc.db'}",
        rate_limit=0,
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        ready(client)
        yield client


TRAIN = {"dataset": {"x": [1.0, 2.0], "y": [3.0, 5.0]}, "epochs": 2, "batch_size": 1}


def _as(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _operations(client: TestClient) -> list[tuple[str, str]]:
    spec = client.get("/openapi.json").json()
    return [(m.upper(), p) for p, ops in spec["paths"].items() for m in ops]


def test_every_route_but_the_open_ones_needs_a_key(keyed: TestClient) -> None:
    operations = _operations(keyed)
    assert len(operations) >= 15
    for method, path in operations:
        url = re.sub(r"\{[^}]+\}", "s_whatever", path)
        for headers in ({}, _as("wrong-key"), {"Authorization": "Basic YWxpY2U6eA=="}):
            r = keyed.request(method, url, headers=headers, json={})
            if path in OPEN:
                assert r.status_code < 400, (method, path, r.status_code)
                continue
            body = assert_problem(r, 401)
            assert body["type"] == "unauthorized", (method, path)
            assert r.headers["www-authenticate"].startswith("Bearer"), (method, path)


def test_open_routes_stay_open(keyed: TestClient) -> None:
    for path in sorted(OPEN):
        assert keyed.get(path).status_code == 200, path
    assert keyed.get("/static/docs/swagger-ui.css").status_code == 200


def test_a_wrong_key_is_told_invalid_token(keyed: TestClient) -> None:
    r = keyed.post("/v1/step", json=SEED_STEP, headers=_as("nope"))
    assert 'error="invalid_token"' in r.headers["www-authenticate"]


def test_both_kinds_of_key_work(keyed: TestClient) -> None:
    for key in (ALICE, BOB):
        r = keyed.post("/v1/step", json=SEED_STEP, headers=_as(key))
        assert r.status_code == 200 and r.json()["params"] == {"w": [1.1]}
    assert keyed.post(
        "/v1/step", json=SEED_STEP, headers={"authorization": f"bearer {ALICE}"}
    ).is_success


def test_another_keys_session_does_not_exist(keyed: TestClient) -> None:
    """Bob gets 404 (never 403) on every route of Alice's session, and changes nothing."""
    created = keyed.post("/v1/sessions", json=SESSION, headers=_as(ALICE))
    assert created.status_code == 201
    sid = created.json()["id"]
    checkpoint = keyed.get(f"/v1/sessions/{sid}/checkpoint", headers=_as(ALICE)).content
    batch: dict[str, Any] = {"batch": {"x": 1, "y": 3}}
    calls = [
        ("GET", f"/v1/sessions/{sid}", None),
        ("PATCH", f"/v1/sessions/{sid}", {"name": "mine now"}),
        ("POST", f"/v1/sessions/{sid}/step", batch),
        ("POST", f"/v1/sessions/{sid}/gradients", batch),
        ("POST", f"/v1/sessions/{sid}/forward", {"batch": {"x": 1}}),
        ("GET", f"/v1/sessions/{sid}/history", None),
        ("GET", f"/v1/sessions/{sid}/checkpoint", None),
        ("POST", f"/v1/sessions/{sid}/train", TRAIN),
        ("DELETE", f"/v1/sessions/{sid}", None),
    ]
    session_routes = {p for _, p in _operations(keyed) if "{session_id}" in p}
    assert {re.sub(r"\{session_id\}", sid, p) for p in session_routes} <= {c[1] for c in calls}
    for method, url, body in calls:
        r = keyed.request(method, url, headers=_as(BOB), json=body)
        assert assert_problem(r, 404)["type"] == "not-found", (method, url)
    assert sid not in {s["id"] for s in keyed.get("/v1/sessions", headers=_as(BOB)).json()["items"]}
    mine = keyed.get(f"/v1/sessions/{sid}", headers=_as(ALICE)).json()
    assert mine["step"] == 0 and mine["name"] is None and mine["version"] == 1
    # Bob may restore Alice's file: it becomes Bob's own copy, not access to hers.
    copy = keyed.post("/v1/sessions/restore", content=checkpoint, headers=_as(BOB))
    assert copy.status_code == 201 and copy.json()["id"] != sid
    # Alice's training job is no more Bob's than her session.
    job = keyed.post(f"/v1/sessions/{sid}/train", json=TRAIN, headers=_as(ALICE)).json()
    for method, url in [
        ("GET", f"/v1/jobs/{job['id']}"),
        ("GET", f"/v1/jobs/{job['id']}/events"),
        ("DELETE", f"/v1/jobs/{job['id']}"),
    ]:
        r = keyed.request(method, url, headers=_as(BOB))
        assert assert_problem(r, 404)["type"] == "not-found", (method, url)


def test_idempotency_keys_are_scoped_per_api_key(keyed: TestClient) -> None:
    key = {"Idempotency-Key": "shared-name"}
    a = keyed.post("/v1/sessions", json=SESSION, headers={**_as(ALICE), **key})
    b = keyed.post("/v1/sessions", json=SESSION, headers={**_as(BOB), **key})
    assert a.status_code == b.status_code == 201
    assert a.json()["id"] != b.json()["id"] and "idempotent-replayed" not in b.headers


def test_swagger_ui_has_an_authorize_button(keyed: TestClient) -> None:
    spec = keyed.get("/openapi.json").json()
    assert spec["components"]["securitySchemes"]["apiKey"]["scheme"] == "bearer"
    assert spec["paths"]["/v1/step"]["post"]["security"][0] == {"apiKey": []}
    assert "security" not in spec["paths"]["/healthz"]["get"]


def test_keys_file_errors_name_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "keys.txt"
    bad.write_text("not-a-digest label\n")
    with pytest.raises(ValueError, match="keys.txt:1"):
        create_app(Settings(api_keys_file=str(bad), store="memory://"))
