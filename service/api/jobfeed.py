"""Jobs as this API process sees them: read from the store, on every replica alike.

``JobBoard`` reads and cancels jobs in the store (off the event loop: the store is
synchronous); ``memory://`` too is a file this process shares with its workers.

``Feeds`` keeps one reader per followed job: however many event streams follow a job in this
process, the store is read once per tick for all of them. When the server shuts down every
stream is told so (``interrupted`` if the job goes on, elsewhere or after the restart). It
also counts each key's open streams against ``--max-streams-per-key``: in this process, so
the quota holds per replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from service.errors import GradsvcError, NotFound, QuotaExceeded
from service.store import SessionStore
from service.store.base import FINISHED
from service.workers.jobs import job_view
from service.workers.pool import WorkerPool

POLL_SECONDS = 0.1
KEEPALIVE_SECONDS = 15.0
CANCEL_WAIT_SECONDS = 5.0
"""How long DELETE /v1/jobs/{id} waits for the runner to stop at a step (it looks at its
next report, within a tenth of a second); a runner that died stops when the job is next
claimed, and the answer then still says running."""


class JobBoard:
    def __init__(self, store: SessionStore, pool: WorkerPool, *, ttl: float) -> None:
        self.store, self.pool, self.ttl = store, pool, ttl

    async def get(self, owner: str, job_id: str) -> dict[str, Any]:
        job = await asyncio.to_thread(self.store.get_job, owner, job_id, time.time())
        if job is None:
            raise NotFound(f"no job {job_id}")
        return job_view(job)

    async def cancel(self, owner: str, job_id: str) -> dict[str, Any]:
        """Ask the job to stop, and answer how it ended once its runner has stopped it."""
        job = await asyncio.to_thread(self.store.cancel_job, owner, job_id, time.time(), self.ttl)
        if job is None:
            raise NotFound(f"no job {job_id}")
        view = job_view(job)
        deadline = time.monotonic() + CANCEL_WAIT_SECONDS
        while view["status"] not in FINISHED and time.monotonic() < deadline:
            await asyncio.sleep(POLL_SECONDS / 2)
            view = await self.get(owner, job_id)
        return view


@dataclass
class Feed:
    """One job's latest view, shared by the streams that follow it."""

    view: dict[str, Any]
    followers: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    """set once, when ``view`` is replaced (then a new event takes its place)"""
    task: asyncio.Task[None] | None = None

    def publish(self, view: dict[str, Any]) -> None:
        self.view, changed, self.changed = view, self.changed, asyncio.Event()
        changed.set()


class Feeds:
    def __init__(self, board: JobBoard, *, max_streams_per_key: int = 0) -> None:
        self.board = board
        self.feeds: dict[tuple[str, str], Feed] = {}
        self.closing = False
        self.max_streams = max_streams_per_key
        self.streams: Counter[str] = Counter()
        """each key's open event streams"""

    def admit(self, owner: str) -> Callable[[], None]:
        """Count one more open stream of ``owner``'s, or refuse it (QuotaExceeded) at the
        limit; the function returned takes it off the count (once, however often called),
        and must be called when the stream ends, whyever it ends."""
        if self.max_streams and self.streams[owner] >= self.max_streams:
            raise QuotaExceeded(
                f"this key already has {self.max_streams} event streams open on this server, "
                "the limit (--max-streams-per-key): close one first; GET /v1/jobs/{id} "
                "reads a job without a stream"
            )
        self.streams[owner] += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.streams[owner] -= 1
                if not self.streams[owner]:
                    del self.streams[owner]

        return release

    def close(self) -> None:
        """Shutdown: each stream ends now with a final event."""
        self.closing = True
        for feed in self.feeds.values():
            feed.publish(feed.view)

    async def follow(
        self, owner: str, first: dict[str, Any]
    ) -> AsyncIterator[dict[str, Any] | None]:
        """The job's views as they change, the last one final (finished or ``interrupted``);
        None when it has been quiet for KEEPALIVE_SECONDS."""
        key = (owner, first["id"])
        feed = self.feeds.get(key)
        if feed is None:
            feed = self.feeds[key] = Feed(first)
            feed.task = asyncio.create_task(self._read(key, feed))
        feed.followers += 1
        try:
            while True:
                view, changed = feed.view, feed.changed  # a change from now on sets it
                if self.closing and view["status"] not in FINISHED:
                    view = {**view, "status": "interrupted"}
                yield view
                if view["status"] not in ("queued", "running"):
                    return
                try:
                    await asyncio.wait_for(changed.wait(), KEEPALIVE_SECONDS)
                except TimeoutError:
                    yield None
        finally:
            feed.followers -= 1
            if feed.followers == 0 and self.feeds.get(key) is feed:
                del self.feeds[key]
                if feed.task is not None:
                    feed.task.cancel()

    async def _read(self, key: tuple[str, str], feed: Feed) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            pool = self.board.pool
            while feed.view["status"] not in FINISHED and not self.closing:
                await asyncio.sleep(POLL_SECONDS)
                if pool.draining or pool.closing:  # SIGTERM: end every stream now
                    self.close()
                    return
                try:
                    view = await self.board.get(*key)
                except NotFound:  # purged, or its last state is all there is
                    view = {**feed.view, "status": "interrupted"}
                except GradsvcError:
                    continue  # a full queue, a store hiccup: the next tick tries again
                if view != feed.view:
                    feed.publish(view)
