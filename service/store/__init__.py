"""Sessions at rest: bytes and versions, no tensors. ``open_store(url)`` picks the backend."""

from __future__ import annotations

from service.store.base import (
    Commit,
    HistoryRow,
    IdempotencyRecord,
    SessionRecord,
    SessionStore,
)


def open_store(url: str) -> SessionStore:
    """``memory://``, ``sqlite:///path`` (relative) or ``sqlite:////abs/path``, ``redis://...``."""
    if url == "memory://" or url.startswith("memory:"):
        from service.store.memory import MemoryStore

        return MemoryStore()
    if url.startswith("sqlite://"):
        from service.store.sqlite import SqliteStore

        return SqliteStore(url.removeprefix("sqlite:///") or "gradsvc.db")
    if url.startswith(("redis://", "rediss://", "unix://")):
        from service.store.redis import RedisStore

        return RedisStore(url)
    raise ValueError(
        f"unknown store {url!r}: use memory://, sqlite:///path or redis://host:port/db"
    )


__all__ = [
    "Commit",
    "HistoryRow",
    "IdempotencyRecord",
    "SessionRecord",
    "SessionStore",
    "open_store",
]
