"""API keys: every route but the open ones needs one, and a key sees only its own sessions."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.config import Settings
from tests.conftest import SEED_STEP, assert_problem, ready
from tests.e2e.server import ROOT

ALICE, BOB = "alice-key-0123456789", "bob-key-9876543210"
OPS = "operator-key-5555555555"
OPERATOR_ROUTES = ("/metrics", "/v1/workers")
MEMORY = ("--store", "memory://")
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
        admin_keys=OPS,
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
        ("POST", f"/v1/sessions/{sid}/accumulate", batch),
        ("POST", f"/v1/sessions/{sid}/apply", {}),
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


def test_operator_keys_fail_closed_too(tmp_path: Path) -> None:
    comments = tmp_path / "ops.txt"
    comments.write_text("# to be filled in\n")
    with pytest.raises(ValueError, match="ops.txt \\(--admin-keys-file\\) holds no key"):
        create_app(Settings(admin_keys_file=str(comments), store="memory://"))
    with pytest.raises(ValueError, match="both an API key and an operator key"):
        create_app(Settings(api_keys="a,b", admin_keys="b", store="memory://"))


def test_keys_file_errors_name_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "keys.txt"
    bad.write_text("not-a-digest label\n")
    with pytest.raises(ValueError, match="keys.txt:1"):
        create_app(Settings(api_keys_file=str(bad), store="memory://"))


def test_operator_routes_take_only_operator_keys(keyed: TestClient) -> None:
    """A tenant's key finds no /metrics or /v1/workers: the same 404 as a route that does not
    exist. An operator key reads them, and is no tenant key anywhere else."""
    unknown = assert_problem(keyed.get("/v1/no-such-route", headers=_as(ALICE)), 404)
    for path in OPERATOR_ROUTES:
        for tenant in (ALICE, BOB):
            for asked in (path, path + "/"):
                hidden = assert_problem(keyed.get(asked, headers=_as(tenant)), 404)
                assert {**hidden, "detail": ""} == {**unknown, "detail": ""}, asked
                assert hidden["detail"] == f"no resource at {asked}"
        assert keyed.get(path, headers=_as(OPS)).status_code == 200, path
        missing = assert_problem(keyed.get(path), 401)
        assert missing["type"] == "unauthorized"
    assert keyed.get("/metrics", headers=_as(OPS)).text.startswith("# HELP")
    for method, path in [("POST", "/v1/step"), ("GET", "/v1/sessions")]:
        r = keyed.request(method, path, headers=_as(OPS), json=SEED_STEP)
        assert assert_problem(r, 401)["type"] == "unauthorized", (method, path)
        assert 'error="invalid_token"' in r.headers["www-authenticate"]


def test_a_keyless_server_shows_operator_routes_to_loopback_only(client: TestClient) -> None:
    for path in OPERATOR_ROUTES:
        assert client.get(path).status_code == 200, path  # the fixture calls from 127.0.0.1
    # The same app, called from another machine (no lifespan: the middleware answers).
    remote = TestClient(client.app, raise_server_exceptions=False, client=("203.0.113.9", 4000))
    for path in OPERATOR_ROUTES:
        assert assert_problem(remote.get(path), 404)["type"] == "not-found", path


def test_the_document_says_operator_routes_take_operator_keys(keyed: TestClient) -> None:
    spec = keyed.get("/openapi.json").json()
    assert spec["components"]["securitySchemes"]["adminKey"]["scheme"] == "bearer"
    for path in OPERATOR_ROUTES:
        operation = spec["paths"][path]["get"]
        assert operation["security"] == [{"adminKey": []}], path
        assert {"401", "404"} <= set(operation["responses"]), path


def test_a_keys_option_that_yields_no_key_refuses_to_start(tmp_path: Path) -> None:
    """Fail closed: whatever the host, exit 2 with one line on stderr, before any worker."""
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "comments.txt").write_text("# nobody yet\n\n   # still nobody\n")
    cases = {
        "--api-keys": ["--host", "0.0.0.0", "--api-keys", ","],
        "empty.txt": ["--host", "0.0.0.0", "--api-keys-file", str(tmp_path / "empty.txt")],
        "comments.txt": ["--api-keys-file", str(tmp_path / "comments.txt")],
    }
    started = {
        said: subprocess.Popen(
            [sys.executable, "-m", "service", "serve", "--port", "0", *MEMORY, *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for said, args in cases.items()
    }
    ended: dict[str, tuple[int | None, str]] = {}
    try:
        for said, proc in started.items():
            try:
                ended[said] = (proc.wait(timeout=60), proc.communicate()[1])
            except subprocess.TimeoutExpired:
                ended[said] = (None, "")  # it started to serve
    finally:
        for proc in started.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    for said, (code, err) in ended.items():
        assert code == 2, (said, code, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("gradsvc: "), (said, err)
        assert said in lines[0] and "no key" in lines[0], (said, err)
