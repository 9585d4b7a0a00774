"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter

from service.api import schemas
from service.api.deps import PoolDep
from service.api.problems import responses
from service.errors import Unavailable

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=schemas.Health, summary="The process is up")
async def healthz() -> schemas.Health:
    return schemas.Health(status="ok")


@router.get(
    "/readyz",
    response_model=schemas.Health,
    responses=responses(503),
    summary="Ready to compute (503 otherwise)",
)
async def readyz(pool: PoolDep) -> schemas.Health:
    if not pool.ready:
        raise Unavailable("the compute pool is not running")
    return schemas.Health(status="ready")
