"""``python -m bench.gpu``: a large MLP step through the service on a GPU, against the raw
torch step on the same GPU, in one run. Prints the card's name and the ratio.

The service's figure is a session step end to end (HTTP, b64 in and out, the worker, the
commit to SQLite); the torch figure is forward, backward and Adam's update on tensors already
on the device, synchronised. Run it on a machine with CUDA; it refuses to run without.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from typing import Any

import httpx
import torch

from bench.workloads import b64
from tests.e2e.server import Server


def _torch_ms(rows: int, width: int, seconds: float) -> float:
    device = torch.device("cuda")
    model = torch.nn.Sequential(
        torch.nn.Linear(width, width), torch.nn.ReLU(), torch.nn.Linear(width, 1)
    ).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.randn(rows, width, device=device), torch.randn(rows, 1, device=device)
    times = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 5:
        torch.cuda.synchronize()
        start = time.perf_counter()
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[2:])


def _service_ms(rows: int, width: int, seconds: float) -> float:
    spec = {
        "model": {
            "type": "sequential",
            "layers": [
                {"type": "linear", "in_features": width, "out_features": width},
                {"type": "relu"},
                {"type": "linear", "in_features": width, "out_features": 1},
            ],
        },
        "loss": "mse",
        "optimizer": {"type": "adam", "lr": 0.001},
        "device": "cuda",
    }
    batch = {"x": b64(torch.randn(rows, width)), "y": b64(torch.randn(rows, 1))}
    with (
        tempfile.TemporaryDirectory() as tmp,
        Server("--store", f"sqlite:///{tmp}/gpu.db", "--devices", "auto") as server,
        httpx.Client(base_url=server.url, timeout=120) as http,
    ):
        sid = http.post("/v1/sessions", json=spec).json()["id"]
        body = {"batch": batch, "encoding": "b64"}
        times = []
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline or len(times) < 5:
            start = time.perf_counter()
            answer = http.post(f"/v1/sessions/{sid}/step", json=body)
            times.append(time.perf_counter() - start)
            assert answer.status_code == 200, answer.text
        return 1000 * statistics.median(times[2:])


def measure(rows: int = 65_536, width: int = 1024, seconds: float = 10.0) -> dict[str, Any]:
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device here")
    torch_ms = _torch_ms(rows, width, seconds)
    service_ms = _service_ms(rows, width, seconds)
    return {
        "card": torch.cuda.get_device_name(0),
        "rows": rows,
        "width": width,
        "torch_ms": torch_ms,
        "service_ms": service_ms,
        "ratio": service_ms / torch_ms,
    }


def main() -> int:
    try:
        figures = measure()
    except RuntimeError as exc:
        print(f"bench.gpu: {exc}", file=sys.stderr)
        return 2
    print(
        f"{figures['card']}: MLP {figures['width']}→{figures['width']}→1 on "
        f"{figures['rows']} rows, Adam: service step p50 {figures['service_ms']:.2f} ms, "
        f"torch step p50 {figures['torch_ms']:.2f} ms, service / torch "
        f"{figures['ratio']:.2f}×"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
