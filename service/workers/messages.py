"""The protocol between the pool and its workers: one message per operation, typed.

A message is a frozen description of what to do, from a closed set (``Request``), with the
arguments the API has already validated: never code, never a name looked up at runtime.
Each one says what it is answered with, ``Message[R]``, so that the pool's typed methods
(``WorkerPool.read`` and the rest) are checked end to end: the route gets the type the
worker's operation returns. ``Job`` is the envelope that carries a message to a worker,
``Reply`` the one that carries its answer back.

No torch here: the API process imports this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from service.engine import specs
from service.engine.specs import Kind
from service.errors import GradsvcError
from service.store import Cursor, HistoryRow, SessionRecord
from service.workers.jobs import Answer, Idem, RunJob

R = TypeVar("R", covariant=True)


class Message(Generic[R]):
    """An operation a worker performs for the pool, answered with an ``R``."""


@dataclass(frozen=True)
class Stateless(Message[Answer]):
    """``POST /v1/forward``, ``/gradients``, ``/step``: nothing is kept."""

    kind: Kind
    body: specs.ForwardRequest
    idem: Idem | None


@dataclass(frozen=True)
class Create(Message[Answer]):
    owner: str
    session_id: str
    body: specs.SessionCreate
    idem: Idem | None


@dataclass(frozen=True)
class Restore(Message[Answer]):
    """A new session from a checkpoint file (its bytes, as uploaded)."""

    owner: str
    session_id: str
    data: bytes
    idem: Idem | None


@dataclass(frozen=True)
class Read(Message[Answer]):
    owner: str
    session_id: str


@dataclass(frozen=True)
class Page(Message[tuple[list[dict[str, Any]], SessionRecord | None]]):
    """A page of the owner's sessions as summaries (``params``: with their parameters), and
    the last one if more follow."""

    owner: str
    limit: int
    after: Cursor | None
    params: bool = False


@dataclass(frozen=True)
class Patch(Message[Answer]):
    owner: str
    session_id: str
    body: specs.SessionPatch
    if_match: str | None


@dataclass(frozen=True)
class Delete(Message[None]):
    owner: str
    session_id: str


@dataclass(frozen=True)
class History(Message[list[HistoryRow]]):
    owner: str
    session_id: str
    limit: int
    after: int


@dataclass(frozen=True)
class Checkpoint(Message[tuple[bytes, SessionRecord]]):
    """The session as a safetensors file, and the record it was made from."""

    owner: str
    session_id: str


@dataclass(frozen=True)
class Run(Message[Answer]):
    """A step, gradients or forward on one session; the worker may batch it with others."""

    job: RunJob


@dataclass(frozen=True)
class Accumulate(Message[Answer]):
    """A batch's gradients into the session's accumulator; run alone, never batched."""

    owner: str
    session_id: str
    body: specs.SessionAccumulateRequest
    idem: Idem | None
    if_match: str | None


@dataclass(frozen=True)
class Apply(Message[Answer]):
    """One optimizer step with the session's accumulated gradients; run alone."""

    owner: str
    session_id: str
    body: specs.SessionApplyRequest
    idem: Idem | None
    if_match: str | None


@dataclass(frozen=True)
class RunMany(Message[list[Answer | GradsvcError]]):
    """Steps on sessions that share one worker, sent as one (``POST /v1/sessions/step``);
    each is answered on its own, in order."""

    jobs: tuple[RunJob, ...]


@dataclass(frozen=True)
class Train(Message[Answer]):
    owner: str
    session_id: str
    job_id: str
    request: specs.TrainRequest
    idem: Idem | None


@dataclass(frozen=True)
class Ping(Message[int]):
    """Answered with the worker's pid."""


@dataclass(frozen=True)
class Handover(Message[int]):
    """The server is draining: let every training job's lease go (a worker of another
    replica resumes the job at once) and claim no more; answered with how many were let go."""


Request = (
    Stateless
    | Create
    | Restore
    | Read
    | Page
    | Patch
    | Delete
    | History
    | Checkpoint
    | Run
    | Accumulate
    | Apply
    | RunMany
    | Train
    | Ping
    | Handover
)
"""Every message a worker answers."""


@dataclass
class Job:
    """A message on its way to a worker."""

    id: int
    message: Message[Any]
    deadline: float
    """time.time() after which the worker must not commit for it"""
    budget: float = float("inf")
    """seconds each of its computations may take: the worker's deadline for a job is reset
    to this far ahead as the job's computation starts (and says so, ``Progress``)"""
    rest: int = 0
    """How many jobs of the same pass follow this one (already on their way): the worker
    reads them all before it starts, and runs the pass as the pool composed it."""
    received: float = 0.0
    """time.monotonic() when the worker read it"""
    backlog: bool = False
    """More requests wait for this worker behind its pass: its next pass comes as soon as
    this one is answered, so a training job's mini-batch should wait for it."""


@dataclass
class Info:
    """What an answer (or a worker's heartbeat, ``Reply`` 0 after the first) tells the pool
    besides the answer, for its metrics: what happened in the worker since its last one."""

    held: int = 0
    """sessions this worker keeps built"""
    wait: float | None = None
    """seconds the job waited in the pool's queue before it was sent (the pool sets it;
    None in a heartbeat)"""
    calls: list[tuple[int, float]] | None = None
    """computations: (items computed in the one call, seconds the call took)"""
    steps: int = 0
    """session steps committed"""
    store: list[tuple[str, float]] | None = None
    """store calls: (operation, seconds)"""
    store_errors: list[str] | None = None
    """store trouble met, by kind (``unavailable``, ``locked``, ``full``)"""
    jobs: list[str] | None = None
    """training job events: how jobs ended (``succeeded``, ``failed``...), and ``resumed``"""
    running: int = 0
    """training jobs this worker runs now"""
    cuda: tuple[int, int] | None = None
    """on a CUDA device: (bytes allocated, bytes reserved) by this worker's torch"""


@dataclass(frozen=True)
class Progress:
    """The worker is about to compute (``writes`` False) or to write to the store for
    (``writes`` True) these jobs of its pass. If the worker is lost before it answers them,
    this says what may be run again elsewhere: a job it never started, or started without
    writing and was not the one computing; never one that may have committed."""

    job_ids: tuple[int, ...]
    writes: bool


@dataclass
class Reply:
    """A job's answer: its result when ``ok``, else the ``GradsvcError`` to raise. Job 0 is
    the worker saying it is up (its value: the pid), and then its heartbeat (value None)."""

    job_id: int
    ok: bool
    value: Any
    info: Info


Upward = Reply | Progress
"""What a worker sends its pool."""
