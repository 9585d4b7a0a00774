"""Training jobs with a real server: progress over SSE, cancel, holds, and ``gradsvc train``."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import SEED_STEP, assert_problem
from tests.e2e.server import ROOT, Server

SEED_SESSION = {
    **{k: SEED_STEP[k] for k in ("model", "loss")},
    "optimizer": {"type": "sgd", "lr": 0.01},
}
LINE = {"x": [0.0, 1.0, 2.0, 3.0], "y": [1.0, 3.0, 5.0, 7.0]}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    db = tmp_path_factory.mktemp("jobs") / "jobs.db"
    with Server("--store", f"sqlite:///{db}") as s:
        yield s


@pytest.fixture
def http(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


def session(http: httpx.Client) -> str:
    sid: str = http.post("/v1/sessions", json=SEED_SESSION).json()["id"]
    return sid


def events(http: httpx.Client, job_id: str) -> Iterator[tuple[str, dict[str, Any]]]:
    name = ""
    with http.stream("GET", f"/v1/jobs/{job_id}/events") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        for line in stream.iter_lines():
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                yield name, json.loads(line[5:])


def test_a_10000_step_job_streams_progress_and_cancels_at_a_step(http: httpx.Client) -> None:
    sid = session(http)
    started = http.post(
        f"/v1/sessions/{sid}/train", json={"dataset": LINE, "epochs": 2500, "batch_size": 1}
    )
    assert started.status_code == 202, started.text
    job = started.json()
    assert started.headers["Location"] == f"/v1/jobs/{job['id']}"
    assert (job["total_steps"], job["status"]) == (10_000, "queued")

    # The session is the job's while it runs.
    held = http.post(f"/v1/sessions/{sid}/step", json={"batch": {"x": 1, "y": 3}})
    problem = assert_problem(held, 409)
    assert (problem["type"], job["id"] in problem["detail"]) == ("session-busy", True)
    assert_problem(http.patch(f"/v1/sessions/{sid}", json={"name": "x"}), 409)
    assert_problem(http.delete(f"/v1/sessions/{sid}"), 409)
    assert http.get(f"/v1/sessions/{sid}").json()["job"] == job["id"]

    seen: list[dict[str, Any]] = []
    for name, data in events(http, job["id"]):
        seen.append(data)
        if name == "progress" and len(seen) == 5:
            cancelled = http.delete(f"/v1/jobs/{job['id']}")
            assert cancelled.status_code == 200
        if name == "end":
            break
    progress = [d["steps_done"] for d in seen[:-1]]
    assert progress == sorted(progress) and len(set(progress)) == len(progress)
    final = seen[-1]
    assert final["status"] == "cancelled"
    assert 0 < final["steps_done"] < 10_000
    assert 0 < final["progress"] < 1

    after = http.get(f"/v1/sessions/{sid}").json()
    assert after["job"] is None
    assert after["step"] == final["steps_done"] == final["step"]
    assert http.get(f"/v1/jobs/{job['id']}").json()["status"] == "cancelled"
    rows = http.get(f"/v1/sessions/{sid}/history", params={"limit": 500}).json()
    assert rows["items"][0]["step"] == 1
    # Free again: the next step is the one after the job's last.
    step = http.post(f"/v1/sessions/{sid}/step", json={"batch": {"x": 1, "y": 3}})
    assert step.json()["step"] == final["steps_done"] + 1


def test_a_job_equals_the_same_steps_taken_one_by_one(http: httpx.Client) -> None:
    by_job, by_hand = session(http), session(http)
    body = {"dataset": LINE, "epochs": 3, "batch_size": 2, "shuffle": False}
    job = http.post(f"/v1/sessions/{by_job}/train", json=body).json()
    for _ in range(3):
        for i in (0, 2):
            batch = {"x": LINE["x"][i : i + 2], "y": LINE["y"][i : i + 2]}
            assert http.post(f"/v1/sessions/{by_hand}/step", json={"batch": batch}).is_success
    deadline = time.monotonic() + 30
    while (done := http.get(f"/v1/jobs/{job['id']}").json())["status"] != "succeeded":
        assert time.monotonic() < deadline, done
        time.sleep(0.05)
    assert (done["steps_done"], done["progress"], done["epoch"], done["attempts"]) == (6, 1.0, 3, 1)
    a, b = (http.get(f"/v1/sessions/{s}").json() for s in (by_job, by_hand))
    assert a["params"] == b["params"] and a["step"] == b["step"] == 6
    # A finished job's stream is its end, at once.
    assert [name for name, _ in events(http, job["id"])] == ["end"]


def test_a_job_goes_on_when_its_client_goes_away(http: httpx.Client) -> None:
    sid = session(http)
    job = http.post(
        f"/v1/sessions/{sid}/train", json={"dataset": LINE, "epochs": 50, "batch_size": 1}
    ).json()
    for _ in events(http, job["id"]):
        break  # hang up after the first event
    deadline = time.monotonic() + 30
    while http.get(f"/v1/jobs/{job['id']}").json()["status"] != "succeeded":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert http.get(f"/v1/sessions/{sid}").json()["step"] == 200


def test_bad_jobs_are_refused_before_they_start(http: httpx.Client) -> None:
    sid = session(http)
    train = f"/v1/sessions/{sid}/train"
    ragged = {"dataset": {"x": [1.0, 2.0], "y": [1.0]}, "epochs": 1, "batch_size": 1}
    assert "rows" in assert_problem(http.post(train, json=ragged), 422)["detail"]
    huge = {"dataset": LINE, "epochs": 10**6, "batch_size": 1}
    assert_problem(http.post(train, json=huge), 422)
    assert_problem(http.post(train, json={"dataset": LINE, "epochs": 0, "batch_size": 1}), 422)
    bad_y = {"dataset": {"x": [1.0], "y": "no"}, "epochs": 1, "batch_size": 1}
    assert assert_problem(http.post(train, json=bad_y), 422)["errors"][0]["loc"][:3] == [
        "body",
        "dataset",
        "y",
    ]
    assert_problem(http.post("/v1/sessions/s_nope/train", json=ragged), 404)
    assert_problem(http.get("/v1/jobs/j_nope"), 404)
    assert http.get(f"/v1/sessions/{sid}").json()["step"] == 0


def test_a_failing_job_reports_its_problem(http: httpx.Client) -> None:
    sid = http.post(
        "/v1/sessions", json={**SEED_SESSION, "optimizer": {"type": "sgd", "lr": 1e300}}
    ).json()["id"]
    job = http.post(
        f"/v1/sessions/{sid}/train", json={"dataset": LINE, "epochs": 5, "batch_size": 1}
    ).json()
    *_, (name, final) = events(http, job["id"])
    assert (name, final["status"], final["error"]["type"]) == ("end", "failed", "non-finite")
    assert http.get(f"/v1/sessions/{sid}").json()["step"] == final["steps_done"]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service", "train", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_gradsvc_train_shows_progress_and_exits_0(
    server: Server, http: httpx.Client, tmp_path: Path
) -> None:
    sid = session(http)
    data = tmp_path / "line.csv"
    data.write_text("x,noise,y\n" + "".join(f"{x},9,{2 * x + 1}\n" for x in range(8)))
    done = cli(
        "--server", server.url, "--session", sid, str(data), "--epochs", "25",
        "--batch-size", "4", "--x-columns", "x", "--y-columns", "y",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "epoch 25/25" in done.stdout and "50/50" in done.stdout and "loss" in done.stdout
    assert "50 steps, session at step 50" in done.stdout
    assert http.get(f"/v1/sessions/{sid}").json()["step"] == 50


def test_gradsvc_train_exits_non_zero_when_the_job_fails(
    server: Server, http: httpx.Client, tmp_path: Path
) -> None:
    sid = http.post(
        "/v1/sessions", json={**SEED_SESSION, "optimizer": {"type": "sgd", "lr": 1e300}}
    ).json()["id"]
    data = tmp_path / "line.npy"
    import numpy as np

    np.save(data, np.array([[x, 2 * x + 1] for x in range(4)], dtype=np.float64))
    failed = cli("--server", server.url, "--session", sid, str(data), "--epochs", "3",
                 "--batch-size", "1")  # fmt: skip
    assert failed.returncode == 1
    assert "failed" in failed.stderr and "not finite" in failed.stderr
    missing = cli("--server", server.url, "--session", sid, str(tmp_path / "none.csv"),
                  "--epochs", "1", "--batch-size", "1")  # fmt: skip
    assert missing.returncode == 2
