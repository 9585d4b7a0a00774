"""A worker process: the only place torch computes for a request.

It owns one device, opens its own connection to the store, and answers the jobs its pool
sends over a socket, in the order they arrive. Each job carries one message from the closed
set ``messages.Request`` (validated arguments, never code), dispatched on its type. While it
computes, the jobs that arrive wait in the socket (the pool's side never blocks); between
computations it reads them all at once, and the steps among them for sessions of one
signature run as one call.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, assert_never

from service.engine.limits import Limits
from service.errors import GradsvcError
from service.store.base import IDEMPOTENCY_TTL, JOB_TTL
from service.workers import messages as m
from service.workers.inbox import Inbox
from service.workers.jobs import Answer, Idem, RunJob
from service.workers.messages import Info, Job, Progress, Reply
from service.workers.watch import Watcher

if TYPE_CHECKING:  # the pool imports this module for ``main``: it must not pull torch in
    from service.workers.sessions import Sessions

log = logging.getLogger("gradsvc.worker")
NEXT_PASS = 0.5
"""Seconds to wait for the next pass the pool said is coming, before a training job's
mini-batch may go first (the pool sends it as soon as this pass's answers arrive)."""
HEARTBEAT_SECONDS = 2.0
"""How often a worker tells its pool what it did that answered no request (a training job's
steps) and what it holds now (jobs running, device memory): ``Reply`` 0 with no value. It
also does as soon as it takes up or ends a training job."""
WRITES = (m.Create, m.Restore, m.Patch, m.Delete, m.Train, m.Accumulate, m.Apply)
"""Operations that may change the store as they run: a lost worker's pool never runs them
again, as it cannot know they did not. (An answer kept under an Idempotency-Key is no
change: running its request again replays it.)"""


@dataclass(frozen=True)
class WorkerConfig:
    index: int
    device: str
    threads: int
    store: str
    limits: Limits
    max_sessions_per_key: int
    batch_window: float
    """seconds to wait for more steps to batch with; 0: no batching"""
    max_batch: int
    session_cache: int
    max_train_steps: int
    job_ttl: float = JOB_TTL
    log_level: str = "info"
    idempotency_ttl: float = IDEMPOTENCY_TTL
    max_jobs_per_key: int = 0
    """active training jobs per owner; 0: no limit"""
    max_stored_bytes_per_key: int = 0
    """bytes one owner may keep in the store; 0: no limit"""
    handed_over: bool = False
    """the server drains: claim no training job (a worker restarted during the drain)"""


class TimedStore:
    """A store whose calls are timed, for the store latency metric."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self.samples: list[tuple[str, float]] = []

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._store, name)
        if not callable(attr) or name.startswith("_"):
            return attr

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return attr(*args, **kwargs)
            finally:
                self.samples.append((name, time.perf_counter() - start))

        return timed

    def drain(self) -> list[tuple[str, float]]:
        samples, self.samples = self.samples, []
        return samples


def main(sock: socket.socket, config: WorkerConfig) -> None:
    """The process's entry point (spawned: a fresh interpreter, nothing inherited)."""
    # Ctrl-C reaches the whole process group, and so may SIGTERM (systemd's default stop,
    # ``timeout``, ``kill -- -pgid``): the pool drains and stops its workers itself (it
    # closes their sockets; they die with it if it is killed), so a worker that went at the
    # signal would cut what the drain lets finish and keep the leases it should hand over.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent()
    from service import logs

    logs.setup(config.log_level)
    import torch

    from service.store import open_store
    from service.workers import compute
    from service.workers.compute import guarded
    from service.workers.sessions import Sessions

    torch.set_num_threads(config.threads)
    if config.device.startswith("cuda"):
        torch.cuda.set_device(config.device)
    inbox = Inbox(sock)
    store = TimedStore(
        open_store(
            config.store,
            idempotency_ttl=config.idempotency_ttl,
            max_stored_bytes=config.max_stored_bytes_per_key,
        )
    )
    sessions = Sessions(
        store,
        config.limits,
        config.max_sessions_per_key,
        device=config.device,
        cache_size=config.session_cache,
        batching=config.batch_window > 0,
    )
    worker = Worker(sessions, config)
    runner = worker.runner
    runner.handed_over = config.handed_over

    def report(info: Info) -> Info:
        """What happened here since the last answer or heartbeat, for the pool's metrics."""
        info.held = len(sessions.cache)
        info.store, info.steps = store.drain(), sessions.drain_steps()
        info.calls, info.store_errors = compute.drain_calls(), _store_errors()
        info.jobs, info.running = runner.drain_finished(), len(runner.runs)
        info.cuda = _cuda_memory(config.device)
        return info

    backlog = False
    try:
        _warm_up()
        compute.drain_calls()  # the warm-up is no request's
        inbox.send(Reply(0, True, os.getpid(), Info()))
        beat, running = time.monotonic() + HEARTBEAT_SECONDS, 0
        while True:
            # Requests first; a training job's next mini-batch when none is waiting (and
            # none is on its way: the pool said more wait behind the last pass). Jobs come
            # from the store (any replica's), looked for at most every half second.
            guarded(runner.tick)
            # A training job's steps answer no request: a heartbeat tells of them, and at
            # once of a job taken or ended.
            if time.monotonic() >= beat or len(runner.runs) != running:
                beat, running = time.monotonic() + HEARTBEAT_SECONDS, len(runner.runs)
                inbox.send(Reply(0, True, None, report(Info())))
            if runner.busy:
                try:
                    first = inbox.get(timeout=NEXT_PASS) if backlog else inbox.get_nowait()
                except queue.Empty:
                    backlog = False
                    guarded(runner.advance)  # a store outage must not take the worker down
                    continue
            else:
                try:
                    first = inbox.get(timeout=runner.idle_wait())
                except queue.Empty:
                    continue
            if first is None:
                break

            def send(reply: Reply | Progress) -> None:
                if isinstance(reply, Reply):
                    report(reply.info)
                inbox.send(reply)

            jobs = worker.gather(first, inbox)
            backlog = first.backlog
            worker.execute(jobs, send)
    except OSError:
        pass  # the pool went away (it closed our socket): nobody is left to answer
    finally:
        runner.release()
        store.close()
    # Everything is written and closed: skip the interpreter's teardown (torch's takes
    # seconds on a busy machine, and the server's exit waits for it).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _store_errors() -> list[str]:
    from service.store import trouble

    return [kind for kind, n in trouble.drain_met().items() for _ in range(n)]


def _cuda_memory(device: str) -> tuple[int, int] | None:
    """Bytes allocated and reserved by this process's torch on its CUDA device; None on CPU."""
    if not device.startswith("cuda"):
        return None
    import torch

    return torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)


def _warm_up() -> None:
    """The notebook's step, once, before the worker says it is up: a fresh process's first
    autograd call loads and initialises much of torch (seconds on a small machine), and
    that must not count against the first request's compute timeout."""
    from service.engine import specs
    from service.engine.limits import DEFAULT_LIMITS
    from service.engine.seed import SEED_STEP
    from service.engine.step import run

    try:  # under the engine's own limits: the operator's may refuse the seed itself
        run("step", specs.StepRequest.model_validate(SEED_STEP), DEFAULT_LIMITS)
    except Exception:  # only a warm-up: the first request will say what is wrong
        log.exception("the warm-up step failed")


def _die_with_parent() -> None:
    """If the API process is killed (SIGKILL, the OOM killer), go too, at once, rather than
    finish a batch nobody is waiting for. Linux only; elsewhere the closed socket stops us."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class _Group(Watcher):
    """Jobs computed together, each answered once, with the group's timings. Each job's
    deadline runs from the start of its own computation (the pool's watchdog, told by the
    same ``Progress``, agrees): a job never pays for another's time."""

    def __init__(self, jobs: list[Job], send: Callable[[Reply | Progress], None]) -> None:
        self.jobs, self.send = jobs, send
        self.answered: set[int] = set()
        self.deadlines = [job.deadline for job in jobs]

    def done(self, i: int, outcome: Any) -> None:
        self.reply(self.jobs[i], outcome)

    def progress(self, indices: list[int], writes: bool) -> None:
        if not writes:
            now = time.time()
            for i in indices:
                self.deadlines[i] = now + self.jobs[i].budget
        self.send(Progress(tuple(self.jobs[i].id for i in indices), writes))

    def deadline(self, i: int, job: RunJob) -> float:
        return self.deadlines[i]

    def reply(self, job: Job, result: Any) -> None:
        self.answered.add(job.id)
        self.send(Reply(job.id, not isinstance(result, GradsvcError), result, Info()))


class _Bulk(Watcher):
    """A bulk step (one job, many sessions' steps): the pool hears of its progress under its
    one id, and the whole request has one deadline, from when its pass was sent."""

    def __init__(self, job: Job, send: Callable[[Reply | Progress], None]) -> None:
        self.job, self.send = job, send

    def progress(self, indices: list[int], writes: bool) -> None:
        self.send(Progress((self.job.id,), writes))


class Worker:
    def __init__(self, sessions: Sessions, config: WorkerConfig) -> None:
        from service.workers.runner import Runner
        from service.workers.training import Trainer

        self.sessions = sessions
        self.config = config
        self.runner = Runner(sessions, config.job_ttl)
        self.trainer = Trainer(
            sessions, config.limits, config.max_train_steps, self.runner, config.max_jobs_per_key
        )

    def gather(self, first: Job, inbox: Inbox) -> list[Job]:
        """``first`` and the rest of its pass: the pool sends a pass's jobs back to back and
        decides what goes in it (``fair``); the worker runs it as sent."""
        jobs = [first]
        while len(jobs) <= first.rest:
            job = inbox.get()
            if job is None:
                inbox.put(None)  # the pool is gone: what was read still runs, then stop
                break
            jobs.append(job)
        return jobs

    def execute(self, jobs: list[Job], send: Callable[[Reply | Progress], None]) -> None:
        """Every job answered through ``send``, each as soon as it is final (a committed
        step's answer never waits behind later work: its caller's deadline runs), and the
        pool told before each computation and each write which jobs it is for (``Progress``:
        what a lost worker's pool may run again). Consecutive ``Run`` jobs go to the sessions
        runner together (it keeps each session's order and batches across sessions)."""
        i = 0
        while i < len(jobs):
            runs: list[Job] = []
            for job in jobs[i:]:
                if not isinstance(job.message, m.Run):
                    break
                runs.append(job)
            group = _Group(runs or [jobs[i]], send)
            if runs:  # until its first computation, a hang is any of theirs
                group.progress(list(range(len(runs))), writes=False)
                self._run_many(group)
            else:
                job = jobs[i]
                send(Progress((job.id,), writes=isinstance(job.message, WRITES)))
                group.reply(job, self._one(job, send))
            i += len(group.jobs)

    def _run_many(self, group: _Group) -> None:
        from service.workers.compute import guarded

        run_jobs = [
            replace(job.message.job, deadline=job.deadline)
            for job in group.jobs
            if isinstance(job.message, m.Run)
        ]
        failed = guarded(self.sessions.run_many, run_jobs, group)
        if isinstance(failed, GradsvcError):  # run_many settles every job itself; a bug if not
            for job in group.jobs:
                if job.id not in group.answered:
                    group.reply(job, failed)

    def _one(self, job: Job, send: Callable[[Reply | Progress], None]) -> Any:
        if not isinstance(job.message, m.Request):
            return GradsvcError(f"unknown operation {type(job.message).__name__}")
        from service.workers.compute import guarded

        return guarded(self._handle, job.message, _Bulk(job, send))

    def _handle(self, message: m.Request, bulk: _Bulk) -> Any:
        """What the message asks for; each case answers with its message's result type."""
        sessions, trainer = self.sessions, self.trainer
        match message:
            case m.Stateless(kind, body, idem):
                return self._stateless(kind, body, idem)
            case m.Create(owner, session_id, body, idem):
                return sessions.create(owner, session_id, body, idem)
            case m.Restore(owner, session_id, data, idem):
                return sessions.restore(owner, session_id, data, idem)
            case m.Read(owner, session_id):
                return sessions.read(owner, session_id)
            case m.Page(owner, limit, after, params):
                return sessions.page(owner, limit, after, params)
            case m.Patch(owner, session_id, body, if_match):
                return sessions.patch(owner, session_id, body, if_match)
            case m.Delete(owner, session_id):
                return sessions.delete(owner, session_id)
            case m.History(owner, session_id, limit, after):
                return sessions.history(owner, session_id, limit, after)
            case m.Checkpoint(owner, session_id):
                return sessions.checkpoint(owner, session_id)
            case m.Run(job):
                return sessions.run(job)
            case m.Accumulate(owner, session_id, body, idem, if_match):
                deadline = bulk.job.deadline
                return sessions.accumulate(owner, session_id, body, idem, if_match, deadline)
            case m.Apply(owner, session_id, body, idem, if_match):
                deadline = bulk.job.deadline
                return sessions.apply(owner, session_id, body, idem, if_match, deadline)
            case m.RunMany(jobs):  # many sessions' steps in one request: POST /v1/sessions/step
                jobs = tuple(replace(job, deadline=bulk.job.deadline) for job in jobs)
                return sessions.step_many(jobs, bulk)
            case m.Train(owner, session_id, job_id, request, idem):
                return trainer.start(owner, session_id, job_id, request, idem)
            case m.Ping():
                return os.getpid()
            case m.Handover():
                return self.runner.hand_over()
            case _:
                assert_never(message)

    def _stateless(self, kind: Any, body: Any, idem: Idem | None) -> Answer:
        import orjson

        from service.engine.budget import check_answer
        from service.engine.step import run
        from service.workers.idempotent import remembered

        limits = self.sessions.limits

        def computed() -> Answer:
            from service.workers import compute

            start = time.perf_counter()
            try:
                result = run(kind, body, limits)
            finally:
                compute.calls.append((1, time.perf_counter() - start))
            data = orjson.dumps(result)
            check_answer(len(data), limits, 'ask for "encoding": "b64"')
            return Answer(200, data)

        return remembered(self.sessions.store, idem, computed)
