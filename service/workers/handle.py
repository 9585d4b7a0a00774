"""One worker process as the pool sees it: its socket, its queue, its pass, its restarts.

- The process is spawned (a fresh interpreter: nothing inherited, torch loaded only there)
  and talks to the pool over its own socket, which the event loop reads and writes without
  threads.
- Requests wait in the handle's ``FairQueue`` (keys in turn) and go to the worker one pass
  at a time: the next pass is composed when the last one is answered, so what waits can
  still be reordered, expired or kept.
- Deadlines: a request still queued at its deadline is answered 504 and never runs. A pass
  gets ``compute_timeout`` from when it is sent; the worker refuses to commit past it, and
  if it has not answered ``GRACE`` seconds later it is killed. Only the computation it was
  in (its ``Progress`` says which) is answered 504, and its key is named in the log (the
  ``recycled`` count has no key: keys are many).
- A worker that dies (killed, crashed, lost its device) is started again, ever slower if it
  keeps dying before it has been up a minute (``Backoff``); its sessions reload from the
  store, where everything acknowledged is. Of its pass, the jobs it was computing or may
  have written for end 503; the rest, which wrote nothing, go back to the head of the queue
  and run on the restarted worker.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from service.errors import ComputeTimeout, Unavailable
from service.workers import framing, worker
from service.workers.fair import FairQueue, Ticket
from service.workers.messages import Job, Progress, Reply, Upward
from service.workers.worker import WorkerConfig

if TYPE_CHECKING:
    from service.workers.pool import WorkerPool

log = logging.getLogger("gradsvc.pool")
MAX_BACKOFF = 30.0
HEALTHY_SECONDS = 60.0
"""Seconds up after which a worker's exit no longer counts towards its restart back-off."""
GRACE = 2.0
"""Seconds past its deadline that a pass's worker gets to say so before it is recycled."""
EOF_WAIT = 1.0
"""Seconds a dead worker's last bytes (answers, progress) are awaited before it is judged."""
STARTUP_TIMEOUT = 180.0
"""Seconds a worker may take to say it is up (torch's import, the device, the store, the
warm-up) before it is taken for stuck and started again."""


class _Channel(asyncio.Protocol):
    """The pool's end of a worker's socket, read and written by the event loop."""

    def __init__(self, on_reply: Callable[[Upward], None], on_lost: Callable[[], None]) -> None:
        self.on_reply, self.on_lost = on_reply, on_lost
        self.decoder = framing.Decoder[Upward](Reply, Progress)
        self.transport: asyncio.Transport | None = None
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        for reply in self.decoder.feed(data):
            self.on_reply(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        """Every byte the worker wrote has been read (a dead worker's socket ends in EOF)."""
        self.lost = True
        self.on_lost()

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
        self.queue = FairQueue()
        self.flight: dict[int, Ticket] = {}
        """the pass the worker has, by job id: those of its jobs not answered yet"""
        self.current: tuple[int, ...] = ()
        """the jobs the worker said it is computing (or writing for) now"""
        self.done = 0
        self.restarts = 0
        self.backoff = Backoff()
        self.held = 0
        self.running = 0
        """training jobs the worker runs, as its last answer or heartbeat said"""
        self.cuda: tuple[int, int] | None = None
        """its CUDA memory (allocated, reserved), as last said; None on the CPU"""
        self.up_at: float | None = None
        """time.monotonic() when the running process said it is up"""
        self.pid: int | None = None
        self.process: Any = None
        self.channel: _Channel | None = None
        self.up = asyncio.Event()
        self.last_pass = 0
        """``Run`` jobs in the last pass: how many to wait a batch window for"""
        self._window: asyncio.TimerHandle | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._exited_seen = False
        self.pass_deadline = 0.0
        self._recycled = False
        self._startup: asyncio.TimerHandle | None = None

    @property
    def depth(self) -> int:
        """Requests queued or in the worker's pass."""
        return len(self.queue) + len(self.flight)

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
        self.up_at = None
        self._exited_seen = False
        self.up.clear()
        _, channel = await loop.connect_accepted_socket(
            lambda: _Channel(self._received, self._judge), mine
        )
        self.channel = channel
        loop.add_reader(process.sentinel, self._exited)
        self.watch_start()

    def watch_start(self) -> None:
        """A worker that does not say it is up in ``STARTUP_TIMEOUT`` is killed (and so
        started again): a wedged device or a store that never answers must not hold its
        queue for good."""
        loop = asyncio.get_running_loop()
        self._startup = loop.call_later(STARTUP_TIMEOUT, self._stuck_starting)

    # -- the queue and the pass ---------------------------------------------------------------

    def submit(self, ticket: Ticket) -> None:
        """Queue ``ticket``; it is answered through its future (504 if still queued at its
        deadline)."""
        self._arm(ticket)
        self.queue.push(ticket)
        self._wake()

    def withdraw(self, ticket: Ticket) -> None:
        """The caller went away: a queued ticket is dropped (it never runs); one the worker
        has is never run again elsewhere (its caller may already have retried it)."""
        if self.queue.remove(ticket):
            ticket.cancel_expiry()
        ticket.abandoned = True

    def _arm(self, ticket: Ticket) -> None:
        loop = asyncio.get_running_loop()
        wait = max(0.0, ticket.deadline - time.time())
        ticket.expiry = loop.call_later(wait, self._expire, ticket)

    def _expire(self, ticket: Ticket) -> None:
        ticket.expiry = None
        if ticket.future.done() or ticket not in self.queue:
            return
        waited = time.time() - ticket.arrived
        if self._recovering() and waited < 2 * self.pool.timeout + GRACE + MAX_BACKOFF:
            # It waits behind a computation that overran, or for the restart that follows:
            # not its fault. The restart gives the queue a fresh timeout (``_up``).
            loop = asyncio.get_running_loop()
            ticket.expiry = loop.call_later(1.0, self._expire, ticket)
            return
        self.queue.remove(ticket)
        ticket.future.set_exception(
            ComputeTimeout(
                f"the request waited {waited:.1f} s for its worker, past the compute timeout, "
                "and never started: nothing was changed; retry it"
            )
        )

    def _recovering(self) -> bool:
        """Whether the worker is being recycled or restarted, or its pass overran."""
        overran = bool(self.flight) and time.time() > self.pass_deadline
        return overran or self.state != "up"

    def _wake(self) -> None:
        """Send the next pass if the worker is free; when batching, first wait up to a batch
        window for as many steps as the last pass had (they are on their way: the callers
        that pass answered)."""
        if self.flight or self.state != "up" or not self.queue:
            return
        window = self.config.batch_window
        if window > 0 and 0 < self.queue.batched() < min(self.last_pass, self.config.max_batch):
            if self._window is None:
                loop = asyncio.get_running_loop()
                self._window = loop.call_later(window, self._dispatch)
            return
        self._dispatch()

    def _dispatch(self) -> None:
        if self._window is not None:
            self._window.cancel()
            self._window = None
        if self.flight or self.state != "up" or self.channel is None or not self.queue:
            return
        if self.pool.closing:
            return
        tickets = self.queue.next_pass(self.config.max_batch)
        now = time.time()
        timeout = self.pool.timeout
        backlog = bool(self.queue)
        self.current = ()
        for k, ticket in enumerate(tickets):
            ticket.cancel_expiry()
            ticket.sent = now
            self.flight[ticket.id] = ticket
            rest = len(tickets) - 1 - k
            self.channel.send(
                Job(ticket.id, ticket.message, now + timeout, timeout, rest, backlog=backlog)
            )
        self.last_pass = sum(1 for t in tickets if t.batched)
        self._rearm()

    def _rearm(self) -> None:
        """The watchdog for the computation that starts now (each gets the timeout)."""
        if self._watchdog is not None:
            self._watchdog.cancel()
        self.pass_deadline = time.time() + self.pool.timeout
        loop = asyncio.get_running_loop()
        self._watchdog = loop.call_later(self.pool.timeout + GRACE, self._overran)

    def _received(self, reply: Upward) -> None:
        if isinstance(reply, Progress):
            self.current = reply.job_ids
            for job_id in reply.job_ids:
                if (ticket := self.flight.get(job_id)) is not None:
                    ticket.started = True
                    ticket.writing = ticket.writing or reply.writes
            if self.flight:
                self._rearm()
            return
        self.held, self.running, self.cuda = reply.info.held, reply.info.running, reply.info.cuda
        if reply.job_id == 0:
            if reply.value is not None:
                self._up(reply.value)
            elif self.pool.observer is not None:  # a heartbeat
                self.pool.observer(reply.info)
            return
        self.done += 1
        ticket = self.flight.pop(reply.job_id, None)
        if ticket is not None:  # from the fair queue to the worker
            reply.info.wait = ticket.sent - ticket.arrived
        if self.pool.observer is not None:
            self.pool.observer(reply.info)
        if ticket is not None and not ticket.future.done():
            if reply.ok:
                ticket.future.set_result(reply.value)
            else:
                ticket.future.set_exception(reply.value)
        if not self.flight:
            self._pass_done()

    def _up(self, pid: int) -> None:
        if self._startup is not None:
            self._startup.cancel()
            self._startup = None
        self.pid, self.state = pid, "up"
        self.up_at = time.monotonic()
        self.up.set()
        log.info("worker %d up on %s (pid %d)", self.index, self.config.device, pid)
        deadline = time.time() + self.pool.timeout
        for ticket in self.queue:  # what waited for this start gets its time to run now
            if ticket.deadline < deadline:
                ticket.cancel_expiry()
                ticket.deadline = deadline
                self._arm(ticket)
        self._wake()

    def _pass_done(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        self.current = ()
        self._wake()

    def _overran(self) -> None:
        """The pass is past its deadline and grace: recycle the worker. What it is computing
        is answered 504; the rest of the pass is judged when the worker is gone."""
        self._watchdog = None
        if self._exited_seen:  # it died meanwhile: ``_judge`` says how its pass ended
            return
        culprits = [self.flight[i] for i in self.current if i in self.flight]
        culprits = culprits or [t for t in self.flight.values() if t.started]
        owners = sorted({t.owner for t in culprits})
        self.pool.recycled += 1
        log.warning(
            "worker %d is stuck past a deadline in a computation of %s; recycling it",
            self.index,
            ", ".join(f"key {label(owner)}" for owner in owners) or "no request",
        )
        for ticket in culprits:
            del self.flight[ticket.id]
            if not ticket.future.done():
                ticket.future.set_exception(
                    ComputeTimeout(
                        f"the computation took longer than {self.pool.timeout:g} s and was "
                        "stopped; a retry with the same Idempotency-Key answers it if it was "
                        "applied"
                    )
                )
        self._recycled = True
        self.kill()

    # -- the process --------------------------------------------------------------------------

    def _exited(self) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(self.process.sentinel)
        self.process.join(0)
        self._exited_seen = True
        self.state = "stopped" if self.pool.closing else "restarting"
        self.running, self.cuda = 0, None  # its jobs go on elsewhere; its memory is freed
        self.up.clear()
        if self.channel is None or self.channel.lost:
            self._judge()
        else:  # read its last answers first: they say what it finished
            loop.call_later(EOF_WAIT, self._judge)

    def _judge(self) -> None:
        """Once the worker has exited and its last bytes are read (or given up on): settle
        its pass, and start it again."""
        if not self._exited_seen or self.channel is None:
            return
        channel, self.channel = self.channel, None
        if channel.transport is not None:
            channel.transport.close()
        if self.process.exitcode is None:  # its end of the pipe closes before it is reaped
            self.process.join(EOF_WAIT)
        how = exit_status(self.process.exitcode)
        lost = Unavailable(
            f"the worker computing this request stopped ({how}) before it "
            "answered: retry with the same Idempotency-Key (a change it had already committed "
            "is then answered, not applied again)"
        )
        again: list[Ticket] = []
        for ticket in self.flight.values():
            if ticket.future.done():
                continue
            if ticket.id in self.current or ticket.writing or self.pool.closing:
                ticket.future.set_exception(lost)
            elif not ticket.abandoned:
                again.append(ticket)
        self.flight.clear()
        self.current = ()
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self.pool.closing:
            self.fail_queued()
            return
        self.queue.requeue(again)
        for ticket in again:  # they wait for the restart (see ``_expire``)
            ticket.started = False
            self._arm(ticket)
        self.restarts += 1
        up_for = None if self.up_at is None else time.monotonic() - self.up_at
        recycled, self._recycled = self._recycled, False
        delay = self.backoff.after_exit(up_for, recycled=recycled)
        log.warning(
            "worker %d exited (%s); restarting in %.1f s (%d requests to run there)",
            self.index,
            how,
            delay,
            len(self.queue),
        )
        loop = asyncio.get_running_loop()
        loop.call_later(delay, lambda: loop.create_task(self._respawn()))

    def fail_queued(self) -> None:
        """The pool is closing: what still waits is answered (503) and never runs."""
        closed = Unavailable("the server is shutting down; retry on another replica")
        for ticket in list(self.queue):
            self.queue.remove(ticket)
            ticket.cancel_expiry()
            if not ticket.future.done():
                ticket.future.set_exception(closed)

    def _stuck_starting(self) -> None:
        self._startup = None
        if self.state == "starting" and not self.pool.closing:
            log.warning(
                "worker %d did not start in %.0f s; starting it again", self.index, STARTUP_TIMEOUT
            )
            self.kill()

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
            self.depth,
            self.held,
            self.done,
            self.restarts,
        )


class Backoff:
    """How long to wait before a worker that exited is started again.

    A worker that keeps dying before it has been healthy (an unreachable store, a broken
    device: it may not even say it is up) is started again ever slower, 0.5 s doubling up to
    ``MAX_BACKOFF``. One that was up for ``HEALTHY_SECONDS`` was not failing to start: its
    exit is taken as a one-off, the count starts over and it restarts at once. So does one
    recycled for an overrun (the computation's fault, not the worker's).
    """

    def __init__(self) -> None:
        self.failures = 0
        """exits in a row of a worker that never stayed up ``HEALTHY_SECONDS``"""

    def after_exit(self, up_for: float | None, *, recycled: bool = False) -> float:
        """The delay before the next start, given how long the worker that just exited had
        been up (None: it never said it was up), and whether it was recycled."""
        if recycled or (up_for is not None and up_for >= HEALTHY_SECONDS):
            self.failures = 0
            return 0.0
        self.failures += 1
        return float(min(MAX_BACKOFF, 0.5 * 2 ** (self.failures - 1)))


def exit_status(code: int | None) -> str:
    """A process's exit as the log says it: the signal that killed it, or its exit status."""
    if code is None:
        return "exit status unknown"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def label(owner: str) -> str:
    """How logs and metrics name a key: the start of its digest (never the key itself)."""
    return owner[:12] if owner else "anonymous"
