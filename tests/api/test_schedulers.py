"""Schedulers over HTTP: lr in every step answer, bulk item and history row; PATCH replaces
or removes a scheduler; a bad scheduler spec is a 422 that changes nothing."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.engine import state
from tests.conftest import SEED_STEP, assert_problem

SEED = {k: SEED_STEP[k] for k in ("model", "loss", "optimizer")}  # SGD, lr 0.1
HALVING = {"type": "exponential", "gamma": 0.5}
BATCH = {"batch": {"x": 1, "y": 3}}


def create(client: TestClient, **extra: Any) -> dict[str, Any]:
    r = client.post("/v1/sessions", json={**SEED, **extra})
    assert r.status_code == 201, r.text
    return dict(r.json())


def step(client: TestClient, sid: str) -> dict[str, Any]:
    r = client.post(f"/v1/sessions/{sid}/step", json=BATCH)
    assert r.status_code == 200, r.text
    return dict(r.json())


def patch(client: TestClient, sid: str, body: dict[str, Any]) -> Any:
    return client.patch(f"/v1/sessions/{sid}", json=body)


def test_step_answers_bulk_items_and_history_rows_carry_the_next_lr(client: TestClient) -> None:
    session = create(client, scheduler=HALVING)
    sid = session["id"]
    assert session["lr"] == 0.1 and session["scheduler"] == HALVING
    assert [step(client, sid)["lr"] for _ in range(2)] == [0.05, 0.025]
    other = create(client)["id"]  # no scheduler: the optimizer's own lr
    items = [{"session": sid, **BATCH}, {"session": other, **BATCH}]
    r = client.post("/v1/sessions/step", json={"items": items, "include": ["params"]})
    assert [(i["status"], i["lr"]) for i in r.json()["items"]] == [(200, 0.0125), (200, 0.1)]
    rows = client.get(f"/v1/sessions/{sid}/history").json()["items"]
    assert [row["lr"] for row in rows] == [0.05, 0.025, 0.0125]
    assert client.get(f"/v1/sessions/{sid}").json()["lr"] == 0.0125


def test_patch_replaces_and_removes_the_scheduler(client: TestClient) -> None:
    sid = create(client, scheduler=HALVING)["id"]
    step(client, sid)
    fifth = {"type": "step", "step_size": 1, "gamma": 0.2}
    r = patch(client, sid, {"scheduler": fifth})  # starts at its step 0, from the optimizer's lr
    assert r.status_code == 200, r.text
    assert (r.json()["scheduler"], r.json()["lr"], r.json()["version"]) == (fifth, 0.1, 3)
    assert step(client, sid)["lr"] == pytest.approx(0.02, rel=1e-15)
    r = patch(client, sid, {"scheduler": None})
    assert (r.json()["scheduler"], r.json()["lr"], r.json()["version"]) == (None, 0.1, 5)
    assert step(client, sid)["lr"] == 0.1
    # A new lr with a new scheduler: the schedule starts from it.
    r = patch(client, sid, {"optimizer": {"lr": 0.4}, "scheduler": HALVING})
    assert r.status_code == 200 and r.json()["lr"] == 0.4
    assert step(client, sid)["lr"] == 0.2


def test_patching_the_lr_a_scheduler_sets_is_refused(client: TestClient) -> None:
    sid = create(client, scheduler=HALVING)["id"]
    step(client, sid)
    before = client.get(f"/v1/sessions/{sid}").json()
    problem = assert_problem(patch(client, sid, {"optimizer": {"lr": 0.5}}), 422)
    assert '"scheduler"' in problem["detail"] and "null" in problem["detail"]
    assert client.get(f"/v1/sessions/{sid}").json() == before


@pytest.mark.parametrize(
    ("scheduler", "said"),
    [
        (
            {"type": "plateau"},
            "one of: step, multistep, exponential, cosine, linear, onecycle, cosine_warm_restarts",
        ),  # the allowed types are listed
        ({"type": "step"}, "step_size"),
        ({"type": "step", "step_size": 0}, "step_size"),
        ({"type": "step", "step_size": 2, "verbose": True}, "verbose"),
        ({"type": "linear", "start_factor": 0}, "start_factor"),
        ({"type": "onecycle", "max_lr": 0.1}, "total_steps"),
        ({"type": "onecycle", "max_lr": 0.1, "epochs": 2}, "steps_per_epoch"),
        (  # a length the document cannot bound (a product): refused when built
            {"type": "onecycle", "max_lr": 0.1, "epochs": 2**16, "steps_per_epoch": 2**16},
            "below 2**31",
        ),
        ({"type": "cosine", "T_max": "10"}, "T_max"),
        ({"type": "torch.optim.lr_scheduler.StepLR", "step_size": 1}, "unknown scheduler"),
    ],
)
def test_a_bad_scheduler_is_a_422_that_changes_nothing(
    client: TestClient, scheduler: dict[str, Any], said: str
) -> None:
    sid = create(client, scheduler=HALVING)["id"]
    before = client.get(f"/v1/sessions/{sid}").json()
    count = len(client.get("/v1/sessions", params={"limit": 500}).json()["items"])
    problem = assert_problem(
        client.post("/v1/sessions", json={**SEED, "scheduler": scheduler}), 422
    )
    assert said in str(problem), problem
    assert_problem(patch(client, sid, {"scheduler": scheduler}), 422)
    assert client.get(f"/v1/sessions/{sid}").json() == before
    assert len(client.get("/v1/sessions", params={"limit": 500}).json()["items"]) == count


def test_torch_refusing_a_scheduler_is_a_422(client: TestClient) -> None:
    # OneCycleLR cycles momentum by default, and Adagrad has none.
    adagrad = {"type": "adagrad", "lr": 0.1}
    r = client.post(
        "/v1/sessions",
        json={
            **SEED,
            "optimizer": adagrad,
            "scheduler": {"type": "onecycle", "max_lr": 1, "total_steps": 4},
        },
    )
    assert "momentum" in assert_problem(r, 422)["detail"]


def test_a_finished_onecycle_refuses_the_next_step(client: TestClient) -> None:
    sid = create(client, scheduler={"type": "onecycle", "max_lr": 0.2, "total_steps": 2})["id"]
    step(client, sid), step(client, sid)
    before = client.get(f"/v1/sessions/{sid}").json()
    problem = assert_problem(client.post(f"/v1/sessions/{sid}/step", json=BATCH), 422)
    assert "2 steps are done" in problem["detail"]
    assert client.get(f"/v1/sessions/{sid}").json() == before


def test_a_training_jobs_steps_step_the_scheduler(client: TestClient) -> None:
    sid = create(client, scheduler=HALVING)["id"]
    dataset = {"x": [1.0, 2.0, 3.0], "y": [3.0, 5.0, 7.0]}
    train = {"dataset": dataset, "epochs": 1, "batch_size": 1, "shuffle": False}
    job = client.post(f"/v1/sessions/{sid}/train", json=train).json()
    deadline = time.monotonic() + 60
    while client.get(f"/v1/jobs/{job['id']}").json()["status"] != "succeeded":
        assert time.monotonic() < deadline, "the job did not finish"
        time.sleep(0.05)
    rows = client.get(f"/v1/sessions/{sid}/history").json()["items"]
    assert [row["lr"] for row in rows] == [0.05, 0.025, 0.0125]
    assert client.get(f"/v1/sessions/{sid}").json()["lr"] == 0.0125


RESTARTS = {"type": "cosine_warm_restarts", "T_0": 3}
ONECYCLE = {"type": "onecycle", "max_lr": 0.2, "total_steps": 4}


@pytest.mark.parametrize(
    ("scheduler", "saved", "said"),
    [
        (HALVING, {"last_epoch": -1, "step_count": 1, "lr": 0.1}, "last_epoch"),
        (HALVING, {"last_epoch": 1, "step_count": 1, "lr": 0.1, "base_lrs": [9]}, "base_lrs"),
        (HALVING, {"last_epoch": 1, "step_count": 1, "lr": "0.1"}, "lr"),
        (HALVING, {"last_epoch": 1, "step_count": 1, "lr": 0.1, "T_i": 3, "T_cur": 0}, "T_i"),
        (RESTARTS, {"last_epoch": 1, "step_count": 1, "lr": 0.1}, "T_i"),
        (RESTARTS, {"last_epoch": 5, "step_count": 1, "lr": 0.1, "T_i": 3, "T_cur": 3}, "T_cur"),
        (ONECYCLE, {"last_epoch": 5, "step_count": 1, "lr": 0.1, "momentum": 0.9}, "past"),
        (ONECYCLE, {"last_epoch": 1, "step_count": 1, "lr": 0.1}, "momentum"),
        (HALVING, "[1, 2]", "scheduler"),
    ],
)
def test_a_checkpoint_whose_scheduler_state_lies_is_a_422(
    client: TestClient, scheduler: dict[str, Any], saved: Any, said: str
) -> None:
    sid = create(client, scheduler=scheduler)["id"]
    step(client, sid)
    data = client.get(f"/v1/sessions/{sid}/checkpoint").content
    lr = client.get(f"/v1/sessions/{sid}").json()["lr"]
    text = saved if isinstance(saved, str) else json.dumps(saved)
    forged = state.with_metadata(data, {state.SCHEDULER: text})
    r = client.post(
        "/v1/sessions/restore",
        content=forged,
        headers={"content-type": "application/octet-stream"},
    )
    assert said in assert_problem(r, 422)["detail"]
    restored = client.post(
        "/v1/sessions/restore", content=data, headers={"content-type": "application/octet-stream"}
    )
    assert restored.status_code == 201 and restored.json()["lr"] == lr  # the true one restores
