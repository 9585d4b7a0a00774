"""Stateless computation: forward, gradients, step. Nothing is kept between calls."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body

from service.api import schemas
from service.api.deps import LimitsDep, PoolDep
from service.api.problems import responses
from service.api.responses import FastJSONResponse
from service.engine import specs
from service.engine.step import run

router = APIRouter(prefix="/v1", tags=["compute"])
PROBLEMS = responses(400, 422, 503)


@router.post(
    "/forward",
    response_model=schemas.ForwardResponse,
    responses=PROBLEMS,
    summary="The model's outputs for a batch",
)
async def forward(
    body: Annotated[specs.ForwardRequest, Body(openapi_examples=schemas.FORWARD_EXAMPLES)],
    pool: PoolDep,
    limits: LimitsDep,
) -> FastJSONResponse:
    return FastJSONResponse(await pool.run(run, "forward", body, limits))


@router.post(
    "/gradients",
    response_model=schemas.GradientsResponse,
    response_model_exclude_none=True,
    responses=PROBLEMS,
    summary="Loss, dL/dθ and outputs for a batch; no update",
)
async def gradients(
    body: Annotated[specs.GradientsRequest, Body(openapi_examples=schemas.GRADIENTS_EXAMPLES)],
    pool: PoolDep,
    limits: LimitsDep,
) -> FastJSONResponse:
    return FastJSONResponse(await pool.run(run, "gradients", body, limits))


@router.post(
    "/step",
    response_model=schemas.StepResponse,
    response_model_exclude_none=True,
    responses=PROBLEMS,
    summary="One optimizer step from fresh optimizer state",
    description=(
        "Forward, loss, backward and one update. The seed example is the notebook's first "
        'step: loss 0.5, dL/dw = -1, w 1 → 1.1. With `"explain": true` the response carries '
        "the trace, from which the chain rule can be read off."
    ),
)
async def step(
    body: Annotated[specs.StepRequest, Body(openapi_examples=schemas.STEP_EXAMPLES)],
    pool: PoolDep,
    limits: LimitsDep,
) -> FastJSONResponse:
    return FastJSONResponse(await pool.run(run, "step", body, limits))
