"""Training jobs: many steps on one session, with live progress (Server-Sent Events).

Jobs live in the store, not in one process (``service.workers.training``): any replica
answers GET and DELETE of a job and follows its events, a job holds its session on every
replica, and a job whose runner died is resumed by another worker.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Body, Depends, Path, Request, Response
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from service.api import schemas
from service.api.auth import PrincipalDep
from service.api.deps import InFlightDep, PoolDep
from service.api.idempotency import IdemDep
from service.api.jobfeed import Feeds, JobBoard
from service.api.problems import responses
from service.api.responses import FastJSONRoute, respond
from service.api.routes.sessions import SessionId, checked
from service.engine import specs

router = APIRouter(tags=["jobs"], route_class=FastJSONRoute)
JobId = Annotated[str, Path(description="a job id, as returned by POST .../train")]


async def _board(request: Request) -> JobBoard:
    board: JobBoard = request.app.state.jobs
    return board


async def _feeds(request: Request) -> Feeds:
    feeds: Feeds = request.app.state.feeds
    return feeds


JobsDep = Annotated[JobBoard, Depends(_board)]
FeedsDep = Annotated[Feeds, Depends(_feeds)]


@router.post(
    "/v1/sessions/{session_id}/train",
    status_code=202,
    response_model=schemas.Job,
    responses=responses(400, 404, 409, 422, 503, 504, 507),
    operation_id="trainSession",
    summary="Start a training job: epochs of mini-batch steps, each one committed",
    description=(
        "Answers 202 at once with the job and `Location: /v1/jobs/{id}`. The job is kept in the "
        "store and run by any live worker of any replica; it commits every mini-batch (so a "
        "crash or a cancel leaves the session at its last completed step, and a job whose "
        "runner died is resumed from there), and holds the session on every replica: other "
        "steps, patches and deletes get 409 `session-busy` naming the job until it ends. It "
        "goes on if the client goes away. A key may have `--max-jobs-per-key` jobs queued or "
        "running (default 4), and an active job's dataset counts in the key's stored bytes "
        "(`--max-stored-bytes-per-key`): over either, 429 `quota-exceeded`."
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
) -> Response:
    job_id = "j_" + secrets.token_urlsafe(16)
    async with inflight.hold(idem):
        answer = await pool.train(owner, checked(session_id), job_id, body, idem)
    if not answer.replayed:
        request.app.state.metrics.jobs.labels("started").inc()
    return respond(answer)


@router.get(
    "/v1/jobs/{job_id}",
    response_model=schemas.Job,
    responses=responses(404, 503),
    operation_id="getJob",
    summary="A training job's state and progress",
    description=(
        "The same on every replica: `status`, `progress` (0..1), the epoch and steps done, "
        "the last mini-batch's loss, and `error` (a problem) if it failed."
    ),
)
async def job(job_id: JobId, owner: PrincipalDep, jobs: JobsDep) -> Any:
    return await jobs.get(owner, job_id)


@router.delete(
    "/v1/jobs/{job_id}",
    response_model=schemas.Job,
    responses=responses(404, 503),
    operation_id="cancelJob",
    summary="Cancel a training job; the session keeps its last completed step",
    description=(
        "Stops the job on whichever replica runs it and releases its session, which keeps "
        "the last committed mini-batch. A job that has ended already is answered as it is."
    ),
)
async def cancel(job_id: JobId, owner: PrincipalDep, jobs: JobsDep) -> Any:
    return await jobs.cancel(owner, job_id)


@router.get(
    "/v1/jobs/{job_id}/events",
    responses={
        200: {
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
            "description": (
                "`event: progress` (the job, as GET /v1/jobs/{id} gives it) whenever it has "
                "moved, at most ten a second; then one `event: end` with the final job "
                "(status `interrupted` if this server shuts down while the job goes on "
                "elsewhere). `id` is the number of steps done."
            ),
        },
        **responses(404, 503),
    },
    response_class=StreamingResponse,
    operation_id="followJobEvents",
    summary="Follow a training job: Server-Sent Events",
    description=(
        "A key may have `--max-streams-per-key` streams open on one server (default 16): "
        "one more is a 429 `quota-exceeded` before it starts; a stream stops counting when "
        "it ends or its client goes away."
    ),
)
async def events(
    job_id: JobId, owner: PrincipalDep, jobs: JobsDep, feeds: FeedsDep
) -> StreamingResponse:
    first = await jobs.get(owner, job_id)  # 404 before the stream starts
    release = feeds.admit(owner)  # and 429 over the key's streams

    async def stream() -> AsyncIterator[bytes]:
        sent: tuple[Any, ...] | None = None
        async for view in feeds.follow(owner, first):
            if view is None:
                yield b": keep-alive\n\n"
            elif view["status"] not in ("queued", "running"):
                yield _event("end", view)
            elif (moved := (view["status"], view["steps_done"])) != sent:
                yield _event("progress", view)
                sent = moved

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return _Counted(release, stream(), media_type="text/event-stream", headers=headers)


class _Counted(StreamingResponse):
    """A stream that is taken off its key's count when it is over: ended, failed, or its
    client gone (then Starlette cancels it). The response's own call, not the body's
    generator, releases it: a generator cancelled before its first step runs no cleanup."""

    def __init__(self, release: Callable[[], None], *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.release()


def _event(name: str, view: dict[str, Any]) -> bytes:
    return b"event: %s\nid: %d\ndata: %s\n\n" % (
        name.encode(),
        view["steps_done"],
        orjson.dumps(view),
    )
