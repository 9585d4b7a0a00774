"""The worker pool, as the API process sees it: route, bound, queue fairly; one method per
operation.

- One worker process per entry of the device layout (``devices.layout``), each behind a
  ``WorkerHandle`` that spawns and restarts it and queues its requests.
- A session's jobs always go to the same worker (crc32 of its id), so its model stays built
  there and its jobs keep their order; other jobs go to the least loaded worker.
- Each worker's queue is shared fairly between keys (``fair``): a key's backlog delays
  another key's next request by at most the pass that is running.
- Bounds, each answered at once: ``queue_size`` requests per worker (503 with
  ``Retry-After``); with keys, ``max_inflight_per_key`` requests in flight per key (429 with
  ``Retry-After``).
- A job gets ``compute_timeout`` seconds to start and as many to compute (see ``handle``).
- The routes call one typed method per operation (``read``, ``step_many``, ...); each sends
  one message of ``service.workers.messages`` through ``_call``, the only way to a worker.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import itertools
import logging
import multiprocessing
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from service.config import Settings
from service.engine import specs
from service.engine.specs import Kind
from service.errors import GradsvcError, TooManyRequests, Unavailable
from service.store import Cursor, HistoryRow, SessionRecord
from service.workers import devices
from service.workers import messages as m
from service.workers.fair import Ticket
from service.workers.handle import WorkerHandle, WorkerStats
from service.workers.jobs import Answer, Idem, RunJob
from service.workers.messages import Info
from service.workers.worker import WorkerConfig

log = logging.getLogger("gradsvc.pool")
R = TypeVar("R")


class WorkerPool:
    def __init__(self, settings: Settings, observer: Callable[[Info], None] | None = None) -> None:
        self.observer = observer
        """called with what each answer tells besides the answer (metrics)"""
        self.layout = devices.layout(settings.devices, settings.workers_per_device)
        self.queue_size = settings.queue_size
        self.timeout = settings.compute_timeout
        self.context = multiprocessing.get_context("spawn")
        self.closing = False
        self.draining = False
        """SIGTERM came: not ready (the requests in flight still run)"""
        self._ids = itertools.count(1)
        self._turn = itertools.count()
        self.inflight_limit = settings.max_inflight_per_key if settings.keyed else None
        """requests a key may have in flight; None without keys (one user: nothing to share)"""
        self.inflight: collections.Counter[str] = collections.Counter()
        self.recycled = 0
        """workers recycled because a computation overran (the log names the keys)"""
        limits = settings.limits()
        self.workers = [
            WorkerHandle(
                self,
                i,
                WorkerConfig(
                    index=i,
                    device=device,
                    threads=self.layout.threads if device == "cpu" else 1,
                    store=settings.store,
                    limits=limits,
                    max_sessions_per_key=settings.max_sessions_per_key,
                    batch_window=settings.batch_window_ms / 1000,
                    max_batch=settings.max_batch,
                    session_cache=settings.session_cache,
                    max_train_steps=settings.max_train_steps,
                    job_ttl=settings.job_ttl,
                    log_level=settings.log_level,
                    idempotency_ttl=settings.idempotency_ttl,
                    max_jobs_per_key=settings.max_jobs_per_key,
                    max_stored_bytes_per_key=settings.max_stored_bytes_per_key,
                ),
            )
            for i, device in enumerate(self.layout.devices)
        ]

    async def start(self) -> None:
        for handle in self.workers:
            await handle.spawn()

    async def wait_ready(self, timeout: float) -> bool:
        try:
            async with asyncio.timeout(timeout):
                for handle in self.workers:
                    await handle.up.wait()
        except TimeoutError:
            return False
        return True

    @property
    def ready(self) -> bool:
        return not self.draining and all(w.state == "up" for w in self.workers)

    def route(self, key: str | None) -> WorkerHandle:
        """The session's own worker; for work on no session, the least loaded one."""
        if key is not None:
            return self.workers[zlib.crc32(key.encode()) % len(self.workers)]
        start = next(self._turn) % len(self.workers)
        order = self.workers[start:] + self.workers[:start]
        return min(order, key=lambda w: (w.state != "up", w.depth))

    # -- the operations ---------------------------------------------------------------------

    async def stateless(
        self, owner: str, kind: Kind, body: specs.ForwardRequest, idem: Idem | None
    ) -> Answer:
        return await self._call(owner, m.Stateless(kind, body, idem), None)

    async def create(
        self, owner: str, session_id: str, body: specs.SessionCreate, idem: Idem | None
    ) -> Answer:
        return await self._call(owner, m.Create(owner, session_id, body, idem), session_id)

    async def restore(self, owner: str, session_id: str, data: bytes, idem: Idem | None) -> Answer:
        return await self._call(owner, m.Restore(owner, session_id, data, idem), session_id)

    async def read(self, owner: str, session_id: str) -> Answer:
        return await self._call(owner, m.Read(owner, session_id), session_id)

    async def page(
        self, owner: str, limit: int, after: Cursor | None, params: bool = False
    ) -> tuple[list[dict[str, Any]], SessionRecord | None]:
        """A page of the owner's sessions, from any worker: all of them read the store."""
        return await self._call(owner, m.Page(owner, limit, after, params), None)

    async def patch(
        self, owner: str, session_id: str, body: specs.SessionPatch, if_match: str | None
    ) -> Answer:
        return await self._call(owner, m.Patch(owner, session_id, body, if_match), session_id)

    async def delete(self, owner: str, session_id: str) -> None:
        await self._call(owner, m.Delete(owner, session_id), session_id)

    async def history(
        self, owner: str, session_id: str, limit: int, after: int
    ) -> list[HistoryRow]:
        return await self._call(owner, m.History(owner, session_id, limit, after), session_id)

    async def checkpoint(self, owner: str, session_id: str) -> tuple[bytes, SessionRecord]:
        return await self._call(owner, m.Checkpoint(owner, session_id), session_id)

    async def run(self, job: RunJob) -> Answer:
        return await self._call(job.owner, m.Run(job), job.session_id)

    async def accumulate(
        self,
        owner: str,
        session_id: str,
        body: specs.SessionAccumulateRequest,
        idem: Idem | None,
        if_match: str | None,
    ) -> Answer:
        message = m.Accumulate(owner, session_id, body, idem, if_match)
        return await self._call(owner, message, session_id)

    async def apply(
        self,
        owner: str,
        session_id: str,
        body: specs.SessionApplyRequest,
        idem: Idem | None,
        if_match: str | None,
    ) -> Answer:
        return await self._call(owner, m.Apply(owner, session_id, body, idem, if_match), session_id)

    async def step_many(self, jobs: Sequence[RunJob]) -> list[Answer | GradsvcError]:
        """Many sessions' steps, answered in the order given: one ``RunMany`` to each worker
        that owns some of the sessions, all sent at once. A worker that fails (a full queue,
        a restart) answers each of its steps with that error; the others stand."""
        groups: dict[int, list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault(self.route(job.session_id).index, []).append(i)
        answers: list[Answer | GradsvcError] = [GradsvcError("not computed")] * len(jobs)
        owner = jobs[0].owner if jobs else ""

        async def run(indices: list[int]) -> None:
            group = tuple(jobs[i] for i in indices)
            results: list[Answer | GradsvcError]
            try:
                message = m.RunMany(group)
                results = await self._call(owner, message, group[0].session_id, counted=False)
            except GradsvcError as exc:
                results = [exc] * len(indices)
            for i, result in zip(indices, results, strict=True):
                answers[i] = result

        with self._admitted(owner):  # one request in flight, whatever its number of workers
            await asyncio.gather(*(run(indices) for indices in groups.values()))
        return answers

    async def train(
        self,
        owner: str,
        session_id: str,
        job_id: str,
        request: specs.TrainRequest,
        idem: Idem | None,
    ) -> Answer:
        return await self._call(
            owner, m.Train(owner, session_id, job_id, request, idem), session_id
        )

    async def ping(self, key: str | None = None) -> int:
        """The pid of the worker that answers for ``key``."""
        return await self._call("", m.Ping(), key, counted=False)

    # -- the one way to a worker ------------------------------------------------------------

    async def _call(
        self, owner: str, message: m.Message[R], key: str | None, *, counted: bool = True
    ) -> R:
        """Have the worker for ``key`` answer ``message`` for ``owner``; raise what it raised.
        ``counted``: whether this is a request of its own against the key's in-flight limit
        (a bulk step's parts are one request). While the server drains, what was admitted
        before the drain still runs: the drain refuses new requests before they get here."""
        if self.closing:
            raise Unavailable(
                "the server is shutting down; retry on another replica", retry_after=5
            )
        handle = self.route(key)
        if handle.depth >= self.queue_size:
            raise Unavailable("this worker's queue is full; retry shortly")
        with self._admitted(owner) if counted else contextlib.nullcontext():
            return await self._send(handle, owner, message, key)

    async def _send(
        self, handle: WorkerHandle, owner: str, message: m.Message[R], key: str | None
    ) -> R:
        now = time.time()
        ticket = Ticket(
            next(self._ids),
            owner,
            message,
            asyncio.get_running_loop().create_future(),
            deadline=now + self.timeout,
            arrived=now,
            session=key if isinstance(message, m.Run) else None,
        )
        handle.submit(ticket)
        try:
            result: R = await asyncio.shield(ticket.future)
        except asyncio.CancelledError:  # the caller went away: if it is queued, drop it
            handle.withdraw(ticket)
            raise
        return result

    async def hand_over(self) -> int:
        """The server drains: every worker lets its training jobs' leases go and claims no
        more (``Runner.hand_over``), after the requests queued before it. Returns how many
        jobs were let go; a worker that cannot answer lets its own go as it stops. A worker
        started again from now on (it died during the drain) claims none either."""
        for handle in self.workers:
            handle.config = dataclasses.replace(handle.config, handed_over=True)

        async def one(handle: WorkerHandle) -> int:
            try:
                return await self._send(handle, "", m.Handover(), None)
            except GradsvcError:
                return 0

        return sum(await asyncio.gather(*(one(handle) for handle in self.workers)))

    @contextlib.contextmanager
    def _admitted(self, owner: str) -> Iterator[None]:
        """One of ``owner``'s requests in flight, within the key's limit (429 beyond it)."""
        limit = self.inflight_limit
        if limit is not None and self.inflight[owner] >= limit:
            raise TooManyRequests(
                f"this key has {limit} requests in flight, the limit: wait for some to be "
                "answered before sending more",
                retry_after=1,
            )
        self.inflight[owner] += 1
        try:
            yield
        finally:
            self.inflight[owner] -= 1
            if not self.inflight[owner]:
                del self.inflight[owner]

    def stats(self) -> list[WorkerStats]:
        return [w.stats() for w in self.workers]

    async def close(self, timeout: float = 10.0) -> None:
        """Ask every worker to stop (closing its socket does), wait, then kill stragglers."""
        self.closing = True
        for handle in self.workers:
            handle.fail_queued()
        for handle in self.workers:
            if handle.channel is not None and handle.channel.transport is not None:
                handle.channel.transport.close()
        deadline = time.monotonic() + timeout
        for handle in self.workers:
            process = handle.process
            while process is not None and process.is_alive() and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            handle.kill()
            if process is not None:
                await asyncio.to_thread(process.join, 5)
            handle.state = "stopped"
