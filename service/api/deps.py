"""Named dependencies: what a route needs from the running app.

All ``async def``: a plain ``def`` dependency costs a trip through FastAPI's thread pool on
every request, for what is only an attribute read.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import Depends, Request

from service.api.idempotency import InFlight
from service.config import Settings
from service.engine.limits import Limits
from service.store import SessionStore
from service.workers.pool import WorkerPool


def _state(name: str) -> Callable[[Request], Awaitable[Any]]:
    async def get(request: Request) -> Any:
        return getattr(request.app.state, name)

    get.__name__ = f"app_state_{name}"
    return get


PoolDep = Annotated[WorkerPool, Depends(_state("pool"))]
SettingsDep = Annotated[Settings, Depends(_state("settings"))]
LimitsDep = Annotated[Limits, Depends(_state("limits"))]
StoreDep = Annotated[SessionStore, Depends(_state("store"))]
InFlightDep = Annotated[InFlight, Depends(_state("inflight"))]
