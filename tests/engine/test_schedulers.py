"""Schedulers in sessions equal torch's: a session's steps, through ``Sessions.run_many``
(what a worker runs), against a plain torch loop (optimizer.step(), then scheduler.step()),
across a checkpoint and restore in the middle; and a batched step of sessions at different
points of their schedules equals their separate steps."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
import torch
from torch.optim import lr_scheduler

from service.engine import batching, specs
from service.engine.limits import DEFAULT_LIMITS
from service.errors import GradsvcError
from service.store.memory import MemoryStore
from service.workers.jobs import Answer, RunJob
from service.workers.sessions import Sessions

OWNER = "o"
STEPS, RESTORE_AT = 12, 5
SGD = {"type": "sgd", "lr": 0.1, "momentum": 0.9}
ADAM = {"type": "adam", "lr": 0.01}

# (scheduler spec, optimizer spec, torch class and arguments): all seven, each with a change
# of lr within a dozen steps; onecycle on Adam cycles beta1, on SGD the momentum.
CASES: dict[str, tuple[dict[str, Any], dict[str, Any], Any, dict[str, Any]]] = {
    "step": ({"type": "step", "step_size": 3, "gamma": 0.5}, SGD, lr_scheduler.StepLR, {}),
    "multistep": (
        {"type": "multistep", "milestones": [2, 7, 7]},
        SGD,
        lr_scheduler.MultiStepLR,
        {},
    ),
    "exponential": ({"type": "exponential", "gamma": 0.8}, SGD, lr_scheduler.ExponentialLR, {}),
    "cosine": (
        {"type": "cosine", "T_max": 8, "eta_min": 0.001},
        SGD,
        lr_scheduler.CosineAnnealingLR,
        {},
    ),
    "linear": ({"type": "linear", "total_iters": 6}, SGD, lr_scheduler.LinearLR, {}),
    "onecycle": (
        {"type": "onecycle", "max_lr": 0.05, "total_steps": STEPS, "three_phase": True},
        ADAM,
        lr_scheduler.OneCycleLR,
        {},
    ),
    "onecycle_sgd": (
        {"type": "onecycle", "max_lr": 0.2, "epochs": 3, "steps_per_epoch": 4},
        SGD,
        lr_scheduler.OneCycleLR,
        {},
    ),
    "cosine_warm_restarts": (
        {"type": "cosine_warm_restarts", "T_0": 2, "T_mult": 2, "eta_min": 0.01},
        SGD,
        lr_scheduler.CosineAnnealingWarmRestarts,
        {},
    ),
}


def model_spec() -> dict[str, Any]:
    weight = [[0.5, -0.25, 0.125], [-0.5, 0.75, 0.25]]
    return {
        "type": "linear",
        "in_features": 3,
        "out_features": 2,
        "dtype": "float64",
        "params": {"weight": {"value": weight}, "bias": {"value": [0.1, -0.2]}},
    }


def batch(step: int) -> tuple[list[list[float]], list[list[float]]]:
    gen = torch.Generator().manual_seed(step)
    x = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(4, 2, generator=gen, dtype=torch.float64)
    return x.tolist(), y.tolist()


def step_job(sid: str, step: int) -> RunJob:
    x, y = batch(step)
    request = specs.SessionGradientsRequest.model_construct(
        batch=specs.Batch.model_construct(x=x, y=y), encoding="list", explain=False
    )
    return RunJob("step", OWNER, sid, request)


def body(result: Answer | GradsvcError) -> dict[str, Any]:
    assert isinstance(result, Answer), result
    return dict(orjson.loads(result.body))


def create(sessions: Sessions, sid: str, scheduler: Any, optimizer: Any) -> None:
    spec = {"model": model_spec(), "loss": "mse", "optimizer": optimizer, "scheduler": scheduler}
    answer = sessions.create(OWNER, sid, specs.SessionCreate.model_validate(spec), None)
    assert answer.status == 201


def torch_run(name: str) -> list[tuple[dict[str, torch.Tensor], float]]:
    """Parameters and get_last_lr() after each step, in a plain torch loop."""
    scheduler_spec, optimizer_spec, cls, _ = CASES[name]
    weight = torch.tensor(model_spec()["params"]["weight"]["value"], dtype=torch.float64)
    bias = torch.tensor(model_spec()["params"]["bias"]["value"], dtype=torch.float64)
    params = [torch.nn.Parameter(weight), torch.nn.Parameter(bias)]
    hyper = {k: v for k, v in optimizer_spec.items() if k != "type"}
    optimizer_cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}[optimizer_spec["type"]]
    optimizer = optimizer_cls(params, **hyper)
    scheduler = cls(optimizer, **{k: v for k, v in scheduler_spec.items() if k != "type"})
    out = []
    for step in range(STEPS):
        x, y = (torch.tensor(t, dtype=torch.float64) for t in batch(step))
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(torch.nn.functional.linear(x, *params), y).backward()
        optimizer.step()
        scheduler.step()
        named = {"weight": params[0].detach().clone(), "bias": params[1].detach().clone()}
        out.append((named, scheduler.get_last_lr()[0]))
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_a_scheduled_session_steps_as_torch_does(name: str) -> None:
    want = torch_run(name)
    sessions = Sessions(MemoryStore(), DEFAULT_LIMITS, 0)
    scheduler_spec, optimizer_spec, _, _ = CASES[name]
    create(sessions, "s_a", scheduler_spec, optimizer_spec)
    sid = "s_a"
    for step in range(STEPS):
        if step == RESTORE_AT:  # a checkpoint, restored as a new session, goes on from there
            data, _ = sessions.checkpoint(OWNER, sid)
            sessions.cache.drop((OWNER, sid))
            assert sessions.restore(OWNER, "s_b", data, None).status == 201
            sid = "s_b"
        got = body(sessions.run_many([step_job(sid, step)])[0])
        params, lr = want[step]
        assert got["lr"] == lr, f"step {step + 1}: lr {got['lr']} is not torch's {lr}"
        for key, value in params.items():
            torch.testing.assert_close(
                torch.tensor(got["params"][key], dtype=torch.float64), value, atol=1e-12, rtol=0
            )
    view = body(sessions.read(OWNER, sid))
    assert view["lr"] == want[-1][1] and view["scheduler"]["type"] == scheduler_spec["type"]
    rows = sessions.history(OWNER, sid, 100, 0)
    assert [r.lr for r in rows] == [lr for _, lr in want[RESTORE_AT:]]


def test_batched_sessions_at_other_points_of_their_schedules_equal_their_own_steps(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    groups: list[int] = []
    real = batching.run_group

    def counted(*args: Any) -> Any:
        groups.append(len(args[2]))
        return real(*args)

    monkeypatch.setattr(batching, "run_group", counted)
    scheduler = {"type": "exponential", "gamma": 0.5}
    together, alone = (
        Sessions(MemoryStore(), DEFAULT_LIMITS, 0),
        Sessions(MemoryStore(), DEFAULT_LIMITS, 0, batching=False),
    )
    ids = ["s_0", "s_1", "s_2", "s_3"]
    for sessions in (together, alone):
        for sid in ids:
            create(sessions, sid, scheduler, SGD)
        for ahead in ("s_1", "s_3"):  # two steps further on in their schedules
            for step in range(2):
                body(sessions.run_many([step_job(ahead, step)])[0])
    for step in range(2, 5):
        jobs = [step_job(sid, step) for sid in ids]
        batched = together.run_many(jobs)
        separate = [alone.run_many([job])[0] for job in jobs]
        for sid, got, want in zip(ids, map(body, batched), map(body, separate), strict=True):
            assert got["lr"] == want["lr"], sid
            for key in want["params"]:
                torch.testing.assert_close(
                    torch.tensor(got["params"][key]),
                    torch.tensor(want["params"][key]),
                    atol=1e-12,
                    rtol=0,
                    msg=lambda m, sid=sid: f"{sid}: {m}",
                )
    # The same lr batched together, another lr kept apart: two groups of two each call.
    assert groups == [2, 2] * 3
