"""``/metrics`` (Prometheus), the JSON access log, and ``X-Request-ID``.

One registry per app (tests build many apps). The HTTP figures are taken here, in ASGI
middleware outside every other, so that what the key check or the body limit refuses is
counted too; the compute figures come from the workers, with each answer (``Info``); the
workers' state is read from the pool when Prometheus scrapes.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.workers.handle import label
from service.workers.messages import Info
from service.workers.pool import WorkerPool

access = logging.getLogger("gradsvc.access")
MEDIA_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_REQUEST_ID = re.compile(r"^[\w.:@/+=-]{1,128}$")
_FAST = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "gradsvc_http_requests", "HTTP requests answered", ["route", "method", "status"],
            registry=r,
        )  # fmt: skip
        self.latency = Histogram(
            "gradsvc_http_request_duration_seconds", "time to answer an HTTP request",
            ["route", "method"], buckets=_FAST, registry=r,
        )  # fmt: skip
        self.queue_wait = Histogram(
            "gradsvc_queue_wait_seconds", "time a job waited in its worker before it ran",
            buckets=_FAST, registry=r,
        )  # fmt: skip
        self.compute = Histogram(
            "gradsvc_compute_seconds", "time a job's computation took in its worker",
            buckets=_FAST, registry=r,
        )  # fmt: skip
        self.batch = Histogram(
            "gradsvc_batch_size", "jobs computed together (one vmapped call, one commit)",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024), registry=r,
        )  # fmt: skip
        self.store = Histogram(
            "gradsvc_store_seconds", "time a store call took, by operation", ["op"],
            buckets=_FAST, registry=r,
        )  # fmt: skip
        self.steps = Counter("gradsvc_steps", "session steps committed", registry=r)
        self.jobs = Counter(
            "gradsvc_jobs", "training jobs, started and ended by how", ["event"], registry=r
        )
        self.pool: WorkerPool | None = None
        r.register(_PoolCollector(self))

    def observe(self, info: Info) -> None:
        """What one worker answer tells (called by the pool)."""
        self.queue_wait.observe(max(0.0, info.wait))
        self.compute.observe(info.compute)
        self.batch.observe(info.batch)
        if info.steps:
            self.steps.inc(info.steps)
        for op, seconds in info.store or ():
            self.store.labels(op).observe(seconds)
        for status in info.jobs or ():
            self.jobs.labels(status).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _PoolCollector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        pool = self.metrics.pool
        if pool is None:
            return
        up = GaugeMetricFamily("gradsvc_workers_up", "worker processes up")
        up.add_metric([], sum(1 for w in pool.workers if w.state == "up"))
        restarts = CounterMetricFamily(
            "gradsvc_worker_restarts", "worker processes restarted", labels=["worker"]
        )
        depth = GaugeMetricFamily(
            "gradsvc_queue_depth", "requests queued for a worker or in its pass", labels=["worker"]
        )
        held = GaugeMetricFamily(
            "gradsvc_sessions_held", "sessions a worker keeps built", labels=["worker"]
        )
        for w in pool.workers:
            restarts.add_metric([str(w.index)], w.restarts)
            depth.add_metric([str(w.index)], w.depth)
            held.add_metric([str(w.index)], w.held)
        recycled = CounterMetricFamily(
            "gradsvc_worker_recycled",
            "workers recycled because a computation of this key ran past its deadline (the "
            "key's digest, cut short; only keys that caused one appear)",
            labels=["key"],
        )
        for owner, count in sorted(pool.recycled.items()):
            recycled.add_metric([label(owner)], count)
        yield from (up, restarts, depth, held, recycled)


class ObserveMiddleware:
    """Times and counts every request, logs it as one JSON line, and gives it a request id:
    the client's ``X-Request-ID`` when it is a sane token, a new one otherwise; either way
    it is sent back."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        given = _header(scope, b"x-request-id")
        request_id = given if given and _REQUEST_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        status = 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            took = time.perf_counter() - start
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            method = scope["method"]
            self.metrics.requests.labels(route, method, str(status)).inc()
            self.metrics.latency.labels(route, method).observe(took)
            fields: dict[str, Any] = {
                "request_id": request_id,
                "method": method,
                "path": scope["path"],
                "route": route,
                "status": status,
                "duration_ms": round(took * 1000, 3),
                "client": (scope.get("client") or ("", 0))[0],
            }
            access.info("%s %s %d", method, scope["path"], status, extra={"fields": fields})


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None
