"""The ``SessionStore`` protocol and its records.

A step is load → compute → commit. ``commit`` is one atomic compare-and-set on the session's
version that writes the new state, the history row and the idempotency record together, and
refuses when the version moved or the idempotency key is already taken: then the caller
reads again (and replays the stored answer, or recomputes on the newer state).

Every store counts the bytes each owner keeps, in the same transaction as each write, and
refuses a write that would take its owner past the store's ``max_stored_bytes``
(``Commit.QUOTA``): what counts and the rule are ``service.store.usage``'s.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from service.store.ratelimit import Buckets

IDEMPOTENCY_TTL = 24 * 3600.0
"""The default of ``--idempotency-ttl``: seconds an idempotency record is kept."""
JOB_TTL = 7 * 24 * 3600.0
"""How long a finished job is kept (``--job-ttl``'s default)."""
ACTIVE = ("queued", "running")
FINISHED = ("succeeded", "failed", "cancelled")
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
    hold: str | None = None
    """The training job that holds the session: only its own steps may commit, and the
    session cannot be deleted. Set and cleared by the job methods, never by ``commit``."""


@dataclass(frozen=True)
class HistoryRow:
    step: int
    loss: float | None
    """The step's loss; None for an apply of batches sent with grad_outputs only."""
    grad_norm: float
    at: float
    lr: float | None = None
    """The lr the session's next step uses, as the step's answer says (None: a row written
    before steps recorded it)."""


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
    """The owner already has as many sessions (or active jobs) as the limit allows."""
    BUSY = "busy"
    """A training job other than the item's holder holds the session."""
    QUOTA = "quota"
    """The write would grow its owner's stored bytes past ``max_stored_bytes``."""


@dataclass(frozen=True)
class CommitItem:
    """One session's commit: ``record`` replaces the session at ``expected_version``."""

    record: SessionRecord
    expected_version: int
    history: HistoryRow | None = None
    idem: IdempotencyRecord | None = None
    holder: str | None = None
    """The training job this commit belongs to: it must be the session's hold (or both
    none), else the commit is ``Commit.BUSY``."""


def prefix_commits(
    items: Sequence[CommitItem], commit_one: Callable[[CommitItem], Commit]
) -> list[Commit]:
    """``commit_one`` over ``items``, in order, but per session only up to its first refusal
    (``commit_many``'s rule), for stores that commit item by item inside one transaction."""
    refused: set[tuple[str, str]] = set()
    outcomes: list[Commit] = []
    for item in items:
        session = (item.record.owner, item.record.id)
        outcome = Commit.CONFLICT if session in refused else commit_one(item)
        if outcome is not Commit.OK:
            refused.add(session)
        outcomes.append(outcome)
    return outcomes


@dataclass(frozen=True)
class JobRecord:
    """A training job at rest. Its progress is advisory: the session's step is the truth
    (``steps_done = session.step - start_step``), since the job alone steps the session."""

    id: str
    owner: str
    session: str
    spec: str
    """JSON: epochs, batch_size, shuffle, seed, rows (the train request minus the dataset)."""
    dataset: bytes
    """safetensors: the decoded inputs (``x.<name>``) and targets (``y``)."""
    start_step: int
    created_at: float
    updated_at: float
    status: str = "queued"
    epoch: int = 0
    """0-based index of the epoch under way"""
    batch: int = 0
    """0-based index of the next mini-batch in the epoch"""
    steps_done: int = 0
    step: int = 0
    """the session's step"""
    loss: float | None = None
    error: str | None = None
    """JSON: the problem a failed job ended with"""
    attempts: int = 0
    """the runs it has had: each claim counts, a hand-over's included"""
    failures: int = 0
    """the runs that stopped on a fault of the service's (a store outage, a lost worker); a
    hand-over on a drain is not one, so rolling restarts never use a job's allowance up"""
    lease_holder: str | None = None
    lease_expires: float = 0.0
    cancel: bool = False
    expires_at: float | None = None
    """When a finished job is forgotten (finished + the job TTL)."""


@dataclass(frozen=True)
class Progress:
    """What a runner reports after its mini-batches."""

    epoch: int
    batch: int
    steps_done: int
    step: int
    loss: float | None


class JobStore(Protocol):
    """Jobs, their holds and their leases. A lease is (holder, expiry): the runner that holds
    an unexpired lease is the only one that may report on the job or finish it."""

    def create_job(
        self, job: JobRecord, idem: IdempotencyRecord | None = None, limit: int = 0
    ) -> Commit:
        """At once: the session must be the owner's (GONE) and free (BUSY), the key free
        (CONFLICT), the owner under ``limit`` active jobs (FULL; 0: no limit) and its dataset
        within the owner's bytes (QUOTA); then the job is written, from the step the session
        is at (``start_step``), and holds its session. Its dataset's bytes are given back when
        it ends."""
        ...

    def get_job(self, owner: str, job_id: str, now: float) -> JobRecord | None:
        """The job, with an empty ``dataset`` (only ``claim_job`` reads that back)."""
        ...

    def claim_job(self, worker: str, now: float, lease_seconds: float) -> JobRecord | None:
        """A queued job, or a running one whose lease lapsed, now running under ``worker``'s
        lease with one more attempt; None if none. Two workers never claim one job."""
        ...

    def renew_lease(
        self,
        job_id: str,
        worker: str,
        now: float,
        lease_seconds: float,
        progress: Progress | None = None,
        failures: int | None = None,
    ) -> JobRecord | None:
        """Extend the lease (and record progress, and the job's count of ``failures`` when
        given); None if ``worker`` no longer holds it. The job comes back without its
        dataset, as from ``get_job``."""
        ...

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
        """Write the final status and release the session's hold, together; False if
        ``worker`` no longer holds the lease."""
        ...

    def cancel_job(self, owner: str, job_id: str, now: float, ttl: float) -> JobRecord | None:
        """Ask the job to stop: a queued job is cancelled at once (its hold released), a
        running one is flagged for its runner. None if there is no such job."""
        ...


class SessionStore(JobStore, Protocol):
    max_stored_bytes: int
    """The bytes one owner may keep (``service.store.usage``); 0: no limit."""

    def create(
        self, record: SessionRecord, idem: IdempotencyRecord | None = None, limit: int = 0
    ) -> Commit:
        """Insert a new session, unless the owner has ``limit`` already (FULL; 0: no limit)
        or its bytes would go over (QUOTA)."""
        ...

    def get(self, owner: str, session_id: str) -> SessionRecord | None: ...

    def get_many(self, keys: Sequence[tuple[str, str]]) -> list[SessionRecord | None]:
        """``get`` of each (owner, session id) in ``keys``, in their order, read at once."""
        ...

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
        """Several commits in one transaction (one fsync, one round trip): a group commit.

        Each item is compared-and-set with ``commit``'s outcomes, and one session's items
        commit as a prefix: once an item of a session is refused, every later item of that
        session is refused too (CONFLICT) and writes nothing, even where its own expected
        version happens to match (another writer moved the session to it). Items of a chain
        are computed each on the one before; committing one past a gap would apply a step
        to a state that no acknowledged step left."""
        ...

    def delete(self, owner: str, session_id: str) -> bool:
        """False if there is no such session, or a job holds it; else its bytes are given back."""
        ...

    def history(
        self, owner: str, session_id: str, limit: int, after_step: int = 0
    ) -> list[HistoryRow]: ...

    def idempotency(self, owner: str, key: str, now: float) -> IdempotencyRecord | None: ...

    def remember(self, idem: IdempotencyRecord) -> Commit:
        """Store an answer that changed no session: OK, CONFLICT if the key is already taken,
        QUOTA if the owner's bytes would go over."""
        ...

    def stored_bytes(self, owner: str) -> int:
        """The bytes the owner keeps now, as the quota counts them."""
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
        ``batch`` per transaction, and give their bytes back; the number deleted (Redis
        expires the records itself: there, the number whose bytes it gave back)."""
        ...

    def close(self) -> None: ...
