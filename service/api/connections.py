"""What the API process serves at once: at most ``max_connections`` requests, and nothing new
while it drains.

An HTTP/1.1 connection carries one request at a time, so the requests in progress are the
connections being served (an idle keep-alive connection is closed by uvicorn after a few
seconds). uvicorn's own ``limit_concurrency`` would answer a plain-text 503 without
``Retry-After``, and would count idle connections too; this answers a problem, and closes
the connection so that the client that was turned away frees its socket.

The drain (SIGTERM, ``--drain-seconds``): a load balancer keeps sending to a replica for a
while after its /readyz turns 503, so for ``drain_seconds`` the listener stays open and
every new request is answered 503 ``unavailable`` with ``Retry-After`` (the client retries,
on another replica), while those in flight finish. ``/healthz`` and ``/metrics`` are still
served: the process is alive, and its figures are worth a last scrape.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from starlette.types import ASGIApp, Receive, Scope, Send

from service.api.problems import problem

log = logging.getLogger("gradsvc")
GRACE_SECONDS = 5.0
"""Seconds past ``drain_seconds`` that requests still in flight may take to finish before
the server stops anyway (uvicorn then gives them a last few seconds of its own)."""
_SERVED_WHILE_DRAINING = frozenset({"/healthz", "/metrics"})


class Drain:
    """The server's drain: begun once (by SIGTERM), over when its time is up.

    Args:
        seconds: how long new requests are refused (503) with the listener still open.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.since: float | None = None
        """time.monotonic() when the drain began; None until then"""
        self.serving = 0
        """requests in flight (event streams included, until they end)"""
        self._hooks: list[Callable[[], None]] = []

    @property
    def draining(self) -> bool:
        return self.since is not None

    def on_begin(self, hook: Callable[[], None]) -> None:
        """Have ``hook`` called (on the event loop) when the drain begins, or now if it has:
        a SIGTERM that comes while the app starts begins the drain before the app adds its
        hooks."""
        self._hooks.append(hook)
        if self.draining:
            hook()

    def begin(self) -> None:
        """Start draining (again: nothing more). Call it on the event loop."""
        if self.since is not None:
            return
        self.since = time.monotonic()
        log.info(
            "draining: new requests get 503 for %g s; %d in flight", self.seconds, self.serving
        )
        for hook in self._hooks:
            hook()

    def over(self) -> bool:
        """Whether the server may stop now: ``seconds`` have passed since the drain began and
        nothing is in flight, or ``GRACE_SECONDS`` more have passed whatever is."""
        if self.since is None:
            return False
        spent = time.monotonic() - self.since
        return spent >= self.seconds and (
            self.serving == 0 or spent >= self.seconds + GRACE_SECONDS
        )


class ConnectionLimitMiddleware:
    def __init__(self, app: ASGIApp, max_connections: int, drain: Drain | None = None) -> None:
        self.app, self.max_connections = app, max_connections
        self.drain = drain or Drain(0)

    @property
    def serving(self) -> int:
        return self.drain.serving

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        drain = self.drain
        if drain.draining and scope["path"] not in _SERVED_WHILE_DRAINING:
            refusal = problem(
                503,
                "unavailable",
                "Service unavailable",
                "this server is shutting down and takes no new requests; retry after "
                "Retry-After (another replica answers)",
                headers={"Retry-After": "1", "Connection": "close"},
            )
            await refusal(scope, receive, send)
            return
        if drain.serving >= self.max_connections:
            refusal = problem(
                503,
                "unavailable",
                "Service unavailable",
                f"the service is serving as many connections as it may at once "
                f"({self.max_connections}, --max-connections); retry after Retry-After",
                headers={"Retry-After": "1", "Connection": "close"},
            )
            await refusal(scope, receive, send)
            return
        drain.serving += 1
        try:
            await self.app(scope, receive, send)
        finally:
            drain.serving -= 1
