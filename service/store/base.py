"""The ``SessionStore`` protocol and its records.

A step is load → compute → commit. ``commit`` is one atomic compare-and-set on the session's
version that writes the new state, the history row and the idempotency record together, and
refuses when the version moved or the idempotency key is already taken: then the caller
reads again (and replays the stored answer, or recomputes on the newer state).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from service.store.ratelimit import Buckets

IDEMPOTENCY_TTL = 24 * 3600.0
"""The default of ``--idempotency-ttl``: seconds an idempotency record is kept."""
Cursor = tuple[float, str]
"""(created_at, id) of the last session of the previous page."""


@dataclass(frozen=True)
class SessionRecord:
    id: str
    owner: str
    name: str | None
    spec: str
    """JSON: the model, loss and optimizer specs and the device."""
    state: bytes
    """safetensors: parameters and optimizer state."""
    step: int
    version: int
    created_at: float
    updated_at: float


@dataclass(frozen=True)
class HistoryRow:
    step: int
    loss: float
    grad_norm: float
    at: float


@dataclass(frozen=True)
class IdempotencyRecord:
    owner: str
    key: str
    fingerprint: str
    """What the request was (method, path, body digest): the same key with another is a 422."""
    status: int
    body: bytes
    headers: str
    """JSON object of the headers to replay (Location, ETag, content type)."""
    created_at: float


class Commit(enum.Enum):
    OK = "ok"
    CONFLICT = "conflict"
    """The version moved, or the idempotency key was taken, since the caller read."""
    GONE = "gone"
    FULL = "full"
    """The owner already has as many sessions as the limit allows."""


@dataclass(frozen=True)
class CommitItem:
    """One session's commit: ``record`` replaces the session at ``expected_version``."""

    record: SessionRecord
    expected_version: int
    history: HistoryRow | None = None
    idem: IdempotencyRecord | None = None


class SessionStore(Protocol):
    def create(
        self, record: SessionRecord, idem: IdempotencyRecord | None = None, limit: int = 0
    ) -> Commit:
        """Insert a new session, unless the owner has ``limit`` already (0: no limit)."""
        ...

    def get(self, owner: str, session_id: str) -> SessionRecord | None: ...

    def sessions(self, owner: str, limit: int, after: Cursor | None = None) -> list[SessionRecord]:
        """The owner's sessions in creation order, those after ``after``."""
        ...

    def commit(
        self,
        record: SessionRecord,
        expected_version: int,
        history: HistoryRow | None = None,
        idem: IdempotencyRecord | None = None,
    ) -> Commit: ...

    def commit_many(self, items: Sequence[CommitItem]) -> list[Commit]:
        """Several sessions' commits in one transaction (one fsync, one round trip): a group
        commit. Each item is compared-and-set on its own, with ``commit``'s outcomes."""
        ...

    def delete(self, owner: str, session_id: str) -> bool: ...

    def history(
        self, owner: str, session_id: str, limit: int, after_step: int = 0
    ) -> list[HistoryRow]: ...

    def idempotency(self, owner: str, key: str, now: float) -> IdempotencyRecord | None: ...

    def remember(self, idem: IdempotencyRecord) -> bool:
        """Store an answer that changed no session; False if the key is already taken."""
        ...

    def buckets(self, rate: float, burst: int) -> Buckets:
        """Token buckets for rate limits: shared by every process that shares this store
        where the store can (Redis), else this process's own."""
        ...

    def ping(self) -> bool: ...

    def writable(self) -> None:
        """Return if a write would go through now, else raise what it would meet
        (``StoreUnavailable``, ``InsufficientStorage``): /readyz's probe, a real tiny write."""
        ...

    def purge(self, now: float, batch: int = 500) -> int:
        """Delete the idempotency records older than the store's TTL at ``now``, at most
        ``batch`` per transaction; the number deleted (0 where the store expires them
        itself)."""
        ...

    def close(self) -> None: ...
