"""An in-memory store, in one process: the contract's test seam. Same semantics, no
durability, and no sharing between processes (``memory://`` is a private SQLite file, so
that every worker sees its sessions and a worker's crash loses none)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import replace

from service.store.base import (
    IDEMPOTENCY_TTL,
    Commit,
    CommitItem,
    Cursor,
    HistoryRow,
    IdempotencyRecord,
    SessionRecord,
)
from service.store.ratelimit import MemoryBuckets


class MemoryStore:
    def __init__(self, *, idempotency_ttl: float = IDEMPOTENCY_TTL) -> None:
        self.idempotency_ttl = idempotency_ttl
        self._lock = threading.Lock()
        self._sessions: dict[str, SessionRecord] = {}
        self._history: dict[str, list[HistoryRow]] = {}
        self._idem: dict[tuple[str, str], IdempotencyRecord] = {}

    def _key_taken(self, idem: IdempotencyRecord | None) -> bool:
        if idem is None:
            return False
        old = self._idem.get((idem.owner, idem.key))
        return old is not None and old.created_at + self.idempotency_ttl > idem.created_at

    def create(
        self, record: SessionRecord, idem: IdempotencyRecord | None = None, limit: int = 0
    ) -> Commit:
        with self._lock:
            if record.id in self._sessions or self._key_taken(idem):
                return Commit.CONFLICT
            if limit and sum(r.owner == record.owner for r in self._sessions.values()) >= limit:
                return Commit.FULL
            self._sessions[record.id] = record
            self._history[record.id] = []
            if idem is not None:
                self._idem[(idem.owner, idem.key)] = idem
            return Commit.OK

    def get(self, owner: str, session_id: str) -> SessionRecord | None:
        record = self._sessions.get(session_id)
        return record if record is not None and record.owner == owner else None

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
            return [self._commit_one(item) for item in items]

    def _commit_one(self, item: CommitItem) -> Commit:
        record = item.record
        current = self._sessions.get(record.id)
        if current is None or current.owner != record.owner:
            return Commit.GONE
        if current.version != item.expected_version or self._key_taken(item.idem):
            return Commit.CONFLICT
        self._sessions[record.id] = replace(record, version=item.expected_version + 1)
        if item.history is not None:
            self._history[record.id].append(item.history)
        if item.idem is not None:
            self._idem[(item.idem.owner, item.idem.key)] = item.idem
        return Commit.OK

    def delete(self, owner: str, session_id: str) -> bool:
        with self._lock:
            if self.get(owner, session_id) is None:
                return False
            del self._sessions[session_id]
            del self._history[session_id]
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

    def remember(self, idem: IdempotencyRecord) -> bool:
        with self._lock:
            if self._key_taken(idem):
                return False
            self._idem[(idem.owner, idem.key)] = idem
            return True

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
                    del self._idem[k]
            deleted += len(old)
            if len(old) < batch:
                return deleted

    def close(self) -> None:
        pass
