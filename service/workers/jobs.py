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
from typing import Any

from service.engine import specs
from service.engine.specs import Kind
from service.store import IdempotencyRecord, JobRecord, SessionRecord


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


def job_view(job: JobRecord) -> dict[str, Any]:
    """A job as GET /v1/jobs/{id} shows it (and its event stream, and POST .../train)."""
    spec = json.loads(job.spec)
    total = spec["epochs"] * math.ceil(spec["rows"] / spec["batch_size"])
    return {
        "id": job.id,
        "session": job.session,
        "status": job.status,
        "progress": min(1.0, job.steps_done / total),
        "epoch": min(job.epoch + 1, spec["epochs"]),
        "epochs": spec["epochs"],
        "steps_done": job.steps_done,
        "total_steps": total,
        "step": job.step,
        "loss": job.loss,
        "attempts": job.attempts,
        "error": json.loads(job.error) if job.error else None,
        "created_at": iso(job.created_at),
        "updated_at": iso(job.updated_at),
    }


def new_id() -> str:
    return "s_" + secrets.token_urlsafe(16)
