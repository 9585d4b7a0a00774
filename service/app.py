"""``create_app(settings)``: the FastAPI application, its routes, handlers and compute pool."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from service import __version__
from service.api import docs, problems
from service.api.idempotency import InFlight
from service.api.ordering import SessionLocks
from service.api.routes import compute, ops, sessions
from service.config import Settings
from service.store import open_store
from service.workers.pool import ComputePool
from service.workers.sessions import Sessions

DESCRIPTION = """\
Forward passes, gradients and optimizer steps for small PyTorch models, over HTTP.

Start with **POST /v1/step** and its *seed* example: it is the first step of the backprop
notebook (ŷ = w·x + 1, L = ½(ŷ−y)², SGD with lr 0.1), and answers loss 0.5, dL/dw = −1 and
w = 1.1. Add `"explain": true` to see the chain rule, computed.

Tensors travel as nested lists, `{"dtype","shape","data"}`, or `{"dtype","shape","b64"}`
(raw little-endian bytes). Every error is `application/problem+json` (RFC 9457); its `type`
is one of `validation-error`, `malformed-json`, `invalid-input`, `invalid-tensor`,
`invalid-expression`, `invalid-spec`, `shape-mismatch`, `non-finite`, `not-found`,
`method-not-allowed`, `unavailable`, `internal`.
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.store = open_store(settings.store)
        app.state.sessions = Sessions(app.state.store, app.state.limits)
        app.state.pool = ComputePool(settings.compute_threads, settings.queue_size)
        app.state.locks = SessionLocks()
        app.state.inflight = InFlight()
        try:
            yield
        finally:
            app.state.pool.close()
            app.state.store.close()

    app = FastAPI(
        title="gradsvc",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        license_info={"name": "MIT"},
    )
    app.state.settings = settings
    app.state.limits = settings.limits()
    problems.install(app)
    app.include_router(compute.router)
    app.include_router(sessions.router)
    app.include_router(ops.router)
    docs.install(app)
    _add_problem_schema(app)
    return app


def _add_problem_schema(app: FastAPI) -> None:
    """Put the Problem schema in the document so that every route's problem responses resolve."""
    original = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = original()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components["Problem"] = problems.Problem.model_json_schema(
                ref_template="#/components/schemas/{model}"
            )
            defs = components["Problem"].pop("$defs", {})
            components.update(defs)
            components.setdefault(
                "DType",
                {"type": "string", "enum": ["float32", "float64", "float16", "bfloat16", "int64"]},
            )
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
