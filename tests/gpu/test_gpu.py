"""On a CUDA device: the same answers as on the CPU, and an out-of-memory request that leaves
the worker serving. Marked ``gpu``; they skip where torch sees no CUDA device."""

from __future__ import annotations

import base64
import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from service.app import create_app
from service.config import Settings
from tests.conftest import LOOPBACK, SEED_STEP, ready

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here"),
]
MLP: dict[str, Any] = {
    "model": {
        "type": "sequential",
        "layers": [
            {"type": "linear", "in_features": 8, "out_features": 32},
            {"type": "tanh"},
            {"type": "linear", "in_features": 32, "out_features": 1},
        ],
        "seed": 3,
    },
    "loss": "mse",
    "optimizer": {"type": "adam", "lr": 0.01},
}
_g = torch.Generator().manual_seed(1)
BATCH = {
    "x": torch.randn(16, 8, generator=_g).tolist(),
    "y": torch.randn(16, 1, generator=_g).tolist(),
}


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    db = tmp_path_factory.mktemp("gpu") / "gpu.db"
    settings = Settings(
        store=f"sqlite:///{db}",
        devices="auto",
        max_activation_elements=10**12,
        max_tensor_elements=10**9,
        max_batch_elements=10**9,
        max_body_bytes=2**31,
    )
    with TestClient(create_app(settings), raise_server_exceptions=False, client=LOOPBACK) as c:
        ready(c)
        yield c


def steps(client: TestClient, spec: dict[str, Any], device: str, n: int = 3) -> list[Any]:
    created = client.post("/v1/sessions", json={**spec, "device": device})
    assert created.status_code == 201, created.text
    assert created.json()["device"].startswith(device)
    sid = created.json()["id"]
    batch = {"batch": BATCH if spec is MLP else {"x": 1, "y": 3}}
    return [client.post(f"/v1/sessions/{sid}/step", json=batch).json() for _ in range(n)]


def close(a: Any, b: Any, tol: float) -> None:
    torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=tol, rtol=tol)


def test_workers_are_on_the_gpu(client: TestClient) -> None:
    workers = client.get("/v1/workers").json()["items"]
    assert all(w["device"].startswith("cuda") for w in workers)


def test_the_seed_on_cuda_equals_the_cpu(client: TestClient) -> None:
    seed = {k: SEED_STEP[k] for k in ("model", "loss", "optimizer")}
    on_gpu, on_cpu = steps(client, seed, "cuda"), steps(client, seed, "cpu")
    assert [s["params"] for s in on_gpu] == [s["params"] for s in on_cpu]
    assert on_gpu[0]["params"] == {"w": [1.1]}


def test_an_mlp_on_cuda_equals_the_cpu(client: TestClient) -> None:
    on_gpu, on_cpu = steps(client, MLP, "cuda"), steps(client, MLP, "cpu")
    for g, c in zip(on_gpu, on_cpu, strict=True):
        close(g["loss"], c["loss"], 1e-5)
        for name in c["params"]:
            close(g["params"][name], c["params"][name], 1e-5)


def test_batched_steps_on_cuda_equal_the_cpu(client: TestClient) -> None:
    made = {}
    for device in ("cuda", "cpu"):
        made[device] = [
            client.post("/v1/sessions", json={**MLP, "device": device}).json()["id"]
            for _ in range(8)
        ]
    answers = {}
    for device, ids in made.items():
        items = [{"session": sid, "batch": BATCH} for sid in ids]
        body = {"items": items, "include": ["loss", "params"]}
        answers[device] = client.post("/v1/sessions/step", json=body).json()["items"]
    for g, c in zip(answers["cuda"], answers["cpu"], strict=True):
        assert g["status"] == c["status"] == 200
        close(g["loss"], c["loss"], 1e-5)
        for name in c["params"]:
            close(g["params"][name], c["params"][name], 1e-5)


def test_out_of_memory_is_a_problem_and_the_worker_stays_up(client: TestClient) -> None:
    free, _ = torch.cuda.mem_get_info()
    width = 16_384
    rows = int(free // (width * 4)) * 2  # one activation is twice the free memory
    huge = copy.deepcopy(MLP)
    huge["model"]["layers"] = [
        {"type": "linear", "in_features": 1, "out_features": width},
        {"type": "relu"},
        {"type": "linear", "in_features": width, "out_features": 1},
    ]
    sid = client.post("/v1/sessions", json={**huge, "device": "cuda"}).json()["id"]
    zeros = base64.b64encode(bytes(rows * 4)).decode()
    x = {"dtype": "float32", "shape": [rows, 1], "b64": zeros}
    pids = {w["pid"] for w in client.get("/v1/workers").json()["items"]}
    answer = client.post(f"/v1/sessions/{sid}/forward", json={"batch": {"x": x}})
    assert answer.status_code == 507, answer.text
    assert answer.json()["type"] == "out-of-memory"
    assert client.post("/v1/step", json=SEED_STEP).json()["params"] == {"w": [1.1]}
    assert {w["pid"] for w in client.get("/v1/workers").json()["items"]} == pids


def test_gpu_benchmark_script_runs(tmp_path: Path) -> None:
    from bench import gpu

    figures = gpu.measure(rows=1024, width=256, seconds=0.5)
    assert figures["service_ms"] > 0 and figures["torch_ms"] > 0
