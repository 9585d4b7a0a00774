"""Liveness and readiness."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter

from service.api import schemas
from service.api.deps import PoolDep, StoreDep
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
    summary="Store and compute ready (503 otherwise)",
)
async def readyz(pool: PoolDep, store: StoreDep) -> schemas.Health:
    if not pool.ready:
        raise Unavailable("the compute pool is not running")
    try:
        reachable = await asyncio.to_thread(store.ping)
    except Exception:  # any failure to reach the store means not ready, whatever its kind
        reachable = False
    if not reachable:
        raise Unavailable("the session store does not answer")
    return schemas.Health(status="ready")
