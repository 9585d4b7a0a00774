"""The API process's own store calls meet store trouble as problems too: the rate-limit
buckets on Redis (asked before any route runs) and /readyz's write probe."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from fastapi.testclient import TestClient

from service.app import create_app
from service.config import Settings
from tests.api.test_many_sessions import SEED_SESSION
from tests.conftest import assert_problem, ready
from tests.e2e.server import free_port


def test_an_unreachable_redis_is_503_store_unavailable_not_500() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0?socket_connect_timeout=0.5&socket_timeout=0.5"
    settings = Settings(store=url, api_keys="k1", devices="cpu", workers_per_device=1)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        response = client.get("/v1/sessions", headers={"Authorization": "Bearer k1"})
        problem = assert_problem(response, 503)
        assert problem["type"] == "store-unavailable"
        assert "Redis" in problem["detail"] and int(response.headers["Retry-After"]) >= 1
        deadline = time.monotonic() + 60
        while (ready := assert_problem(client.get("/readyz"), 503))["type"] != "store-unavailable":
            assert time.monotonic() < deadline, ready  # "unavailable": the workers start
            time.sleep(0.1)
        assert "cannot take writes" in ready["detail"]


def test_expired_idempotency_records_are_purged_in_the_background(tmp_path: Path) -> None:
    db = tmp_path / "purge.db"
    settings = Settings(
        store=f"sqlite:///{db}", idempotency_ttl=1.0, devices="cpu", workers_per_device=1
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        ready(client)
        created = client.post("/v1/sessions", json=SEED_SESSION, headers={"Idempotency-Key": "p"})
        assert created.status_code == 201

        def records() -> int:
            with sqlite3.connect(db) as raw:
                (count,) = raw.execute("SELECT count(*) FROM idempotency").fetchone()
            return int(count)

        assert records() == 1
        deadline = time.monotonic() + 30
        while records():
            assert time.monotonic() < deadline, "the expired record was never purged"
            time.sleep(0.2)
        # The session stays; only its key's record is gone, so the key is free again.
        again = client.post("/v1/sessions", json=SEED_SESSION, headers={"Idempotency-Key": "p"})
        assert again.status_code == 201 and again.json()["id"] != created.json()["id"]
