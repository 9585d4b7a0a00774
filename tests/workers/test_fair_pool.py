"""Fair sharing against real workers: a key's backlog, its overrunning computation and its
in-flight count do not cost another key its requests.

Each test drives the pool itself (the API's routes call nothing else) with two owners:
Bob attacks, Alice makes ordinary requests. The assertions are counts and statuses, never
timings; the timeouts are small so that the attacks are quick."""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from service.config import Settings
from service.engine import specs
from service.errors import ComputeTimeout, GradsvcError, TooManyRequests
from service.workers.jobs import Answer, RunJob, new_id
from service.workers.pool import WorkerPool
from tests.conftest import SEED_STEP

SEED_SESSION = specs.SessionCreate.model_validate(
    {k: SEED_STEP[k] for k in ("model", "loss", "optimizer")}
)
STEP = specs.SessionGradientsRequest.model_validate({"batch": {"x": 1, "y": 3}})


def heavy(layers: int, rows: int, width: int = 512) -> specs.ForwardRequest:
    """Gradients of a deep MLP on ``rows`` rows: seconds of compute, little memory."""
    x = np.ones((rows, width), dtype=np.float32)
    y = np.zeros((rows, 1), dtype=np.float32)
    linear = {"type": "linear", "in_features": width, "out_features": width}
    body = {
        "model": {
            "type": "sequential",
            "layers": [linear] * layers + [{**linear, "out_features": 1}],
        },
        "loss": "mse",
        "encoding": "b64",  # the gradients' answer within the answer budget
        "batch": {
            "x": {"dtype": "float32", "shape": [rows, width], "b64": base64.b64encode(x).decode()},
            "y": {"dtype": "float32", "shape": [rows, 1], "b64": base64.b64encode(y).decode()},
        },
    }
    return specs.GradientsRequest.model_validate(body)


async def started(pool: WorkerPool) -> None:
    """Until the one worker says it is computing something."""
    handle = pool.workers[0]
    while not handle.current:
        await asyncio.sleep(0.01)


def pool_with(tmp_path: Path, **options: Any) -> Callable[[], AsyncIterator[WorkerPool]]:
    settings = Settings(
        store=f"sqlite:///{tmp_path / 'fair.db'}",
        devices="cpu",
        workers_per_device=1,
        api_keys="alice-key,bob-key",
        **options,
    )

    async def opened() -> AsyncIterator[WorkerPool]:
        pool = WorkerPool(settings)
        await pool.start()
        try:
            assert await pool.wait_ready(120)
            yield pool
        finally:
            await pool.close()

    return opened


def run(main: Callable[[WorkerPool], Awaitable[None]], opened: Any) -> None:
    async def go() -> None:
        async for pool in opened():
            await main(pool)

    asyncio.run(go())


async def session(pool: WorkerPool, owner: str) -> str:
    session_id = new_id()
    assert (await pool.create(owner, session_id, SEED_SESSION, None)).status == 201
    return session_id


def step_of(answer: Answer) -> int:
    return int(orjson.loads(answer.body)["step"])


def test_an_overrunning_computation_recycles_its_worker_and_the_queue_behind_it_runs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Bob's computation runs past the timeout: it alone is answered 504, the worker is
    recycled with Bob's key in the log (the count has no key label), and Alice's step,
    queued behind it, runs on the restarted worker."""

    async def main(pool: WorkerPool) -> None:
        alice = await session(pool, "alice")
        bob = asyncio.create_task(pool.stateless("bob", "gradients", heavy(36, 6000), None))
        await started(pool)
        answers = await asyncio.gather(
            *(pool.run(RunJob("step", "alice", alice, STEP)) for _ in range(3)),
            return_exceptions=True,
        )
        with pytest.raises(ComputeTimeout, match="took longer"):
            await bob
        assert sorted(step_of(a) for a in answers if isinstance(a, Answer)) == [1, 2, 3], answers
        assert pool.workers[0].restarts == 1
        assert pool.recycled == 1

    with caplog.at_level(logging.WARNING, logger="gradsvc.pool"):
        run(main, pool_with(tmp_path, compute_timeout=0.5, batch_window_ms=0))
    assert any("computation of key bob" in r.getMessage() for r in caplog.records)


def test_a_request_still_queued_at_its_deadline_is_504_and_never_runs(tmp_path: Path) -> None:
    """Bob's slow steps on one session each finish within the timeout, one pass each; the
    ones that waited past their deadline are 504 without running: the session's history
    holds exactly the answered steps, and no worker was recycled."""

    async def main(pool: WorkerPool) -> None:
        bob = await session(pool, "bob")
        slow = specs.SessionCreate.model_validate(
            {
                "model": heavy(12, 8000, 256).model.model_dump(),
                "loss": "mse",
                "optimizer": {"type": "sgd", "lr": 0.0},
            }
        )
        assert (await pool.create("bob", bob + "x", slow, None)).status == 201
        request = specs.SessionGradientsRequest.model_validate(
            {"batch": heavy(12, 8000, 256).batch.model_dump(), "encoding": "b64"}
        )
        # 16 steps of one session, one pass each: however fast the machine, the last ones
        # wait several steps' time, past the timeout (which no one step comes near)
        answers = await asyncio.gather(
            *(pool.run(RunJob("step", "bob", bob + "x", request)) for _ in range(16)),
            return_exceptions=True,
        )
        done = [a for a in answers if isinstance(a, Answer)]
        late = [a for a in answers if isinstance(a, ComputeTimeout)]
        assert len(done) + len(late) == 16 and done, answers
        assert any("never started" in str(a) for a in late), answers
        history = await pool.history("bob", bob + "x", 100, 0)
        assert [row.step for row in history] == sorted(step_of(a) for a in done)
        assert pool.workers[0].restarts == 0 and not pool.recycled

    run(main, pool_with(tmp_path, compute_timeout=2.0, batch_window_ms=0))


def test_a_key_over_its_in_flight_limit_is_429_and_another_key_is_not(tmp_path: Path) -> None:
    async def main(pool: WorkerPool) -> None:
        alice, bob = await session(pool, "alice"), await session(pool, "bob")
        flood = [pool.run(RunJob("step", "bob", bob, STEP)) for _ in range(12)]
        answers = await asyncio.gather(
            *flood, pool.run(RunJob("step", "alice", alice, STEP)), return_exceptions=True
        )
        bobs, alices = answers[:-1], answers[-1]
        refused = [a for a in bobs if isinstance(a, TooManyRequests)]
        assert len(refused) == 12 - 4 and all(a.retry_after >= 1 for a in refused)
        assert sorted(step_of(a) for a in bobs if isinstance(a, Answer)) == [1, 2, 3, 4]
        assert isinstance(alices, Answer) and step_of(alices) == 1
        assert not pool.inflight  # every request let go of its place

    run(main, pool_with(tmp_path, max_inflight_per_key=4))


def _ok(answers: list[Answer | GradsvcError | BaseException]) -> int:
    return sum(isinstance(a, Answer) for a in answers)
