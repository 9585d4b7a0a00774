"""Every scheduler goes on across a server restart exactly as in a plain torch loop: one
server on a SQLite file, restarted once in the middle of all of them."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch

from tests.e2e.server import Server
from tests.engine.test_schedulers import CASES, STEPS, batch, model_spec, torch_run

BEFORE = 5


@pytest.mark.timeout(300)
def test_every_scheduler_survives_a_restart(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'gradsvc.db'}"
    args = ("--store", store, "--workers-per-device", "1")  # one process starts faster
    server = Server(*args).start()
    got: dict[str, list[tuple[dict[str, list[list[float]]], float]]] = {n: [] for n in CASES}
    try:
        ids = {}
        for name, (scheduler, optimizer, _, _) in CASES.items():
            body = {"model": model_spec(), "loss": "mse", "optimizer": optimizer}
            r = httpx.post(server.url + "/v1/sessions", json={**body, "scheduler": scheduler})
            assert r.status_code == 201, r.text
            ids[name] = r.json()["id"]

        def steps(first: int, last: int) -> None:
            http = httpx.Client(base_url=server.url)
            for step in range(first, last):
                for name, sid in ids.items():
                    x, y = batch(step)
                    r = http.post(f"/v1/sessions/{sid}/step", json={"batch": {"x": x, "y": y}})
                    assert r.status_code == 200, r.text
                    got[name].append((r.json()["params"], r.json()["lr"]))
            http.close()

        steps(0, BEFORE)
        assert server.terminate() == 0
        server = Server(*args, port=server.port).start()
        steps(BEFORE, STEPS)
    finally:
        server.stop()
    for name in CASES:
        for step, ((params, lr), (want, want_lr)) in enumerate(
            zip(got[name], torch_run(name), strict=True)
        ):
            assert lr == want_lr, f"{name} step {step + 1}"
            for key, value in want.items():
                torch.testing.assert_close(
                    torch.tensor(params[key], dtype=torch.float64), value, atol=1e-12, rtol=0
                )
