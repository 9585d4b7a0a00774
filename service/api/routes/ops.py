"""Liveness, readiness, the workers and the metrics."""

from __future__ import annotations

import dataclasses

from fastapi import APIRouter, Request, Response

from service.api import metrics, schemas
from service.api.deps import PoolDep
from service.api.problems import responses
from service.api.store_health import StoreHealth
from service.errors import StoreUnavailable, Unavailable

router = APIRouter(tags=["operations"])
OPERATORS_ONLY = (
    "For operators: every tenant's traffic shows here. An operator key (`--admin-keys`) "
    "reads it; a tenant's API key gets 404. Without operator keys, a keyless server answers "
    "its loopback callers only, and a keyed one nobody."
)


@router.get(
    "/healthz",
    response_model=schemas.Health,
    operation_id="health",
    summary="The process is up",
    description="Liveness: 200 while the API process answers, whatever the store or workers do.",
)
async def healthz() -> schemas.Health:
    return schemas.Health(status="ok")


@router.get(
    "/readyz",
    response_model=schemas.Health,
    responses=responses(503),
    operation_id="ready",
    summary="Store and compute ready (503 otherwise)",
    description=(
        "Readiness, for a load balancer: 200 when every worker is up and the store takes "
        "writes; 503 (`unavailable` or `store-unavailable`, saying why) otherwise."
    ),
)
async def readyz(request: Request, pool: PoolDep) -> schemas.Health:
    if not pool.ready:
        states = ", ".join(f"{w.index}: {w.state}" for w in pool.workers)
        raise Unavailable(f"not every worker is up ({states})")
    health: StoreHealth = request.app.state.store_health
    trouble = await health.trouble()
    if trouble is not None:  # a full disk too: not ready is 503, whatever the cause
        raise StoreUnavailable(f"the session store cannot take writes: {trouble.detail}")
    return schemas.Health(status="ready")


@router.get(
    "/v1/workers",
    response_model=schemas.Workers,
    responses=responses(503),
    operation_id="listWorkers",
    summary="The worker processes: device, pid, state, queue depth, sessions held",
    description=OPERATORS_ONLY,
)
async def workers(pool: PoolDep) -> schemas.Workers:
    return schemas.Workers(
        items=[schemas.Worker(**dataclasses.asdict(stats)) for stats in pool.stats()]
    )


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {
            "content": {metrics.MEDIA_TYPE: {"schema": {"type": "string"}}},
            "description": "Prometheus text format",
        }
    },
    operation_id="metrics",
    summary="Prometheus metrics: requests, latency, queues, compute, batches, steps, jobs",
    description=OPERATORS_ONLY + " Prometheus sends the key as `authorization: bearer`.",
)
async def prometheus(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=metrics.MEDIA_TYPE)
