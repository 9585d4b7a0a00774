"""Sessions survive restarts and SIGKILL, and stay exactly-once across replicas on Redis."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from tests.e2e.server import Server

KILLS = 6
"""SIGKILLs per store: each restart waits for the worker process to import torch. (Kills
under two writers and mixed failures are test_linearizable's; these are lean.)"""

pytestmark = pytest.mark.slow

MLP: dict[str, Any] = {
    "type": "sequential",
    "layers": [
        {"type": "linear", "in_features": 3, "out_features": 5},
        {"type": "tanh"},
        {"type": "linear", "in_features": 5, "out_features": 1},
    ],
    "dtype": "float64",
    "seed": 3,
}
OPTIMIZERS = {
    "adam": ({"type": "adam", "lr": 0.05}, lambda p: torch.optim.Adam(p, lr=0.05)),
    "sgd-nesterov": (
        {"type": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True},
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
    ),
}


def _store(kind: str, tmp_path: Path, redis_url: str) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'gradsvc.db'}"
    return redis_url


def _batches(n: int, seed: int) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "x": torch.randn(4, 3, generator=g, dtype=torch.float64).tolist(),
            "y": torch.randn(4, 1, generator=g, dtype=torch.float64).tolist(),
        }
        for _ in range(n)
    ]


def _reference(initial: dict[str, Any], make_opt: Any, batches: list[dict[str, Any]]) -> dict:
    net = torch.nn.Sequential(
        torch.nn.Linear(3, 5, dtype=torch.float64),
        torch.nn.Tanh(),
        torch.nn.Linear(5, 1, dtype=torch.float64),
    )
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.copy_(torch.tensor(initial[name], dtype=torch.float64))
    opt = make_opt(list(net.parameters()))
    for b in batches:
        opt.zero_grad()
        x = torch.tensor(b["x"], dtype=torch.float64)
        y = torch.tensor(b["y"], dtype=torch.float64)
        torch.nn.functional.mse_loss(net(x), y).backward()
        opt.step()
    return {n: p.detach().tolist() for n, p in net.named_parameters()}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", ["sqlite", "redis"])
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_state_survives_a_restart(
    kind: str, optimizer: str, tmp_path: Path, redis_url: str
) -> None:
    """10 steps with a restart between step 5 and 6 end exactly where torch.optim does."""
    spec, make_opt = OPTIMIZERS[optimizer]
    store = _store(kind, tmp_path, redis_url + f"?prefix={kind}{optimizer}")
    batches = _batches(10, seed=11)
    server = Server("--store", store).start()
    try:
        created = httpx.post(
            server.url + "/v1/sessions", json={"model": MLP, "loss": "mse", "optimizer": spec}
        ).json()
        sid, initial = created["id"], created["params"]
        for b in batches[:5]:
            assert httpx.post(f"{server.url}/v1/sessions/{sid}/step", json={"batch": b}).is_success
        assert server.terminate() == 0
        server = Server("--store", store, port=server.port).start()
        for b in batches[5:]:
            r = httpx.post(f"{server.url}/v1/sessions/{sid}/step", json={"batch": b})
            assert r.status_code == 200, r.text
        final = httpx.get(f"{server.url}/v1/sessions/{sid}").json()
    finally:
        server.stop()
    assert final["step"] == 10
    assert final["params"] == _reference(initial, make_opt, batches)


LINEAR_MOMENTUM = {
    "model": {"type": "linear", "in_features": 2, "out_features": 1, "dtype": "float64"},
    "loss": "mse",
    "optimizer": {"type": "sgd", "lr": 0.05, "momentum": 0.9},
}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_sigkill_loses_no_acknowledged_step_and_doubles_none(
    kind: str, tmp_path: Path, redis_url: str
) -> None:
    """A client streams steps (each retried with its key until acknowledged) while the server
    is SIGKILLed ``KILLS`` times at random moments and restarted on the same port."""
    store = _store(kind, tmp_path, redis_url + "?prefix=kill")
    server = Server("--store", store).start()
    sid = httpx.post(server.url + "/v1/sessions", json=LINEAR_MOMENTUM).json()["id"]
    initial = httpx.get(f"{server.url}/v1/sessions/{sid}").json()["params"]
    rng = random.Random(5)
    batches = [
        {"x": [[rng.uniform(-1, 1), rng.uniform(-1, 1)]], "y": [[rng.uniform(-1, 1)]]}
        for _ in range(2000)
    ]
    acknowledged: list[int] = []
    stop = threading.Event()
    url = server.url

    def client() -> None:
        for i, batch in enumerate(batches):
            if stop.is_set():
                return
            while True:  # retry with the same key until the step is acknowledged
                try:
                    r = httpx.post(
                        f"{url}/v1/sessions/{sid}/step",
                        json={"batch": batch},
                        headers={"Idempotency-Key": f"step-{i}"},
                        timeout=10,
                    )
                    if r.status_code == 200:
                        acknowledged.append(r.json()["step"])
                        break
                    assert r.status_code >= 500, r.text
                except httpx.TransportError:
                    pass
                time.sleep(0.02)

    thread = threading.Thread(target=client)
    thread.start()
    try:
        for _ in range(KILLS):
            # Let the stream move on, then kill at a random moment within it.
            before = len(acknowledged)
            deadline = time.monotonic() + 60
            while len(acknowledged) <= before and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.3))
            server.kill()
            server = Server("--store", store, port=server.port)
            server.start()
        time.sleep(0.3)
        stop.set()
        thread.join(60)
        final = httpx.get(f"{server.url}/v1/sessions/{sid}").json()
        history = httpx.get(f"{server.url}/v1/sessions/{sid}/history", params={"limit": 500})
        steps = [h["step"] for h in history.json()["items"]]
    finally:
        stop.set()
        server.stop()
    count = len(acknowledged)
    assert count >= KILLS
    assert acknowledged == list(range(1, count + 1))
    assert final["step"] == count
    assert steps[:count] == list(range(1, count + 1))
    net = torch.nn.Linear(2, 1, dtype=torch.float64)
    with torch.no_grad():
        net.weight.copy_(torch.tensor(initial["weight"], dtype=torch.float64))
        net.bias.copy_(torch.tensor(initial["bias"], dtype=torch.float64))
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    for b in batches[:count]:
        opt.zero_grad()
        x, y = torch.tensor(b["x"], dtype=torch.float64), torch.tensor(b["y"], dtype=torch.float64)
        torch.nn.functional.mse_loss(net(x), y).backward()
        opt.step()
    assert final["params"] == {"weight": net.weight.tolist(), "bias": net.bias.tolist()}


@pytest.mark.timeout(600)
def test_replicas_on_one_redis_apply_each_step_once(redis_url: str) -> None:
    """Two servers, one Redis, 8 threads × 200 steps alternating servers, half retried once
    with the same key on the other server. Each step adds exactly 1 to w (an L1 loss far from
    its target has gradient -x whatever w is), so w counts the updates that were applied."""
    store = redis_url + "?prefix=replicas"
    servers = [Server("--store", store).start(), Server("--store", store).start()]
    try:
        spec = {
            "model": {
                "type": "expression",
                "expression": "w * x",
                "params": {"w": {"value": 0.0}},
                "dtype": "float64",
            },
            "loss": "l1",
            "optimizer": {"type": "sgd", "lr": 1.0},
        }
        sid = httpx.post(servers[0].url + "/v1/sessions", json=spec).json()["id"]
        seen: list[int] = []
        errors: list[str] = []
        lock = threading.Lock()

        def client(t: int) -> None:
            with httpx.Client(timeout=60) as http:
                for i in range(200):
                    here, there = servers[(t + i) % 2], servers[(t + i + 1) % 2]
                    body = {"batch": {"x": 1, "y": 1e9}}
                    key = {"Idempotency-Key": f"{t}-{i}"}
                    r = http.post(f"{here.url}/v1/sessions/{sid}/step", json=body, headers=key)
                    if r.status_code != 200:
                        errors.append(r.text)
                        continue
                    if i % 2 == 0:
                        again = http.post(
                            f"{there.url}/v1/sessions/{sid}/step", json=body, headers=key
                        )
                        if (
                            again.json() != r.json()
                            or again.headers.get("idempotent-replayed") != "true"
                        ):
                            errors.append(f"retry of {t}-{i} was not a replay: {again.text}")
                    with lock:
                        seen.append(r.json()["step"])

        threads = [threading.Thread(target=client, args=(t,)) for t in range(8)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(600)
        assert not errors, errors[:3]
        final = httpx.get(f"{servers[1].url}/v1/sessions/{sid}").json()
    finally:
        for s in servers:
            s.stop()
    assert sorted(seen) == list(range(1, 1601))
    assert final["step"] == 1600
    assert final["params"] == {"w": 1600.0}
