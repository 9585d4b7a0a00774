"""``Idempotency-Key``: what the request was, and one request per key at a time in this process.

The stored answers live in the store (written in the same commit as the state they answer
for); this module names the request and makes a retry that arrives while the first is still
running wait for it, then replay its answer.

The name (``fingerprint``) is a digest of the method, the path, the body, and the fields that
shape the answer (``include``, ``encoding``) wherever they come from: the body's bytes carry
its own, the query's are added. The same key with another name is a 422.

Keys live in namespaces, so that one kind of key cannot take another's record: a request's
``Idempotency-Key`` is stored as it is; an item's own ``idempotency_key`` in
``POST /v1/sessions/step`` as ``ITEM + key``; and the items of a request sent under a header
key as ``BULK + index + key`` (``bulk_item``). Both prefixes hold a tab, which no key can
(keys are printable ASCII), so no client-chosen key can forge another namespace's.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, Header, Request

from service.api.auth import principal
from service.errors import Conflict, InvalidInput
from service.workers.jobs import Idem

MAX_KEY = 255
WAIT_SECONDS = 30.0
SHAPING = ("include", "encoding")
"""Query fields that change what the answer carries: part of the request's fingerprint."""
ITEM = "item\t"
BULK = "bulk\t"


def item_key(key: str) -> str:
    """Where an item's own ``idempotency_key`` is stored: apart from request keys."""
    return ITEM + key


def bulk_item(key: str, index: int) -> str:
    """Where item ``index`` of a request under the header ``key`` is stored."""
    return f"{BULK}{index}\t{key}"


def fingerprint(method: str, path: str, body: bytes, query: dict[str, list[str]]) -> str:
    """The request's name: method, path, the answer-shaping query fields, and the body."""
    digest = hashlib.sha256(f"{method} {path}\n".encode())
    shaping = [f"{name}={','.join(query[name])}" for name in SHAPING if query.get(name)]
    if shaping:  # without, the digest is what it always was: stored records still match
        digest.update(f"?{'&'.join(shaping)}\n\n".encode())
    digest.update(body)
    return digest.hexdigest()


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
    key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            min_length=1,
            max_length=MAX_KEY,
            pattern=r"^[\x20-\x7e]+$",
            description=(
                "retries with the same key and request get the first answer (kept "
                "--idempotency-ttl, 24 h by default)"
            ),
        ),
    ] = None,
) -> Idem | None:
    if key is None:
        return None
    if not 1 <= len(key) <= MAX_KEY or not key.isascii() or not key.isprintable():
        raise InvalidInput(f"Idempotency-Key must be 1 to {MAX_KEY} printable ASCII characters")
    owner = principal(request)
    query = {name: request.query_params.getlist(name) for name in SHAPING}
    name = fingerprint(request.method, request.url.path, await request.body(), query)
    return Idem(owner, key, name)


IdemDep = Annotated[Idem | None, Depends(_idem)]
