"""Sessions: the notebook's w kept on the server, with its optimizer state, durably."""

from __future__ import annotations

import base64
import binascii
import json
import math
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Header, Path, Query, Request, Response

from service.api import schemas
from service.api.auth import PrincipalDep
from service.api.deps import InFlightDep, LocksDep, PoolDep, SessionsDep
from service.api.idempotency import IdemDep, InFlight
from service.api.ordering import SessionLocks
from service.api.problems import responses
from service.api.responses import FastJSONRoute, respond
from service.engine import specs
from service.engine.specs import Kind
from service.errors import InvalidInput, NotFound
from service.workers.pool import ComputePool
from service.workers.sessions import Idem, Sessions, etag, iso

router = APIRouter(prefix="/v1/sessions", tags=["sessions"], route_class=FastJSONRoute)
SessionId = Annotated[str, Path(description="a session id, as returned by POST /v1/sessions")]
IfMatch = Annotated[
    str | None,
    Header(alias="If-Match", description="the ETag you read: 412 if the session moved since"),
]
ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
MAX_PAGE = 500


def _checked(session_id: str) -> str:
    # An id that cannot exist is simply not found: no hint about the format, no path games.
    if not 1 <= len(session_id) <= 64 or not set(session_id) <= ID_CHARS:
        raise NotFound(f"no session {session_id[:64]}")
    return session_id


def _cursor(value: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


def _uncursor(cursor: str) -> Any:
    try:
        if len(cursor) > 512:
            raise ValueError("too long")
        return json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (binascii.Error, ValueError, UnicodeDecodeError, RecursionError):
        raise _bad_cursor() from None


def _bad_cursor() -> InvalidInput:
    return InvalidInput("cursor is not one this service gave out", loc=("query", "cursor"))


COMMON = responses(400, 404, 409, 412, 422, 503)
CHECKPOINT_MEDIA = "application/octet-stream"


@router.post(
    "",
    status_code=201,
    response_model=schemas.Session,
    responses=COMMON,
    summary="Create a session",
)
async def create(
    body: Annotated[specs.SessionCreate, Body(openapi_examples=schemas.SESSION_EXAMPLES)],
    owner: PrincipalDep,
    idem: IdemDep,
    sessions: SessionsDep,
    pool: PoolDep,
    inflight: InFlightDep,
) -> Response:
    async with inflight.hold(idem):
        return respond(await pool.run(sessions.create, owner, body, idem))


@router.post(
    "/restore",
    status_code=201,
    response_model=schemas.Session,
    responses=responses(400, 404, 409, 413, 422, 503),
    summary="A new session from a checkpoint file",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {CHECKPOINT_MEDIA: {"schema": {"type": "string", "format": "binary"}}},
        }
    },
)
async def restore(
    request: Request,
    owner: PrincipalDep,
    idem: IdemDep,
    sessions: SessionsDep,
    pool: PoolDep,
    inflight: InFlightDep,
) -> Response:
    data = await request.body()
    async with inflight.hold(idem):
        return respond(await pool.run(sessions.restore, owner, data, idem))


@router.get(
    "", response_model=schemas.SessionList, responses=responses(422, 503), summary="List sessions"
)
async def list_sessions(
    owner: PrincipalDep,
    sessions: SessionsDep,
    pool: PoolDep,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
    cursor: str | None = None,
) -> dict[str, Any]:
    after = None
    if cursor is not None:
        value = _uncursor(cursor)
        if not (
            isinstance(value, list)
            and len(value) == 2
            and isinstance(value[0], int | float)
            and not isinstance(value[0], bool)
            and math.isfinite(value[0])
            and isinstance(value[1], str)
        ):
            raise _bad_cursor()
        after = (float(value[0]), value[1])
    items, last = await pool.run(sessions.page, owner, limit, after)
    return {"items": items, "next": _cursor([last.created_at, last.id]) if last else None}


@router.get(
    "/{session_id}",
    response_model=schemas.Session,
    responses=responses(404, 503),
    summary="A session",
)
async def get(
    session_id: SessionId, owner: PrincipalDep, sessions: SessionsDep, pool: PoolDep
) -> Response:
    return respond(await pool.run(sessions.read, owner, _checked(session_id)))


@router.patch(
    "/{session_id}",
    response_model=schemas.Session,
    responses=COMMON,
    summary="Rename, change optimizer hyper-parameters, or set parameter values",
)
async def patch(
    session_id: SessionId,
    body: specs.SessionPatch,
    owner: PrincipalDep,
    sessions: SessionsDep,
    pool: PoolDep,
    locks: LocksDep,
    if_match: IfMatch = None,
) -> Response:
    async with locks.hold(_checked(session_id)):
        return respond(await pool.run(sessions.patch, owner, session_id, body, if_match))


@router.delete(
    "/{session_id}", status_code=204, responses=responses(404, 503), summary="Delete a session"
)
async def delete(
    session_id: SessionId, owner: PrincipalDep, sessions: SessionsDep, pool: PoolDep
) -> Response:
    if not await pool.run(sessions.store.delete, owner, _checked(session_id)):
        raise NotFound(f"no session {session_id}")
    return Response(status_code=204)


class SessionCall:
    """A step, gradients or forward on one session: one at a time per session, in arrival
    order, and one request per Idempotency-Key at a time."""

    def __init__(
        self,
        owner: str,
        idem: Idem | None,
        sessions: Sessions,
        pool: ComputePool,
        locks: SessionLocks,
        inflight: InFlight,
    ) -> None:
        self.owner, self.idem, self.sessions = owner, idem, sessions
        self.pool, self.locks, self.inflight = pool, locks, inflight

    async def __call__(
        self,
        kind: Kind,
        session_id: str,
        body: specs.SessionBatchRequest,
        if_match: str | None = None,
    ) -> Response:
        async with self.inflight.hold(self.idem), self.locks.hold(_checked(session_id)):
            answer = await self.pool.run(
                self.sessions.run, kind, self.owner, session_id, body, self.idem, if_match
            )
        return respond(answer)


async def _session_call(
    owner: PrincipalDep,
    idem: IdemDep,
    sessions: SessionsDep,
    pool: PoolDep,
    locks: LocksDep,
    inflight: InFlightDep,
) -> SessionCall:
    return SessionCall(owner, idem, sessions, pool, locks, inflight)


SessionCallDep = Annotated[SessionCall, Depends(_session_call)]
StepBody = Annotated[
    specs.SessionGradientsRequest, Body(openapi_examples=schemas.SESSION_STEP_EXAMPLES)
]


@router.post(
    "/{session_id}/step",
    response_model=schemas.SessionStepResponse,
    response_model_exclude_none=True,
    responses=COMMON,
    summary="One optimizer step on the session's state, committed before the answer",
)
async def step(
    session_id: SessionId, body: StepBody, call: SessionCallDep, if_match: IfMatch = None
) -> Response:
    return await call("step", session_id, body, if_match)


@router.post(
    "/{session_id}/gradients",
    response_model=schemas.GradientsResponse,
    response_model_exclude_none=True,
    responses=COMMON,
    summary="Loss and dL/dθ at the session's parameters; nothing changes",
)
async def session_gradients(
    session_id: SessionId, body: StepBody, call: SessionCallDep
) -> Response:
    return await call("gradients", session_id, body)


@router.post(
    "/{session_id}/forward",
    response_model=schemas.ForwardResponse,
    responses=COMMON,
    summary="The session's model on a batch",
)
async def session_forward(
    session_id: SessionId,
    body: Annotated[
        specs.SessionBatchRequest,
        Body(openapi_examples={"first": {"summary": "ŷ at x = 1", "value": {"batch": {"x": 1}}}}),
    ],
    call: SessionCallDep,
) -> Response:
    return await call("forward", session_id, body)


@router.get(
    "/{session_id}/history",
    response_model=schemas.History,
    responses=responses(404, 422, 503),
    summary="Loss and gradient norm of every step, oldest first",
)
async def history(
    session_id: SessionId,
    owner: PrincipalDep,
    sessions: SessionsDep,
    pool: PoolDep,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
    cursor: str | None = None,
) -> dict[str, Any]:
    after = 0
    if cursor is not None:
        value = _uncursor(cursor)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise _bad_cursor()
        after = value
    await pool.run(sessions.fetch, owner, _checked(session_id))
    rows = await pool.run(sessions.store.history, owner, session_id, limit + 1, after)
    items = [
        {"step": r.step, "loss": r.loss, "grad_norm": r.grad_norm, "at": iso(r.at)}
        for r in rows[:limit]
    ]
    return {"items": items, "next": _cursor(rows[limit - 1].step) if len(rows) > limit else None}


@router.get(
    "/{session_id}/checkpoint",
    responses={
        200: {
            "content": {CHECKPOINT_MEDIA: {"schema": {"type": "string", "format": "binary"}}},
            "description": "a safetensors file: parameters, optimizer state, specs in its metadata",
        },
        **responses(404, 503),
    },
    response_class=Response,
    summary="Download the session as a safetensors file",
)
async def checkpoint(
    session_id: SessionId, owner: PrincipalDep, sessions: SessionsDep, pool: PoolDep
) -> Response:
    data, record = await pool.run(sessions.checkpoint, owner, _checked(session_id))
    filename = f"{record.id}-step{record.step}.safetensors"
    return Response(
        data,
        media_type=CHECKPOINT_MEDIA,
        headers={
            "ETag": etag(record),
            "Content-Disposition": f'attachment; filename="{filename}"',
        },
    )
