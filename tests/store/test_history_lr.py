"""History rows keep lr, and stores written before rows had it still read: a SQLite file
with the old history table gains the column, a Redis row of the old size reads lr None; and
a SQLite file from before jobs counted their failures gains that column; a SQLite file whose
history loss is NOT NULL is rebuilt with every row kept, and then takes a row without one."""

from __future__ import annotations

import sqlite3
import struct
import time
import uuid
from dataclasses import replace
from pathlib import Path

import redis

from service.store import Commit, HistoryRow, JobRecord, SessionRecord
from service.store.redis import RedisStore
from service.store.sqlite import SqliteStore

OLD_JOBS = """CREATE TABLE jobs (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, session TEXT NOT NULL, spec TEXT NOT NULL,
    dataset BLOB NOT NULL, start_step INTEGER NOT NULL, created_at REAL NOT NULL,
    updated_at REAL NOT NULL, status TEXT NOT NULL, epoch INTEGER NOT NULL,
    batch INTEGER NOT NULL, steps_done INTEGER NOT NULL, step INTEGER NOT NULL, loss REAL,
    error TEXT, attempts INTEGER NOT NULL, lease_holder TEXT, lease_expires REAL NOT NULL,
    cancel INTEGER NOT NULL, expires_at REAL
);"""
OLD_HISTORY = """CREATE TABLE history (
    session_id TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    step INTEGER NOT NULL, loss REAL NOT NULL, grad_norm REAL NOT NULL, at REAL NOT NULL,
    PRIMARY KEY (session_id, step)
)"""


def record() -> SessionRecord:
    now = time.time()
    return SessionRecord("s_1", "o", None, "{}", b"state", 0, 1, now, now)


def test_an_old_sqlite_file_gains_lr(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:
        db.execute(OLD_HISTORY)
    store = SqliteStore(str(path))
    try:
        assert store.create(record(), None, 0) is Commit.OK
        row = HistoryRow(1, 0.5, 1.0, time.time(), 0.05)
        assert store.commit(replace(record(), step=1), 1, row) is Commit.OK
        assert store.history("o", "s_1", 10) == [row]
    finally:
        store.close()


def test_an_old_redis_row_reads_without_lr(redis_url: str) -> None:
    prefix = f"gradsvc-test:{uuid.uuid4().hex}:"
    store = RedisStore(redis_url, prefix=prefix)
    client = redis.Redis.from_url(redis_url)
    try:
        assert store.create(record(), None, 0) is Commit.OK
        new = HistoryRow(2, 0.25, 0.5, time.time(), 0.025)
        assert store.commit(replace(record(), step=2), 1, new) is Commit.OK
        old = HistoryRow(1, 0.5, 1.0, time.time())
        client.zadd(f"{prefix}h:s_1", {struct.pack(">qddd", 1, 0.5, 1.0, old.at): 1})
        assert store.history("o", "s_1", 10) == [old, new]
        client.delete(*client.scan_iter(match=f"{prefix}*"))
    finally:
        client.close()
        store.close()


def test_an_old_sqlite_jobs_table_gains_failures(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:
        db.executescript(OLD_JOBS)
    store = SqliteStore(str(path))
    try:
        assert store.create(record(), None, 0) is Commit.OK
        job = JobRecord("j_1", "o", "s_1", "{}", b"data", 0, time.time(), time.time())
        assert store.create_job(job) is Commit.OK
        claimed = store.claim_job("w", time.time(), 10)
        assert claimed is not None and (claimed.attempts, claimed.failures) == (1, 0)
    finally:
        store.close()


OLD_SESSIONS = """CREATE TABLE sessions (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, name TEXT, spec TEXT NOT NULL,
    state BLOB NOT NULL, step INTEGER NOT NULL, version INTEGER NOT NULL,
    created_at REAL NOT NULL, updated_at REAL NOT NULL
)"""


def test_an_old_sqlite_history_keeps_every_row_and_takes_a_row_without_a_loss(
    tmp_path: Path,
) -> None:
    path = tmp_path / "old.db"
    old = [HistoryRow(step, 1.0 / step, 0.5 * step, 1000.0 + step) for step in (1, 2, 3)]
    with sqlite3.connect(path) as db:
        db.execute(OLD_SESSIONS)
        db.execute(OLD_HISTORY)
        db.execute("INSERT INTO sessions VALUES ('s_1', 'o', NULL, '{}', x'00', 3, 4, 1.0, 2.0)")
        db.executemany(
            "INSERT INTO history VALUES ('s_1', ?, ?, ?, ?)",
            [(r.step, r.loss, r.grad_norm, r.at) for r in old],
        )
    for _ in range(2):  # opening it again finds nothing left to do
        store = SqliteStore(str(path))
        store.close()
    store = SqliteStore(str(path))
    try:
        assert store.history("o", "s_1", 10) == old
        lossless = HistoryRow(4, None, 1.0, time.time(), 0.05)
        record = replace(store.get("o", "s_1"), step=4)  # type: ignore[arg-type]
        assert store.commit(record, 4, lossless) is Commit.OK
        assert store.history("o", "s_1", 10) == [*old, lossless]
        assert store.delete("o", "s_1")  # the rebuilt table still follows its session
        assert store.history("o", "s_1", 10) == []
    finally:
        store.close()
    with sqlite3.connect(path) as db:
        assert [r[0] for r in db.execute("SELECT name FROM sqlite_master")].count("history") == 1
        notnull = {r[1]: r[3] for r in db.execute("PRAGMA table_info(history)")}
        assert notnull == {"session_id": 1, "step": 1, "loss": 0, "grad_norm": 1, "at": 1, "lr": 0}
