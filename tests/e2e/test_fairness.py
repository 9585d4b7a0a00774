"""Two keys on one real server: while Bob runs each attack in turn, Alice's sequential steps
all succeed, and no process's memory passes its ceiling.

The attacks are the ones that got through before the service was fair and bounded: a queue
flood, slow heavy requests, a flood of jobs, a flood of event streams, concurrent large
bodies and slow bodies. Each runs on threads while Alice makes ``ALICE_STEPS`` steps one
after the other; the assertions are counts (Alice: every step 200, so 0 × 503 and 0 × 504;
Bob: what he was refused, and with what), never timings. The ceilings are the processes'
high-water marks (VmHWM), read at the end.
"""

from __future__ import annotations

import base64
import contextlib
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
import pytest

from tests.conftest import SEED_STEP
from tests.e2e.server import Server, high_water_kib

ALICE, BOB, ADMIN = "alice-key", "bob-key", "operator-key"
ALICE_STEPS = 20
SESSION = {key: SEED_STEP[key] for key in ("model", "loss", "optimizer")}
API_CEILING_KIB = 1536 * 1024
"""The API process, through 8 concurrent 60 MB bodies (each is ~0.5 GB as Python lists)."""
WORKER_CEILING_KIB = 1536 * 1024
"""A worker, through the heavy requests and the jobs (its baseline, torch loaded, ~300 MB)."""
BODY_TIMEOUT = 2.0


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@dataclass
class Attack:
    """Bob's threads, each calling ``once`` until told to stop; what he got, counted."""

    once: Callable[[httpx.Client], int]
    threads: int
    statuses: Counter[int] = field(default_factory=Counter)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _run(self, url: str) -> None:
        with httpx.Client(base_url=url, headers=auth(BOB), timeout=120) as http:
            while not self._stop.is_set():
                try:
                    status = self.once(http)
                except httpx.TransportError:
                    status = 0
                with self._lock:
                    self.statuses[status] += 1

    @contextlib.contextmanager
    def running(self, url: str) -> Iterator[Attack]:
        threads = [
            threading.Thread(target=self._run, args=(url,), daemon=True)
            for _ in range(self.threads)
        ]
        for thread in threads:
            thread.start()
        try:
            time.sleep(0.5)  # the attack is under way before Alice starts
            yield self
        finally:
            self._stop.set()
            for thread in threads:
                thread.join(120)


@dataclass
class Ctx:
    server: Server
    alice: httpx.Client
    bob: httpx.Client
    alice_session: str
    bob_session: str
    pids: list[int]


@pytest.fixture(scope="module")
def ctx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ctx]:
    db = tmp_path_factory.mktemp("fair") / "fair.db"
    server = Server(
        "--store",
        f"sqlite:///{db}",
        "--api-keys",
        f"{ALICE},{BOB}",
        "--admin-keys",
        ADMIN,
        "--workers-per-device",
        "1",
        "--rate-limit",
        "0",  # fairness is what is under test, not the rate limit
        "--body-timeout",
        str(BODY_TIMEOUT),
        "--log-level",
        "warning",
        env={"CUDA_VISIBLE_DEVICES": ""},
    ).start()
    alice = httpx.Client(base_url=server.url, headers=auth(ALICE), timeout=60)
    bob = httpx.Client(base_url=server.url, headers=auth(BOB), timeout=60)
    try:
        ids = [c.post("/v1/sessions", json=SESSION).json()["id"] for c in (alice, bob)]
        workers = bob.get("/v1/workers", headers=auth(ADMIN)).json()["items"]
        assert server.proc is not None
        pids = [server.proc.pid, *(w["pid"] for w in workers)]
        yield Ctx(server, alice, bob, ids[0], ids[1], pids)
    finally:
        alice.close()
        bob.close()
        server.stop()


def alice_steps(ctx: Ctx) -> Counter[int]:
    statuses: Counter[int] = Counter()
    for _ in range(ALICE_STEPS):
        r = ctx.alice.post(
            f"/v1/sessions/{ctx.alice_session}/step", json={"batch": SEED_STEP["batch"]}
        )
        statuses[r.status_code] += 1
    return statuses


def assert_alice_served(statuses: Counter[int]) -> None:
    assert statuses == Counter({200: ALICE_STEPS}), statuses


def heavy_body(layers: int, rows: int) -> dict[str, Any]:
    x = base64.b64encode(np.ones((rows, 256), dtype=np.float32)).decode()
    y = base64.b64encode(np.zeros((rows, 1), dtype=np.float32)).decode()
    linear = {"type": "linear", "in_features": 256, "out_features": 256}
    return {
        "model": {
            "type": "sequential",
            "layers": [linear] * layers + [{**linear, "out_features": 1}],
        },
        "loss": "mse",
        "batch": {
            "x": {"dtype": "float32", "shape": [rows, 256], "b64": x},
            "y": {"dtype": "float32", "shape": [rows, 1], "b64": y},
        },
    }


def test_a_queue_flood(ctx: Ctx) -> None:
    """Bob keeps far more steps in flight than his limit allows: his extra ones are 429s,
    and Alice's steps go in the next pass each."""
    path = f"/v1/sessions/{ctx.bob_session}/step"
    attack = Attack(
        lambda http: http.post(path, json={"batch": SEED_STEP["batch"]}).status_code, 48
    )
    with attack.running(ctx.server.url):
        assert_alice_served(alice_steps(ctx))
    assert attack.statuses[200] > 0 and attack.statuses[429] > 0, attack.statuses
    assert set(attack.statuses) <= {200, 429}, attack.statuses


def test_slow_heavy_requests(ctx: Ctx) -> None:
    """Bob's stateless gradients of a deep MLP, several at once: each of Alice's steps waits
    for at most the one computation of Bob's that is running."""
    body = heavy_body(8, 2000)
    attack = Attack(lambda http: http.post("/v1/gradients", json=body).status_code, 4)
    with attack.running(ctx.server.url):
        assert_alice_served(alice_steps(ctx))
    assert attack.statuses[200] > 0 and set(attack.statuses) <= {200}, attack.statuses


def test_a_flood_of_jobs_and_of_event_streams(ctx: Ctx) -> None:
    """Bob starts more training jobs than his quota, then opens more streams than his quota
    on one of them: both are 429 quota-exceeded (no Retry-After); the jobs train between
    Alice's steps, never ahead of them."""
    dataset = {"x": [0.0, 1.0, 2.0, 3.0], "y": [1.0, 3.0, 5.0, 7.0]}
    started, refused = [], []
    for _ in range(6):
        sid = ctx.bob.post("/v1/sessions", json=SESSION).json()["id"]
        r = ctx.bob.post(
            f"/v1/sessions/{sid}/train",
            json={"dataset": dataset, "epochs": 100_000, "batch_size": 1},
        )
        (started if r.status_code == 202 else refused).append(r)
    assert len(started) == 4, [r.text for r in refused]
    assert all(r.status_code == 429 and r.json()["type"] == "quota-exceeded" for r in refused)
    assert all("retry-after" not in r.headers for r in refused)
    job = started[0].headers["location"]
    streams: list[Any] = []
    stream_statuses: Counter[int] = Counter()
    with contextlib.ExitStack() as stack:
        http = stack.enter_context(
            httpx.Client(base_url=ctx.server.url, headers=auth(BOB), timeout=60)
        )
        for _ in range(20):
            response = stack.enter_context(http.stream("GET", f"{job}/events"))
            stream_statuses[response.status_code] += 1
            streams.append(response)
        assert stream_statuses == Counter({200: 16, 429: 4}), stream_statuses
        assert_alice_served(alice_steps(ctx))
    for r in started:
        assert ctx.bob.delete(r.headers["location"]).status_code in (200, 202, 204)


def test_concurrent_large_bodies(ctx: Ctx) -> None:
    """Eight 60 MB JSON bodies of Bob's at once (a tensor far over the element limit): each
    is refused (422 as its numbers are counted, 503 while the parse budget is spent, or 408
    when, on these busy cores, it took longer to send than this server's short body
    timeout), and the API process stays under its ceiling."""
    numbers = ",".join(["1.5"] * 15_000_000)
    body = (
        '{"model": {"type": "linear", "in_features": 1, "out_features": 1}, "loss": "mse", '
        f'"batch": {{"x": [{numbers}], "y": 1}}}}'
    ).encode()
    assert 55_000_000 < len(body) < 64 * 1024 * 1024
    attack = Attack(
        lambda http: (
            http.post(
                "/v1/gradients", content=body, headers={"content-type": "application/json"}
            ).status_code
        ),
        8,
    )
    with attack.running(ctx.server.url):
        assert_alice_served(alice_steps(ctx))
    assert attack.statuses[422] > 0 and set(attack.statuses) <= {408, 422, 503}, attack.statuses


def test_slow_bodies(ctx: Ctx) -> None:
    """Sixty connections of Bob's that send their headers and part of a body, then stall:
    each is answered 408 once the body timeout passes and closed."""
    answers: list[bytes] = []
    lock = threading.Lock()

    def slow() -> None:
        with socket.create_connection(("127.0.0.1", ctx.server.port), timeout=30) as sock:
            head = (
                f"POST /v1/sessions/{ctx.bob_session}/step HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: Bearer {BOB}\r\nContent-Type: application/json\r\n"
                'Content-Length: 1000\r\n\r\n{"batch": '
            )
            sock.sendall(head.encode())
            got = b""
            with contextlib.suppress(OSError):
                while chunk := sock.recv(65536):
                    got += chunk
            with lock:
                answers.append(got)

    threads = [threading.Thread(target=slow, daemon=True) for _ in range(60)]
    for thread in threads:
        thread.start()
    time.sleep(0.3)
    assert_alice_served(alice_steps(ctx))
    for thread in threads:
        thread.join(30)
    assert len(answers) == 60
    assert all(a.startswith(b"HTTP/1.1 408") for a in answers), Counter(a[:12] for a in answers)


def test_every_process_stayed_under_its_ceiling(ctx: Ctx) -> None:
    """Last: the high-water marks of the API process and the worker, through every attack."""
    api, *workers = (high_water_kib(pid) for pid in ctx.pids)
    assert api < API_CEILING_KIB, f"API process peaked at {api // 1024} MiB"
    for peak in workers:
        assert peak < WORKER_CEILING_KIB, f"a worker peaked at {peak // 1024} MiB"
    # and the service still serves
    r = ctx.alice.post(f"/v1/sessions/{ctx.alice_session}/step", json={"batch": SEED_STEP["batch"]})
    assert r.status_code == 200
