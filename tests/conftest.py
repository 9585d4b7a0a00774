"""Shared fixtures: an in-process app (TestClient, lifespan on), and the notebook's requests."""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.config import Settings
from service.engine import seed
from tests.redis_server import redis_url  # noqa: F401 (a fixture for every test folder)

SEED_STEP: dict[str, Any] = seed.SEED_STEP


@pytest.fixture
def seed_step() -> dict[str, Any]:
    """The notebook's first step, as API.md's curl sends it (a fresh copy per test)."""
    return copy.deepcopy(SEED_STEP)


@pytest.fixture(scope="session")
def app_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """A real SQLite file, as in production, in a temporary folder."""
    db = tmp_path_factory.mktemp("store") / "gradsvc.db"
    return Settings(queue_size=16, store=f"sqlite:///{db}")


# TestClient's own client address ("testclient") is no IP: a keyless server serves its operator
# routes (/metrics, /v1/workers) to loopback callers only, so the tests call from loopback.
LOOPBACK = ("127.0.0.1", 50000)


@pytest.fixture(scope="session")
def client(app_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(app_settings), raise_server_exceptions=False, client=LOOPBACK) as c:
        ready(c)
        yield c


def ready(client: TestClient, timeout: float = 60.0) -> TestClient:
    """Wait until the app's workers are up (/readyz), as a load balancer would."""
    deadline = time.monotonic() + timeout
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, "the workers did not come up"
        time.sleep(0.05)
    return client


def assert_problem(response: Any, status: int | None = None) -> dict[str, Any]:
    """A problem+json body with the RFC 9457 members; returns it."""
    if status is not None:
        assert response.status_code == status, response.text
    assert 400 <= response.status_code < 600
    assert response.headers["content-type"].startswith("application/problem+json"), response.text
    body: dict[str, Any] = response.json()
    for key in ("type", "title", "status", "detail"):
        assert key in body, body
    assert body["status"] == response.status_code
    return body
