"""``create_app(settings)``: the FastAPI application, its routes, handlers and compute pool."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from service import __version__
from service.api import docs, problems
from service.api.auth import OPEN_PATHS, OPERATOR_PATHS, AuthMiddleware, Keys
from service.api.bodylimit import BodyLimitMiddleware
from service.api.connections import ConnectionLimitMiddleware, Drain
from service.api.idempotency import InFlight
from service.api.jobfeed import Feeds, JobBoard
from service.api.metrics import Metrics, ObserveMiddleware
from service.api.parsebudget import ParseBudget
from service.api.routes import compute, jobs, ops, sessions, ui
from service.api.store_health import PURGE_EVERY, StoreHealth, purge_forever
from service.config import Settings
from service.store import EphemeralFile, is_memory, open_store
from service.workers.pool import WorkerPool

DESCRIPTION = """\
Forward passes, gradients and optimizer steps for small PyTorch models, over HTTP.

Start with **POST /v1/step** and its *seed* example: it is the first step of the backprop
notebook (ŷ = w·x + 1, L = ½(ŷ−y)², SGD with lr 0.1), and answers loss 0.5, dL/dw = −1 and
w = 1.1. Add `"explain": true` to see the chain rule, computed.

Tensors travel as nested lists, `{"dtype","shape","data"}`, or `{"dtype","shape","b64"}`
(raw little-endian bytes). Every error is `application/problem+json` (RFC 9457); its `type`
is one of `validation-error`, `malformed-json`, `invalid-input`, `invalid-tensor`,
`invalid-expression`, `invalid-spec`, `shape-mismatch`, `non-finite`, `not-found`,
`method-not-allowed`, `session-busy`, `unavailable`, `store-unavailable` (503: the store is
unreachable, locked or refuses writes; retry after `Retry-After`), `insufficient-storage`
(507: the store's disk or memory is full), `request-timeout` (408: the body did not arrive
in time), `unsupported-media-type` (415: a JSON body sent without `Content-Type:
application/json`), `too-large` (422: over the memory or answer budget; the detail gives
the estimate), `too-many-requests` (429, with `Retry-After`: the rate or in-flight limit),
`quota-exceeded` (429, no `Retry-After`: a per-key quota of jobs, streams, stored bytes or
sessions), `compute-timeout` (504: nothing was changed), `internal`.
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # This process's own store connection is for rate limits, readiness, jobs (read and
        # cancelled here on every replica), whole-request idempotency records and their
        # purge: sessions are read and written by the workers. memory:// is a private file
        # that this process makes and every worker shares.
        ephemeral = EphemeralFile() if is_memory(settings.store) else None
        serving = settings.model_copy(update={"store": ephemeral.url}) if ephemeral else settings
        app.state.store = open_store(
            serving.store,
            idempotency_ttl=settings.idempotency_ttl,
            max_stored_bytes=settings.max_stored_bytes_per_key,
        )
        app.state.store_health = StoreHealth(app.state.store)
        every = min(PURGE_EVERY, max(settings.idempotency_ttl, 0.5))
        purger = asyncio.create_task(purge_forever(app.state.store, every))
        app.state.pool = metrics.pool = WorkerPool(serving, observer=metrics.observe)
        await app.state.pool.start()
        rate_limited = keys.tenants is not None and settings.rate_limit > 0
        app.state.buckets = (
            app.state.store.buckets(settings.rate_limit, settings.rate_burst)
            if rate_limited
            else None
        )
        app.state.inflight = InFlight()
        app.state.jobs = board = JobBoard(
            app.state.store,
            app.state.pool,
            ttl=settings.job_ttl,
        )
        app.state.feeds = Feeds(board, max_streams_per_key=settings.max_streams_per_key)
        pool, health = app.state.pool, app.state.store_health
        metrics.ready = lambda: pool.ready and health.healthy and not drain.draining
        handing_over: list[asyncio.Task[int]] = []

        def drained() -> None:
            # SIGTERM: no new work for the workers (the middleware refuses it before them),
            # every event stream gets its final event now, and the training jobs go to a
            # worker of another replica at once rather than when their leases lapse.
            pool.draining = True
            app.state.feeds.close()
            handing_over.append(asyncio.create_task(pool.hand_over()))

        drain.on_begin(drained)
        try:
            yield
        finally:
            app.state.feeds.close()
            purger.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await purger
            await app.state.pool.close()
            if app.state.buckets is not None:
                await app.state.buckets.aclose()
            app.state.store.close()
            if ephemeral is not None:
                ephemeral.remove()

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
    app.state.metrics = metrics = Metrics()
    app.state.drain = drain = Drain(settings.drain_seconds)
    keys = Keys.from_settings(settings)
    app.state.limits = settings.limits()
    problems.install(app)
    app.state.parse_budget = budget = ParseBudget(settings.max_parsing_bytes)
    # Added innermost first. A request meets: the metrics and access log (which count what
    # the others refuse too), the drain and the connection limit (503), the key (401, 429),
    # then its body's size, time and share of the parse budget (413, 408, 503).
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=settings.max_body_bytes,
        timeout=settings.body_timeout,
        budget=budget,
    )
    app.add_middleware(AuthMiddleware, keys=keys)
    app.add_middleware(
        ConnectionLimitMiddleware, max_connections=settings.max_connections, drain=drain
    )
    app.add_middleware(ObserveMiddleware, metrics=metrics)
    app.include_router(compute.router)
    app.include_router(sessions.router)
    app.include_router(jobs.router)
    app.include_router(ops.router)
    app.include_router(ui.router)
    docs.install(app)
    _add_problem_schema(app, keys=keys)
    return app


def _declare_security(schema: dict[str, Any], *, keys: Keys) -> None:
    """Bearer keys on every route but the open ones (Swagger UI's Authorize button), and the
    problems answered before a route's own code runs: 503 (too many connections) everywhere;
    401 and 429 on every keyed route (401 and 404 on the operator routes, for a tenant's
    key); 408, 413 and 503 (the parse budget) wherever a body is read; 415 wherever the body
    is JSON.

    With keys configured the key is required; without, it is optional (the empty requirement),
    which is what the committed document, made with the default settings, says. The operator
    routes take an operator key; with none configured, a keyless server's loopback callers
    need none."""
    schema["components"]["securitySchemes"] = {
        "apiKey": {
            "type": "http",
            "scheme": "bearer",
            "description": "an API key, when the service is configured with keys",
        },
        "adminKey": {
            "type": "http",
            "scheme": "bearer",
            "description": (
                "an operator key (--admin-keys): the only key the operator routes take; "
                "a keyless server also answers them to loopback callers without one"
            ),
        },
    }
    keyed = keys.tenants is not None
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            if path in OPEN_PATHS:
                operation["responses"].setdefault("503", problems.responses(503)[503])
                continue
            if path in OPERATOR_PATHS:
                open_to_loopback = not keyed and keys.operators is None
                operation["security"] = [{"adminKey": []}] + ([{}] if open_to_loopback else [])
                extra = [401, 404, 503]
            else:
                operation["security"] = [{"apiKey": []}] if keyed else [{"apiKey": []}, {}]
                extra = [401, 429, 503]
            if method in ("post", "patch", "put"):
                extra += [408, 413]
            if "application/json" in operation.get("requestBody", {}).get("content", {}):
                extra.append(415)
            for status, entry in problems.responses(*extra).items():
                operation["responses"].setdefault(str(status), entry)


def _add_problem_schema(app: FastAPI, *, keys: Keys) -> None:
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
            _declare_security(schema, keys=keys)
            _problem_for_validation(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _problem_for_validation(schema: dict[str, Any]) -> None:
    """FastAPI declares its own 422 body (HTTPValidationError, application/json) on a route
    that names none; this app answers every 422 as a problem, so the document says so."""
    for operations in schema["paths"].values():
        for operation in operations.values():
            declared = operation["responses"].get("422", {})
            if "application/json" in declared.get("content", {}):
                operation["responses"]["422"] = problems.responses(422)[422]
    text = json.dumps(schema["paths"])
    for name in ("HTTPValidationError", "ValidationError"):
        if f"#/components/schemas/{name}" not in text:
            schema["components"]["schemas"].pop(name, None)
