"""Store trouble as domain errors, at the store's own boundary.

A locked SQLite file, a full disk or an unreachable Redis is not a bug: the client should be
told to retry (503 ``store-unavailable``) or that the store is full (507
``insufficient-storage``), and an operator's /readyz should say so. Each store maps its
driver's errors here, once, with ``translated``: every public method of the class is wrapped,
so no call can leak a raw ``sqlite3.OperationalError`` or ``redis.ConnectionError`` to the
worker's catch-all, which would answer 500 "this is a bug".

Nothing is half-written when these are raised: a SQLite transaction rolls back, and a Redis
write is one script or one MULTI/EXEC, which the server applies whole or not at all.
"""

from __future__ import annotations

import collections
import errno
import functools
import sqlite3
from collections.abc import Callable
from typing import Any, TypeVar

import redis

from service.errors import GradsvcError, InsufficientStorage, StoreUnavailable

T = TypeVar("T")
Translate = Callable[[BaseException], GradsvcError | None]

_LOCKED = ("database is locked", "database table is locked", "busy")
_FULL_CODES = {getattr(sqlite3, "SQLITE_FULL", 13)}
_BUSY_CODES = {getattr(sqlite3, "SQLITE_BUSY", 5), getattr(sqlite3, "SQLITE_LOCKED", 6)}


def sqlite_trouble(exc: BaseException) -> GradsvcError | None:
    """The domain error a SQLite failure amounts to, or None if it is not store trouble."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return _full("the disk holding the SQLite store is full")
    if not isinstance(exc, sqlite3.OperationalError):
        return None
    text = str(exc).lower()
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        code &= 0xFF  # the primary code: SQLITE_IOERR_WRITE is IOERR, and so on
    if code in _FULL_CODES or text.startswith("database or disk is full"):
        return _full("the disk holding the SQLite store is full")
    if code in _BUSY_CODES or any(word in text for word in _LOCKED):
        return StoreUnavailable(
            "the SQLite store stayed locked by another process past its busy wait; nothing "
            "was written: retry shortly (if it persists, look for a process holding the file)",
            kind="locked",
        )
    if "readonly" in text.replace(" ", "") or "unable to open" in text:
        return StoreUnavailable(
            f"the SQLite store refuses writes ({exc}); nothing was written: retry shortly, "
            "and check the file's permissions and mount"
        )
    if "disk i/o error" in text:
        return StoreUnavailable(
            "the SQLite store could not write to its disk (I/O error); nothing was written: "
            "retry shortly, and check the disk"
        )
    return None


def redis_trouble(exc: BaseException) -> GradsvcError | None:
    """The domain error a Redis failure amounts to, or None if it is not store trouble."""
    if isinstance(exc, redis.OutOfMemoryError) or (
        isinstance(exc, redis.ResponseError) and str(exc).startswith("OOM")
    ):
        return _full("Redis is at its maxmemory and refuses writes")
    if isinstance(exc, redis.BusyLoadingError):
        return StoreUnavailable(
            "Redis is still loading its data set; nothing was written: retry shortly"
        )
    if isinstance(exc, redis.ReadOnlyError):
        return StoreUnavailable(
            "the Redis server is a read-only replica; nothing was written: retry shortly, "
            "and point --store at the primary"
        )
    if isinstance(exc, redis.TimeoutError):
        return StoreUnavailable(
            "Redis did not answer in time; nothing was acknowledged: retry shortly (with the "
            "same Idempotency-Key, a retry is applied at most once)"
        )
    if isinstance(exc, redis.ConnectionError):
        return StoreUnavailable(
            "the Redis store cannot be reached; nothing was written: retry shortly"
        )
    return None


def _full(what: str) -> InsufficientStorage:
    return InsufficientStorage(
        f"{what}; nothing was written. Retrying will not help until an operator frees space "
        "(or deletes sessions you no longer need)"
    )


met: collections.Counter[str] = collections.Counter()
"""The store trouble this process has met, by kind (``unavailable``, ``locked``, ``full``),
since ``drain_met`` last asked: counted once, here, where it leaves the store (the metric
``gradsvc_store_errors_total``)."""


def drain_met() -> dict[str, int]:
    """The trouble counted since the last call (and forgotten here)."""
    counts = dict(met)
    met.clear()
    return counts


def count(error: GradsvcError) -> None:
    """Count ``error`` in ``met`` if it is store trouble, once however many wrapped methods
    it leaves through (one store method may call another)."""
    if isinstance(error, StoreUnavailable | InsufficientStorage) and not getattr(
        error, "_counted", False
    ):
        error._counted = True  # type: ignore[union-attr]
        met[error.kind] += 1


def translated(translate: Translate) -> Callable[[type[T]], type[T]]:
    """Wrap every public method of a store class so that its driver's trouble leaves it as
    a domain error (``translate`` decides which failures are trouble; others go on as they
    are: they are bugs)."""

    def wrap(method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return method(*args, **kwargs)
            except GradsvcError as exc:
                count(exc)
                raise
            except Exception as exc:
                error = translate(exc)
                if error is None:
                    raise
                count(error)
                raise error from exc

        return call

    def decorate(cls: type[T]) -> type[T]:
        for name, value in list(vars(cls).items()):
            if callable(value) and not name.startswith("_") and name != "close":
                setattr(cls, name, wrap(value))
        return cls

    return decorate
