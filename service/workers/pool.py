"""The worker pool, as the API process sees it: spawn, route, bound, time, restart.

- One spawned process per entry of the device layout (``devices.layout``), each talking to
  the pool over its own socket; the event loop reads and writes them without threads.
- A session's jobs always go to the same worker (crc32 of its id), so its model stays built
  there and its jobs keep their order; other jobs go to the least loaded worker.
- Each worker takes at most ``queue_size`` jobs at a time; beyond that a caller gets 503 with
  ``Retry-After`` at once.
- A job gets ``compute_timeout`` seconds. The worker itself refuses to commit past the
  deadline, so a 504 leaves the session unchanged; a worker that has not answered shortly
  after is killed and restarted.
- A worker that dies (killed, crashed, lost its device) fails its jobs with 503, and is
  started again; its sessions reload from the store, where everything acknowledged is.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import pickle
import socket
import struct
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from service.config import Settings
from service.errors import ComputeTimeout, Unavailable
from service.workers import devices, worker
from service.workers.worker import Info, Job, WorkerConfig

log = logging.getLogger("gradsvc.pool")
GRACE = 2.0
"""Seconds past its deadline that a job's worker gets to say so before it is recycled."""
MAX_BACKOFF = 30.0
_SMALL = struct.Struct("!i")
_LARGE = struct.Struct("!Q")


class _Channel(asyncio.Protocol):
    """multiprocessing.Connection's framing (a 4-byte big-endian length, or -1 and 8 bytes),
    read and written by the event loop."""

    def __init__(self, on_message: Callable[[Any], None], on_lost: Callable[[], None]) -> None:
        self.on_message, self.on_lost = on_message, on_lost
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        buf = self.buffer
        buf += data
        while len(buf) >= 4:
            (size,) = _SMALL.unpack_from(buf)
            start = 4
            if size == -1:
                if len(buf) < 12:
                    return
                (size,) = _LARGE.unpack_from(buf, 4)
                start = 12
            if len(buf) < start + size:
                return
            payload = bytes(buf[start : start + size])
            del buf[: start + size]
            self.on_message(pickle.loads(payload))  # from our own worker, never a client

    def send(self, message: Any) -> None:
        payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        size = len(payload)
        head = _SMALL.pack(size) if size <= 0x7FFFFFFF else _SMALL.pack(-1) + _LARGE.pack(size)
        assert self.transport is not None
        self.transport.write(head + payload if size < 65536 else head)
        if size >= 65536:
            self.transport.write(payload)

    def connection_lost(self, exc: Exception | None) -> None:
        self.on_lost()


@dataclass
class WorkerStats:
    index: int
    device: str
    pid: int | None
    state: str
    queue_depth: int
    sessions_held: int
    requests_done: int
    restarts: int


class WorkerHandle:
    def __init__(self, pool: WorkerPool, index: int, config: WorkerConfig) -> None:
        self.pool, self.index, self.config = pool, index, config
        self.state = "starting"
        self.pending: dict[int, asyncio.Future[Any]] = {}
        self.done = 0
        self.restarts = 0
        self.held = 0
        self.pid: int | None = None
        self.process: Any = None
        self.channel: _Channel | None = None
        self.started_at = 0.0
        self.up = asyncio.Event()

    async def spawn(self) -> None:
        loop = asyncio.get_running_loop()
        mine, theirs = socket.socketpair()
        mine.setblocking(False)  # uvloop keeps a socket's mode: a blocking write would stall
        process = self.pool.context.Process(
            target=worker.main,
            args=(theirs, self.config),
            name=f"gradsvc-worker-{self.index}",
            daemon=True,
        )
        process.start()
        theirs.close()
        self.process, self.state, self.pid = process, "starting", None
        self.started_at = time.monotonic()
        self.up.clear()
        _, channel = await loop.connect_accepted_socket(
            lambda: _Channel(self._received, lambda: None), mine
        )
        self.channel = channel
        loop.add_reader(process.sentinel, self._exited)

    def send(self, job: Job) -> None:
        assert self.channel is not None
        self.channel.send(job)

    def _received(self, message: tuple[int, bool, Any, Info]) -> None:
        job_id, ok, value, info = message
        if job_id == 0:
            self.pid, self.state = value, "up"
            self.up.set()
            log.info("worker %d up on %s (pid %d)", self.index, self.config.device, value)
            return
        self.held = info.held
        self.done += 1
        if self.pool.observer is not None:
            self.pool.observer(info)
        future = self.pending.get(job_id)
        if future is None or future.done():
            return
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)

    def _exited(self) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(self.process.sentinel)
        self.process.join(0)
        code = self.process.exitcode
        if self.channel is not None and self.channel.transport is not None:
            self.channel.transport.close()
        self.channel = None
        lost = Unavailable(
            f"the worker computing this request stopped (exit status {code}); nothing was "
            "committed for it: retry"
        )
        for future in self.pending.values():
            if not future.done():
                future.set_exception(lost)
        self.pending.clear()
        self.up.clear()
        if self.pool.closing:
            self.state = "stopped"
            return
        self.state = "restarting"
        self.restarts += 1
        lived = time.monotonic() - self.started_at
        # A worker that dies as it starts (an unreachable store, say) is retried ever slower.
        delay = 0.0 if lived > 10 else min(MAX_BACKOFF, 0.5 * 2 ** min(self.restarts, 6))
        log.warning("worker %d exited with %s; restarting in %.1f s", self.index, code, delay)
        loop.call_later(delay, lambda: loop.create_task(self._respawn()))

    async def _respawn(self) -> None:
        if not self.pool.closing:
            await self.spawn()

    def kill(self) -> None:
        if self.process is not None and self.process.is_alive():
            self.state = "restarting"  # not ready from now, not only once the exit is seen
            self.process.kill()

    def stats(self) -> WorkerStats:
        return WorkerStats(
            self.index,
            self.config.device,
            self.pid,
            self.state,
            len(self.pending),
            self.held,
            self.done,
            self.restarts,
        )


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
        self._ids = itertools.count(1)
        self._turn = itertools.count()
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
                    log_level=settings.log_level,
                    idempotency_ttl=settings.idempotency_ttl,
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
        return min(order, key=lambda w: (w.state != "up", len(w.pending)))

    async def call(self, op: str, *args: Any, key: str | None = None) -> Any:
        """Run ``op`` in a worker and return what it returns (or raise what it raised)."""
        if self.draining or self.closing:
            raise Unavailable(
                "the server is shutting down; retry on another replica", retry_after=5
            )
        handle = self.route(key)
        if handle.channel is None:
            raise Unavailable("the worker for this request is restarting; retry shortly")
        if len(handle.pending) >= self.queue_size:
            raise Unavailable("this worker's queue is full; retry shortly")
        job_id = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        handle.pending[job_id] = future
        deadline = time.time() + self.timeout
        try:
            handle.send(Job(job_id, op, args, deadline, len(handle.pending)))
            try:
                return await asyncio.wait_for(asyncio.shield(future), self.timeout)
            except TimeoutError:
                pass
            try:  # the worker refuses to commit past the deadline: let it say how it ended
                return await asyncio.wait_for(asyncio.shield(future), GRACE)
            except TimeoutError:
                log.warning("worker %d is stuck past a deadline; recycling it", handle.index)
                handle.kill()
                raise ComputeTimeout(
                    f"the computation took longer than {self.timeout:g} s; nothing was changed"
                ) from None
        finally:
            handle.pending.pop(job_id, None)

    def stats(self) -> list[WorkerStats]:
        return [w.stats() for w in self.workers]

    async def close(self, timeout: float = 10.0) -> None:
        """Ask every worker to stop (closing its socket does), wait, then kill stragglers."""
        self.closing = True
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
