"""``/metrics`` (Prometheus), the JSON access log, and ``X-Request-ID``.

One registry per app (tests build many apps). The HTTP figures are taken here, in ASGI
middleware outside every other, so that what the key check or the body limit refuses is
counted too; the compute figures come from the workers, with each answer and heartbeat
(``Info``); the workers' state is read from the pool when Prometheus scrapes. No series has
a per-key label: keys are many, and a series per key would swamp Prometheus (logs name
them).
"""

from __future__ import annotations

import importlib
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterator
from functools import cache
from importlib import metadata
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import __version__
from service.store import trouble
from service.workers.messages import Info
from service.workers.pool import WorkerPool

access = logging.getLogger("gradsvc.access")
MEDIA_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_REQUEST_ID = re.compile(r"^[\w.:@/+=-]{1,128}$")
_FAST = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_ITEMS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
STORE_TROUBLE = ("unavailable", "locked", "full")
"""The kinds of ``gradsvc_store_errors_total``, each shown from the start (at 0)."""

# A counter's ``_created`` twin is a series per labelled child that dashboards never use.
disable_created_metrics()  # type: ignore[no-untyped-call]


class Metrics:
    """This app's registry and the figures the API process keeps in it.

    Besides the service's own series it holds the process (CPU, memory, file descriptors),
    platform (the Python build) and garbage-collector collectors Prometheus users expect.
    The workers' series are read from the pool at each scrape (``_PoolCollector``).
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.requests = Counter(
            "gradsvc_http_requests", "HTTP requests answered", ["route", "method", "status"],
            registry=r,
        )  # fmt: skip
        self.latency = Histogram(
            "gradsvc_http_request_duration_seconds", "time to answer an HTTP request",
            ["route", "method"], buckets=_FAST, registry=r,
        )  # fmt: skip
        self.queue_wait = Histogram(
            "gradsvc_queue_wait_seconds",
            "seconds a request waited in its worker's fair queue in the API process, from "
            "being queued to being sent to the worker; one observation per request answered",
            buckets=_FAST, registry=r,
        )  # fmt: skip
        self.compute = Histogram(
            "gradsvc_compute_seconds",
            "seconds one computation took in a worker: one observation per call (a vmapped "
            "call over a group of items, or one item alone)",
            buckets=_FAST, registry=r,
        )  # fmt: skip
        self.per_item = Histogram(
            "gradsvc_compute_seconds_per_item",
            "seconds of computation per item: each call's time divided evenly among the "
            "items it computed, observed once per item",
            buckets=_FAST, registry=r,
        )  # fmt: skip
        self.batch_items = Histogram(
            "gradsvc_batch_items",
            "items (session steps, gradients or forwards) computed in one call: a vmapped "
            "group's size, 1 for an item alone; one observation per call",
            buckets=_ITEMS, registry=r,
        )  # fmt: skip
        self.store = Histogram(
            "gradsvc_store_seconds", "time a store call took, by operation", ["op"],
            buckets=_FAST, registry=r,
        )  # fmt: skip
        self.store_errors = Counter(
            "gradsvc_store_errors",
            "store trouble met (answered 503 store-unavailable or 507 insufficient-storage, "
            "or retried), by kind: unavailable (unreachable, read-only, timed out), locked "
            "(SQLite's busy wait ran out), full (disk or Redis maxmemory)",
            ["kind"], registry=r,
        )  # fmt: skip
        for kind in STORE_TROUBLE:
            self.store_errors.labels(kind)
        self.steps = Counter("gradsvc_steps", "session steps committed", registry=r)
        self.jobs = Counter(
            "gradsvc_jobs", "training jobs, started and ended by how", ["event"], registry=r
        )
        self.jobs_resumed = Counter(
            "gradsvc_jobs_resumed",
            "training jobs a worker of this replica took up again from their last committed "
            "step (their runner stopped or handed them over)",
            registry=r,
        )
        self.jobs_failed = Counter(
            "gradsvc_jobs_failed", "training jobs that failed on this replica", registry=r
        )
        # Each request's children, looked up once: labels() takes a lock and checks its
        # arguments on every call. These hold no more entries than the registry holds
        # children (unmatched paths all count as one route).
        self._answered: dict[tuple[str, str, int], Any] = {}
        self._timed: dict[tuple[str, str], Any] = {}
        self.pool: WorkerPool | None = None
        self.ready: Callable[[], bool] = lambda: False
        """whether /readyz would answer 200 now, without probing the store (the app sets it)"""
        r.register(_PoolCollector(self))

    def observe(self, info: Info) -> None:
        """What one worker answer or heartbeat tells (called by the pool)."""
        if info.wait is not None:
            self.queue_wait.observe(max(0.0, info.wait))
        for items, seconds in info.calls or ():
            self.batch_items.observe(items)
            self.compute.observe(seconds)
            for _ in range(items):
                self.per_item.observe(seconds / items)
        if info.steps:
            self.steps.inc(info.steps)
        for op, seconds in info.store or ():
            self.store.labels(op).observe(seconds)
        for kind in info.store_errors or ():
            self.store_errors.labels(kind).inc()
        for event in info.jobs or ():
            if event == "resumed":
                self.jobs_resumed.inc()
                continue
            self.jobs.labels(event).inc()
            if event == "failed":
                self.jobs_failed.inc()

    def answered(self, route: str, method: str, status: int, seconds: float) -> None:
        """One HTTP request answered: counted by route, method and status, and timed."""
        key = (route, method, status)
        if (count := self._answered.get(key)) is None:
            count = self._answered[key] = self.requests.labels(route, method, str(status))
        count.inc()
        if (latency := self._timed.get(key[:2])) is None:
            latency = self._timed[key[:2]] = self.latency.labels(route, method)
        latency.observe(seconds)

    def render(self) -> bytes:
        for kind, count in trouble.drain_met().items():  # this process's own store calls
            self.store_errors.labels(kind).inc(count)
        return generate_latest(self.registry)


class _PoolCollector(Collector):
    """The workers' state, read from the pool when Prometheus scrapes."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        pool = self.metrics.pool
        if pool is None:
            return
        devices = pool.layout.devices
        build = GaugeMetricFamily(
            "gradsvc_build_info",
            "1, labelled with the service's version, torch's, and the workers' devices",
            labels=["version", "torch", "devices"],
        )
        build.add_metric([__version__, _torch_version(), ",".join(devices)], 1)
        ready = GaugeMetricFamily(
            "gradsvc_ready", "1 when /readyz answers 200 (workers up, store writable, not draining)"
        )
        ready.add_metric([], 1 if self.metrics.ready() else 0)
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
            "workers recycled because a computation ran past its deadline (the log names the key)",
        )
        recycled.add_metric([], pool.recycled)
        running = GaugeMetricFamily(
            "gradsvc_jobs_running", "training jobs the workers of this replica are running"
        )
        running.add_metric([], sum(w.running for w in pool.workers))
        yield from (build, ready, up, restarts, depth, held, recycled, running)
        yield from _cuda(pool)


def _cuda(pool: WorkerPool) -> Iterator[Metric]:
    """Device memory as the workers last said (summed over a device's workers), and its
    utilisation from NVML when ``pynvml`` is importable: nothing at all on the CPU."""
    memory: dict[str, list[int]] = {}
    for w in pool.workers:
        if w.cuda is not None:
            totals = memory.setdefault(w.config.device, [0, 0])
            totals[0] += w.cuda[0]
            totals[1] += w.cuda[1]
    if memory:
        allocated = GaugeMetricFamily(
            "gradsvc_cuda_memory_allocated_bytes",
            "bytes the workers' torch has allocated on the device (their last report)",
            labels=["device"],
        )
        reserved = GaugeMetricFamily(
            "gradsvc_cuda_memory_reserved_bytes",
            "bytes the workers' torch caching allocator holds on the device (their last report)",
            labels=["device"],
        )
        for device, (alloc, held) in sorted(memory.items()):
            allocated.add_metric([device], alloc)
            reserved.add_metric([device], held)
        yield from (allocated, reserved)
    cuda = sorted({d for d in pool.layout.devices if d.startswith("cuda")})
    if cuda and (nvml := _nvml()) is not None:
        busy = GaugeMetricFamily(
            "gradsvc_gpu_utilization_ratio",
            "share of the last sample period the device was computing (NVML), 0 to 1",
            labels=["device"],
        )
        try:
            for device in cuda:
                index = int(device.partition(":")[2] or 0)
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                busy.add_metric([device], nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100)
        except nvml.NVMLError:
            return
        yield busy


@cache
def _nvml() -> Any:
    """``pynvml``, initialised, if it is installed and finds a driver; else None. Optional:
    not a dependency. (Indices are NVML's, which match CUDA's unless CUDA_VISIBLE_DEVICES
    reorders them.)"""
    try:
        nvml = importlib.import_module("pynvml")
        nvml.nvmlInit()
    except Exception:  # not installed, or no driver: no utilisation series
        return None
    return nvml


@cache
def _torch_version() -> str:
    """torch's version, read from its metadata: this process never imports torch."""
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:  # pragma: no cover
        return "unknown"


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
            self.metrics.answered(route, method, status, took)
            if access.isEnabledFor(logging.INFO):  # else its fields would be built for nothing
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
