"""Named dependencies: what a route needs from the running app."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.api.idempotency import InFlight
from service.api.ordering import SessionLocks
from service.config import Settings
from service.engine.limits import Limits
from service.store import SessionStore
from service.workers.pool import ComputePool
from service.workers.sessions import Sessions


def _pool(request: Request) -> ComputePool:
    pool: ComputePool = request.app.state.pool
    return pool


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def _limits(request: Request) -> Limits:
    limits: Limits = request.app.state.limits
    return limits


PoolDep = Annotated[ComputePool, Depends(_pool)]
SettingsDep = Annotated[Settings, Depends(_settings)]
LimitsDep = Annotated[Limits, Depends(_limits)]


def _state(name: str) -> object:
    def get(request: Request) -> object:
        return getattr(request.app.state, name)

    return get


SessionsDep = Annotated[Sessions, Depends(_state("sessions"))]
StoreDep = Annotated[SessionStore, Depends(_state("store"))]
LocksDep = Annotated[SessionLocks, Depends(_state("locks"))]
InFlightDep = Annotated[InFlight, Depends(_state("inflight"))]
