"""The drain is the API process's to run, whatever else gets the signal: a SIGTERM sent to the
whole process group (systemd's default, ``timeout``, ``kill -- -pgid``) leaves the workers
to finish what was admitted and hand their jobs over; and a worker that dies while its
server drains is started again without claiming jobs (they are for another replica, or
this one after its restart)."""

from __future__ import annotations

import os
import signal
import sqlite3
import time
from pathlib import Path

import httpx
import pytest

from tests.api.test_metrics import scrape, value
from tests.e2e.server import Server
from tests.e2e.test_jobs_replicas import LONG, client, new_session, wait

pytestmark = pytest.mark.slow
DRAIN = 60.0
"""Long enough for a worker to die and come back inside it; the test kills the server."""


def _lease(db: Path, jid: str) -> tuple[int, float]:
    with sqlite3.connect(db) as raw:
        attempts, expires = raw.execute(
            "SELECT attempts, lease_expires FROM jobs WHERE id = ?", (jid,)
        ).fetchone()
    return int(attempts), float(expires)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_sigterm_to_the_group_then_a_worker_restarted_during_the_drain(tmp_path: Path) -> None:
    db = tmp_path / "drain.db"
    server = Server("--store", f"sqlite:///{db}", "--drain-seconds", str(DRAIN)).start()
    try:
        with client(server) as http:
            jid = http.post(f"/v1/sessions/{new_session(http)}/train", json=LONG).json()["id"]
            wait(http, jid, lambda j: j["steps_done"] >= 5)
            pids = [w["pid"] for w in http.get("/v1/workers").json()["items"]]
            assert server.proc is not None
            server.proc.terminate()  # SIGTERM: the job is handed over (its lease let go)
            for pid in pids:  # as a signal to the process group reaches them too
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 5  # well within the lease: let go, not lapsed
            while _lease(db, jid)[1] > time.time():
                assert time.monotonic() < deadline, "the job's lease was not let go"
                time.sleep(0.05)
            assert all(_alive(pid) for pid in pids), server.output()[-3000:]
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            # /metrics is still served while draining: wait for the workers to be back up.
            deadline = time.monotonic() + 60
            while value(scrape(http), "gradsvc_workers_up") < len(pids) or (
                value(scrape(http), "gradsvc_worker_restarts_total", worker="0") == 0
            ):
                assert time.monotonic() < deadline, server.output()[-3000:]
                time.sleep(0.1)
            time.sleep(1.5)  # three of a worker's looks for a runnable job
            attempts, expires = _lease(db, jid)
            assert attempts == 1 and expires < time.time(), "a restarted worker took the job"
            assert server.proc.poll() is None  # still draining
    except httpx.TransportError:
        raise AssertionError(server.output()[-3000:]) from None
    finally:
        server.stop()
