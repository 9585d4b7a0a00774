"""Who is asking: API keys, checked before anything else is read, and per-key rate limits.

Keys come from ``--api-keys`` (the keys themselves) and ``--api-keys-file`` (SHA-256 hex
digests, one per line, each optionally followed by a label). A request's bearer token is
hashed and compared with every digest in constant time. The principal, and so the owner of
what the request makes, is the key's digest: the raw key is never stored.

With no keys configured the service is open and every caller is the anonymous principal
``""`` (the settings refuse that on a non-loopback address unless told ``--insecure``).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Request
from starlette.types import ASGIApp, Receive, Scope, Send

from service.api.problems import send_problem
from service.config import Settings
from service.errors import GradsvcError
from service.store.ratelimit import Buckets

ANONYMOUS = ""
# The pages and their assets hold no data; the calls they make carry the key.
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/docs", "/redoc", "/openapi.json", "/ui", "/ui/"})
OPEN_PREFIXES = ("/static/docs/", "/ui/static/")
CHALLENGE = 'Bearer realm="gradsvc"'


@dataclass(frozen=True)
class KeyRing:
    digests: tuple[bytes, ...]

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyRing | None:
        digests = [
            hashlib.sha256(key.strip().encode()).digest()
            for key in (settings.api_keys or "").split(",")
            if key.strip()
        ]
        if settings.api_keys_file:
            digests += read_keys_file(Path(settings.api_keys_file))
        return cls(tuple(digests)) if digests else None

    def principal(self, token: str) -> str | None:
        presented = hashlib.sha256(token.encode()).digest()
        found = None
        for digest in self.digests:  # no early exit: the time taken says nothing
            if hmac.compare_digest(digest, presented):
                found = digest.hex()
        return found


def read_keys_file(path: Path) -> list[bytes]:
    digests = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        digest = text.split()[0].lower()
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError(f"{path}:{number}: expected a SHA-256 hex digest (64 characters)")
        digests.append(bytes.fromhex(digest))
    return digests


def _bearer(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return None


class AuthMiddleware:
    """401 before the body is read; 429 when the key's bucket is empty."""

    def __init__(self, app: ASGIApp, keys: KeyRing | None) -> None:
        self.app, self.keys = app, keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        principal: str | None = ANONYMOUS
        if self.keys is not None and not (path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)):
            token = _bearer(scope)
            principal = self.keys.principal(token) if token else None
            if principal is None:
                error = ', error="invalid_token"' if token else ""
                await send_problem(
                    send,
                    401,
                    "unauthorized",
                    "Unauthorized",
                    "a valid API key is required: Authorization: Bearer <key>",
                    {"WWW-Authenticate": CHALLENGE + error},
                )
                return
            # Made with the store when the app starts: Redis shares them between replicas.
            buckets: Buckets | None = getattr(scope["app"].state, "buckets", None)
            if buckets is not None:
                try:  # a bucket in Redis is a round trip: off the event loop, then
                    wait = (
                        await asyncio.to_thread(buckets.take, principal, time.time())
                        if buckets.remote
                        else buckets.take(principal, time.time())
                    )
                except GradsvcError as exc:  # the store's trouble (StoreUnavailable, ...)
                    retry = getattr(exc, "retry_after", None)
                    headers = {"Retry-After": str(retry)} if retry is not None else None
                    await send_problem(send, exc.status, exc.type, exc.title, exc.detail, headers)
                    return
                if wait > 0:
                    await send_problem(
                        send,
                        429,
                        "too-many-requests",
                        "Too many requests",
                        "this key is over its request rate; slow down",
                        {"Retry-After": str(max(1, math.ceil(wait)))},
                    )
                    return
        scope.setdefault("state", {})["principal"] = principal
        await self.app(scope, receive, send)


async def _principal(request: Request) -> str:
    principal: str = getattr(request.state, "principal", ANONYMOUS)
    return principal


PrincipalDep = Annotated[str, Depends(_principal)]
