"""Who is asking: API keys, checked before anything else is read, and per-key rate limits.

Two key rings, each from a list of keys and a file of SHA-256 hex digests (one per line,
each optionally followed by a label). A request's bearer token is hashed and compared with
every digest of a ring in constant time.

- Tenant keys (``--api-keys``, ``--api-keys-file``) reach every route but the operator ones.
  The principal, and so the owner of what a request makes, is the key's digest: the raw key
  is never stored. With no tenant keys the service is open and every caller is the anonymous
  principal ``""`` (the settings refuse that on a non-loopback address unless ``--insecure``).
- Operator keys (``--admin-keys``, ``--admin-keys-file``) reach only ``OPERATOR_PATHS``,
  which show every tenant's traffic. There a tenant key is answered 404, as if the route did
  not exist; an operator key is no tenant key (401 on every other route). Without operator
  keys, a keyless server serves those routes to loopback clients, and a keyed one to nobody.

Fail closed: a keys option that yields no key stops the start (``ValueError``), and so does
a key that is in both rings.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Request
from starlette.types import ASGIApp, Receive, Scope, Send

from service.api.problems import send_problem
from service.config import Settings
from service.errors import GradsvcError, NotFound
from service.store.ratelimit import Buckets

ANONYMOUS = ""
# The pages and their assets hold no data; the calls they make carry the key.
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/docs", "/redoc", "/openapi.json", "/ui", "/ui/"})
OPEN_PREFIXES = ("/static/docs/", "/ui/static/")
OPERATOR_PATHS = frozenset({"/metrics", "/v1/workers"})
CHALLENGE = 'Bearer realm="gradsvc"'


@dataclass(frozen=True)
class KeyRing:
    digests: tuple[bytes, ...]

    @classmethod
    def load(cls, keys: str | None, keys_file: str | None, flag: str) -> KeyRing | None:
        """The ring of ``keys`` (comma-separated) and ``keys_file`` (digests), or None when
        neither is given. ``ValueError`` when they are given but yield no key, or the file has
        a line that is not a digest; ``OSError`` when the file cannot be read."""
        if keys is None and keys_file is None:
            return None
        digests = [
            hashlib.sha256(key.strip().encode()).digest()
            for key in (keys or "").split(",")
            if key.strip()
        ]
        if keys_file is not None:
            path = Path(keys_file)
            found = read_keys_file(path)
            if not found:
                raise ValueError(
                    f"{path} (--{flag}-file) holds no key digest, only blank or comment lines: "
                    "add one SHA-256 hex digest per line, or leave the option out"
                )
            digests += found
        if not digests:  # the settings refuse this already; the ring does not rely on it
            raise ValueError(f"--{flag} holds no key: give at least one, or leave it out")
        return cls(tuple(digests))

    def principal(self, token: str) -> str | None:
        presented = hashlib.sha256(token.encode()).digest()
        found = None
        for digest in self.digests:  # no early exit: the time taken says nothing
            if hmac.compare_digest(digest, presented):
                found = digest.hex()
        return found


@dataclass(frozen=True)
class Keys:
    """The tenants' ring and the operators' ring; None where none is configured."""

    tenants: KeyRing | None
    operators: KeyRing | None

    @classmethod
    def from_settings(cls, settings: Settings) -> Keys:
        tenants = KeyRing.load(settings.api_keys, settings.api_keys_file, "api-keys")
        operators = KeyRing.load(settings.admin_keys, settings.admin_keys_file, "admin-keys")
        if tenants and operators and set(tenants.digests) & set(operators.digests):
            raise ValueError(
                "a key is both an API key and an operator key: operators are not tenants; "
                "give each its own key"
            )
        return cls(tenants, operators)


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


def _loopback(scope: Scope) -> bool:
    client = scope.get("client")
    if not client:
        return False
    try:
        address = ipaddress.ip_address(client[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return address.is_loopback or bool(mapped and mapped.is_loopback)


async def _unauthorized(send: Send, token: str | None) -> None:
    error = ', error="invalid_token"' if token else ""
    await send_problem(
        send,
        401,
        "unauthorized",
        "Unauthorized",
        "a valid API key is required: Authorization: Bearer <key>",
        {"WWW-Authenticate": CHALLENGE + error},
    )


async def _not_found(send: Send, path: str) -> None:
    # The body of any unknown route's 404 (problems.http_error): nothing says it exists.
    await send_problem(send, 404, NotFound.type, NotFound.title, f"no resource at {path}")


class AuthMiddleware:
    """401 before the body is read; 404 for a tenant on an operator route; 429 when the
    key's bucket is empty; 503 when its bucket cannot be read."""

    def __init__(self, app: ASGIApp, keys: Keys) -> None:
        self.app, self.keys = app, keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        tenants = self.keys.tenants
        principal: str | None = ANONYMOUS
        # With its slash too: no redirect hints at it. Other methods go on to their 405.
        if path.rstrip("/") in OPERATOR_PATHS and scope["method"] in ("GET", "HEAD"):
            if not await self._operator(scope, send):
                return
        elif tenants is not None and not (path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)):
            token = _bearer(scope)
            principal = tenants.principal(token) if token else None
            if principal is None:
                await _unauthorized(send, token)
                return
            if not await _within_rate(scope, send, principal):
                return
        scope.setdefault("state", {})["principal"] = principal
        await self.app(scope, receive, send)

    async def _operator(self, scope: Scope, send: Send) -> bool:
        """Whether the request may go on to an operator route (else it was answered)."""
        token = _bearer(scope)
        tenants, operators = self.keys.tenants, self.keys.operators
        if operators is not None and token and operators.principal(token):
            return True
        if tenants is not None and token and tenants.principal(token):
            await _not_found(send, scope["path"])
            return False
        if operators is None and tenants is None:  # keyless: this machine's own callers only
            if _loopback(scope):
                return True
            await _not_found(send, scope["path"])
            return False
        await _unauthorized(send, token)
        return False


async def _within_rate(scope: Scope, send: Send, principal: str) -> bool:
    """Whether ``principal`` has a token in its bucket (else the request was answered)."""
    # Made with the store when the app starts: Redis shares them between replicas.
    buckets: Buckets | None = getattr(scope["app"].state, "buckets", None)
    if buckets is None:
        return True
    try:
        wait = await buckets.take(principal, time.time())
    except GradsvcError as exc:  # the store's trouble: StoreUnavailable
        retry = getattr(exc, "retry_after", None)
        headers = {"Retry-After": str(retry)} if retry is not None else None
        await send_problem(send, exc.status, exc.type, exc.title, exc.detail, headers)
        return False
    if wait > 0:
        await send_problem(
            send,
            429,
            "too-many-requests",
            "Too many requests",
            "this key is over its request rate; slow down",
            {"Retry-After": str(max(1, math.ceil(wait)))},
        )
        return False
    return True


def principal(request: Request) -> str:
    """Who is asking (the key's digest, or ``ANONYMOUS``), as the middleware found it."""
    found: str = getattr(request.state, "principal", ANONYMOUS)
    return found


async def _principal(request: Request) -> str:
    return principal(request)


PrincipalDep = Annotated[str, Depends(_principal)]
