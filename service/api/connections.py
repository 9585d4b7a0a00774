"""At most ``max_connections`` requests are served at once; the next is a 503 at once.

An HTTP/1.1 connection carries one request at a time, so the requests in progress are the
connections being served (an idle keep-alive connection is closed by uvicorn after a few
seconds). uvicorn's own ``limit_concurrency`` would answer a plain-text 503 without
``Retry-After``, and would count idle connections too; this answers a problem, and closes
the connection so that the client that was turned away frees its socket.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from service.api.problems import problem


class ConnectionLimitMiddleware:
    def __init__(self, app: ASGIApp, max_connections: int) -> None:
        self.app, self.max_connections = app, max_connections
        self.serving = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.serving >= self.max_connections:
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
        self.serving += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.serving -= 1
