"""A batch-norm session over HTTP: its buffers in the view, updated by committed steps and
accumulates only, kept by checkpoints, refused when forged; forward in eval mode."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load, save
from torch import nn

from service.engine import models, specs
from tests.conftest import assert_problem

BN_NET = {
    "type": "sequential",
    "dtype": "float64",
    "layers": [
        {"type": "linear", "in_features": 2, "out_features": 3},
        {"type": "batch_norm1d", "num_features": 3, "momentum": 0.5},
        {"type": "linear", "in_features": 3, "out_features": 1},
    ],
}
SESSION = {"model": BN_NET, "loss": "mse", "optimizer": {"type": "sgd", "lr": 0.1}}
X = [[1.0, 2.0], [0.5, -1.0], [3.0, 0.0], [-2.0, 1.5]]
BATCH = {"x": X, "y": [[1.0], [0.0], [-1.0], [2.0]]}
FRESH = {"1.running_mean": [0.0] * 3, "1.running_var": [1.0] * 3, "1.num_batches_tracked": 0}


def _buffers(client: TestClient, sid: str) -> dict[str, Any]:
    r = client.get(f"/v1/sessions/{sid}")
    assert r.status_code == 200, r.text
    return r.json()["buffers"]  # type: ignore[no-any-return]


def _reference(view: dict[str, Any]) -> nn.Module:
    """torch.nn's own modules holding the session's parameters and buffers."""
    module = copy.deepcopy(models.build(specs.SequentialModel.model_validate(BN_NET)).module)
    values = {**view["params"], **view["buffers"]}
    with torch.no_grad():
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            t.copy_(torch.tensor(values[name], dtype=t.dtype))
    return module


@pytest.fixture(scope="module")
def sid(client: TestClient) -> str:
    r = client.post("/v1/sessions", json=SESSION)
    assert r.status_code == 201, r.text
    assert r.json()["buffers"] == FRESH
    return r.json()["id"]  # type: ignore[no-any-return]


def test_the_view_lists_buffers_and_reads_leave_them(client: TestClient) -> None:
    sid = client.post("/v1/sessions", json=SESSION).json()["id"]
    view = client.get(f"/v1/sessions/{sid}").json()
    assert set(view["params"]) == {"0.weight", "0.bias", "1.weight", "1.bias", "2.weight", "2.bias"}
    assert view["buffers"] == FRESH
    r = client.post(f"/v1/sessions/{sid}/forward", json={"batch": {"x": [X[0]]}})
    assert r.status_code == 200, r.text  # eval mode: one row is fine
    reference = _reference(view).eval()
    with torch.no_grad():
        expected = reference(torch.tensor([X[0]], dtype=torch.float64))
    torch.testing.assert_close(
        torch.tensor(r.json()["outputs"], dtype=torch.float64), expected, rtol=1e-10, atol=1e-10
    )
    r = client.post(f"/v1/sessions/{sid}/gradients", json={"batch": BATCH})
    assert r.status_code == 200, r.text
    assert _buffers(client, sid) == FRESH


def test_a_committed_step_updates_them_as_torch_does(client: TestClient, sid: str) -> None:
    view = client.get(f"/v1/sessions/{sid}").json()
    reference = _reference(view).train()
    reference(torch.tensor(X, dtype=torch.float64))  # a train-mode forward updates them
    r = client.post(f"/v1/sessions/{sid}/step", json={"batch": BATCH})
    assert r.status_code == 200, r.text
    buffers = _buffers(client, sid)
    assert buffers["1.num_batches_tracked"] == view["buffers"]["1.num_batches_tracked"] + 1
    for name, b in reference.named_buffers():
        torch.testing.assert_close(torch.tensor(buffers[name], dtype=b.dtype), b)


def test_a_refused_step_leaves_them(client: TestClient, sid: str) -> None:
    r = client.get(f"/v1/sessions/{sid}")
    stale, before = r.headers["etag"], r.json()["buffers"]
    assert client.post(f"/v1/sessions/{sid}/step", json={"batch": BATCH}).status_code == 200
    moved = _buffers(client, sid)
    assert moved != before
    r = client.post(f"/v1/sessions/{sid}/step", json={"batch": BATCH}, headers={"If-Match": stale})
    assert_problem(r, 412)
    assert _buffers(client, sid) == moved
    r = client.post(
        f"/v1/sessions/{sid}/accumulate", json={"batch": BATCH}, headers={"If-Match": stale}
    )
    assert_problem(r, 412)
    assert _buffers(client, sid) == moved
    r = client.post(f"/v1/sessions/{sid}/accumulate", json={"batch": BATCH})
    assert r.status_code == 200, r.text
    after = _buffers(client, sid)
    assert after["1.num_batches_tracked"] == moved["1.num_batches_tracked"] + 1


def test_checkpoint_and_restore_keep_them(client: TestClient, sid: str) -> None:
    assert client.post(f"/v1/sessions/{sid}/step", json={"batch": BATCH}).status_code == 200
    content = client.get(f"/v1/sessions/{sid}/checkpoint").content
    assert {"buffer.1.running_mean", "buffer.1.num_batches_tracked"} <= set(load(content))
    r = client.post("/v1/sessions/restore", content=content)
    assert r.status_code == 201, r.text
    assert r.json()["buffers"] == _buffers(client, sid) != FRESH


def _forged(content: bytes, name: str, value: torch.Tensor | None) -> bytes:
    import json

    tensors = load(content)
    metadata = json.loads(content[8 : 8 + int.from_bytes(content[:8], "little")])["__metadata__"]
    if value is None:
        del tensors[name]
    else:
        tensors[name] = value
    return save(tensors, metadata=metadata)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("buffer.1.running_var", torch.tensor([1.0, -0.5, 1.0], dtype=torch.float64)),
        ("buffer.1.running_mean", torch.tensor([float("inf"), 0, 0], dtype=torch.float64)),
        ("buffer.1.running_mean", torch.zeros(5, dtype=torch.float64)),
        ("buffer.1.num_batches_tracked", torch.tensor(1.5, dtype=torch.float64)),
        ("buffer.1.num_batches_tracked", None),
    ],
)
def test_a_forged_buffer_is_refused(
    client: TestClient, sid: str, name: str, value: torch.Tensor | None
) -> None:
    content = client.get(f"/v1/sessions/{sid}/checkpoint").content
    before = len(client.get("/v1/sessions", params={"limit": 500}).json()["items"])
    problem = assert_problem(
        client.post("/v1/sessions/restore", content=_forged(content, name, value)), 422
    )
    assert name in problem["detail"]
    assert len(client.get("/v1/sessions", params={"limit": 500}).json()["items"]) == before


def test_per_sample_quantities_are_refused(client: TestClient) -> None:
    body = {"model": BN_NET, "loss": "mse", "batch": BATCH, "quantities": ["per_sample_grads"]}
    problem = assert_problem(client.post("/v1/gradients", json=body), 422)
    assert "batch-norm" in problem["detail"]
