"""Jobs live in the store: two replicas on one Redis (and on one SQLite file) see the same
jobs and holds; a job whose server was SIGKILLed or restarted is resumed by a live worker
and ends exactly as an uninterrupted run; one Idempotency-Key makes one job."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from gradsvc_client import Client

from tests.conftest import assert_problem
from tests.e2e.server import Server

SESSION: dict[str, Any] = {
    "model": {
        "type": "sequential",
        "layers": [
            {"type": "linear", "in_features": 2, "out_features": 4},
            {"type": "tanh"},
            {"type": "linear", "in_features": 4, "out_features": 1},
        ],
        "dtype": "float64",
        "seed": 5,
    },
    "loss": "mse",
    "optimizer": {"type": "adam", "lr": 0.01},
}
DATA = {
    "x": [[i / 7, (i * i % 5) / 5] for i in range(7)],
    "y": [[(i % 3) - 1.0] for i in range(7)],
}
# 7 rows in batches of 3 (the last one short), shuffled: 1200 committed steps.
LONG = {"dataset": DATA, "epochs": 400, "batch_size": 3, "shuffle": True, "seed": 11}
SHORT = {"dataset": DATA, "epochs": 1, "batch_size": 7}
Pair = tuple[Server, Server]


def _pair(store: str) -> Iterator[Pair]:
    a, b = Server("--store", store), Server("--store", store)
    try:
        yield a.start(), b.start()
    finally:
        a.stop()
        b.stop()


@pytest.fixture(scope="module")
def redis_store(redis_url: str) -> str:
    return f"{redis_url}?prefix=jobs-{uuid.uuid4().hex}"


@pytest.fixture(scope="module")
def on_redis(redis_store: str) -> Iterator[Pair]:
    yield from _pair(redis_store)


@pytest.fixture(scope="module")
def on_sqlite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    db = tmp_path_factory.mktemp("replicas") / "jobs.db"
    yield from _pair(f"sqlite:///{db}")


@pytest.fixture(params=["redis", "sqlite"])
def pair(request: pytest.FixtureRequest) -> Pair:
    servers: Pair = request.getfixturevalue(f"on_{request.param}")
    return servers


def client(server: Server) -> httpx.Client:
    return httpx.Client(base_url=server.url, timeout=60)


def new_session(http: httpx.Client) -> str:
    created = http.post("/v1/sessions", json=SESSION)
    assert created.status_code == 201, created.text
    sid: str = created.json()["id"]
    return sid


def wait(http: httpx.Client, job_id: str, until: Any, timeout: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job: dict[str, Any] = http.get(f"/v1/jobs/{job_id}").json()
        if until(job):
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.05)


def events(http: httpx.Client, job_id: str) -> Iterator[tuple[str, dict[str, Any]]]:
    name = ""
    with http.stream("GET", f"/v1/jobs/{job_id}/events") as stream:
        assert stream.status_code == 200
        for line in stream.iter_lines():
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                yield name, json.loads(line[5:])


def history(http: httpx.Client, sid: str) -> list[int]:
    steps: list[int] = []
    page: dict[str, Any] = {"limit": 500}
    while True:
        rows = http.get(f"/v1/sessions/{sid}/history", params=page).json()
        steps += [r["step"] for r in rows["items"]]
        if rows["next"] is None:
            return steps
        page["cursor"] = rows["next"]


def params(http: httpx.Client, sid: str) -> Any:
    return http.get(f"/v1/sessions/{sid}").json()["params"]


def test_the_other_replica_sees_the_job_and_its_hold(pair: Pair) -> None:
    a, b = pair
    with client(a) as here, client(b) as there:
        sid = new_session(here)
        started = here.post(f"/v1/sessions/{sid}/train", json=LONG)
        assert started.status_code == 202, started.text
        jid = started.json()["id"]
        assert there.get(f"/v1/jobs/{jid}").json()["session"] == sid
        assert there.get(f"/v1/sessions/{sid}").json()["job"] == jid
        refused = [
            there.post(f"/v1/sessions/{sid}/step", json={"batch": {"x": [[0, 0]], "y": [[0]]}}),
            there.patch(f"/v1/sessions/{sid}", json={"name": "mine"}),
            there.delete(f"/v1/sessions/{sid}"),
        ]
        for response in refused:
            problem = assert_problem(response, 409)
            assert problem["type"] == "session-busy" and jid in problem["detail"]
            assert f"DELETE /v1/jobs/{jid}" in problem["detail"]
        seen: list[tuple[str, dict[str, Any]]] = []
        cancelled: dict[str, Any] | None = None
        for name, view in events(there, jid):
            seen.append((name, view))
            if name == "progress" and view["steps_done"] > 0 and cancelled is None:
                answer = there.delete(f"/v1/jobs/{jid}")
                assert answer.status_code == 200
                cancelled = answer.json()
                assert cancelled["status"] == "cancelled"
        name, final = seen[-1]
        assert (name, final["status"]) == ("end", "cancelled")
        progress = [v["steps_done"] for n, v in seen if n == "progress"]
        assert progress == sorted(progress) and 0 < final["steps_done"] < 1200
        session = here.get(f"/v1/sessions/{sid}").json()
        assert session["job"] is None and session["step"] == final["steps_done"] == final["step"]
        assert here.get(f"/v1/jobs/{jid}").json()["status"] == "cancelled"
        # Free again, on either replica.
        assert there.patch(f"/v1/sessions/{sid}", json={"name": "mine"}).status_code == 200


def test_one_idempotency_key_sent_to_two_replicas_makes_one_job(pair: Pair) -> None:
    a, b = pair
    with client(a) as here, client(b) as there:
        for _ in range(20):
            sid = new_session(here)
            key = {"Idempotency-Key": uuid.uuid4().hex}
            answers: list[httpx.Response] = []

            def send(http: httpx.Client, sid: str, key: dict[str, str], out: list[Any]) -> None:
                out.append(http.post(f"/v1/sessions/{sid}/train", json=SHORT, headers=key))

            threads = [
                threading.Thread(target=send, args=(h, sid, key, answers)) for h in (here, there)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert [r.status_code for r in answers] == [202, 202], [r.text for r in answers]
            (jid,) = {r.json()["id"] for r in answers}
            wait(here, jid, lambda j: j["status"] == "succeeded")
            assert here.get(f"/v1/sessions/{sid}").json()["step"] == 1  # one job's one step


def _runner_pid(store: str, jid: str) -> int:
    """The pid of the worker holding the job's lease (``host:pid:nonce``), from the store."""
    url, _, prefix = store.partition("?prefix=")
    client = redis.Redis.from_url(url)
    try:
        holder = client.hget(f"{prefix}:j:{jid}", "lease_holder")
    finally:
        client.close()
    assert holder
    return int(holder.decode().split(":")[1])


def _worker_pids(server: Server) -> set[int]:
    workers = httpx.get(server.url + "/v1/workers", timeout=10).json()
    return {w["pid"] for w in workers["items"]}


def test_a_job_whose_server_is_killed_goes_on_elsewhere_exactly(
    on_redis: Pair, redis_store: str
) -> None:
    a, b = on_redis
    with client(a) as http:
        resumed, twin = new_session(http), new_session(http)
        jid = http.post(f"/v1/sessions/{resumed}/train", json=LONG).json()["id"]
        wait(http, jid, lambda j: j["steps_done"] >= 20)
    pid = _runner_pid(redis_store, jid)
    runner, survivor = (a, b) if pid in _worker_pids(a) else (b, a)
    assert pid in _worker_pids(runner)
    runner.kill()
    killed_at = time.monotonic()
    try:
        with client(survivor) as http:
            running = wait(http, jid, lambda j: j["attempts"] == 2, timeout=30)
            assert time.monotonic() - killed_at < 30 and running["status"] in (
                "running",
                "succeeded",
            )
            done = wait(http, jid, lambda j: j["status"] == "succeeded", timeout=120)
            assert (done["attempts"], done["steps_done"], done["progress"]) == (2, 1200, 1.0)
            other = http.post(f"/v1/sessions/{twin}/train", json=LONG).json()["id"]
            wait(http, other, lambda j: j["status"] == "succeeded", timeout=120)
            assert http.get(f"/v1/jobs/{other}").json()["attempts"] == 1
            a_state = http.get(f"/v1/sessions/{resumed}").json()
            b_state = http.get(f"/v1/sessions/{twin}").json()
            assert a_state["step"] == b_state["step"] == 1200
            assert a_state["params"] == b_state["params"]
            assert history(http, resumed) == list(range(1, 1201))  # each step once
    finally:
        runner.start()  # the module's pair stays whole


def test_a_restarted_server_resumes_its_job(tmp_path: Path) -> None:
    db = tmp_path / "restart.db"
    server = Server("--store", f"sqlite:///{db}")
    with server:
        with client(server) as http:
            resumed, twin = new_session(http), new_session(http)
            jid = http.post(f"/v1/sessions/{resumed}/train", json=LONG).json()["id"]
            wait(http, jid, lambda j: j["steps_done"] >= 20)
            last: list[tuple[str, dict[str, Any]]] = []
            follower = threading.Thread(target=lambda: last.extend(events(http, jid)))
            follower.start()
            # The client follows the job through the restart: 'interrupted' is not its end.
            followed: list[Any] = []
            gs = Client(server.url, tensors="numpy", retries=30, backoff=0.2, max_wait=1.0)
            through = threading.Thread(target=lambda: followed.extend(gs.events(jid)))
            through.start()
            time.sleep(0.3)
            assert server.terminate() == 0
            follower.join(10)
            assert last and last[-1][0] == "end" and last[-1][1]["status"] == "interrupted"
        with sqlite3.connect(db) as raw:
            (status, attempts) = raw.execute(
                "SELECT status, attempts FROM jobs WHERE id = ?", (jid,)
            ).fetchone()
        assert (status, attempts) == ("running", 1)
        server.start()
        with client(server) as http:
            done = wait(http, jid, lambda j: j["status"] == "succeeded", timeout=120)
            assert (done["attempts"], done["steps_done"]) == (2, 1200)
            other = http.post(f"/v1/sessions/{twin}/train", json=LONG).json()["id"]
            wait(http, other, lambda j: j["status"] == "succeeded", timeout=120)
            assert params(http, resumed) == params(http, twin)
        through.join(30)
        gs.close()
        final = followed[-1]
        assert final.event == "end" and final.job is not None and final.job.status == "succeeded"
        assert all(e.job.status != "interrupted" for e in followed if e.job is not None)
