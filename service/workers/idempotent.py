"""Idempotency-Key replays, in the worker: a retry gets the first answer, never a second run.

The record is written by the same store transaction as the change it answers for (a
session's commit), or on its own for answers that change no session (``remembered``). A
record names the request it answers (its fingerprint): the same key with another request is
a 422, so a client's bug cannot be mistaken for a retry.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from service.errors import GradsvcError, KeyReused
from service.store import Commit, SessionStore
from service.workers import quotas
from service.workers.jobs import Answer, Idem

MAX_ATTEMPTS = 100


def replay(store: SessionStore, idem: Idem | None) -> Answer | None:
    """The stored answer for this key, or None; KeyReused if the key named another request."""
    if idem is None:
        return None
    record = store.idempotency(idem.owner, idem.key, time.time())
    if record is None:
        return None
    if record.fingerprint != idem.fingerprint:
        raise KeyReused(
            "this Idempotency-Key was used for a different request; use a new key for a new request"
        )
    return Answer(record.status, record.body, json.loads(record.headers), replayed=True)


def remembered(store: SessionStore, idem: Idem | None, compute: Callable[[], Answer]) -> Answer:
    """An answer that changes no session, stored under its Idempotency-Key (if it has one);
    QuotaExceeded if keeping it would take the key over its stored bytes."""
    for _ in range(MAX_ATTEMPTS):
        if (stored := replay(store, idem)) is not None:
            return stored
        answer = compute()
        if idem is None:
            return answer
        outcome = store.remember(idem.record(answer))
        if outcome is Commit.OK:
            return answer
        if outcome is Commit.QUOTA:
            raise quotas.stored_bytes(store, idem.owner)
    raise GradsvcError("could not store the answer")  # pragma: no cover
