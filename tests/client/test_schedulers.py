"""The client's scheduler builders are what the service takes, and lr comes back in its
results: every builder, one step each, on the client tests' one server."""

from __future__ import annotations

from typing import Any

import pytest
from gradsvc_client import (
    Client,
    CosineAnnealingLR,
    CosineAnnealingWarmRestarts,
    ExponentialLR,
    LinearLR,
    MultiStepLR,
    OneCycleLR,
    StepLR,
)
from torch.optim import lr_scheduler

from tests.e2e.server import Server

NOTEBOOK = {"type": "expression", "expression": "w * x + 1", "params": {"w": {"value": [1.0]}}}
SGD = {"type": "sgd", "lr": 0.1, "momentum": 0.5}
BUILDERS: list[tuple[Any, Any, dict[str, Any]]] = [
    (StepLR(1, gamma=0.5), lr_scheduler.StepLR, {"step_size": 1, "gamma": 0.5}),
    (MultiStepLR([1], gamma=0.3), lr_scheduler.MultiStepLR, {"milestones": [1], "gamma": 0.3}),
    (ExponentialLR(0.9), lr_scheduler.ExponentialLR, {"gamma": 0.9}),
    (
        CosineAnnealingLR(4, eta_min=0.01),
        lr_scheduler.CosineAnnealingLR,
        {"T_max": 4, "eta_min": 0.01},
    ),
    (LinearLR(total_iters=3), lr_scheduler.LinearLR, {"total_iters": 3}),
    (
        OneCycleLR(1.0, total_steps=5, anneal_strategy="linear"),
        lr_scheduler.OneCycleLR,
        {"max_lr": 1.0, "total_steps": 5, "anneal_strategy": "linear"},
    ),
    (
        CosineAnnealingWarmRestarts(1, T_mult=2),
        lr_scheduler.CosineAnnealingWarmRestarts,
        {"T_0": 1, "T_mult": 2},
    ),
]


def torch_lrs(cls: Any, arguments: dict[str, Any], steps: int) -> list[float]:
    import torch

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1, momentum=0.5)
    scheduler = cls(optimizer, **arguments)
    lrs = [scheduler.get_last_lr()[0]]
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
        lrs.append(scheduler.get_last_lr()[0])
    return lrs


@pytest.mark.parametrize(
    ("builder", "cls", "arguments"), BUILDERS, ids=[type(b[0]).__name__ for b in BUILDERS]
)
def test_every_scheduler_builder_is_taken_and_lr_comes_back(
    server: Server, builder: Any, cls: Any, arguments: dict[str, Any]
) -> None:
    want = torch_lrs(cls, arguments, 2)
    with Client(server.url) as gs:
        s = gs.create_session(NOTEBOOK, "squared", SGD, scheduler=builder)
        assert s.lr == want[0] and s.scheduler is not None
        stepped = [gs.session_step(s, 1, 3).lr for _ in range(2)]
        assert stepped == want[1:]
        history = list(gs.history(s))
        assert [h.lr for h in history] == want[1:]
        assert gs.get_session(s).lr == want[2]
