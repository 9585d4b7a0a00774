"""The sessions runner with batching on equals it with batching off: the random mixed specs
of the engine's batching test, through ``Sessions.run_many`` (what a worker runs for a batch
of requests, or for ``POST /v1/sessions/step``) against each job run alone, with commits."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
import torch

from service.engine import batching, specs
from service.errors import GradsvcError
from service.store.memory import MemoryStore
from service.workers.jobs import Answer, RunJob
from service.workers.sessions import Sessions
from tests.engine.test_batching import AMPLIFIED, NORMALISING, TOLERANCE, make_batches, make_case

CASES = 200
OWNER = "o"


def runner(batching: bool) -> Sessions:
    return Sessions(MemoryStore(), specs_limits(), 0, batching=batching)


def specs_limits() -> Any:
    from service.engine.limits import DEFAULT_LIMITS

    return DEFAULT_LIMITS


def compare(got: Any, want: Any, tol: float, where: str) -> None:
    if isinstance(want, dict):
        assert got.keys() == want.keys(), where
        for key in want:
            compare(got[key], want[key], tol, f"{where}.{key}")
    elif isinstance(want, list) and any(isinstance(v, str | dict | None) for v in want):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            compare(g, w, tol, f"{where}[{i}]")
    elif isinstance(want, int | float | list) and not isinstance(want, bool):
        torch.testing.assert_close(
            torch.tensor(got, dtype=torch.float64),
            torch.tensor(want, dtype=torch.float64),
            atol=tol,
            rtol=tol,
            msg=lambda m: f"{where}: {m}",
        )
    else:
        assert got == want, where


def body(result: Answer | GradsvcError) -> Any:
    if isinstance(result, GradsvcError):
        return {"problem": result.type}
    return orjson.loads(result.body)


@pytest.mark.parametrize("block", range(4))
def test_batched_runs_equal_single_runs(block: int, monkeypatch: pytest.MonkeyPatch) -> None:
    grouped: list[int] = []
    real = batching.run_group

    def counted(*args: Any) -> Any:
        grouped.append(len(args[2]))
        return real(*args)

    monkeypatch.setattr(batching, "run_group", counted)
    for index in range(block * CASES // 4, (block + 1) * CASES // 4):
        case = make_case(index)
        together, alone = runner(True), runner(False)
        ids = [f"s_{index}_{i}" for i in range(len(case.specs))]
        for sid, spec in zip(ids, case.specs, strict=True):
            create = specs.SessionCreate.model_validate(spec.model_dump())
            together.create(OWNER, sid, create, None)
            alone.create(OWNER, sid, create, None)
        optimizer = case.specs[0].optimizer.type
        amplified = case.kind == "step" and optimizer in NORMALISING
        tol = (AMPLIFIED if amplified else TOLERANCE)[case.dtype]
        for call in range(3):
            jobs = [
                RunJob(
                    case.kind,
                    OWNER,
                    sid,
                    specs.SessionGradientsRequest.model_construct(
                        batch=specs.Batch.model_construct(x=x, y=y), encoding="list", explain=False
                    ),
                )
                for sid, (x, y) in zip(ids, make_batches(case, call), strict=True)
            ]
            batched = together.run_many(jobs)
            singles = [alone.run_many([job])[0] for job in jobs]
            for sid, got, want in zip(ids, batched, singles, strict=True):
                compare(body(got), body(want), tol, f"case {index} call {call} {sid}")
        for sid in ids:
            got, want = together.read(OWNER, sid), alone.read(OWNER, sid)
            a, b = orjson.loads(got.body), orjson.loads(want.body)
            for drop in ("created_at", "updated_at"):
                a.pop(drop), b.pop(drop)
            compare(a, b, tol, f"case {index} {sid} after")
    assert sum(grouped) > CASES // 4, "the batched runner should have batched"
