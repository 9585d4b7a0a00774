"""Store trouble leaves a store as a domain error, in one piece, and travels back from a
worker as one: a locked SQLite file, an unreachable Redis, and their write probes."""

from __future__ import annotations

import asyncio
import pickle
import sqlite3
import threading
import time
import uuid
from pathlib import Path

import pytest

from service.errors import InsufficientStorage, StoreUnavailable
from service.store.base import Commit
from service.store.ratelimit import Buckets
from service.store.redis import RedisStore
from service.store.sqlite import SqliteStore
from service.store.trouble import redis_trouble, sqlite_trouble
from tests.e2e.server import free_port
from tests.store.test_contract import ALICE, idem, row, session, stepped


def test_a_locked_sqlite_file_is_store_unavailable_and_writes_nothing(tmp_path: Path) -> None:
    path = str(tmp_path / "locked.db")
    store = SqliteStore(path, busy_timeout_ms=50)
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        record = session()
        assert store.create(record) is Commit.OK
        holder.execute("BEGIN EXCLUSIVE")
        started = time.monotonic()
        with pytest.raises(StoreUnavailable) as caught:
            store.commit(stepped(record), 1, row(1), idem("k"))
        assert time.monotonic() - started < 2  # the short busy wait, not 30 s
        assert "locked" in caught.value.detail and caught.value.retry_after >= 1
        with pytest.raises(StoreUnavailable):
            store.writable()
        holder.execute("ROLLBACK")
        # Nothing half-written, and the store's connection is usable again.
        assert store.get(ALICE, "s1") == record
        assert store.history(ALICE, "s1", 10) == []
        assert store.idempotency(ALICE, "k", time.time()) is None
        store.writable()
        assert store.commit(stepped(record), 1, row(1), idem("k")) is Commit.OK
    finally:
        holder.close()
        store.close()


def test_an_unreachable_redis_is_store_unavailable() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0?socket_connect_timeout=0.5&socket_timeout=0.5"
    store = RedisStore(url, prefix="gone:")
    try:
        with pytest.raises(StoreUnavailable):
            store.get(ALICE, "s1")
        with pytest.raises(StoreUnavailable):
            store.writable()
        with pytest.raises(StoreUnavailable):
            asyncio.run(_take_once(store.buckets(1.0, 1)))
        assert store.ping() is False
    finally:
        store.close()


async def _take_once(buckets: Buckets) -> float:
    try:
        return await buckets.take(ALICE, time.time())
    finally:
        await buckets.aclose()


def test_a_bucket_redis_cannot_use_is_store_unavailable(redis_url: str) -> None:
    """Any Redis failure of the rate limiter is a 503 (here: its key holds another type, a
    WRONGTYPE error that the stores do not map), never a 500."""
    import redis

    prefix = f"wrongtype-{uuid.uuid4().hex[:8]}:"
    store = RedisStore(redis_url, prefix=prefix)
    raw = redis.Redis.from_url(redis_url)
    bucket = f"{prefix}rate:{ALICE}"
    try:
        raw.set(bucket, "not a hash")
        with pytest.raises(StoreUnavailable, match="could not be checked in Redis"):
            asyncio.run(_take_once(store.buckets(1.0, 1)))
        raw.delete(bucket)
        assert asyncio.run(_take_once(store.buckets(1.0, 1))) == 0  # the same, once fixed
    finally:
        raw.delete(bucket)
        raw.close()
        store.close()


def test_driver_errors_are_named() -> None:
    import redis

    full = sqlite3.OperationalError("database or disk is full")
    assert isinstance(sqlite_trouble(full), InsufficientStorage)
    assert isinstance(sqlite_trouble(OSError(28, "No space left on device")), InsufficientStorage)
    locked = sqlite3.OperationalError("database is locked")
    assert isinstance(sqlite_trouble(locked), StoreUnavailable)
    assert sqlite_trouble(sqlite3.OperationalError("no such table: x")) is None  # a bug
    oom = redis.OutOfMemoryError("OOM command not allowed when used memory > 'maxmemory'")
    assert isinstance(redis_trouble(oom), InsufficientStorage)
    assert isinstance(redis_trouble(redis.BusyLoadingError("loading")), StoreUnavailable)
    assert isinstance(redis_trouble(redis.TimeoutError("timeout")), StoreUnavailable)
    assert redis_trouble(redis.ResponseError("WRONGTYPE")) is None


def test_the_errors_cross_the_worker_socket_intact() -> None:
    for error in (StoreUnavailable("locked"), InsufficientStorage("full")):
        back = pickle.loads(pickle.dumps(error))
        assert (type(back), back.detail, back.status, back.type) == (
            type(error),
            error.detail,
            error.status,
            error.type,
        )
    assert pickle.loads(pickle.dumps(StoreUnavailable("x", retry_after=7))).retry_after == 7


def test_sqlite_url_options_are_checked_when_the_settings_are_read(tmp_path: Path) -> None:
    from pydantic import ValidationError

    from service.config import Settings
    from service.store import open_store

    store = open_store(f"sqlite:///{tmp_path / 'o.db'}?busy_timeout=50&synchronous=off")
    try:
        assert isinstance(store, SqliteStore)
        assert (store.busy_timeout_ms, store.synchronous) == (50, "OFF")
    finally:
        store.close()
    for bad in ("?busy=5", "?busy_timeout=soon", "?synchronous=sometimes"):
        with pytest.raises(ValidationError):
            Settings(store=f"sqlite:///{tmp_path / 'o.db'}{bad}")


def test_memory_files_of_dead_servers_are_removed_by_the_next_one() -> None:
    import subprocess
    import sys
    import tempfile

    from service.store.ephemeral import PREFIX, EphemeralFile

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    orphan = Path(tempfile.mkdtemp(prefix=PREFIX))
    (orphan / "pid").write_text(str(gone.pid))
    live = EphemeralFile()
    try:
        assert not orphan.exists()
        assert live.directory.exists() and live.url.startswith("sqlite:///")
        EphemeralFile().remove()  # another live one leaves this one alone
        assert live.directory.exists()
    finally:
        live.remove()
    assert not live.directory.exists()


def test_many_stores_opening_one_fresh_file_at_once_all_open(tmp_path: Path) -> None:
    """Every worker opens the file at once when a server starts. Switching a fresh file to
    WAL needs it alone, and SQLite answers "locked" at once there instead of waiting, so an
    opener used to fail now and then (the quota race test met it on CI)."""
    failures: list[BaseException] = []

    def open_one(path: str, barrier: threading.Barrier) -> None:
        barrier.wait()
        try:
            SqliteStore(path, max_stored_bytes=1 << 20).close()
        except BaseException as err:  # noqa: BLE001 - the test reports every one
            failures.append(err)

    for n in range(40):
        path = str(tmp_path / f"fresh{n}.db")
        barrier = threading.Barrier(6)
        threads = [threading.Thread(target=open_one, args=(path, barrier)) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        store = SqliteStore(path)
        try:
            assert store.create(session()) is Commit.OK  # and the file is whole
            assert (store._conn().execute("PRAGMA journal_mode").fetchone()[0]) == "wal"
        finally:
            store.close()
    assert failures == []
