"""Sessions at rest: bytes and versions, no tensors. ``open_store(url)`` picks the backend."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from service.store.base import (
    IDEMPOTENCY_TTL,
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
from service.store.ephemeral import EphemeralFile, is_memory
from service.store.sqlite import BUSY_TIMEOUT_MS


def sqlite_options(url: str) -> tuple[str, int, str, int | None]:
    """A ``sqlite://`` URL's path, busy timeout (ms), synchronous mode and page cap
    (``?max_pages=N``, for tests: a file that may not grow past N pages plays a full disk
    where a small disk cannot be mounted); ValueError, with
    what to write instead, for an option it does not know or a value it cannot use (checked
    when the settings are read, so that a typo stops the start with a message)."""
    path, _, text = url.removeprefix("sqlite:///").partition("?")
    options = dict(parse_qsl(text, keep_blank_values=True))
    unknown = sorted(set(options) - {"busy_timeout", "synchronous", "max_pages"})
    if unknown:
        raise ValueError(
            f"unknown SQLite store option {unknown[0]!r}: use ?busy_timeout=MS or "
            "?synchronous=off|normal|full"
        )
    busy = options.get("busy_timeout", str(BUSY_TIMEOUT_MS))
    if not busy.isdigit():
        raise ValueError(f"busy_timeout must be whole milliseconds, not {busy!r}")
    synchronous = options.get("synchronous", "full").lower()
    if synchronous not in ("off", "normal", "full"):
        raise ValueError(f"synchronous must be off, normal or full, not {synchronous!r}")
    pages = options.get("max_pages")
    if pages is not None and not pages.isdigit():
        raise ValueError(f"max_pages must be a whole number of pages, not {pages!r}")
    return path or "gradsvc.db", int(busy), synchronous, None if pages is None else int(pages)


def open_store(
    url: str, *, idempotency_ttl: float = IDEMPOTENCY_TTL, max_stored_bytes: int = 0
) -> SessionStore:
    """``memory://`` (this process only: the server makes it a shared file, see
    ``store.ephemeral``), ``sqlite:///path`` (relative) or ``sqlite:////abs/path`` with
    options ``?busy_timeout=MS`` (how long a write waits for another process's lock, 5000 by
    default) and ``?synchronous=off|normal|full`` (full by default),
    ``redis://host:port/db[?prefix=NAME]`` with redis-py's URL options (``socket_timeout``
    ...). ``idempotency_ttl``: seconds an idempotency record is kept; ``max_stored_bytes``: the
    bytes one owner may keep (``service.store.usage``; 0: no limit)."""
    if is_memory(url):
        from service.store.memory import MemoryStore

        return MemoryStore(idempotency_ttl=idempotency_ttl, max_stored_bytes=max_stored_bytes)
    if url.startswith("sqlite://"):
        from service.store.sqlite import SqliteStore

        path, busy_timeout_ms, synchronous, max_pages = sqlite_options(url)
        return SqliteStore(
            path,
            idempotency_ttl=idempotency_ttl,
            busy_timeout_ms=busy_timeout_ms,
            synchronous=synchronous,
            max_pages=max_pages,
            max_stored_bytes=max_stored_bytes,
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
        return RedisStore(
            rest,
            prefix=f"{prefix}:",
            idempotency_ttl=idempotency_ttl,
            max_stored_bytes=max_stored_bytes,
        )
    raise ValueError(
        f"unknown store {url!r}: use memory://, sqlite:///path or redis://host:port/db"
    )


__all__ = [
    "IDEMPOTENCY_TTL",
    "JOB_TTL",
    "Commit",
    "EphemeralFile",
    "CommitItem",
    "Cursor",
    "HistoryRow",
    "IdempotencyRecord",
    "JobRecord",
    "Progress",
    "SessionRecord",
    "SessionStore",
    "is_memory",
    "open_store",
    "sqlite_options",
]
