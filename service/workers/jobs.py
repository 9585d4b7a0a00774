"""What the API process hands a worker and gets back: plain, picklable, no torch.

The API process never imports torch: it validates, routes and answers; the numbers are
computed in the workers (``service.workers.worker``).
"""

from __future__ import annotations

import json
import math
import secrets
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

from service.engine import specs
from service.engine.specs import Kind
from service.store import IdempotencyRecord, SessionRecord


@dataclass
class Answer:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    replayed: bool = False


@dataclass(frozen=True)
class Idem:
    """An ``Idempotency-Key`` and what the request was."""

    owner: str
    key: str
    fingerprint: str

    def record(self, answer: Answer) -> IdempotencyRecord:
        return IdempotencyRecord(
            self.owner,
            self.key,
            self.fingerprint,
            answer.status,
            answer.body,
            json.dumps(answer.headers),
            time.time(),
        )


def etag(record: SessionRecord) -> str:
    return f'"{record.id}:{record.version}"'


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class RunJob:
    """A step, gradients or forward on one session, as the API hands it to a worker."""

    kind: Kind
    owner: str
    session_id: str
    request: specs.SessionBatchRequest
    idem: Idem | None = None
    if_match: str | None = None
    deadline: float = math.inf
    """time.time() after which the job must not commit (the caller has answered 504)."""
    holder: str | None = None
    """The training job this step belongs to: it alone may step a session the job holds."""
    include: frozenset[str] = frozenset({"loss", "grads", "params", "outputs"})
    """What the answer carries besides the step: a training job's own steps need only the
    loss; ``POST /v1/sessions/step`` items what the request's ``include`` names."""


def new_id() -> str:
    return "s_" + secrets.token_urlsafe(16)
