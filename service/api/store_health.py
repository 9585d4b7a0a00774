"""The store, as the API process looks after it: is it writable now (for /readyz), and the
idempotency records past their TTL (deleted in the background).

/readyz asks the store for a real tiny write (``SessionStore.writable``), so that a locked
file, a full disk or a paused Redis takes this replica out of a load balancer's rotation
while it lasts, and puts it back by itself. The answer is kept for a second: probes from a
load balancer (or many) do not hammer the store, and one slow probe is not run twice.
"""

from __future__ import annotations

import asyncio
import logging
import time

from service.errors import GradsvcError, StoreUnavailable
from service.store import SessionStore

log = logging.getLogger("gradsvc.store")
PROBE_EVERY = 1.0
"""Seconds a probe's answer stands for."""
PURGE_EVERY = 60.0
"""Seconds between two sweeps of expired idempotency records (the TTL, if that is shorter:
no record outlives twice its TTL)."""


class StoreHealth:
    def __init__(self, store: SessionStore, every: float = PROBE_EVERY) -> None:
        self.store, self.every = store, every
        self._lock = asyncio.Lock()
        self._checked = -float("inf")
        self._error: GradsvcError | None = None

    @property
    def healthy(self) -> bool:
        """What the last probe said (True before the first): read without probing."""
        return self._error is None

    async def trouble(self) -> GradsvcError | None:
        """What a write would meet now (None: it would go through), at most ``every`` old."""
        async with self._lock:
            if time.monotonic() - self._checked >= self.every:
                self._error = await asyncio.to_thread(self._probe)
                self._checked = time.monotonic()
            return self._error

    def _probe(self) -> GradsvcError | None:
        try:
            self.store.writable()
        except GradsvcError as exc:
            return exc
        except Exception as exc:  # an unmapped failure still means: not ready
            log.warning("the store's write probe failed: %r", exc)
            name = type(exc).__name__
            return StoreUnavailable(f"the session store's write probe failed ({name})")
        return None


async def purge_forever(store: SessionStore, every: float = PURGE_EVERY) -> None:
    """Delete expired idempotency records every ``every`` seconds, until cancelled. Store
    trouble only postpones a sweep: the next one catches up."""
    while True:
        await asyncio.sleep(every)
        try:
            deleted = await asyncio.to_thread(store.purge, time.time())
        except GradsvcError as exc:
            log.warning("could not purge expired idempotency records: %s", exc.detail)
            continue
        if deleted:
            log.info("purged %d expired idempotency records", deleted)
