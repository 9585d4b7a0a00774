"""SQLite, the default store: one file, WAL, ``synchronous=FULL``, ``BEGIN IMMEDIATE``.

A commit is one transaction: the version compare-and-set on the session row, the history
row, the idempotency record and the owner's bytes (the ``usage`` table,
``service.store.usage``). Nothing is acknowledged before it returns.

Trouble is short and named: a writer waits ``busy_timeout`` ms (5 s by default, not 30) for
another process's lock, then the call is a ``StoreUnavailable``; a full disk is an
``InsufficientStorage`` (``store.trouble``). Either way the transaction is rolled back.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from service.errors import InsufficientStorage
from service.store import jobs_sqlite, usage
from service.store.base import (
    IDEMPOTENCY_TTL,
    Commit,
    CommitItem,
    Cursor,
    HistoryRow,
    IdempotencyRecord,
    JobRecord,
    Progress,
    SessionRecord,
)
from service.store.ratelimit import MemoryBuckets
from service.store.sqlite_group import commit_group
from service.store.trouble import sqlite_trouble, translated

_HISTORY = """
    session_id TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    step INTEGER NOT NULL, loss REAL, grad_norm REAL NOT NULL, at REAL NOT NULL,
    lr REAL, PRIMARY KEY (session_id, step)
"""
SCHEMA = f"""
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, name TEXT, spec TEXT NOT NULL,
    state BLOB NOT NULL, step INTEGER NOT NULL, version INTEGER NOT NULL,
    created_at REAL NOT NULL, updated_at REAL NOT NULL, hold TEXT
);
CREATE INDEX IF NOT EXISTS sessions_by_owner ON sessions (owner, created_at, id);
CREATE TABLE IF NOT EXISTS history ({_HISTORY});
CREATE TABLE IF NOT EXISTS idempotency (
    owner TEXT NOT NULL, key TEXT NOT NULL, fingerprint TEXT NOT NULL, status INTEGER NOT NULL,
    body BLOB NOT NULL, headers TEXT NOT NULL, created_at REAL NOT NULL,
    PRIMARY KEY (owner, key)
);
CREATE INDEX IF NOT EXISTS idempotency_by_age ON idempotency (created_at);
CREATE TABLE IF NOT EXISTS health (id INTEGER PRIMARY KEY, at REAL NOT NULL);
"""
BUSY_TIMEOUT_MS = 5000
"""How long a writer waits for another process's lock by default (``?busy_timeout=MS``)."""
PROBE_TIMEOUT_MS = 1000
"""/readyz's write probe waits this long for a lock at most: a probe must answer quickly."""
MIN_FREE_BYTES = 64 * 1024
"""Below this much free disk the store is reported full: a step's write could not fit."""
CACHE_KIB = 16 * 1024
"""Each connection's page cache, an upper bound (it fills only as pages are read). SQLite's
default, 2 MiB, is less than a group of a few hundred sessions' states: a group's commit
spilled its dirty pages to the WAL mid-transaction and the next group's read went back to
the file for every state; 16 MiB holds a group of about a thousand small-MLP sessions."""
_COLUMNS = "id, owner, name, spec, state, step, version, created_at, updated_at, hold"


_MIGRATIONS = (
    # (table, column, what adds it): files from before jobs, lr and job failures.
    ("sessions", "hold", "ALTER TABLE sessions ADD COLUMN hold TEXT"),
    ("history", "lr", "ALTER TABLE history ADD COLUMN lr REAL"),
    ("jobs", "failures", "ALTER TABLE jobs ADD COLUMN failures INTEGER NOT NULL DEFAULT 0"),
)


def _make_schema(db: sqlite3.Connection) -> None:
    """Create the tables and add the columns an older file lacks, inside the caller's write
    transaction (``executescript`` would commit it, so statement by statement)."""
    for statement in (SCHEMA + jobs_sqlite.SCHEMA).split(";"):
        if statement.strip():
            db.execute(statement)
    for table, column, alter in _MIGRATIONS:
        if column not in {row[1] for row in db.execute(f"PRAGMA table_info({table})")}:
            db.execute(alter)
    _nullable_loss(db)


def _nullable_loss(db: sqlite3.Connection) -> None:
    """Rebuild a history table whose loss is NOT NULL (files from before an apply could have
    no loss): SQLite cannot alter a column, so copy every row of a session that exists into
    a table of today's shape and put it in the old one's place, in the caller's transaction.
    A no-op once done."""
    notnull = {row[1]: row[3] for row in db.execute("PRAGMA table_info(history)")}
    if not notnull.get("loss"):
        return
    columns = "session_id, step, loss, grad_norm, at, lr"
    db.execute(f"CREATE TABLE history_rebuilt ({_HISTORY})")
    # Only rows of a session that exists: a session deleted with foreign keys off (the
    # sqlite3 shell's default) left its rows behind, unreadable, and they would fail the copy.
    db.execute(
        f"INSERT INTO history_rebuilt ({columns}) SELECT {columns} FROM history "
        "WHERE session_id IN (SELECT id FROM sessions)"
    )
    db.execute("DROP TABLE history")
    db.execute("ALTER TABLE history_rebuilt RENAME TO history")


def _use_wal(db: sqlite3.Connection, patience: float) -> None:
    """Switch the file to WAL. On a fresh file the switch needs it to itself, and SQLite
    answers "locked" at once rather than calling the busy handler while another connection
    opening the same file holds it, so wait here, as a writer would."""
    deadline = time.monotonic() + patience
    delay = 0.001
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as err:
            if "locked" not in str(err) or time.monotonic() >= deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.05)


@translated(sqlite_trouble)
class SqliteStore:
    def __init__(
        self,
        path: str,
        *,
        idempotency_ttl: float = IDEMPOTENCY_TTL,
        busy_timeout_ms: int = BUSY_TIMEOUT_MS,
        synchronous: str = "full",
        max_pages: int | None = None,
        max_stored_bytes: int = 0,
    ) -> None:
        if synchronous.lower() not in ("off", "normal", "full"):
            raise ValueError(f"synchronous must be off, normal or full, not {synchronous!r}")
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.idempotency_ttl = idempotency_ttl
        self.busy_timeout_ms = busy_timeout_ms
        self.synchronous = synchronous.upper()
        self.max_pages = max_pages
        self.max_stored_bytes = max_stored_bytes
        self._probe_lock = threading.Lock()
        self._probe_db: sqlite3.Connection | None = None
        # One connection per thread: WAL lets readers go on while another thread's commit
        # waits for its fsync; SQLite itself serialises the writers (BEGIN IMMEDIATE).
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._all_lock = threading.Lock()
        with self._write() as db:
            # Every worker opens the file at once: one at a time makes or migrates it.
            _make_schema(db)
            usage.sqlite_prepare(db)

    def _conn(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            db.execute(f"PRAGMA busy_timeout={int(self.busy_timeout_ms)}")
            _use_wal(db, self.busy_timeout_ms / 1000)
            db.execute(f"PRAGMA synchronous={self.synchronous}")
            db.execute("PRAGMA foreign_keys=ON")
            db.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
            self._cap(db)
            self._local.db = db
            with self._all_lock:
                self._all.append(db)
        return db

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
            db.execute("COMMIT")  # a full disk can fail here, too: then roll back as well
        except BaseException:
            if db.in_transaction:  # SQLite may have rolled back already (SQLITE_FULL)
                db.execute("ROLLBACK")
            raise

    def _idem_grows(self, db: sqlite3.Connection, idem: IdempotencyRecord | None) -> int | None:
        """What putting ``idem`` adds (its answer, less the expired record it replaces), or
        None if its key is taken."""
        if idem is None:
            return 0
        row = db.execute(
            "SELECT created_at, length(body) FROM idempotency WHERE owner = ? AND key = ?",
            (idem.owner, idem.key),
        ).fetchone()
        if row is None:
            return usage.idem_bytes(idem)
        if row[0] + self.idempotency_ttl > idem.created_at:
            return None
        return usage.idem_bytes(idem) - int(row[1])

    def _over(self, db: sqlite3.Connection, owner: str, grows: int) -> bool:
        if self.max_stored_bytes <= 0 or grows <= 0:
            return False  # no read needed: nothing that does not grow is refused
        return usage.over(usage.sqlite_used(db, owner), grows, self.max_stored_bytes)

    def stored_bytes(self, owner: str) -> int:
        return usage.sqlite_used(self._conn(), owner)

    def _put_idem(self, db: sqlite3.Connection, idem: IdempotencyRecord | None, grows: int) -> None:
        """Write ``idem``, which adds ``grows`` bytes (``_idem_grows``)."""
        if idem is not None:
            usage.sqlite_add(db, idem.owner, grows)
            db.execute(
                "INSERT OR REPLACE INTO idempotency VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    idem.owner,
                    idem.key,
                    idem.fingerprint,
                    idem.status,
                    idem.body,
                    idem.headers,
                    idem.created_at,
                ),
            )

    def create(
        self, record: SessionRecord, idem: IdempotencyRecord | None = None, limit: int = 0
    ) -> Commit:
        with self._write() as db:
            idem_grows = self._idem_grows(db, idem)
            if idem_grows is None:
                return Commit.CONFLICT
            if limit:
                (count,) = db.execute(
                    "SELECT count(*) FROM sessions WHERE owner = ?", (record.owner,)
                ).fetchone()
                if count >= limit:
                    return Commit.FULL
            if db.execute("SELECT 1 FROM sessions WHERE id = ?", (record.id,)).fetchone():
                return Commit.CONFLICT
            if self._over(db, record.owner, usage.session_bytes(record) + idem_grows):
                return Commit.QUOTA
            db.execute(
                f"INSERT INTO sessions ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)", _row(record)
            )
            usage.sqlite_add(db, record.owner, usage.session_bytes(record))
            self._put_idem(db, idem, idem_grows)
        return Commit.OK

    def get(self, owner: str, session_id: str) -> SessionRecord | None:
        row = (
            self._conn()
            .execute(
                f"SELECT {_COLUMNS} FROM sessions WHERE id = ? AND owner = ?", (session_id, owner)
            )
            .fetchone()
        )
        return SessionRecord(*row) if row else None

    def get_many(self, keys: Sequence[tuple[str, str]]) -> list[SessionRecord | None]:
        # One statement per chunk (SQLite's default bound on parameters is 999); the
        # owner is compared here, as ``get`` compares it in SQL.
        found: dict[str, SessionRecord] = {}
        ids = list(dict.fromkeys(session_id for _, session_id in keys))
        for start in range(0, len(ids), 900):
            chunk = ids[start : start + 900]
            marks = ",".join("?" * len(chunk))
            rows = (
                self._conn()
                .execute(f"SELECT {_COLUMNS} FROM sessions WHERE id IN ({marks})", chunk)
                .fetchall()
            )
            found.update((record.id, record) for record in (SessionRecord(*row) for row in rows))
        return [
            record if (record := found.get(sid)) is not None and record.owner == owner else None
            for owner, sid in keys
        ]

    def sessions(self, owner: str, limit: int, after: Cursor | None = None) -> list[SessionRecord]:
        created, sid = after if after is not None else (-1.0, "")
        rows = (
            self._conn()
            .execute(
                f"SELECT {_COLUMNS} FROM sessions WHERE owner = ? AND (created_at, id) > (?, ?) "
                "ORDER BY created_at, id LIMIT ?",
                (owner, created, sid, limit),
            )
            .fetchall()
        )
        return [SessionRecord(*row) for row in rows]

    def commit(
        self,
        record: SessionRecord,
        expected_version: int,
        history: HistoryRow | None = None,
        idem: IdempotencyRecord | None = None,
    ) -> Commit:
        return self.commit_many([CommitItem(record, expected_version, history, idem)])[0]

    def commit_many(self, items: Sequence[CommitItem]) -> list[Commit]:
        with self._write() as db:
            return commit_group(db, items, ttl=self.idempotency_ttl, limit=self.max_stored_bytes)

    def delete(self, owner: str, session_id: str) -> bool:
        with self._write() as db:
            # fetchall: a RETURNING statement left mid-way would hold the transaction open.
            rows = db.execute(
                "DELETE FROM sessions WHERE id = ? AND owner = ? AND hold IS NULL "
                "RETURNING length(state)",
                (session_id, owner),
            ).fetchall()
            if not rows:
                return False
            usage.sqlite_add(db, owner, -int(rows[0][0]))
            return True

    def history(
        self, owner: str, session_id: str, limit: int, after_step: int = 0
    ) -> list[HistoryRow]:
        rows = (
            self._conn()
            .execute(
                "SELECT h.step, h.loss, h.grad_norm, h.at, h.lr FROM history h JOIN sessions s "
                "ON s.id = h.session_id WHERE s.id = ? AND s.owner = ? AND h.step > ? "
                "ORDER BY h.step LIMIT ?",
                (session_id, owner, after_step, limit),
            )
            .fetchall()
        )
        return [HistoryRow(*row) for row in rows]

    def idempotency(self, owner: str, key: str, now: float) -> IdempotencyRecord | None:
        row = (
            self._conn()
            .execute(
                "SELECT owner, key, fingerprint, status, body, headers, created_at "
                "FROM idempotency WHERE owner = ? AND key = ? AND created_at > ?",
                (owner, key, now - self.idempotency_ttl),
            )
            .fetchone()
        )
        return IdempotencyRecord(*row) if row else None

    def remember(self, idem: IdempotencyRecord) -> Commit:
        with self._write() as db:
            grows = self._idem_grows(db, idem)
            if grows is None:
                return Commit.CONFLICT
            if self._over(db, idem.owner, grows):
                return Commit.QUOTA
            self._put_idem(db, idem, grows)
            return Commit.OK

    # -- jobs (service.store.jobs_sqlite, each call one transaction) -------------------------

    def create_job(
        self, job: JobRecord, idem: IdempotencyRecord | None = None, limit: int = 0
    ) -> Commit:
        with self._write() as db:
            idem_grows = self._idem_grows(db, idem)
            outcome = jobs_sqlite.create(
                db,
                job,
                idem_grows is None,
                limit,
                lambda grows: self._over(db, job.owner, grows + (idem_grows or 0)),
            )
            if outcome is Commit.OK:
                self._put_idem(db, idem, idem_grows or 0)
            return outcome

    def get_job(self, owner: str, job_id: str, now: float) -> JobRecord | None:
        return jobs_sqlite.get(self._conn(), owner, job_id, now)

    def claim_job(self, worker: str, now: float, lease_seconds: float) -> JobRecord | None:
        if not jobs_sqlite.runnable(self._conn(), now):
            return None
        with self._write() as db:
            return jobs_sqlite.claim(db, worker, now, lease_seconds)

    def renew_lease(
        self,
        job_id: str,
        worker: str,
        now: float,
        lease_seconds: float,
        progress: Progress | None = None,
        failures: int | None = None,
    ) -> JobRecord | None:
        with self._write() as db:
            return jobs_sqlite.renew(db, job_id, worker, now, lease_seconds, progress, failures)

    def finish_job(
        self,
        job_id: str,
        worker: str,
        status: str,
        progress: Progress,
        error: str | None,
        now: float,
        ttl: float,
    ) -> bool:
        with self._write() as db:
            return jobs_sqlite.finish(db, job_id, worker, status, progress, error, now, ttl)

    def cancel_job(self, owner: str, job_id: str, now: float, ttl: float) -> JobRecord | None:
        with self._write() as db:
            return jobs_sqlite.cancel(db, owner, job_id, now, ttl)

    def buckets(self, rate: float, burst: int) -> MemoryBuckets:
        # One file serves one machine's processes; each keeps its own buckets.
        return MemoryBuckets(rate, burst)

    def ping(self) -> bool:
        return bool(self._conn().execute("SELECT 1").fetchone() == (1,))

    def writable(self) -> None:
        """Raise the trouble a write would meet now, else return: a full disk, or a lock
        held past a short wait. It commits a real one-row write (a rolled-back one would
        not notice a full disk), on a connection of its own with a short busy wait."""
        if self.path != ":memory:":
            disk = os.statvfs(Path(self.path).parent)
            if disk.f_bavail * disk.f_frsize < MIN_FREE_BYTES:
                raise InsufficientStorage(
                    f"the disk holding the SQLite store has less than {MIN_FREE_BYTES // 1024} "
                    "KiB free; steps cannot be written until an operator frees space"
                )
        with self._probe_lock:
            if self._probe_db is None:
                self._probe_db = sqlite3.connect(
                    self.path, check_same_thread=False, isolation_level=None
                )
                timeout = min(PROBE_TIMEOUT_MS, self.busy_timeout_ms)
                self._probe_db.execute(f"PRAGMA busy_timeout={int(timeout)}")
                self._cap(self._probe_db)
            db = self._probe_db
            if self.max_pages is not None:
                (pages,) = db.execute("PRAGMA page_count").fetchone()
                (free,) = db.execute("PRAGMA freelist_count").fetchone()
                (size,) = db.execute("PRAGMA page_size").fetchone()
                if (self.max_pages - pages + free) * size < MIN_FREE_BYTES:
                    raise InsufficientStorage(
                        f"the SQLite store is at its cap of {self.max_pages} pages; steps "
                        "cannot be written until sessions are deleted"
                    )
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute("INSERT OR REPLACE INTO health VALUES (1, ?)", (time.time(),))
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise

    def _cap(self, db: sqlite3.Connection) -> None:
        if self.max_pages is not None:
            db.execute(f"PRAGMA max_page_count={int(self.max_pages)}")

    def purge(self, now: float, batch: int = 500) -> int:
        """Delete the idempotency records older than the TTL, ``batch`` per transaction (so
        that no writer waits long behind it); the number deleted."""
        deleted = 0
        while True:
            with self._write() as db:
                gone = db.execute(
                    "DELETE FROM idempotency WHERE rowid IN (SELECT rowid FROM idempotency "
                    "WHERE created_at <= ? LIMIT ?) RETURNING owner, length(body)",
                    (now - self.idempotency_ttl, batch),
                ).fetchall()
                freed: dict[str, int] = {}
                for owner, size in gone:
                    freed[owner] = freed.get(owner, 0) + int(size)
                for owner, size in freed.items():
                    usage.sqlite_add(db, owner, -size)
            count = len(gone)
            deleted += count
            if count < batch:
                return deleted

    def close(self) -> None:
        with self._all_lock:
            for db in self._all:
                db.close()
            self._all.clear()
        with self._probe_lock:
            if self._probe_db is not None:
                self._probe_db.close()
                self._probe_db = None


def _row(r: SessionRecord) -> tuple[object, ...]:
    return (
        r.id,
        r.owner,
        r.name,
        r.spec,
        r.state,
        r.step,
        r.version,
        r.created_at,
        r.updated_at,
        r.hold,
    )
