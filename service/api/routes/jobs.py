"""Training jobs: many steps on one session, with live progress (Server-Sent Events).

A job lives in the worker of its session; this process remembers which session each job it
started belongs to (so it can route to it) and the last state it saw (so that a job whose
worker died is reported failed, not forgotten). Jobs are therefore visible on the replica
that started them.
"""

from __future__ import annotations

import asyncio
import secrets
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Body, Depends, Path, Request, Response
from fastapi.responses import StreamingResponse

from service.api import schemas
from service.api.auth import PrincipalDep
from service.api.deps import InFlightDep, PoolDep
from service.api.idempotency import IdemDep
from service.api.problems import responses
from service.api.responses import FastJSONRoute, respond
from service.api.routes.sessions import SessionId, checked
from service.engine import specs
from service.errors import GradsvcError, NotFound, Unavailable
from service.workers.pool import WorkerPool

router = APIRouter(tags=["jobs"], route_class=FastJSONRoute)
JobId = Annotated[str, Path(description="a job id, as returned by POST .../train")]
POLL_SECONDS = 0.1
KEEPALIVE_SECONDS = 15.0
REMEMBERED = 10_000
FINISHED = ("succeeded", "failed", "cancelled")


@dataclass
class Known:
    owner: str
    session: str
    last: dict[str, Any]


class Jobs:
    """The jobs this process started: job id → its owner, session and last seen state."""

    def __init__(self) -> None:
        self.known: OrderedDict[str, Known] = OrderedDict()

    def add(self, owner: str, view: dict[str, Any]) -> None:
        self.known[view["id"]] = Known(owner, view["session"], view)
        while len(self.known) > REMEMBERED:
            self.known.popitem(last=False)

    async def view(self, pool: WorkerPool, owner: str, job_id: str, op: str = "job") -> Any:
        known = self.known.get(job_id)
        if known is None or known.owner != owner:
            raise NotFound(f"no job {job_id}")
        try:
            view = await pool.call(op, owner, job_id, key=known.session)
        except NotFound:  # its worker restarted: what was committed stays, the job is over
            view = known.last
            if view["status"] not in FINISHED:
                view = {
                    **view,
                    "status": "failed",
                    "error": {
                        "type": "unavailable",
                        "title": "Service unavailable",
                        "status": 503,
                        "detail": "the worker running this job stopped; the session keeps "
                        "its last completed step",
                    },
                }
        known.last = view
        return view


async def _jobs(request: Request) -> Jobs:
    jobs: Jobs = request.app.state.jobs
    return jobs


JobsDep = Annotated[Jobs, Depends(_jobs)]


@router.post(
    "/v1/sessions/{session_id}/train",
    status_code=202,
    response_model=schemas.Job,
    responses=responses(400, 404, 409, 422, 503, 504, 507),
    summary="Start a training job: epochs of mini-batch steps, each one committed",
    description=(
        "Answers 202 at once with the job and `Location: /v1/jobs/{id}`. The job runs in the "
        "session's worker, commits every mini-batch (so a crash or a cancel leaves the session "
        "at its last completed step), and holds the session: other steps, patches and deletes "
        "get 409 naming the job until it ends. It goes on if the client goes away."
    ),
)
async def train(
    request: Request,
    session_id: SessionId,
    body: Annotated[specs.TrainRequest, Body(openapi_examples=schemas.TRAIN_EXAMPLES)],
    owner: PrincipalDep,
    idem: IdemDep,
    pool: PoolDep,
    inflight: InFlightDep,
    jobs: JobsDep,
) -> Response:
    job_id = "j_" + secrets.token_urlsafe(16)
    async with inflight.hold(idem):
        answer = await pool.call(
            "train", owner, checked(session_id), job_id, body, idem, key=session_id
        )
    jobs.add(owner, orjson.loads(answer.body))
    if not answer.replayed:
        request.app.state.metrics.jobs.labels("started").inc()
    return respond(answer)


@router.get(
    "/v1/jobs/{job_id}",
    response_model=schemas.Job,
    responses=responses(404, 503),
    summary="A training job's state and progress",
)
async def job(job_id: JobId, owner: PrincipalDep, pool: PoolDep, jobs: JobsDep) -> Any:
    return await jobs.view(pool, owner, job_id)


@router.delete(
    "/v1/jobs/{job_id}",
    response_model=schemas.Job,
    responses=responses(404, 503),
    summary="Cancel a training job; the session keeps its last completed step",
)
async def cancel(job_id: JobId, owner: PrincipalDep, pool: PoolDep, jobs: JobsDep) -> Any:
    return await jobs.view(pool, owner, job_id, op="cancel")


@router.get(
    "/v1/jobs/{job_id}/events",
    responses={
        200: {
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
            "description": (
                "`event: progress` (the job, as GET /v1/jobs/{id} gives it) whenever it has "
                "moved, at most ten a second; then one `event: end` with the final job. "
                "`id` is the number of steps done."
            ),
        },
        **responses(404, 503),
    },
    response_class=StreamingResponse,
    summary="Follow a training job: Server-Sent Events",
)
async def events(
    job_id: JobId, owner: PrincipalDep, pool: PoolDep, jobs: JobsDep
) -> StreamingResponse:
    first = await jobs.view(pool, owner, job_id)  # 404 before the stream starts

    async def stream() -> AsyncIterator[bytes]:
        view: dict[str, Any] = first
        sent: tuple[Any, ...] | None = None
        quiet = 0.0
        while True:
            moved = (view["status"], view["steps_done"])
            if view["status"] in FINISHED:
                yield _event("end", view)
                return
            if moved != sent:
                yield _event("progress", view)
                sent, quiet = moved, 0.0
            elif quiet >= KEEPALIVE_SECONDS:
                yield b": keep-alive\n\n"
                quiet = 0.0
            await asyncio.sleep(POLL_SECONDS)
            quiet += POLL_SECONDS
            try:
                view = await jobs.view(pool, owner, job_id)
            except (Unavailable, GradsvcError):
                continue  # a full queue or a restart: try again at the next tick

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)


def _event(name: str, view: dict[str, Any]) -> bytes:
    return b"event: %s\nid: %d\ndata: %s\n\n" % (
        name.encode(),
        view["steps_done"],
        orjson.dumps(view),
    )
