"""On a CUDA device, /metrics shows each device's memory as its workers report it, and its
utilisation when ``pynvml`` is installed. Marked ``gpu``; skipped where torch sees no CUDA
device (on the CPU these series are absent: tests/api/test_metrics.py)."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator

import pytest
import torch
from fastapi.testclient import TestClient

from service.app import create_app
from service.config import Settings
from tests.api.test_metrics import scrape, value
from tests.conftest import LOOPBACK, ready
from tests.gpu.test_gpu import BATCH, MLP

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here"),
]


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    db = tmp_path_factory.mktemp("gpu-metrics") / "gpu.db"
    settings = Settings(store=f"sqlite:///{db}", devices="cuda:0", workers_per_device=1)
    with TestClient(create_app(settings), raise_server_exceptions=False, client=LOOPBACK) as c:
        ready(c)
        yield c


def test_cuda_memory_is_reported_per_device(client: TestClient) -> None:
    sid = client.post("/v1/sessions", json={**MLP, "device": "cuda"}).json()["id"]
    assert client.post(f"/v1/sessions/{sid}/step", json={"batch": BATCH}).status_code == 200
    samples = scrape(client)
    allocated = value(samples, "gradsvc_cuda_memory_allocated_bytes", device="cuda:0")
    reserved = value(samples, "gradsvc_cuda_memory_reserved_bytes", device="cuda:0")
    assert 0 < allocated <= reserved  # the session's model and optimizer state live there
    build = [labels for name, labels in samples if name == "gradsvc_build_info"]
    assert dict(build[0])["devices"] == "cuda:0"


@pytest.mark.skipif(importlib.util.find_spec("pynvml") is None, reason="pynvml not installed")
def test_gpu_utilisation_comes_from_nvml(client: TestClient) -> None:
    ratio = scrape(client).get(("gradsvc_gpu_utilization_ratio", (("device", "cuda:0"),)), None)
    assert ratio is not None and 0 <= ratio <= 1
