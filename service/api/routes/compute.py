"""Stateless computation: forward, gradients, step. Nothing is kept between calls."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Depends, Request, Response

from service.api import schemas
from service.api.auth import principal
from service.api.idempotency import IdemDep, InFlight
from service.api.problems import responses
from service.api.responses import FastJSONRoute, respond
from service.engine import specs
from service.engine.specs import Kind
from service.workers.jobs import Idem
from service.workers.pool import WorkerPool

router = APIRouter(prefix="/v1", tags=["compute"], route_class=FastJSONRoute)
PROBLEMS = responses(400, 409, 422, 503, 504, 507)


class Compute:
    """What every stateless route needs, gathered by FastAPI from the request."""

    def __init__(self, pool: WorkerPool, owner: str, idem: Idem | None, inflight: InFlight) -> None:
        self.pool, self.owner, self.idem, self.inflight = pool, owner, idem, inflight

    async def __call__(self, kind: Kind, body: specs.ForwardRequest) -> Response:
        async with self.inflight.hold(self.idem):
            return respond(await self.pool.stateless(self.owner, kind, body, self.idem))


async def _compute(request: Request, idem: IdemDep) -> Compute:
    # Read from the app here rather than through a dependency each: every dependency is a
    # pass of FastAPI's solver per request, and these are attribute reads.
    state = request.app.state
    return Compute(state.pool, principal(request), idem, state.inflight)


ComputeDep = Annotated[Compute, Depends(_compute)]


@router.post(
    "/forward",
    response_model=schemas.ForwardResponse,
    responses=PROBLEMS,
    operation_id="forward",
    summary="The model's outputs for a batch",
    description=(
        "Runs the model on `batch.x` (in eval mode) and answers `outputs`; no loss, no "
        "gradient, nothing kept. The seed example is the notebook's prediction at w = 1: "
        "ŷ = 1·1 + 1 = 2."
    ),
)
async def forward(
    body: Annotated[specs.ForwardRequest, Body(openapi_examples=schemas.FORWARD_EXAMPLES)],
    compute: ComputeDep,
) -> Response:
    return await compute("forward", body)


@router.post(
    "/gradients",
    response_model=schemas.QuantitiesResponse,
    response_model_exclude_none=True,
    responses=PROBLEMS,
    operation_id="gradients",
    summary="Loss, dL/dθ and outputs for a batch; no update",
    description=(
        "Forward, loss and backward: `grads` holds dL/dθ for every trainable parameter. "
        "The seed example is the notebook's first gradient: loss 0.5, dL/dw = −1. With "
        '`"explain": true` the answer carries the trace of every node, from which the '
        "chain rule can be read off."
    ),
)
async def gradients(
    body: Annotated[specs.GradientsRequest, Body(openapi_examples=schemas.GRADIENTS_EXAMPLES)],
    compute: ComputeDep,
) -> Response:
    return await compute("gradients", body)


@router.post(
    "/step",
    response_model=schemas.StepResponse,
    response_model_exclude_none=True,
    responses=PROBLEMS,
    operation_id="step",
    summary="One optimizer step from fresh optimizer state",
    description=(
        "Forward, loss, backward and one update. The seed example is the notebook's first "
        'step: loss 0.5, dL/dw = -1, w 1 → 1.1. With `"explain": true` the response carries '
        "the trace, from which the chain rule can be read off."
    ),
)
async def step(
    body: Annotated[specs.StepRequest, Body(openapi_examples=schemas.STEP_EXAMPLES)],
    compute: ComputeDep,
) -> Response:
    return await compute("step", body)
