"""``create_app(settings)``: the FastAPI application, its routes, handlers and compute pool."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from service import __version__
from service.api import docs, openapi, problems
from service.api.auth import AuthMiddleware, Keys
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
(raw little-endian bytes). Every error is `application/problem+json` (RFC 9457); the
`Problem` schema lists every `type` it can have, with its status and what to do about it.
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
        openapi_tags=openapi.TAGS,
        servers=openapi.SERVERS,
        generate_unique_id_function=openapi.operation_id,
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
    openapi.install(app, keys=keys)
    return app
