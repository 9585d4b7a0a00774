"""The per-key quotas a worker meets, as the problems that say what to do about them.

Each is a ``QuotaExceeded`` (429 ``quota-exceeded``, no ``Retry-After``: time alone does not
fix it) naming the limit, and the option that sets it.
"""

from __future__ import annotations

from service.errors import QuotaExceeded
from service.store import SessionStore


def stored_bytes(store: SessionStore, owner: str) -> QuotaExceeded:
    """The store refused a write (``Commit.QUOTA``): the owner's bytes would go over."""
    used, limit = store.stored_bytes(owner), store.max_stored_bytes
    return QuotaExceeded(
        f"this key stores {used} bytes of its {limit} (--max-stored-bytes-per-key), and this "
        "would take it over: delete sessions it no longer needs (DELETE /v1/sessions/{id}), "
        "let its training jobs end (their datasets are stored while they run), or send it "
        "without an Idempotency-Key (a kept answer counts until it expires)"
    )


def sessions(limit: int) -> QuotaExceeded:
    return QuotaExceeded(
        f"this key already has {limit} sessions, the limit (--max-sessions-per-key): delete "
        "one it no longer needs (DELETE /v1/sessions/{id}) first"
    )


def jobs(limit: int) -> QuotaExceeded:
    return QuotaExceeded(
        f"this key already has {limit} active training jobs, the limit (--max-jobs-per-key): "
        "wait for one to finish, or cancel one (DELETE /v1/jobs/{id}), first"
    )
