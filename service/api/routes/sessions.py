"""Sessions: the notebook's w kept on the server, with its optimizer state, durably."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from typing import Annotated, Any, Literal, cast

import orjson
from fastapi import APIRouter, Body, Depends, Path, Query, Request, Response

from service.api import cursors, schemas
from service.api.auth import PrincipalDep, principal
from service.api.cursors import ID_CHARS
from service.api.deps import InFlightDep, PoolDep, StoreDep
from service.api.idempotency import IdemDep, InFlight, bulk_item, item_key
from service.api.preconditions import IfMatchDep, NoIfMatchDep
from service.api.problems import problem_body, responses
from service.api.responses import FastJSONRoute, respond
from service.engine import specs
from service.engine.specs import Kind
from service.errors import GradsvcError, KeyReused, NotFound, TooLarge
from service.store import SessionStore
from service.workers.jobs import Answer, Idem, RunJob, etag, iso, new_id
from service.workers.pool import WorkerPool

log = logging.getLogger("gradsvc")
router = APIRouter(prefix="/v1/sessions", tags=["sessions"], route_class=FastJSONRoute)
SessionId = Annotated[str, Path(description="a session id, as returned by POST /v1/sessions")]
MAX_PAGE = 500


def checked(session_id: str) -> str:
    # An id that cannot exist is simply not found: no hint about the format, no path games.
    if not 1 <= len(session_id) <= 64 or not set(session_id) <= ID_CHARS:
        raise NotFound(f"no session {session_id[:64]}")
    return session_id


COMMON = responses(400, 404, 409, 412, 422, 503, 504, 507)
CHECKPOINT_MEDIA = "application/octet-stream"


@router.post(
    "",
    status_code=201,
    response_model=schemas.Session,
    responses=COMMON,
    operation_id="createSession",
    summary="Create a session",
    description=(
        "Builds the model, its parameters and the optimizer's state, and keeps them: 201 with "
        "`Location` and `ETag`, and the session at step 0. The seed example is the notebook's "
        "w = 1, squared loss and SGD with lr 0.1; step it with `POST /v1/sessions/{id}/step`. "
        "A key may hold `--max-sessions-per-key` sessions (else 429 `quota-exceeded`)."
    ),
)
async def create(
    body: Annotated[specs.SessionCreate, Body(openapi_examples=schemas.SESSION_EXAMPLES)],
    owner: PrincipalDep,
    idem: IdemDep,
    pool: PoolDep,
    inflight: InFlightDep,
) -> Response:
    session_id = new_id()  # made here, so that the session's own worker makes it
    async with inflight.hold(idem):
        return respond(await pool.create(owner, session_id, body, idem))


@router.post(
    "/restore",
    status_code=201,
    response_model=schemas.Session,
    responses=responses(400, 404, 409, 413, 422, 503, 507),
    operation_id="restoreSession",
    summary="A new session from a checkpoint file",
    description=(
        "The body is a safetensors file from `GET /v1/sessions/{id}/checkpoint` "
        "(`application/octet-stream`): a new session with its parameters, optimizer state, "
        "step and specs, each checked as if sent in JSON (a file that lies is a 422)."
    ),
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
    pool: PoolDep,
    inflight: InFlightDep,
) -> Response:
    data = await request.body()
    session_id = new_id()
    async with inflight.hold(idem):
        return respond(await pool.restore(owner, session_id, data, idem))


@router.post(
    "/step",
    response_model=schemas.SessionsStepResponse,
    response_model_exclude_none=True,
    responses=responses(400, 409, 422, 503, 504, 507),
    operation_id="stepSessions",
    summary="Many sessions, one step each, in one request",
    description=(
        "For services that train many small models: one round trip, one vectorised "
        "computation per model signature in each worker, one group commit. Items are answered "
        "in request order, each with its own `status`: 200 and the step's results (only those "
        "named in `include`), or a `problem`. Each item is applied exactly as its own "
        "`POST /v1/sessions/{id}/step` would be; several items for one session are applied "
        "in order. Exactly once under retries: send the request with an `Idempotency-Key` "
        "header (it covers the whole request: a retry gets every item as first answered, and "
        "another body under it is a 422), or give items an `idempotency_key` of their own "
        "(kept apart from request keys: an item key never takes a single step's record)."
    ),
)
async def step_many(
    body: Annotated[
        specs.SessionsStepRequest, Body(openapi_examples=schemas.SESSIONS_STEP_EXAMPLES)
    ],
    owner: PrincipalDep,
    idem: IdemDep,
    pool: PoolDep,
    inflight: InFlightDep,
    store: StoreDep,
    _: NoIfMatchDep,
) -> Response:
    async with inflight.hold(idem):
        if idem is not None and (stored := await _stored_request(store, idem)) is not None:
            return stored
        payload, replayed = await _step_items(body, owner, idem, pool)
        if idem is not None:
            await _remember_request(store, idem, payload)
    headers = {"Idempotent-Replayed": "true"} if replayed and idem else None
    return Response(payload, 200, headers, media_type="application/json")


async def _stored_request(store: SessionStore, idem: Idem) -> Response | None:
    """The whole answer stored under the request's header key, replayed; KeyReused if the
    key named another request (its stored record, or, if the first try died before storing
    it, its first item's)."""
    now = time.time()
    record = await asyncio.to_thread(store.idempotency, idem.owner, idem.key, now)
    if record is None:
        first = await asyncio.to_thread(store.idempotency, idem.owner, bulk_item(idem.key, 0), now)
        if first is not None and first.fingerprint != _bulk_fingerprint(idem, 0):
            raise _reused()
        return None
    if record.fingerprint != idem.fingerprint:
        raise _reused()
    items = orjson.loads(record.body)["items"]
    for item in items:  # every item is answered from the key, as first answered
        item["replayed"] = True
    return Response(
        orjson.dumps({"items": items}),
        record.status,
        {"Idempotent-Replayed": "true"},
        media_type="application/json",
    )


def _reused() -> KeyReused:
    return KeyReused(
        "this Idempotency-Key was used for a different request: in POST /v1/sessions/step "
        "it covers the whole body (items, include, encoding); use a new key for a new request"
    )


async def _remember_request(store: SessionStore, idem: Idem, payload: bytes) -> None:
    """Store the whole answer. The items are committed already, each under its own key, so
    if this fails a retry still applies nothing twice: it is logged, not answered."""
    record = idem.record(Answer(200, payload, {"Content-Type": "application/json"}))
    try:
        await asyncio.to_thread(store.remember, record)
    except GradsvcError as exc:
        log.warning("could not store a POST /v1/sessions/step answer: %s", exc.detail)


async def _step_items(
    body: specs.SessionsStepRequest, owner: str, idem: Idem | None, pool: WorkerPool
) -> tuple[bytes, bool]:
    """Every item stepped, in its session's worker: the answer's bytes, and whether every
    item was answered from its key."""
    answers: list[Answer | GradsvcError | None] = [None] * len(body.items)
    include = frozenset(body.include)
    jobs: dict[int, RunJob] = {}
    for i, item in enumerate(body.items):
        try:
            session_id = checked(item.session)
        except NotFound as exc:
            answers[i] = exc
            continue
        request = specs.SessionGradientsRequest.model_construct(
            batch=item.batch, encoding=body.encoding, explain=False
        )
        item_idem = _item_idem(owner, item, body, idem, i)
        jobs[i] = RunJob("step", owner, session_id, request, item_idem, include=include)
    results = await pool.step_many(list(jobs.values()))
    for i, result in zip(jobs, results, strict=True):
        answers[i] = result
    if all(isinstance(a, TooLarge) for a in answers):  # budgeted as a whole, and refused
        raise cast(TooLarge, answers[0])
    items = [
        _item(item.session, answer, include, i)
        for i, (item, answer) in enumerate(zip(body.items, answers, strict=True))
    ]
    replayed = all(isinstance(a, Answer) and a.replayed for a in answers)
    return orjson.dumps({"items": items}), replayed


def _item_idem(
    owner: str,
    item: specs.SessionsStepItem,
    body: specs.SessionsStepRequest,
    idem: Idem | None,
    index: int,
) -> Idem | None:
    """An item's own key (what it names: its session, its batch, and the request's
    ``include`` and ``encoding``, which shape its answer), or its place under the header key
    (named by the whole request and the index)."""
    if item.idempotency_key is not None:
        digest = hashlib.sha256(f"POST /v1/sessions/step item {item.session}\n".encode())
        digest.update(orjson.dumps(sorted(body.include)) + body.encoding.encode() + b"\n")
        digest.update(orjson.dumps(item.batch.model_dump(mode="json")))
        return Idem(owner, item_key(item.idempotency_key), digest.hexdigest())
    if idem is not None:
        return Idem(owner, bulk_item(idem.key, index), _bulk_fingerprint(idem, index))
    return None


def _bulk_fingerprint(idem: Idem, index: int) -> str:
    return hashlib.sha256(f"{idem.fingerprint}#{index}".encode()).hexdigest()


_INCLUDED = {"grad_norm": "loss"}  # "loss" brings the gradient norm along, as history does


def _item(
    session_id: str, answer: Answer | GradsvcError | None, include: frozenset[str], index: int
) -> dict[str, Any]:
    if isinstance(answer, Answer):
        full = orjson.loads(answer.body)
        out = {"session": session_id, "status": answer.status, "step": full["step"]}
        if "lr" in full:  # not in an answer stored under its key before steps carried lr
            out["lr"] = full["lr"]
        out.update((k, v) for k, v in full.items() if _INCLUDED.get(k, k) in include)
        if answer.replayed:
            out["replayed"] = True
        return out
    error = answer if answer is not None else GradsvcError("not computed")
    problem = problem_body(error, "items", index)
    return {"session": session_id, "status": error.status, "problem": problem}


@router.get(
    "",
    response_model=schemas.SessionList,
    responses=responses(422, 503),
    operation_id="listSessions",
    summary="List sessions",
    description=(
        "Summaries, newest last; `?include=params` adds each session's parameters, within "
        "the answer limit (`--max-answer-bytes`, else 422 `too-large`)."
    ),
)
async def list_sessions(
    owner: PrincipalDep,
    pool: PoolDep,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
    cursor: str | None = None,
    include: Annotated[
        Literal["params"] | None, Query(description="params: add each session's parameters")
    ] = None,
) -> Response:
    after = cursors.sessions_after(cursor)
    items, last = await pool.page(owner, limit, after, params=include == "params")
    body = {"items": items, "next": cursors.encode([last.created_at, last.id]) if last else None}
    return Response(orjson.dumps(body), media_type="application/json")


@router.get(
    "/{session_id}",
    response_model=schemas.Session,
    responses=responses(404, 503),
    operation_id="getSession",
    summary="A session",
    description=(
        "Its specs, device, step, version and current parameters, with its `ETag` (send it "
        "back as `If-Match` to step or patch only the state you read). Another key's session "
        "is a 404, as is one that does not exist."
    ),
)
async def get(session_id: SessionId, owner: PrincipalDep, pool: PoolDep) -> Response:
    return respond(await pool.read(owner, checked(session_id)))


@router.patch(
    "/{session_id}",
    response_model=schemas.Session,
    responses=COMMON,
    operation_id="updateSession",
    summary="Rename, change optimizer hyper-parameters, or set parameter values",
    description=(
        'Changes `name`, optimizer hyper-parameters (`{"optimizer": {"lr": 0.01}}`), the '
        "`scheduler` (a new one from its step 0; `null` removes it) or parameter values, as "
        "one new version; the optimizer's state is kept. Honours "
        "`If-Match` (412 if the session moved on); 409 `session-busy` while a job holds it."
    ),
)
async def patch(
    session_id: SessionId,
    body: specs.SessionPatch,
    owner: PrincipalDep,
    pool: PoolDep,
    if_match: IfMatchDep,
) -> Response:
    return respond(await pool.patch(owner, checked(session_id), body, if_match))


@router.delete(
    "/{session_id}",
    status_code=204,
    responses=responses(404, 503),
    operation_id="deleteSession",
    summary="Delete a session",
    description=(
        "Removes the session, its history and its checkpoint state: 204. 409 "
        "`session-busy` while a training job holds it (cancel the job first)."
    ),
)
async def delete(session_id: SessionId, owner: PrincipalDep, pool: PoolDep) -> Response:
    await pool.delete(owner, checked(session_id))
    return Response(status_code=204)


class SessionCall:
    """A step, gradients or forward on one session, in its own worker: that worker takes
    one session's jobs in arrival order; one request per Idempotency-Key at a time."""

    def __init__(self, owner: str, idem: Idem | None, pool: WorkerPool, inflight: InFlight) -> None:
        self.owner, self.idem, self.pool, self.inflight = owner, idem, pool, inflight

    async def __call__(
        self,
        kind: Kind,
        session_id: str,
        body: specs.SessionBatchRequest,
        if_match: str | None = None,
    ) -> Response:
        job = RunJob(kind, self.owner, checked(session_id), body, self.idem, if_match)
        async with self.inflight.hold(self.idem):
            answer = await self.pool.run(job)
        return respond(answer)


async def _session_call(request: Request, idem: IdemDep) -> SessionCall:
    # Read from the app here rather than through a dependency each: every dependency is a
    # pass of FastAPI's solver per request, and these are attribute reads.
    state = request.app.state
    return SessionCall(principal(request), idem, state.pool, state.inflight)


SessionCallDep = Annotated[SessionCall, Depends(_session_call)]
StepBody = Annotated[
    specs.SessionGradientsRequest, Body(openapi_examples=schemas.SESSION_STEP_EXAMPLES)
]


@router.post(
    "/{session_id}/step",
    response_model=schemas.SessionStepResponse,
    response_model_exclude_none=True,
    responses=COMMON,
    operation_id="stepSession",
    summary="One optimizer step on the session's state, committed before the answer",
    description=(
        "Forward, loss, backward and one update of the session's parameters and optimizer "
        "state, committed before the answer. On a new notebook session the first example "
        "gives loss 0.5 and w 1.1, the second then outputs 3.2, loss 1.62 and w 1.46. "
        "Exactly once with an `Idempotency-Key`; `If-Match` makes it conditional (412); a "
        "result that is not finite is a 422 `non-finite` and changes nothing."
    ),
)
async def step(
    session_id: SessionId, body: StepBody, call: SessionCallDep, if_match: IfMatchDep
) -> Response:
    return await call("step", session_id, body, if_match)


AccumulateBody = Annotated[
    specs.SessionAccumulateRequest, Body(openapi_examples=schemas.SESSION_ACCUMULATE_EXAMPLES)
]
ApplyBody = Annotated[
    specs.SessionApplyRequest, Body(openapi_examples=schemas.SESSION_APPLY_EXAMPLES)
]


@router.post(
    "/{session_id}/accumulate",
    response_model=schemas.AccumulateResponse,
    response_model_exclude_none=True,
    responses=COMMON,
    operation_id="accumulateSession",
    summary="Add a batch's gradients to the session's accumulator, committed",
    description=(
        "Forward, loss and backward; the gradients join the session's accumulator (kept with "
        "its state, in its checkpoint), committed as a new version before the answer. The "
        "parameters, optimizer and step do not move and no history row is written: `apply` "
        "steps. Answers this batch's `loss`, `grads`, `outputs` and `accumulated`. With "
        "`grad_outputs` (dL/doutputs, the outputs' shape) instead of `batch.y`, the gradients "
        "are `outputs.backward(grad_outputs)`'s and the answer has no `loss`. Exactly "
        "once with an `Idempotency-Key`; `If-Match` makes it conditional (412)."
    ),
)
async def accumulate(
    session_id: SessionId,
    body: AccumulateBody,
    owner: PrincipalDep,
    idem: IdemDep,
    pool: PoolDep,
    inflight: InFlightDep,
    if_match: IfMatchDep,
) -> Response:
    async with inflight.hold(idem):
        answer = await pool.accumulate(owner, checked(session_id), body, idem, if_match)
    return respond(answer)


@router.post(
    "/{session_id}/apply",
    response_model=schemas.ApplyResponse,
    response_model_exclude_none=True,
    responses=COMMON,
    operation_id="applySession",
    summary="One optimizer step with the accumulated gradients, committed",
    description=(
        "One optimizer step with `scale` (default 1; 1/k gives the mean of k batches) times "
        "the sum of the gradients accumulated since the last apply, clipped after scaling; "
        "the accumulator is then empty. `step` + 1 and one history row (loss: the mean of "
        "the losses of the batches sent with `y`, null when none was); the scheduler steps. "
        "A parameter no batch reached is left alone. 409 `nothing-accumulated` when "
        "nothing is. A `/step` is exactly an accumulate and an apply of one batch."
    ),
)
async def apply(
    session_id: SessionId,
    body: ApplyBody,
    owner: PrincipalDep,
    idem: IdemDep,
    pool: PoolDep,
    inflight: InFlightDep,
    if_match: IfMatchDep,
) -> Response:
    async with inflight.hold(idem):
        answer = await pool.apply(owner, checked(session_id), body, idem, if_match)
    return respond(answer)


@router.post(
    "/{session_id}/gradients",
    response_model=schemas.QuantitiesResponse,
    response_model_exclude_none=True,
    responses=COMMON,
    operation_id="sessionGradients",
    summary="Loss and dL/dθ at the session's parameters; nothing changes",
    description=(
        "What `POST /v1/sessions/{id}/step` would compute, without the update: the session "
        "keeps its parameters, optimizer state and step."
    ),
)
async def session_gradients(
    session_id: SessionId,
    body: Annotated[
        specs.SessionQuantitiesRequest, Body(openapi_examples=schemas.SESSION_STEP_EXAMPLES)
    ],
    call: SessionCallDep,
) -> Response:
    return await call("gradients", session_id, body)


@router.post(
    "/{session_id}/forward",
    response_model=schemas.ForwardResponse,
    responses=COMMON,
    operation_id="sessionForward",
    summary="The session's model on a batch",
    description="The outputs at the session's current parameters, in eval mode; nothing changes.",
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
    operation_id="getHistory",
    summary="Loss and gradient norm of every step, oldest first",
    description=(
        "One row per committed step, paginated: pass `next` back as `?cursor=` for the "
        "following page; `next` is null on the last."
    ),
)
async def history(
    session_id: SessionId,
    owner: PrincipalDep,
    pool: PoolDep,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
    cursor: str | None = None,
) -> dict[str, Any]:
    after = cursors.history_after(cursor)
    rows = await pool.history(owner, checked(session_id), limit + 1, after)
    items = [
        {"step": r.step, "loss": r.loss, "grad_norm": r.grad_norm, "lr": r.lr, "at": iso(r.at)}
        for r in rows[:limit]
    ]
    more = len(rows) > limit
    return {"items": items, "next": cursors.encode(rows[limit - 1].step) if more else None}


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
    operation_id="getCheckpoint",
    summary="Download the session as a safetensors file",
    description=(
        "Parameters, buffers and optimizer state as tensors, the specs and step in the "
        "file's metadata: `POST /v1/sessions/restore` makes a new session from it."
    ),
)
async def checkpoint(session_id: SessionId, owner: PrincipalDep, pool: PoolDep) -> Response:
    data, record = await pool.checkpoint(owner, checked(session_id))
    filename = f"{record.id}-step{record.step}.safetensors"
    return Response(
        data,
        media_type=CHECKPOINT_MEDIA,
        headers={
            "ETag": etag(record),
            "Content-Disposition": f'attachment; filename="{filename}"',
        },
    )
