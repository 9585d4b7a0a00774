"""``Idempotency-Key``: what the request was, and one request per key at a time in this process.

The stored answers live in the store (written in the same commit as the state they answer
for); this module only names the request (a digest of method, path and body) and makes a
retry that arrives while the first is still running wait for it, then replay its answer.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, Header, Request

from service.api.auth import PrincipalDep
from service.errors import Conflict, InvalidInput
from service.workers.jobs import Idem

MAX_KEY = 255
WAIT_SECONDS = 30.0


class InFlight:
    def __init__(self) -> None:
        self._running: dict[tuple[str, str], asyncio.Event] = {}

    @asynccontextmanager
    async def hold(self, idem: Idem | None) -> AsyncIterator[None]:
        if idem is None:
            yield
            return
        key = (idem.owner, idem.key)
        while (running := self._running.get(key)) is not None:
            try:
                await asyncio.wait_for(running.wait(), WAIT_SECONDS)
            except TimeoutError:
                raise Conflict("a request with this Idempotency-Key is still in flight") from None
        done = self._running[key] = asyncio.Event()
        try:
            yield
        finally:
            del self._running[key]
            done.set()


async def _idem(
    request: Request,
    owner: PrincipalDep,
    key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            min_length=1,
            max_length=MAX_KEY,
            pattern=r"^[\x20-\x7e]+$",
            description="retries with the same key and body get the first answer (24 h)",
        ),
    ] = None,
) -> Idem | None:
    if key is None:
        return None
    if not 1 <= len(key) <= MAX_KEY or not key.isascii() or not key.isprintable():
        raise InvalidInput(f"Idempotency-Key must be 1 to {MAX_KEY} printable ASCII characters")
    digest = hashlib.sha256()
    digest.update(f"{request.method} {request.url.path}\n".encode())
    digest.update(await request.body())
    return Idem(owner, key, digest.hexdigest())


IdemDep = Annotated[Idem | None, Depends(_idem)]
