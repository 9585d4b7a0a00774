"""Sessions at rest: bytes and versions, no tensors. ``open_store(url)`` picks the backend."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from service.store.base import (
    IDEMPOTENCY_TTL,
    Commit,
    CommitItem,
    Cursor,
    HistoryRow,
    IdempotencyRecord,
    SessionRecord,
    SessionStore,
)
from service.store.ephemeral import EphemeralFile, is_memory


def open_store(url: str, *, idempotency_ttl: float = IDEMPOTENCY_TTL) -> SessionStore:
    """``memory://`` (this process only: the server makes it a shared file, see
    ``store.ephemeral``), ``sqlite:///path`` (relative) or ``sqlite:////abs/path`` with
    options ``?busy_timeout=MS`` (how long a write waits for another process's lock, 5000 by
    default) and ``?synchronous=off|normal|full`` (full by default),
    ``redis://host:port/db[?prefix=NAME]`` with redis-py's URL options (``socket_timeout``
    ...). ``idempotency_ttl``: seconds an idempotency record is kept."""
    if is_memory(url):
        from service.store.memory import MemoryStore

        return MemoryStore(idempotency_ttl=idempotency_ttl)
    if url.startswith("sqlite://"):
        from service.store.sqlite import BUSY_TIMEOUT_MS, SqliteStore

        path, _, options_text = url.removeprefix("sqlite:///").partition("?")
        options = dict(parse_qsl(options_text))
        unknown = set(options) - {"busy_timeout", "synchronous"}
        if unknown:
            raise ValueError(f"unknown SQLite store options {sorted(unknown)} in {url!r}")
        return SqliteStore(
            path or "gradsvc.db",
            idempotency_ttl=idempotency_ttl,
            busy_timeout_ms=int(options.get("busy_timeout", BUSY_TIMEOUT_MS)),
            synchronous=options.get("synchronous", "full"),
        )
    if url.startswith(("redis://", "rediss://", "unix://")):
        from service.store.redis import RedisStore

        # ?prefix=NAME keeps several deployments (or test runs) apart in one Redis database.
        parts = urlsplit(url)
        query = parse_qsl(parts.query)
        prefix = dict(query).get("prefix", "gradsvc")
        rest = urlunsplit(
            parts._replace(query=urlencode([kv for kv in query if kv[0] != "prefix"]))
        )
        return RedisStore(rest, prefix=f"{prefix}:", idempotency_ttl=idempotency_ttl)
    raise ValueError(
        f"unknown store {url!r}: use memory://, sqlite:///path or redis://host:port/db"
    )


__all__ = [
    "IDEMPOTENCY_TTL",
    "Commit",
    "EphemeralFile",
    "CommitItem",
    "Cursor",
    "HistoryRow",
    "IdempotencyRecord",
    "SessionRecord",
    "SessionStore",
    "is_memory",
    "open_store",
]
