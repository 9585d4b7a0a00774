"""The jobs table of the SQLite store: each function runs inside the caller's transaction.

``SqliteStore`` opens the transaction (``BEGIN IMMEDIATE``, so the checks and the writes of
one call see no other writer in between) and calls these with its connection.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import fields, replace

from service.store import usage
from service.store.base import ACTIVE, Commit, JobRecord, Progress

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, session TEXT NOT NULL, spec TEXT NOT NULL,
    dataset BLOB NOT NULL, start_step INTEGER NOT NULL, created_at REAL NOT NULL,
    updated_at REAL NOT NULL, status TEXT NOT NULL, epoch INTEGER NOT NULL,
    batch INTEGER NOT NULL, steps_done INTEGER NOT NULL, step INTEGER NOT NULL, loss REAL,
    error TEXT, attempts INTEGER NOT NULL, lease_holder TEXT, lease_expires REAL NOT NULL,
    cancel INTEGER NOT NULL, expires_at REAL, failures INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_runnable ON jobs (status, lease_expires);
CREATE INDEX IF NOT EXISTS jobs_by_owner ON jobs (owner, status);
CREATE INDEX IF NOT EXISTS jobs_expiring ON jobs (expires_at);
"""
_NAMES = [f.name for f in fields(JobRecord)]
COLUMNS = ", ".join(_NAMES)
LIGHT = ", ".join("x'' AS dataset" if n == "dataset" else n for n in _NAMES)
"""Every column but the dataset (read as empty), for the reads that do not run the job."""
_PROGRESS = ", ".join(f"{f.name} = ?" for f in fields(Progress))


def _job(row: tuple[object, ...] | None) -> JobRecord | None:
    if row is None:
        return None
    values = dict(zip(_NAMES, row, strict=True))
    values["cancel"] = bool(values["cancel"])
    return JobRecord(**values)  # type: ignore[arg-type]


def _values(job: JobRecord) -> tuple[object, ...]:
    return tuple(int(v) if isinstance(v, bool) else v for v in vars(job).values())


def purge(db: sqlite3.Connection, now: float) -> None:
    """Forget finished jobs past their TTL: each job by its own time, whoever owns it."""
    db.execute("DELETE FROM jobs WHERE expires_at IS NOT NULL AND expires_at <= ?", (now,))


def create(
    db: sqlite3.Connection,
    job: JobRecord,
    key_taken: bool,
    limit: int,
    over: Callable[[int], bool],
) -> Commit:
    """``over(grows)``: whether the owner's bytes may not grow by ``grows`` (its dataset)."""
    purge(db, job.created_at)
    row = db.execute(
        "SELECT hold, step FROM sessions WHERE id = ? AND owner = ?", (job.session, job.owner)
    ).fetchone()
    if row is None:
        return Commit.GONE
    if row[0] is not None:
        return Commit.BUSY
    if key_taken or db.execute("SELECT 1 FROM jobs WHERE id = ?", (job.id,)).fetchone():
        return Commit.CONFLICT
    if limit:
        (active,) = db.execute(
            "SELECT count(*) FROM jobs WHERE owner = ? AND status IN (?, ?)", (job.owner, *ACTIVE)
        ).fetchone()
        if active >= limit:
            return Commit.FULL
    if over(usage.job_bytes(job)):
        return Commit.QUOTA
    job = replace(job, start_step=row[1], step=row[1])  # the step the session is at now
    marks = ", ".join("?" * len(_NAMES))
    db.execute(f"INSERT INTO jobs ({COLUMNS}) VALUES ({marks})", _values(job))
    usage.sqlite_add(db, job.owner, usage.job_bytes(job))
    db.execute("UPDATE sessions SET hold = ? WHERE id = ?", (job.id, job.session))
    return Commit.OK


def get(db: sqlite3.Connection, owner: str, job_id: str, now: float) -> JobRecord | None:
    return _job(
        db.execute(
            f"SELECT {LIGHT} FROM jobs WHERE id = ? AND owner = ? "
            "AND (expires_at IS NULL OR expires_at > ?)",
            (job_id, owner, now),
        ).fetchone()
    )


RUNNABLE = (
    "SELECT id FROM jobs WHERE status = 'queued' OR (status = 'running' AND lease_expires < ?)"
    " ORDER BY created_at, id LIMIT 1"
)


def runnable(db: sqlite3.Connection, now: float) -> bool:
    """Whether a claim would find a job: a plain read, so that idle workers polling for jobs
    never take the write lock."""
    return db.execute(RUNNABLE, (now,)).fetchone() is not None


def claim(db: sqlite3.Connection, worker: str, now: float, lease: float) -> JobRecord | None:
    row = db.execute(RUNNABLE, (now,)).fetchone()
    if row is None:
        return None
    db.execute(
        "UPDATE jobs SET status = 'running', attempts = attempts + 1, lease_holder = ?, "
        "lease_expires = ?, updated_at = ? WHERE id = ?",
        (worker, now + lease, now, row[0]),
    )
    return _job(db.execute(f"SELECT {COLUMNS} FROM jobs WHERE id = ?", (row[0],)).fetchone())


def renew(
    db: sqlite3.Connection,
    job_id: str,
    worker: str,
    now: float,
    lease: float,
    progress: Progress | None,
    failures: int | None = None,
) -> JobRecord | None:
    sets, args = "lease_expires = ?, updated_at = ?", [now + lease, now]
    if progress is not None:
        sets += ", " + _PROGRESS
        args += list(vars(progress).values())
    if failures is not None:
        sets += ", failures = ?"
        args.append(failures)
    cursor = db.execute(
        f"UPDATE jobs SET {sets} WHERE id = ? AND status = 'running' AND lease_holder = ?",
        (*args, job_id, worker),
    )
    if cursor.rowcount == 0:
        return None
    return _job(db.execute(f"SELECT {LIGHT} FROM jobs WHERE id = ?", (job_id,)).fetchone())


def finish(
    db: sqlite3.Connection,
    job_id: str,
    worker: str | None,
    status: str,
    progress: Progress | None,
    error: str | None,
    now: float,
    ttl: float,
) -> bool:
    """The final status and the hold's release, in the caller's one transaction; the dataset
    goes, and its bytes with it. ``worker`` None: the job is queued (a cancel before any
    runner took it)."""
    sets = "status = ?, error = ?, updated_at = ?, expires_at = ?, dataset = x'', "
    sets += "lease_holder = NULL"
    args: list[object] = [status, error, now, now + ttl]
    if progress is not None:
        sets += ", " + _PROGRESS
        args += list(vars(progress).values())
    where = "status = 'queued'" if worker is None else "status = 'running' AND lease_holder = ?"
    args.append(job_id)
    if worker is not None:
        args.append(worker)
    held = db.execute(
        "SELECT owner, session, length(dataset) FROM jobs WHERE id = ?", (job_id,)
    ).fetchone()
    cursor = db.execute(f"UPDATE jobs SET {sets} WHERE id = ? AND {where}", args)
    if cursor.rowcount == 0:
        return False
    owner, session, size = held
    usage.sqlite_add(db, owner, -int(size))
    purge(db, now)
    db.execute("UPDATE sessions SET hold = NULL WHERE id = ? AND hold = ?", (session, job_id))
    return True


def cancel(
    db: sqlite3.Connection, owner: str, job_id: str, now: float, ttl: float
) -> JobRecord | None:
    job = get(db, owner, job_id, now)
    if job is None or job.status not in ACTIVE:
        return job
    if job.status == "queued":
        finish(db, job_id, None, "cancelled", None, None, now, ttl)
        db.execute("UPDATE jobs SET cancel = 1 WHERE id = ?", (job_id,))
    else:
        db.execute("UPDATE jobs SET cancel = 1, updated_at = ? WHERE id = ?", (now, job_id))
    return get(db, owner, job_id, now)
