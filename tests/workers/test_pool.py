"""The pool's typed operations against real workers: ``step_many`` splits a request among
the workers that own its sessions and answers in request order."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson

from service.config import Settings
from service.engine import specs
from service.errors import GradsvcError, NotFound
from service.workers.jobs import Answer, RunJob, new_id
from service.workers.pool import WorkerPool
from tests.conftest import SEED_STEP

SEED_SESSION = {k: SEED_STEP[k] for k in ("model", "loss", "optimizer")}


def _step(answer: Answer | GradsvcError) -> int | GradsvcError:
    return orjson.loads(answer.body)["step"] if isinstance(answer, Answer) else answer


def test_step_many_answers_in_request_order_across_workers(tmp_path: Path) -> None:
    settings = Settings(store=f"sqlite:///{tmp_path / 'pool.db'}", devices="cpu")
    settings = settings.model_copy(update={"workers_per_device": 2})

    async def main() -> None:
        pool = WorkerPool(settings)
        await pool.start()
        try:
            assert await pool.wait_ready(120)
            owned: dict[int, list[str]] = {0: [], 1: []}
            while min(len(ids) for ids in owned.values()) < 2:
                session_id = new_id()
                owned[pool.route(session_id).index].append(session_id)
            ids = [*owned[0][:2], *owned[1][:2]]
            ids = [ids[0], ids[2], ids[1], ids[3]]  # the workers' sessions interleaved
            create = specs.SessionCreate.model_validate(SEED_SESSION)
            for session_id in ids:
                assert (await pool.create("o", session_id, create, None)).status == 201
            batch = specs.SessionGradientsRequest.model_validate({"batch": {"x": 1, "y": 3}})
            order = [*ids, ids[1], "s_missing", ids[1]]
            answers = await pool.step_many([RunJob("step", "o", s, batch) for s in order])
            steps = [_step(a) for a in answers]
            assert steps[:4] == [1, 1, 1, 1] and steps[4] == 2 and steps[6] == 3
            assert isinstance(steps[5], NotFound)
            assert len({await pool.ping(s) for s in ids}) == 2
        finally:
            await pool.close()

    asyncio.run(main())
