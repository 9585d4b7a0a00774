"""Per-key quotas through a real server: active jobs, open event streams, stored bytes.

Each refusal is a 429 ``quota-exceeded`` problem with no Retry-After that names its limit;
each test has a key of its own, so that one test's jobs and streams do not count in
another's.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack

import httpx
import pytest

from tests.conftest import SEED_STEP, assert_problem
from tests.e2e.server import Server

SEED = {**{k: SEED_STEP[k] for k in ("model", "loss")}, "optimizer": {"type": "sgd", "lr": 0.01}}
LONG = {"dataset": {"x": [0.0, 1.0], "y": [1.0, 3.0]}, "epochs": 50_000, "batch_size": 1}
"""A job that runs until it is cancelled."""
MIB = 1024 * 1024
WIDE = {
    "model": {"type": "linear", "in_features": 256, "out_features": 256},
    "loss": "mse",
    "optimizer": {"type": "sgd", "lr": 0.1},
}
"""A session of 263,368 stored bytes: three fit in a MiB, a fourth does not."""
KEYS = ("jobs", "streams", "bytes", "other")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    db = tmp_path_factory.mktemp("quotas") / "quotas.db"
    with Server(
        "--store", f"sqlite:///{db}", "--api-keys", ",".join(KEYS), "--rate-limit", "0",
        "--workers-per-device", "1", "--max-jobs-per-key", "2", "--max-streams-per-key", "2",
        "--max-stored-bytes-per-key", str(MIB),
    ) as s:  # fmt: skip
        yield s


class Tenant:
    """A key's client, and the jobs it started (cancelled at the end of the test)."""

    def __init__(self, server: Server, key: str) -> None:
        headers = {"Authorization": f"Bearer {key}"}
        self.http = httpx.Client(base_url=server.url, timeout=30, headers=headers)
        self.jobs: list[str] = []

    def start(self) -> httpx.Response:
        """A job on a new session that runs until it is cancelled."""
        sid = self.http.post("/v1/sessions", json=SEED).json()["id"]
        started = self.http.post(f"/v1/sessions/{sid}/train", json=LONG)
        if started.status_code == 202:
            self.jobs.append(started.json()["id"])
        return started

    def close(self) -> None:
        for job_id in self.jobs:
            self.http.delete(f"/v1/jobs/{job_id}")
        self.http.close()


@pytest.fixture
def tenant(server: Server) -> Iterator[Callable[[str], Tenant]]:
    made: list[Tenant] = []

    def make(key: str) -> Tenant:
        made.append(Tenant(server, key))
        return made[-1]

    yield make
    for one in made:
        one.close()


def quota(response: httpx.Response) -> str:
    problem = assert_problem(response, 429)
    assert problem["type"] == "quota-exceeded" and "retry-after" not in response.headers
    return str(problem["detail"])


def test_active_jobs_per_key(tenant: Callable[[str], Tenant]) -> None:
    mine, other = tenant("jobs"), tenant("other")
    first = mine.start()
    assert first.status_code == 202 and mine.start().status_code == 202
    detail = quota(mine.start())
    assert "2 active training jobs" in detail and "--max-jobs-per-key" in detail
    assert other.start().status_code == 202  # another key's jobs are its own
    assert mine.http.delete(f"/v1/jobs/{first.json()['id']}").json()["status"] == "cancelled"
    assert mine.start().status_code == 202


def _open(stack: ExitStack, http: httpx.Client, job_id: str) -> httpx.Response:
    """An event stream, held open until ``stack`` closes; read whole if it was refused."""
    response = stack.enter_context(http.stream("GET", f"/v1/jobs/{job_id}/events"))
    if response.status_code != 200:
        response.read()
    return response


def _admitted(stack: ExitStack, http: httpx.Client, job_id: str) -> Iterator[str]:
    """A stream, once admitted (a stream whose client has just gone is released as soon as
    the server notices), its first event read; its lines."""
    deadline = time.monotonic() + 30
    while (response := _open(stack, http, job_id)).status_code != 200:
        quota(response)
        assert time.monotonic() < deadline, "a stream that ended still counts"
        time.sleep(0.05)
    lines = response.iter_lines()
    stack.callback(lines.close)  # held till then: httpx closes a stream whose lines are dropped
    assert next(line for line in lines if line.startswith("event:"))
    return lines


def test_open_event_streams_per_key(tenant: Callable[[str], Tenant]) -> None:
    streams = tenant("streams")
    http, job = streams.http, streams.start().json()["id"]
    with ExitStack() as gone, ExitStack() as kept:
        _admitted(gone, http, job)
        lines = _admitted(kept, http, job)
        detail = quota(_open(kept, http, job))  # refused before it starts
        assert "2 event streams" in detail and "--max-streams-per-key" in detail
        gone.close()  # its client goes away: it stops counting
        _admitted(gone, http, job)
        gone.close()
        # The job ends, and so does the stream that follows it: that stops counting too.
        assert http.delete(f"/v1/jobs/{job}").json()["status"] == "cancelled"
        assert "event: end" in lines
    again = streams.start().json()["id"]
    with ExitStack() as both:
        for _ in range(2):
            _admitted(both, http, again)
        assert quota(_open(both, http, again))


def test_stored_bytes_per_key(tenant: Callable[[str], Tenant]) -> None:
    http = tenant("bytes").http
    made = []
    for _ in range(3):
        created = http.post("/v1/sessions", json=WIDE)
        assert created.status_code == 201, created.text
        made.append(created.json()["id"])
    detail = quota(http.post("/v1/sessions", json=WIDE))
    assert f"{3 * 263_368} bytes of its {MIB}" in detail
    assert "--max-stored-bytes-per-key" in detail
    assert len(http.get("/v1/sessions").json()["items"]) == 3
    # A step grows nothing: it goes through; deleting a session makes room.
    batch = {"x": [[0.0] * 256], "y": [[0.0] * 256]}
    step = http.post(f"/v1/sessions/{made[0]}/step", json={"batch": batch})
    assert step.status_code == 200, step.text
    assert http.delete(f"/v1/sessions/{made[1]}").status_code == 204
    assert http.post("/v1/sessions", json=WIDE).status_code == 201


def test_the_document_says_which_429_carries_retry_after(server: Server) -> None:
    document = httpx.get(server.url + "/openapi.json").json()
    answer = document["paths"]["/v1/sessions"]["post"]["responses"]["429"]
    assert "quota-exceeded" in answer["description"]
    assert "too-many-requests" in answer["description"]
    assert answer["headers"]["Retry-After"]["required"] is False
