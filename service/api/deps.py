"""Named dependencies: what a route needs from the running app."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.config import Settings
from service.engine.limits import Limits
from service.workers.pool import ComputePool


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
