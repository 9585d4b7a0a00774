"""An in-memory store, in one process: the contract's test seam. Same semantics, no
durability, and no sharing between processes (``memory://`` is a private SQLite file, so
that every worker sees its sessions and a worker's crash loses none)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from service.store.base import (
    ACTIVE,
    IDEMPOTENCY_TTL,
    Commit,
    CommitItem,
    Cursor,
    HistoryRow,
    IdempotencyRecord,
    JobRecord,
    Progress,
    SessionRecord,
    prefix_commits,
)
from service.store.ratelimit import MemoryBuckets
from service.store.usage import idem_bytes, job_bytes, over, session_bytes


class MemoryStore:
    def __init__(
        self, *, idempotency_ttl: float = IDEMPOTENCY_TTL, max_stored_bytes: int = 0
    ) -> None:
        self.idempotency_ttl = idempotency_ttl
        self.max_stored_bytes = max_stored_bytes
        self._lock = threading.Lock()
        self._sessions: dict[str, SessionRecord] = {}
        self._history: dict[str, list[HistoryRow]] = {}
        self._idem: dict[tuple[str, str], IdempotencyRecord] = {}
        self._jobs: dict[str, JobRecord] = {}
        self._usage: dict[str, int] = {}

    def _key_taken(self, idem: IdempotencyRecord | None) -> bool:
        if idem is None:
            return False
        old = self._idem.get((idem.owner, idem.key))
        return old is not None and old.created_at + self.idempotency_ttl > idem.created_at

    def _idem_grows(self, idem: IdempotencyRecord | None) -> int:
        """What putting ``idem`` adds: its answer, less the expired record it replaces."""
        if idem is None:
            return 0
        return idem_bytes(idem) - idem_bytes(self._idem.get((idem.owner, idem.key)))

    def _over(self, owner: str, grows: int) -> bool:
        return over(self._usage.get(owner, 0), grows, self.max_stored_bytes)

    def _charge(self, owner: str, delta: int) -> None:
        left = self._usage.get(owner, 0) + delta
        if left > 0:
            self._usage[owner] = left
        else:
            self._usage.pop(owner, None)

    def _put_idem(self, idem: IdempotencyRecord | None) -> None:
        if idem is not None:
            self._charge(idem.owner, self._idem_grows(idem))
            self._idem[(idem.owner, idem.key)] = idem

    def stored_bytes(self, owner: str) -> int:
        return self._usage.get(owner, 0)

    def create(
        self, record: SessionRecord, idem: IdempotencyRecord | None = None, limit: int = 0
    ) -> Commit:
        with self._lock:
            if record.id in self._sessions or self._key_taken(idem):
                return Commit.CONFLICT
            if limit and sum(r.owner == record.owner for r in self._sessions.values()) >= limit:
                return Commit.FULL
            if self._over(record.owner, session_bytes(record) + self._idem_grows(idem)):
                return Commit.QUOTA
            self._sessions[record.id] = record
            self._history[record.id] = []
            self._charge(record.owner, session_bytes(record))
            self._put_idem(idem)
            return Commit.OK

    def get(self, owner: str, session_id: str) -> SessionRecord | None:
        record = self._sessions.get(session_id)
        return record if record is not None and record.owner == owner else None

    def get_many(self, keys: Sequence[tuple[str, str]]) -> list[SessionRecord | None]:
        with self._lock:
            return [self.get(owner, session_id) for owner, session_id in keys]

    def sessions(self, owner: str, limit: int, after: Cursor | None = None) -> list[SessionRecord]:
        with self._lock:
            mine = sorted(
                (r for r in self._sessions.values() if r.owner == owner),
                key=lambda r: (r.created_at, r.id),
            )
        if after is not None:
            mine = [r for r in mine if (r.created_at, r.id) > after]
        return mine[:limit]

    def commit(
        self,
        record: SessionRecord,
        expected_version: int,
        history: HistoryRow | None = None,
        idem: IdempotencyRecord | None = None,
    ) -> Commit:
        return self.commit_many([CommitItem(record, expected_version, history, idem)])[0]

    def commit_many(self, items: Sequence[CommitItem]) -> list[Commit]:
        with self._lock:
            return prefix_commits(items, self._commit_one)

    def _commit_one(self, item: CommitItem) -> Commit:
        record = item.record
        current = self._sessions.get(record.id)
        if current is None or current.owner != record.owner:
            return Commit.GONE
        if current.hold != item.holder:
            return Commit.BUSY
        if current.version != item.expected_version or self._key_taken(item.idem):
            return Commit.CONFLICT
        grows = session_bytes(record) - session_bytes(current)
        if self._over(record.owner, grows + self._idem_grows(item.idem)):
            return Commit.QUOTA
        self._sessions[record.id] = replace(
            record, version=item.expected_version + 1, hold=current.hold
        )
        self._charge(record.owner, grows)
        if item.history is not None:
            self._history[record.id].append(item.history)
        self._put_idem(item.idem)
        return Commit.OK

    def delete(self, owner: str, session_id: str) -> bool:
        with self._lock:
            record = self.get(owner, session_id)
            if record is None or record.hold is not None:
                return False
            del self._sessions[session_id]
            del self._history[session_id]
            self._charge(owner, -session_bytes(record))
            return True

    def history(
        self, owner: str, session_id: str, limit: int, after_step: int = 0
    ) -> list[HistoryRow]:
        if self.get(owner, session_id) is None:
            return []
        return [h for h in self._history.get(session_id, []) if h.step > after_step][:limit]

    def idempotency(self, owner: str, key: str, now: float) -> IdempotencyRecord | None:
        record = self._idem.get((owner, key))
        fresh = record is not None and record.created_at + self.idempotency_ttl > now
        return record if fresh else None

    def remember(self, idem: IdempotencyRecord) -> Commit:
        with self._lock:
            if self._key_taken(idem):
                return Commit.CONFLICT
            if self._over(idem.owner, self._idem_grows(idem)):
                return Commit.QUOTA
            self._put_idem(idem)
            return Commit.OK

    # -- jobs -------------------------------------------------------------------------------

    def create_job(
        self, job: JobRecord, idem: IdempotencyRecord | None = None, limit: int = 0
    ) -> Commit:
        with self._lock:
            self._purge(job.created_at)
            session = self.get(job.owner, job.session)
            if session is None:
                return Commit.GONE
            if session.hold is not None:
                return Commit.BUSY
            if job.id in self._jobs or self._key_taken(idem):
                return Commit.CONFLICT
            active = sum(j.owner == job.owner and j.status in ACTIVE for j in self._jobs.values())
            if limit and active >= limit:
                return Commit.FULL
            if self._over(job.owner, job_bytes(job) + self._idem_grows(idem)):
                return Commit.QUOTA
            # It starts from the step the session is at now, whatever the caller read.
            self._jobs[job.id] = replace(job, start_step=session.step, step=session.step)
            self._sessions[job.session] = replace(session, hold=job.id)
            self._charge(job.owner, job_bytes(job))
            self._put_idem(idem)
            return Commit.OK

    def get_job(self, owner: str, job_id: str, now: float) -> JobRecord | None:
        job = self._jobs.get(job_id)
        if job is None or job.owner != owner or (job.expires_at or now + 1) <= now:
            return None
        return replace(job, dataset=b"")

    def claim_job(self, worker: str, now: float, lease_seconds: float) -> JobRecord | None:
        with self._lock:
            runnable = [
                j
                for j in self._jobs.values()
                if j.status == "queued" or (j.status == "running" and j.lease_expires < now)
            ]
            if not runnable:
                return None
            job = min(runnable, key=lambda j: (j.created_at, j.id))
            claimed = replace(
                job,
                status="running",
                attempts=job.attempts + 1,
                lease_holder=worker,
                lease_expires=now + lease_seconds,
                updated_at=now,
            )
            self._jobs[job.id] = claimed
            return claimed

    def _leased(self, job_id: str, worker: str) -> JobRecord | None:
        job = self._jobs.get(job_id)
        ours = job is not None and job.status == "running" and job.lease_holder == worker
        return job if ours else None

    def renew_lease(
        self,
        job_id: str,
        worker: str,
        now: float,
        lease_seconds: float,
        progress: Progress | None = None,
        failures: int | None = None,
    ) -> JobRecord | None:
        with self._lock:
            job = self._leased(job_id, worker)
            if job is None:
                return None
            fields = vars(progress) if progress is not None else {}
            job = replace(job, lease_expires=now + lease_seconds, updated_at=now, **fields)
            if failures is not None:
                job = replace(job, failures=failures)
            self._jobs[job_id] = job
            return replace(job, dataset=b"")

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
        with self._lock:
            job = self._leased(job_id, worker)
            if job is None:
                return False
            self._end(job, status, now, ttl, error=error, lease_holder=None, **vars(progress))
            self._purge(now)
            return True

    def cancel_job(self, owner: str, job_id: str, now: float, ttl: float) -> JobRecord | None:
        with self._lock:
            job = self.get_job(owner, job_id, now)
            if job is None or job.status not in ACTIVE:
                return job
            if job.status == "queued":
                return self._end(job, "cancelled", now, ttl, cancel=True)
            self._jobs[job_id] = job = replace(job, cancel=True, updated_at=now)
            return replace(job, dataset=b"")

    def _end(self, job: JobRecord, status: str, now: float, ttl: float, **fields: Any) -> JobRecord:
        """The final status and the hold's release, under the one lock; the dataset (the
        stored job's: ``job`` may be a copy without it) goes, and its bytes with it."""
        self._charge(job.owner, -job_bytes(self._jobs[job.id]))
        ended = replace(
            job, status=status, updated_at=now, expires_at=now + ttl, dataset=b"", **fields
        )
        self._jobs[job.id] = ended
        session = self._sessions.get(job.session)
        if session is not None and session.hold == job.id:
            self._sessions[job.session] = replace(session, hold=None)
        return ended

    def _purge(self, now: float) -> None:
        for job_id in [k for k, j in self._jobs.items() if (j.expires_at or now + 1) <= now]:
            del self._jobs[job_id]

    def buckets(self, rate: float, burst: int) -> MemoryBuckets:
        return MemoryBuckets(rate, burst)

    def ping(self) -> bool:
        return True

    def writable(self) -> None:
        """Memory is always writable (until the process runs out, which is not ours to see)."""

    def purge(self, now: float, batch: int = 500) -> int:
        """Delete the idempotency records older than the TTL, ``batch`` under the lock at a
        time; the number deleted."""
        deleted = 0
        while True:
            with self._lock:
                old = [
                    k for k, r in self._idem.items() if r.created_at + self.idempotency_ttl <= now
                ][:batch]
                for k in old:
                    self._charge(k[0], -idem_bytes(self._idem.pop(k)))
            deleted += len(old)
            if len(old) < batch:
                return deleted

    def close(self) -> None:
        pass
