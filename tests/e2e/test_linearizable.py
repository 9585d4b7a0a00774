"""Linearizable sessions, proven by the history checker over real histories: two servers on
one Redis and two on one SQLite file, 8 clients, single and bulk steps (some items failing)
on 4 sessions; then the same with a worker, and then a whole server, SIGKILLed midway.

Each scenario's counts go to the test's output (``pytest -s``, or ``-rA``), and to the file
named by ``GRADSVC_CHECKER_LOG`` when it is set.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.checker import Report
from tests.e2e.load import Load
from tests.e2e.server import Server

pytestmark = pytest.mark.slow
SOAK = float(os.environ.get("GRADSVC_SOAK_SECONDS", "20"))
"""seconds of load without faults"""
FAULT_SOAK = float(os.environ.get("GRADSVC_FAULT_SOAK_SECONDS", "10"))
"""seconds of load around a kill (lean: each server restart imports torch again)"""
ARGS = ("--devices", "cpu", "--workers-per-device", "1", "--batch-window-ms", "5")


@pytest.fixture(scope="module", params=["redis", "sqlite"])
def pair(
    request: pytest.FixtureRequest, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[Server]]:
    """Two servers sharing one store: replicas on one Redis, or two servers on one file."""
    if request.param == "redis":
        store = f"{redis_url}?prefix=lin-{uuid.uuid4().hex[:8]}"
    else:
        store = f"sqlite:///{tmp_path_factory.mktemp('lin') / 'shared.db'}"
    servers = [Server("--store", store, *ARGS) for _ in range(2)]
    try:
        for server in servers:
            server.start()
        yield servers
    finally:
        for server in servers:
            server.stop()


def checked(load: Load, name: str) -> Report:
    with httpx.Client(base_url=load.servers[-1], timeout=30, headers=load.headers) as http:
        report = load.checker.check(http)
    line = f"{name}: {report}, {load.retries} retries"
    print(line)
    if log := os.environ.get("GRADSVC_CHECKER_LOG"):
        with Path(log).open("a") as out:
            out.write(line + "\n")
    assert report.violations == [], "\n".join(report.violations[:20])
    assert report.acknowledged > 0 and report.failed > 0  # both kinds really happened
    return report


def worker_pid(server: Server) -> int:
    workers = httpx.get(server.url + "/v1/workers", timeout=10).json()["items"]
    pid: int = workers[0]["pid"]
    return pid


def midway(seconds: float, fault: object) -> threading.Thread:
    def run() -> None:
        time.sleep(seconds / 2)
        fault()  # type: ignore[operator]

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_two_writers_keep_every_session_linearizable(pair: list[Server]) -> None:
    load = Load([s.url for s in pair], keyless=0.3)
    load.create()
    load.run(SOAK)
    checked(load, f"two writers, {SOAK:g} s")


def test_a_worker_killed_midway_loses_and_invents_nothing(pair: list[Server]) -> None:
    load = Load([s.url for s in pair])
    load.create(seed=100)
    victim = pair[0]
    fault = midway(FAULT_SOAK, lambda: os.kill(worker_pid(victim), signal.SIGKILL))
    load.run(FAULT_SOAK)
    fault.join()
    checked(load, f"two writers, a worker SIGKILLed, {FAULT_SOAK:g} s")


def test_a_server_killed_midway_loses_and_invents_nothing(pair: list[Server]) -> None:
    load = Load([s.url for s in pair])
    load.create(seed=200)
    victim = pair[0]

    def crash_and_restart() -> None:
        victim.kill()
        victim.start()

    fault = midway(FAULT_SOAK, crash_and_restart)
    load.run(FAULT_SOAK)
    fault.join()
    checked(load, f"two writers, a server SIGKILLed, {FAULT_SOAK:g} s")


def test_one_busy_worker_batching_steps_with_failures_among_them(pair: list[Server]) -> None:
    """Per-request steps only, to one server: its worker batches them (5 ms window), and
    the bad ones among them must not take a good one's place or drag a later one along."""
    load = Load([pair[1].url], bulk=0.0, bad=0.25, keyless=0.3)
    load.create(seed=300)
    load.run(FAULT_SOAK)
    checked(load, f"one server, per-request steps batched, {FAULT_SOAK:g} s")


def test_bulks_that_run_past_their_deadline_commit_a_prefix(tmp_path: Path) -> None:
    """Bulk requests of up to 200 items under a 0.5 s compute timeout: items still waiting at
    the deadline are answered 504 without running, and staged steps whose deadline passed
    before the group commit are not committed (nor anything computed on them)."""
    store = f"sqlite:///{tmp_path / 'deadlines.db'}"
    with Server("--store", store, *ARGS, "--compute-timeout", "0.5") as server:
        load = Load([server.url], clients=4, bulk=0.7, items=(20, 200), keyless=0.2)
        load.create(seed=500)
        load.run(FAULT_SOAK)
        checked(load, f"bulks past a 0.5 s deadline, {FAULT_SOAK:g} s ({dict(load.statuses)})")
    assert load.statuses[504] > 0, load.statuses  # the deadline path really ran


def test_another_keys_steps_in_the_same_batch_never_touch_a_session(tmp_path: Path) -> None:
    """Bob steps Alice's session while she does, in the same worker batches (a 20 ms window):
    every one of his is a 404, and her history is exactly her acknowledged steps."""
    alice, bob = "alice-" + uuid.uuid4().hex, "bob-" + uuid.uuid4().hex
    store = f"sqlite:///{tmp_path / 'owners.db'}"
    args = ("--api-keys", f"{alice},{bob}", "--batch-window-ms", "20", "--rate-limit", "0")
    with Server("--store", store, "--devices", "cpu", *args) as server:
        load = Load([server.url], sessions=2, clients=4, bulk=0.3, bad=0.1)
        load.headers = {"Authorization": f"Bearer {alice}"}
        load.create(seed=400)
        answers: list[int] = []

        def intruder(n: int) -> None:
            with httpx.Client(base_url=server.url, timeout=30) as http:
                auth = {"Authorization": f"Bearer {bob}"}
                for i in range(60):
                    session = load.ids[(n + i) % len(load.ids)]
                    batch = {"x": [[0.5, 0.5, 0.5]], "y": [[100.0]]}
                    if i % 3:
                        sent = http.post(
                            f"/v1/sessions/{session}/step", json={"batch": batch}, headers=auth
                        )
                        answers.append(sent.status_code)
                    else:
                        items = [{"session": session, "batch": batch}] * 2
                        sent = http.post("/v1/sessions/step", json={"items": items}, headers=auth)
                        assert sent.status_code == 200, sent.text
                        answers.extend(item["status"] for item in sent.json()["items"])

        intruders = [threading.Thread(target=intruder, args=(n,)) for n in range(4)]
        for t in intruders:
            t.start()
        load.run(FAULT_SOAK / 2)
        for t in intruders:
            t.join(60)
        assert answers and set(answers) == {404}
        checked(load, f"another key's steps in the same batches ({len(answers)} tries)")
