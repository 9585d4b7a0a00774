"""SIGTERM drains: /readyz turns 503 at once, the listener stays open answering new requests
503 with Retry-After, event streams end with their final event, the running job is handed
to the other replica (which ends it exactly as an uninterrupted run), and the process exits
0 within its drain time plus a few seconds."""

from __future__ import annotations

import sqlite3
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api.test_metrics import scrape, value
from tests.conftest import assert_problem
from tests.e2e.server import Server
from tests.e2e.test_jobs_replicas import (
    LONG,
    client,
    events,
    history,
    new_session,
    params,
    wait,
)

pytestmark = pytest.mark.slow
DRAIN = 4.0
EXIT_WITHIN = DRAIN + 6.0
"""The drain, then uvicorn's last seconds, the workers' stop and the store's close."""


def _runner_pid(db: Path, jid: str) -> int:
    """The pid of the worker holding the job's lease (``host:pid:nonce``), from the store."""
    with sqlite3.connect(db) as raw:
        (holder,) = raw.execute("SELECT lease_holder FROM jobs WHERE id = ?", (jid,)).fetchone()
    assert holder
    return int(holder.split(":")[1])


def _worker_pids(server: Server) -> set[int]:
    workers = httpx.get(server.url + "/v1/workers", timeout=10).json()
    return {w["pid"] for w in workers["items"]}


def test_sigterm_drains_streams_hands_the_job_over_and_exits_0(tmp_path: Path) -> None:
    db = tmp_path / "drain.db"
    args = ("--store", f"sqlite:///{db}", "--drain-seconds", str(DRAIN))
    a, b = Server(*args), Server(*args)
    try:
        with ThreadPoolExecutor(2) as starting:
            list(starting.map(Server.start, (a, b)))
        with client(a) as http:
            resumed, twin = new_session(http), new_session(http)
            jid = http.post(f"/v1/sessions/{resumed}/train", json=LONG).json()["id"]
            wait(http, jid, lambda j: j["steps_done"] >= 20)
        pid = _runner_pid(db, jid)
        runner, survivor = (a, b) if pid in _worker_pids(a) else (b, a)
        assert pid in _worker_pids(runner)
        _drain_the_runner(runner, survivor, jid)
        with client(survivor) as http:
            done = wait(http, jid, lambda j: j["status"] == "succeeded", timeout=120)
            assert (done["attempts"], done["steps_done"], done["progress"]) == (2, 1200, 1.0)
            straight = http.post(f"/v1/sessions/{twin}/train", json=LONG).json()["id"]
            wait(http, straight, lambda j: j["status"] == "succeeded", timeout=120)
            assert params(http, resumed) == params(http, twin)
            assert history(http, resumed) == list(range(1, 1201))  # each step once
            assert value(scrape(http), "gradsvc_jobs_resumed_total") == 1
    finally:
        a.stop()
        b.stop()


def _drain_the_runner(runner: Server, survivor: Server, jid: str) -> None:
    assert runner.proc is not None
    with client(runner) as http:
        # The running job shows in the runner's metrics (its worker's heartbeat says so).
        deadline = time.monotonic() + 10
        while value(scrape(http), "gradsvc_jobs_running") != 1:
            assert time.monotonic() < deadline, "no gradsvc_jobs_running"
            time.sleep(0.1)
        followed: list[list[tuple[str, dict[str, Any]]]] = [[], []]
        started = [threading.Event(), threading.Event()]

        def follow(i: int) -> None:
            with client(runner) as own:
                for event in events(own, jid):
                    followed[i].append(event)
                    started[i].set()

        followers = [threading.Thread(target=follow, args=(i,)) for i in (0, 1)]
        for thread in followers:
            thread.start()
        for event in started:
            assert event.wait(10), "a follower saw no event"
        runner.proc.terminate()  # SIGTERM
        exit_by = time.monotonic() + EXIT_WITHIN
        ready = http.get("/readyz")
        assert_problem(ready, 503)
        # The listener is still open: a new request is answered, 503 with Retry-After.
        refused = httpx.post(runner.url + "/v1/sessions", json={}, timeout=10)
        problem = assert_problem(refused, 503)
        assert problem["type"] == "unavailable" and refused.headers["Retry-After"] == "1"
        # The job was handed over: the survivor runs it while the runner still drains.
        with client(survivor) as there:
            running = wait(there, jid, lambda j: j["attempts"] == 2, timeout=DRAIN)
        assert running["status"] in ("running", "succeeded")
        assert runner.proc.poll() is None
    for thread in followers:
        thread.join(max(0.0, exit_by - time.monotonic()))
        assert not thread.is_alive()
    for seen in followed:
        name, last = seen[-1]
        assert (name, last["status"]) == ("end", "interrupted"), seen[-3:]
    try:
        code: int | None = runner.proc.wait(max(0.1, exit_by - time.monotonic()))
    except subprocess.TimeoutExpired:
        code = None
    assert code == 0, runner.output()[-4000:]
