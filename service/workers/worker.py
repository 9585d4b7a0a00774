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
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, assert_never

from service.engine.limits import Limits
from service.errors import ComputeTimeout, GradsvcError
from service.workers import messages as m
from service.workers.inbox import Inbox
from service.workers.jobs import Answer, Idem
from service.workers.messages import Info, Job, Reply

if TYPE_CHECKING:  # the pool imports this module for ``main``: it must not pull torch in
    from service.workers.sessions import Sessions

log = logging.getLogger("gradsvc.worker")


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
    log_level: str = "info"


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
    # Ctrl-C reaches the whole process group; the pool drains and stops its workers itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    from service import logs

    logs.setup(config.log_level)
    import torch

    from service.store import open_store
    from service.workers.sessions import Sessions

    torch.set_num_threads(config.threads)
    if config.device.startswith("cuda"):
        torch.cuda.set_device(config.device)
    inbox = Inbox(sock)
    store = TimedStore(open_store(config.store))
    sessions = Sessions(
        store,
        config.limits,
        config.max_sessions_per_key,
        device=config.device,
        cache_size=config.session_cache,
        batching=config.batch_window > 0,
    )
    worker = Worker(sessions, config)
    trainer = worker.trainer
    try:
        inbox.send(Reply(0, True, os.getpid(), Info()))
        while True:
            # Requests first; a training job's next mini-batch when none is waiting.
            if trainer.busy:
                try:
                    first = inbox.get_nowait()
                except queue.Empty:
                    trainer.advance()
                    continue
            else:
                first = inbox.get()
            if first is None:
                break
            replies = worker.execute(worker.gather(first, inbox))
            for n, reply in enumerate(replies):
                info = reply.info
                info.held = len(sessions.cache)
                if n == 0:
                    info.store, info.steps = store.drain(), sessions.drain_steps()
                    info.jobs = trainer.drain_finished()
                inbox.send(reply)
    except OSError:
        pass  # the pool went away (it closed our socket): nobody is left to answer
    finally:
        store.close()


def _die_with_parent() -> None:
    """If the API process is killed (SIGKILL, the OOM killer), go too, at once, rather than
    finish a batch nobody is waiting for. Linux only; elsewhere the closed socket stops us."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Worker:
    def __init__(self, sessions: Sessions, config: WorkerConfig) -> None:
        from service.workers.training import Trainer

        self.sessions = sessions
        self.config = config
        self.trainer = Trainer(sessions, config.limits, config.max_train_steps)

    def gather(self, first: Job, inbox: Inbox) -> list[Job]:
        """``first``, and when batching, the steps queued behind it: those already here, and
        those that arrive within the batch window while the pool says more are coming."""
        jobs = [first]
        window, limit = self.config.batch_window, self.config.max_batch
        if window <= 0 or not isinstance(first.message, m.Run):
            return jobs
        deadline = time.monotonic() + window
        while len(jobs) < limit:
            waiting = max(job.outstanding for job in jobs) > len(jobs)
            timeout = deadline - time.monotonic() if waiting else 0
            try:
                job = inbox.get(timeout=timeout) if timeout > 0 else inbox.get_nowait()
            except queue.Empty:
                break
            if job is None:
                inbox.put(None)  # stop after this batch
                break
            jobs.append(job)
            if not isinstance(job.message, m.Run):
                break
        return jobs

    def execute(self, jobs: list[Job]) -> list[Reply]:
        """Replies in job order. Consecutive ``Run`` jobs go to the sessions runner together
        (it keeps each session's order and batches across sessions)."""
        out: list[Reply] = []
        i = 0
        while i < len(jobs):
            runs: list[tuple[Job, m.Run]] = []
            for job in jobs[i:]:
                if not isinstance(job.message, m.Run):
                    break
                runs.append((job, job.message))
            group = [job for job, _ in runs] or [jobs[i]]
            start = time.monotonic()
            results = self._run_many(runs) if runs else [self._one(jobs[i])]
            took = time.monotonic() - start
            for job, result in zip(group, results, strict=True):
                info = Info(wait=start - job.received, compute=took, batch=len(group))
                out.append(Reply(job.id, not isinstance(result, GradsvcError), result, info))
            i += len(group)
        return out

    def _run_many(self, runs: list[tuple[Job, m.Run]]) -> list[Answer | GradsvcError]:
        from service.workers.compute import guarded

        run_jobs = [replace(run.job, deadline=job.deadline) for job, run in runs]
        results = guarded(self.sessions.run_many, run_jobs)
        if isinstance(results, GradsvcError):
            return [results] * len(runs)
        return results

    def _one(self, job: Job) -> Any:
        if time.time() > job.deadline:
            return ComputeTimeout("the request waited past the compute timeout")
        if not isinstance(job.message, m.Request):
            return GradsvcError(f"unknown operation {type(job.message).__name__}")
        from service.workers.compute import guarded

        return guarded(self._handle, job.message, job.deadline)

    def _handle(self, message: m.Request, deadline: float) -> Any:
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
            case m.Page(owner, limit, after):
                return sessions.page(owner, limit, after)
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
            case m.RunMany(jobs):  # many sessions' steps in one request: POST /v1/sessions/step
                return sessions.run_many([replace(job, deadline=deadline) for job in jobs])
            case m.Train(owner, session_id, job_id, request, idem):
                return self._train(owner, session_id, job_id, request, idem)
            case m.JobView(owner, job_id):
                return trainer.view(owner, job_id)
            case m.Cancel(owner, job_id):
                return trainer.cancel(owner, job_id)
            case m.Ping():
                return os.getpid()
            case _:
                assert_never(message)

    def _train(
        self, owner: str, session_id: str, job_id: str, request: Any, idem: Idem | None
    ) -> Answer:
        """Start a training job; under an Idempotency-Key, a retry gets the first job back."""
        import orjson

        from service.workers.idempotent import remembered

        def started() -> Answer:
            view = self.trainer.start(owner, session_id, job_id, request)
            return Answer(202, orjson.dumps(view), {"Location": f"/v1/jobs/{job_id}"})

        return remembered(self.sessions.store, idem, started)

    def _stateless(self, kind: Any, body: Any, idem: Idem | None) -> Answer:
        import orjson

        from service.engine.step import run
        from service.workers.idempotent import remembered

        limits = self.sessions.limits

        def computed() -> Answer:
            return Answer(200, orjson.dumps(run(kind, body, limits)))

        return remembered(self.sessions.store, idem, computed)
