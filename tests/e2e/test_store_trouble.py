"""Store trouble with real servers: a SQLite file locked by another process, a full disk, a
Redis paused (SIGSTOP), one stopped and one at its maxmemory, and a memory:// server whose
worker is SIGKILLed.

Each time: a step answers the right problem (503 ``store-unavailable`` with Retry-After, or
507 ``insufficient-storage``), /readyz answers 503 while it lasts, and afterwards the server
recovers by itself: the step, retried with its Idempotency-Key, is applied exactly once, and
the session's step, version and history agree (nothing half-written).

The full disk is real where it can be: a 2 MiB tmpfs mounted for the test (we run as root in
the sandbox), filled to the last byte by a file, then freed. Where ``mount`` is not
permitted (a container without CAP_SYS_ADMIN; a loop device would need mount too), the test
falls back to SQLite's own cap, ``PRAGMA max_page_count`` through the test-only store option
``?max_pages=N``: the same SQLITE_FULL, from a file that may not grow. Set
GRADSVC_TEST_NO_MOUNT=1 to run the fallback where mount works.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import SEED_STEP, assert_problem
from tests.e2e.server import Server, free_port
from tests.redis_server import answers

pytestmark = pytest.mark.slow
SESSION = {k: SEED_STEP[k] for k in ("model", "loss", "optimizer")}
CPU = ("--devices", "cpu", "--workers-per-device", "1")


def wait_for(predicate: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.1)


def readyz(server: Server) -> int:
    try:
        return httpx.get(server.url + "/readyz", timeout=10).status_code
    except httpx.TransportError:
        return 0


def create(server: Server) -> str:
    response = httpx.post(server.url + "/v1/sessions", json=SESSION, timeout=30)
    assert response.status_code == 201, response.text
    sid: str = response.json()["id"]
    return sid


def step(server: Server, sid: str, key: str) -> httpx.Response:
    return httpx.post(
        f"{server.url}/v1/sessions/{sid}/step",
        json={"batch": SEED_STEP["batch"]},
        headers={"Idempotency-Key": key},
        timeout=30,
    )


def consistent(server: Server, sid: str, steps: int) -> None:
    """The session is at ``steps``, its version one more, its history exactly 1..steps."""
    session = httpx.get(f"{server.url}/v1/sessions/{sid}", timeout=10).json()
    assert (session["step"], session["version"]) == (steps, steps + 1), session
    history = httpx.get(f"{server.url}/v1/sessions/{sid}/history", timeout=10).json()
    assert [row["step"] for row in history["items"]] == list(range(1, steps + 1))


def trouble(server: Server, sid: str, key: str, status: int, kind: str) -> None:
    """A step answers ``status``/``kind`` (503 with Retry-After), and /readyz says 503."""
    problem = assert_problem(step(server, sid, key), status)
    assert problem["type"] == kind, problem
    assert "retry" in problem["detail"].lower() or "space" in problem["detail"], problem
    if status == 503:
        assert int(step(server, sid, key).headers["Retry-After"]) >= 1
    wait_for(lambda: readyz(server) == 503)
    ready = httpx.get(server.url + "/readyz", timeout=10)
    assert assert_problem(ready, 503)["type"] == "store-unavailable"


def recovered(server: Server, sid: str, key: str, steps: int) -> None:
    """/readyz is 200 again by itself; the step, retried, applies once."""
    wait_for(lambda: readyz(server) == 200)
    response = step(server, sid, key)
    assert response.status_code == 200, response.text
    assert response.json()["step"] == steps
    again = step(server, sid, key)
    assert again.headers.get("Idempotent-Replayed") == "true"
    consistent(server, sid, steps)


@pytest.fixture(scope="module")
def sqlite_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    """One server for the lock test: a short busy wait, so that the test is short too."""
    db = tmp_path_factory.mktemp("locked") / "gradsvc.db"
    with Server("--store", f"sqlite:///{db}?busy_timeout=300", *CPU) as server:
        yield server, db


def test_a_sqlite_file_locked_by_another_process(sqlite_server: tuple[Server, Path]) -> None:
    server, db = sqlite_server
    sid = create(server)
    assert step(server, sid, "lock-1").status_code == 200
    hold = (
        "import sqlite3, sys\n"
        "db = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
        "db.execute('BEGIN EXCLUSIVE')\n"
        "print('locked', flush=True)\n"
        "sys.stdin.read()\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", hold, str(db)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"locked\n"
        trouble(server, sid, "lock-2", 503, "store-unavailable")
        consistent(server, sid, 1)
    finally:
        assert holder.stdin is not None and holder.stdout is not None
        holder.stdin.close()
        holder.wait(10)
        holder.stdout.close()
    recovered(server, sid, "lock-2", 2)


@pytest.fixture(scope="module")
def small_disk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path | None]:
    """A 2 MiB tmpfs of our own, to fill: a real full disk, without filling the machine's;
    None where it cannot be mounted."""
    where = tmp_path_factory.mktemp("disk")
    if os.environ.get("GRADSVC_TEST_NO_MOUNT") == "1":
        yield None
        return
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(where)], capture_output=True
    )
    if mounted.returncode != 0:
        yield None
        return
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(directory: Path) -> Path:
    """A file that takes every free byte of ``directory``'s disk."""
    filler = directory / "filler"
    with filler.open("wb", buffering=0) as out:
        for size in (1 << 16, 1 << 12, 1 << 9, 1):
            chunk = b"\0" * size
            while True:
                try:
                    out.write(chunk)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
                    break
    return filler


def test_a_full_disk(small_disk: Path | None, tmp_path: Path) -> None:
    if small_disk is None:
        capped_file(tmp_path)
        return
    store = f"sqlite:///{small_disk / 'gradsvc.db'}"
    with Server("--store", store, *CPU) as server:
        sid = create(server)
        assert step(server, sid, "disk-1").status_code == 200
        filler = fill(small_disk)
        try:
            trouble(server, sid, "disk-2", 507, "insufficient-storage")
        finally:
            filler.unlink()
        consistent(server, sid, 1)
        recovered(server, sid, "disk-2", 2)


WIDE = {  # 10,100 float32 parameters: about 10 pages of state
    "model": {"type": "linear", "in_features": 100, "out_features": 100},
    "loss": "mse",
    "optimizer": {"type": "sgd", "lr": 0.01},
}


def capped_file(tmp_path: Path) -> None:
    """The fallback: a file capped at 400 pages, filled with sessions until one no longer
    fits (507), then freed by deleting some of them."""
    store = f"sqlite:///{tmp_path / 'capped.db'}?max_pages=400"
    with Server("--store", store, *CPU) as server:
        http = httpx.Client(base_url=server.url, timeout=30)
        batch = {"batch": {"x": [[0.5] * 100], "y": [[1.0] * 100]}, "encoding": "b64"}

        def wide_step(sid: str, key: str) -> httpx.Response:
            return http.post(
                f"/v1/sessions/{sid}/step", json=batch, headers={"Idempotency-Key": key}
            )

        sid = http.post("/v1/sessions", json=WIDE).json()["id"]
        assert wide_step(sid, "cap-1").status_code == 200
        ballast: list[str] = []
        while (made := http.post("/v1/sessions", json=WIDE)).status_code == 201:
            ballast.append(made.json()["id"])
            assert len(ballast) < 100, "the cap never filled"
        assert assert_problem(made, 507)["type"] == "insufficient-storage"
        problem = assert_problem(wide_step(sid, "cap-2"), 507)
        assert problem["type"] == "insufficient-storage"
        wait_for(lambda: readyz(server) == 503)
        for doomed in ballast[:8]:
            assert http.delete(f"/v1/sessions/{doomed}").status_code == 204
        wait_for(lambda: readyz(server) == 200)
        assert wide_step(sid, "cap-2").json()["step"] == 2
        consistent(server, sid, 2)
        http.close()


class OwnRedis:
    """A redis-server of this test's own, on a fixed port so that it can stop and come back
    with its data (append-only file): the shared one must not be paused or stopped."""

    def __init__(self, workdir: Path) -> None:
        self.workdir, self.port = workdir, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> OwnRedis:
        server = shutil.which("redis-server")
        if server is None:
            pytest.skip("redis-server is not installed")
        args = [server, "--bind", "127.0.0.1", "--port", str(self.port), "--save", ""]
        args += ["--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.workdir)]
        with (self.workdir / "redis.log").open("ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        wait_for(self._answers, 10)
        return self

    def _answers(self) -> bool:
        return answers(self.url)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a paused server cannot stop
            self.proc.terminate()
            self.proc.wait(10)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)


@pytest.fixture(scope="module")
def redis_server(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Server, OwnRedis]]:
    own = OwnRedis(tmp_path_factory.mktemp("own-redis")).start()
    prefix = f"trouble-{uuid.uuid4().hex[:8]}"
    store = f"{own.url}?prefix={prefix}&socket_timeout=1&socket_connect_timeout=1"
    try:
        with Server("--store", store, *CPU) as server:
            yield server, own
    finally:
        own.stop()


def test_redis_paused_then_continued(redis_server: tuple[Server, OwnRedis]) -> None:
    server, own = redis_server
    sid = create(server)
    assert step(server, sid, "pause-1").status_code == 200
    own.signal(signal.SIGSTOP)
    try:
        trouble(server, sid, "pause-2", 503, "store-unavailable")
    finally:
        own.signal(signal.SIGCONT)
    recovered(server, sid, "pause-2", 2)


def test_redis_stopped_then_restarted(redis_server: tuple[Server, OwnRedis]) -> None:
    server, own = redis_server
    sid = create(server)
    assert step(server, sid, "stop-1").status_code == 200
    own.stop()
    try:
        trouble(server, sid, "stop-2", 503, "store-unavailable")
    finally:
        own.start()
    recovered(server, sid, "stop-2", 2)


def test_redis_at_its_maxmemory(redis_server: tuple[Server, OwnRedis]) -> None:
    import redis

    server, own = redis_server
    sid = create(server)
    assert step(server, sid, "oom-1").status_code == 200
    admin = redis.Redis.from_url(own.url)
    try:
        admin.config_set("maxmemory", 1)  # every write is over it now: OOM, nothing evicted
        try:
            trouble(server, sid, "oom-2", 507, "insufficient-storage")
        finally:
            admin.config_set("maxmemory", 0)
    finally:
        admin.close()
    recovered(server, sid, "oom-2", 2)


KEY = {"Authorization": "Bearer limited-key"}
PAUSE_MS = 3000
"""Longer than the rate limiter waits for Redis (1 s), shorter than the store's own default
wait (5 s), so that an answer that comes while the pause lasts came from the limiter."""


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, OwnRedis]]:
    """A keyed server, so every request asks Redis for its key's rate-limit bucket first;
    the store URL leaves the timeouts at their defaults."""
    own = OwnRedis(tmp_path_factory.mktemp("limited-redis")).start()
    store = f"{own.url}?prefix=limited-{uuid.uuid4().hex[:8]}"
    try:
        with Server("--store", store, "--api-keys", KEY["Authorization"][7:], *CPU) as server:
            yield server, own
    finally:
        own.stop()


def still_paused(url: str) -> bool:
    """Whether Redis is still under CLIENT PAUSE: a PING on a new connection gets no answer."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    probe = redis.Redis.from_url(
        url, socket_timeout=0.2, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0)
    )
    try:
        probe.ping()
        return False
    except redis.TimeoutError:
        return True
    finally:
        probe.close()


def test_a_stalled_redis_is_a_prompt_503_and_healthz_answers_meanwhile(
    limited: tuple[Server, OwnRedis],
) -> None:
    """The rate limit is asked of Redis asynchronously, waiting a second at most: while Redis
    is paused, keyed requests are 503 store-unavailable with Retry-After (not held for the
    whole stall, nor a thread each), and /healthz answers. Both come back while the pause
    still lasts: the PING after them is still unanswered. Stopped, Redis is a 503 too."""
    import redis

    server, own = limited
    clients = [httpx.Client(base_url=server.url, timeout=30) for _ in range(5)]
    try:
        assert clients[0].get("/v1/sessions", headers=KEY).status_code == 200
        admin = redis.Redis.from_url(own.url)
        admin.execute_command("CLIENT", "PAUSE", str(PAUSE_MS), "ALL")
        admin.close()
        with ThreadPoolExecutor(len(clients)) as pool:
            keyed = [pool.submit(c.get, "/v1/sessions", headers=KEY) for c in clients[1:]]
            health = clients[0].get("/healthz")
            answers = [f.result() for f in keyed]
        assert still_paused(own.url), "the answers came only after the pause"
        assert health.status_code == 200
        for answer in answers:
            problem = assert_problem(answer, 503)
            assert problem["type"] == "store-unavailable", problem
            assert int(answer.headers["Retry-After"]) >= 1
        wait_for(lambda: clients[0].get("/v1/sessions", headers=KEY).status_code == 200)
        own.stop()
        stopped = clients[0].get("/v1/sessions", headers=KEY)
        assert assert_problem(stopped, 503)["type"] == "store-unavailable"
        assert clients[0].get("/healthz").status_code == 200
    finally:
        for c in clients:
            c.close()


def test_memory_store_survives_a_worker_kill() -> None:
    """memory:// is one private file that outlives a worker; it goes when the server does."""
    with Server("--store", "memory://", *CPU) as server:
        assert server.proc is not None
        # Other servers (another test process's) may hold memory:// files of their own: ours
        # is the one that names this server's pid.
        (made,) = (
            d
            for d in Path(tempfile.gettempdir()).glob("gradsvc-memory-*")
            if (d / "pid").exists() and (d / "pid").read_text() == str(server.proc.pid)
        )
        sid = create(server)
        first = step(server, sid, "mem-1")
        assert first.status_code == 200
        (worker,) = httpx.get(server.url + "/v1/workers", timeout=10).json()["items"]
        os.kill(worker["pid"], signal.SIGKILL)

        def replaced() -> bool:
            items = httpx.get(server.url + "/v1/workers", timeout=10).json()["items"]
            return items[0]["pid"] not in (None, worker["pid"]) and items[0]["state"] == "up"

        wait_for(replaced, 60)
        session = httpx.get(f"{server.url}/v1/sessions/{sid}", timeout=10).json()
        assert session["params"] == first.json()["params"]
        assert step(server, sid, "mem-1").headers.get("Idempotent-Replayed") == "true"
        assert step(server, sid, "mem-2").json()["step"] == 2
        consistent(server, sid, 2)
        assert server.terminate() == 0
    assert not made.exists()
