"""Review of issue 15 (batch-norm buffers, grad_outputs, nullable history losses): each test
holds a finding that was a wrong answer or lost state before its fix."""

from __future__ import annotations

import time
from typing import Any

from fastapi.testclient import TestClient

from tests.api.test_batchnorm import BATCH, SESSION, X
from tests.conftest import assert_problem


def _job(client: TestClient, location: str) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while True:
        job: dict[str, Any] = client.get(location).json()
        if job["status"] not in ("queued", "running") or time.monotonic() > deadline:
            return job
        time.sleep(0.05)


def test_a_batch_norm_job_whose_last_batch_holds_one_row_is_refused_before_it_starts(
    client: TestClient,
) -> None:
    sid = client.post("/v1/sessions", json=SESSION).json()["id"]
    x, y = [*X, [0.1, 0.2]], [*BATCH["y"], [0.5]]  # 5 rows in batches of 4: the last holds 1
    body = {"dataset": {"x": x, "y": y}, "epochs": 2, "batch_size": 4, "shuffle": False}
    problem = assert_problem(client.post(f"/v1/sessions/{sid}/train", json=body), 422)
    assert problem["errors"][0]["loc"] == ["body", "batch_size"], problem
    assert client.get(f"/v1/sessions/{sid}").json()["step"] == 0
    # Two rows at the end are fine, and the job's steps keep their running statistics.
    body["dataset"] = {"x": [*x, [0.3, -0.4]], "y": [*y, [1.5]]}
    r = client.post(f"/v1/sessions/{sid}/train", json=body)
    assert r.status_code == 202, r.text
    assert _job(client, r.headers["location"])["status"] == "succeeded"
    view = client.get(f"/v1/sessions/{sid}").json()
    assert view["step"] == view["buffers"]["1.num_batches_tracked"] == 4
