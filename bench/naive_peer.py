"""The naive peer: the ~30-line FastAPI + torch endpoint a user would write instead.

Tensors from the JSON lists, ``w * x + 1`` or an ``nn.Sequential`` built from the request,
``backward()``, one SGD step, ``.tolist()``. It takes the service's request bodies for the
workloads it supports (list tensors; no b64, no limits, no validation, no error bodies).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from fastapi import FastAPI, HTTPException
from torch import nn

app = FastAPI()
ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}


def _layer(spec: dict[str, Any], dtype: torch.dtype) -> nn.Module:
    if spec["type"] == "linear":
        return nn.Linear(spec["in_features"], spec["out_features"], dtype=dtype)
    return ACTIVATIONS[spec["type"]]()


@app.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@app.post("/v1/step")
def step(body: dict[str, Any]) -> dict[str, Any]:
    spec, batch = body["model"], body["batch"]
    dtype = getattr(torch, spec.get("dtype", "float32"))
    x = torch.tensor(batch["x"], dtype=dtype)
    y = torch.tensor(batch["y"], dtype=dtype)
    forward: Callable[[torch.Tensor], torch.Tensor]
    if spec["type"] == "expression" and spec["expression"] == "w * x + 1":
        w = torch.tensor(spec["params"]["w"]["value"], dtype=dtype, requires_grad=True)
        params = {"w": w}

        def forward(t: torch.Tensor) -> torch.Tensor:
            return w * t + 1
    elif spec["type"] == "sequential":
        torch.manual_seed(spec.get("seed", 0))
        forward = nn.Sequential(*(_layer(layer, dtype) for layer in spec["layers"]))
        params = dict(forward.named_parameters())
    else:
        raise HTTPException(422, "only 'w * x + 1' and sequential models")
    out = forward(x)
    loss = (
        0.5 * ((out - y) ** 2).mean()
        if body["loss"] == "squared"
        else nn.functional.mse_loss(out, y)
    )
    loss.backward()
    torch.optim.SGD(params.values(), lr=body["optimizer"]["lr"]).step()
    return {
        "loss": loss.item(),
        "grads": {n: p.grad.tolist() for n, p in params.items() if p.grad is not None},
        "params": {n: p.tolist() for n, p in params.items()},
        "outputs": out.tolist(),
    }
