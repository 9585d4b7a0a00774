"""One worker process as the pool sees it: its socket, its jobs in flight, its restarts.

- The process is spawned (a fresh interpreter: nothing inherited, torch loaded only there)
  and talks to the pool over its own socket, which the event loop reads and writes without
  threads.
- A worker that dies (killed, crashed, lost its device) fails its jobs with 503 and is
  started again, ever slower if it keeps dying as it starts; its sessions reload from the
  store, where everything acknowledged is.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from service.errors import Unavailable
from service.workers import framing, worker
from service.workers.messages import Job, Reply
from service.workers.worker import WorkerConfig

if TYPE_CHECKING:
    from service.workers.pool import WorkerPool

log = logging.getLogger("gradsvc.pool")
MAX_BACKOFF = 30.0


class _Channel(asyncio.Protocol):
    """The pool's end of a worker's socket, read and written by the event loop."""

    def __init__(self, on_reply: Callable[[Reply], None]) -> None:
        self.on_reply = on_reply
        self.decoder = framing.Decoder(Reply)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        for reply in self.decoder.feed(data):
            self.on_reply(reply)

    def send(self, job: Job) -> None:
        assert self.transport is not None
        for piece in framing.encode(job):
            self.transport.write(piece)


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
        _, channel = await loop.connect_accepted_socket(lambda: _Channel(self._received), mine)
        self.channel = channel
        loop.add_reader(process.sentinel, self._exited)

    def send(self, job: Job) -> None:
        assert self.channel is not None
        self.channel.send(job)

    def _received(self, reply: Reply) -> None:
        if reply.job_id == 0:
            self.pid, self.state = reply.value, "up"
            self.up.set()
            log.info("worker %d up on %s (pid %d)", self.index, self.config.device, reply.value)
            return
        self.held = reply.info.held
        self.done += 1
        if self.pool.observer is not None:
            self.pool.observer(reply.info)
        future = self.pending.get(reply.job_id)
        if future is None or future.done():
            return
        if reply.ok:
            future.set_result(reply.value)
        else:
            future.set_exception(reply.value)

    def _exited(self) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(self.process.sentinel)
        self.process.join(0)
        code = self.process.exitcode
        if self.channel is not None and self.channel.transport is not None:
            self.channel.transport.close()
        self.channel = None
        lost = Unavailable(
            f"the worker computing this request stopped (exit status {code}) before it "
            "answered: retry with the same Idempotency-Key (a change it had already committed "
            "is then answered, not applied again)"
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
