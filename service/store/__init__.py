"""Sessions at rest: bytes and versions, no tensors. ``open_store(url)`` picks the backend."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from service.store.base import (
    JOB_TTL,
    Commit,
    CommitItem,
    Cursor,
    HistoryRow,
    IdempotencyRecord,
    JobRecord,
    Progress,
    SessionRecord,
    SessionStore,
)


def open_store(url: str) -> SessionStore:
    """``memory://``, ``sqlite:///path`` (relative) or ``sqlite:////abs/path``,
    ``redis://host:port/db[?prefix=NAME]``."""
    if url == "memory://" or url.startswith("memory:"):
        from service.store.memory import MemoryStore

        return MemoryStore()
    if url.startswith("sqlite://"):
        from service.store.sqlite import SqliteStore

        return SqliteStore(url.removeprefix("sqlite:///") or "gradsvc.db")
    if url.startswith(("redis://", "rediss://", "unix://")):
        from service.store.redis import RedisStore

        # ?prefix=NAME keeps several deployments (or test runs) apart in one Redis database.
        parts = urlsplit(url)
        query = parse_qsl(parts.query)
        prefix = dict(query).get("prefix", "gradsvc")
        rest = urlunsplit(
            parts._replace(query=urlencode([kv for kv in query if kv[0] != "prefix"]))
        )
        return RedisStore(rest, prefix=f"{prefix}:")
    raise ValueError(
        f"unknown store {url!r}: use memory://, sqlite:///path or redis://host:port/db"
    )


__all__ = [
    "JOB_TTL",
    "Commit",
    "CommitItem",
    "Cursor",
    "HistoryRow",
    "IdempotencyRecord",
    "JobRecord",
    "Progress",
    "SessionRecord",
    "SessionStore",
    "open_store",
]
