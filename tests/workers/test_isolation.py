"""Every computation runs in a worker process: the API process does not even load torch."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.config import Settings
from service.engine import models, step
from tests.conftest import LOOPBACK, SEED_STEP, ready
from tests.e2e.server import Server

SEED_SESSION = {k: SEED_STEP[k] for k in ("model", "loss", "optimizer")}


def _refuse(*args: object, **kwargs: object) -> None:
    raise AssertionError("the API process computed")


def test_no_route_computes_in_the_api_process(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Workers are spawned fresh interpreters: the patches below reach only this process.
    for module, name in [(step, "compute"), (step, "run"), (models, "build")]:
        monkeypatch.setattr(module, name, _refuse)
    settings = Settings(store=f"sqlite:///{tmp_path / 'iso.db'}", devices="cpu")
    with TestClient(create_app(settings), raise_server_exceptions=True, client=LOOPBACK) as client:
        ready(client)
        assert client.post("/v1/step", json=SEED_STEP).json()["params"] == {"w": [1.1]}
        forward = {k: SEED_STEP[k] for k in ("model", "batch")}
        assert client.post("/v1/forward", json=forward).status_code == 200
        gradients = {k: v for k, v in SEED_STEP.items() if k != "optimizer"}
        assert client.post("/v1/gradients", json=gradients).status_code == 200
        sid = client.post("/v1/sessions", json=SEED_SESSION).json()["id"]
        batch = {"batch": {"x": 1, "y": 3}}
        for path in ("step", "gradients", "forward"):
            assert client.post(f"/v1/sessions/{sid}/{path}", json=batch).status_code == 200
        many = {"items": [{"session": sid, "batch": {"x": 1, "y": 3}}]}
        assert client.post("/v1/sessions/step", json=many).json()["items"][0]["step"] == 2
        patched = client.patch(f"/v1/sessions/{sid}", json={"params": {"w": [5.0]}})
        assert patched.json()["params"] == {"w": [5.0]}
        checkpoint = client.get(f"/v1/sessions/{sid}/checkpoint").content
        restored = client.post(
            "/v1/sessions/restore",
            content=checkpoint,
            headers={"Content-Type": "application/octet-stream"},
        )
        assert restored.status_code == 201
        assert client.get(f"/v1/sessions/{sid}/history").json()["items"][-1]["step"] == 2
        assert len(client.get("/v1/sessions").json()["items"]) == 2
        workers = client.get("/v1/workers").json()["items"]
        assert workers and all(w["pid"] not in (None, os.getpid()) for w in workers)
        assert all(w["state"] == "up" and w["device"] == "cpu" for w in workers)
        assert sum(w["requests_done"] for w in workers) == 13  # every call above, in a worker


def test_a_served_api_process_never_loads_torch(tmp_path: Path) -> None:
    with Server("--store", f"sqlite:///{tmp_path / 'iso.db'}") as server:
        assert server.proc is not None
        assert httpx.post(server.url + "/v1/step", json=SEED_STEP).status_code == 200
        workers = httpx.get(server.url + "/v1/workers").json()["items"]
        api_maps = Path(f"/proc/{server.proc.pid}/maps").read_text()
        assert "libtorch" not in api_maps
        for worker in workers:
            assert "libtorch" in Path(f"/proc/{worker['pid']}/maps").read_text()
