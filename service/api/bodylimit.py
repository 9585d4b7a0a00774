"""A request body is read in full before the route runs, under three limits of its own
(uvicorn has none):

- size: a ``Content-Length`` over the limit is refused before a byte of the body is read,
  and a body sent in chunks as soon as it passes the limit (413);
- time: the whole body must arrive within the body timeout, else 408 and the connection is
  closed, so that a client that stalls holds neither a connection nor memory for long;
- the parse budget (``parsebudget``): a body whose bytes would take the process past it is
  refused at once with 503 and ``Retry-After``. A body larger than the whole budget could
  never be admitted, so the size limit is the smaller of the two and that body is a 413.

Whatever the refusal, the route never runs.
"""

from __future__ import annotations

import asyncio

from starlette.datastructures import Headers
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.parsebudget import LEASE, Lease, ParseBudget
from service.api.problems import problem

_BODILESS = ("GET", "HEAD", "DELETE", "OPTIONS")


class BodyLimitMiddleware:
    """Args:
    max_bytes: the largest body accepted (413 over).
    timeout: seconds the whole body may take to arrive (408 over).
    budget: the process's parse budget (503 when a body does not fit in what is left).
    """

    def __init__(self, app: ASGIApp, max_bytes: int, timeout: float, budget: ParseBudget) -> None:
        self.app, self.timeout, self.budget = app, timeout, budget
        self.max_bytes = min(max_bytes, budget.total)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in _BODILESS:
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        lease = self.budget.lease()
        try:
            outcome: Response | _Body
            if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
                outcome = self._too_large()
            elif declared is not None and not lease.take(int(declared)):
                outcome = self._over_budget()
            else:
                try:
                    async with asyncio.timeout(self.timeout):
                        outcome = await self._read(receive, lease, declared)
                except TimeoutError:
                    outcome = self._too_slow()
            if isinstance(outcome, Response):
                await outcome(scope, receive, send)
            else:
                await self._forward(scope, receive, send, outcome, lease)
        finally:
            lease.give_back()

    async def _read(self, receive: Receive, lease: Lease, declared: str | None) -> Response | _Body:
        """The whole body, or the problem that stopped it. With a ``Content-Length`` its
        bytes are already held; without, each chunk is taken as it arrives."""
        body = _Body(None if declared is None else int(declared))
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break  # the client went away; the app will see it on its first receive
            chunk = message.get("body", b"")
            if body.size + len(chunk) > self.max_bytes:
                return self._too_large()
            if declared is None and not lease.take(len(chunk)):
                return self._over_budget()
            body.add(chunk)
            if not message.get("more_body", False):
                break
        return body

    async def _forward(
        self, scope: Scope, receive: Receive, send: Send, body: _Body, lease: Lease
    ) -> None:
        """The app, with the body replayed to it. The lease travels in the scope for the
        route to give back once it has parsed the body, and goes back at the latest when the
        answer starts."""
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body.hand_over(), "more_body": False}
            return await receive()

        async def answer(message: Message) -> None:
            if message["type"] == "http.response.start":
                lease.give_back()
            await send(message)

        scope[LEASE] = lease
        await self.app(scope, replay, answer)

    def _too_large(self) -> Response:
        return problem(
            413,
            "payload-too-large",
            "Payload too large",
            f"the request body is larger than the limit of {self.max_bytes} bytes",
        )

    def _over_budget(self) -> Response:
        # The connection stays open (unlike a 408's): uvicorn reads the rest of the body and
        # drops it, so that a client that sends all of its body before it reads still gets
        # this answer and its Retry-After, where a closed connection would be a write error.
        return problem(
            503,
            "unavailable",
            "Service unavailable",
            f"the service is receiving as many request bodies as it may hold at once "
            f"({self.budget.total} bytes, --max-parsing-bytes); retry after Retry-After",
            headers={"Retry-After": "1"},
        )

    def _too_slow(self) -> Response:
        return problem(
            408,
            "request-timeout",
            "Request timeout",
            f"the request body did not arrive within {self.timeout:g} seconds "
            "(--body-timeout); send it again, faster or smaller",
            headers={"Connection": "close"},
        )


class _Body:
    """A body as it arrives. With its size declared, it is written into one buffer of that
    size: no list of chunks to join into a second copy, no chunks left scattered over the
    heap for the allocator to keep. ``hand_over`` gives it away and keeps no reference, so
    the route's copy (Starlette makes ``bytes`` of it) is the only one once it has read it.

    Args:
        declared: the ``Content-Length``, already checked against the limit; None if absent.
    """

    def __init__(self, declared: int | None) -> None:
        self.size = 0
        self.buffer: bytearray | None = bytearray(declared) if declared else None
        self.chunks: list[bytes] = []

    def add(self, chunk: bytes) -> None:
        if self.buffer is not None:
            self.buffer[self.size : self.size + len(chunk)] = chunk
        else:
            self.chunks.append(chunk)
        self.size += len(chunk)

    def hand_over(self) -> bytes | bytearray:
        buffer, chunks = self.buffer, self.chunks
        self.buffer, self.chunks = None, []
        if buffer is None:
            return b"".join(chunks)
        if len(buffer) != self.size:  # the client went away before the end
            del buffer[self.size :]
        return buffer
