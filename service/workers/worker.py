"""A worker process: the only place torch computes for a request.

It owns one device, opens its own connection to the store, and answers the jobs its pool
sends over a socket, in the order they arrive. Jobs are picklable descriptions from a closed
set (``Worker.ops``): an operation name and validated arguments, never code. While it
computes, the jobs that arrive wait in the socket (the pool's side never blocks); between
computations it reads them all at once, and the steps among them for sessions of one
signature run as one call.
"""

from __future__ import annotations

import collections
import logging
import os
import pickle
import queue
import select
import signal
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from service.engine.limits import Limits
from service.errors import ComputeTimeout, GradsvcError
from service.store.base import IDEMPOTENCY_TTL
from service.workers.jobs import Answer, RunJob

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
    idempotency_ttl: float = IDEMPOTENCY_TTL


@dataclass
class Job:
    id: int
    op: str
    args: tuple[Any, ...]
    deadline: float
    outstanding: int = 1
    """How many jobs the pool had sent this worker and not had answered, this one included:
    a hint that more are on their way, worth waiting a batch window for."""
    received: float = 0.0
    """time.monotonic() when this worker read it"""


@dataclass
class Info:
    """What an answer tells the pool besides the answer, for its metrics."""

    held: int = 0
    """sessions this worker keeps built"""
    wait: float = 0.0
    """seconds the job waited in this worker before it ran"""
    compute: float = 0.0
    """seconds its computation took (its batch's, when batched)"""
    batch: int = 1
    """jobs computed together with it, itself included"""
    steps: int = 0
    """session steps committed since the last answer"""
    store: list[tuple[str, float]] | None = None
    """store calls since the last answer: (operation, seconds)"""
    jobs: list[str] | None = None
    """training jobs that ended since the last answer, by how they ended"""


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
    store = TimedStore(open_store(config.store, idempotency_ttl=config.idempotency_ttl))
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
        inbox.send(pickle.dumps((0, True, os.getpid(), Info())))
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
            answers = worker.execute(worker.gather(first, inbox))
            for n, (job_id, ok, value, info) in enumerate(answers):
                info.held = len(sessions.cache)
                if n == 0:
                    info.store, info.steps = store.drain(), sessions.drain_steps()
                    info.jobs = trainer.drain_finished()
                inbox.send(_dumps(job_id, ok, value, info))
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


def _dumps(job_id: int, ok: bool, value: Any, info: Info) -> bytes:
    try:
        return pickle.dumps((job_id, ok, value, info), protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:  # an exception that does not pickle must still answer its job
        error = GradsvcError("the worker could not send its answer; this is a bug")
        return pickle.dumps((job_id, False, error, info))


class Inbox:
    """The worker's end of its socket: jobs in, answers out, in this one thread.

    Reading takes every byte that has arrived and every job in it at once (a reader thread
    would need the GIL for each job, and get it only between the computation's bytecodes).
    A job's ``received`` is stamped as it is read. ``None`` from ``get``: the pool is gone."""

    _HEAD = struct.Struct("!i")
    _LONG = struct.Struct("!Q")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.setblocking(True)
        self.buffer = bytearray()
        self.jobs: collections.deque[Job] = collections.deque()
        self.closed = False

    def get(self, timeout: float | None = None) -> Job | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.jobs and not self.closed:
            wait = None if deadline is None else deadline - time.monotonic()
            if wait is not None and wait <= 0:
                raise queue.Empty
            self._read(wait)
        return self.jobs.popleft() if self.jobs else None

    def get_nowait(self) -> Job | None:
        if not self.jobs and not self.closed:
            self._read(0)
        if not self.jobs and not self.closed:
            raise queue.Empty
        return self.jobs.popleft() if self.jobs else None

    def put(self, job: None) -> None:
        """``put(None)``: stop once the jobs already read are done (as a queue would)."""
        self.closed = True

    def send(self, data: bytes) -> None:
        size = len(data)
        head = (
            self._HEAD.pack(size)
            if size <= 0x7FFFFFFF
            else (self._HEAD.pack(-1) + self._LONG.pack(size))
        )
        self.sock.sendall(head + data if size < 65536 else head)
        if size >= 65536:
            self.sock.sendall(data)

    def _read(self, timeout: float | None) -> None:
        ready, _, _ = select.select([self.sock], [], [], timeout)
        if not ready:
            return
        while True:
            try:
                chunk = self.sock.recv(1 << 20, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            except OSError:
                chunk = b""
            if not chunk:
                self.closed = True
                break
            self.buffer += chunk
        now = time.monotonic()
        buf = self.buffer
        while len(buf) >= 4:
            (size,) = self._HEAD.unpack_from(buf)
            start = 4
            if size == -1:
                if len(buf) < 12:
                    break
                (size,) = self._LONG.unpack_from(buf, 4)
                start = 12
            if len(buf) < start + size:
                break
            job = pickle.loads(bytes(buf[start : start + size]))  # from our pool, never a client
            del buf[: start + size]
            job.received = now
            self.jobs.append(job)


class Worker:
    def __init__(self, sessions: Sessions, config: WorkerConfig) -> None:
        from service.workers.training import Trainer

        self.sessions = sessions
        self.config = config
        self.trainer = Trainer(sessions, config.limits, config.max_train_steps)
        self.ops: dict[str, Callable[..., Any]] = {
            "stateless": self._stateless,
            "create": sessions.create,
            "restore": sessions.restore,
            "read": sessions.read,
            "page": sessions.page,
            "patch": sessions.patch,
            "delete": sessions.delete,
            "history": sessions.history,
            "checkpoint": sessions.checkpoint,
            "run": sessions.run,
            "run_many": self._items,
            "train": self._train,
            "job": self.trainer.view,
            "cancel": self.trainer.cancel,
            "ping": os.getpid,
        }

    def gather(self, first: Job, inbox: Inbox) -> list[Job]:
        """``first``, and when batching, the steps queued behind it: those already here, and
        those that arrive within the batch window while the pool says more are coming."""
        jobs = [first]
        window, limit = self.config.batch_window, self.config.max_batch
        if window <= 0 or first.op != "run":
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
            if job.op != "run":
                break
        return jobs

    def execute(self, jobs: list[Job]) -> list[tuple[int, bool, Any, Info]]:
        """Answers in job order. Consecutive ``run`` jobs go to the sessions runner together
        (it keeps each session's order and batches across sessions)."""
        out: list[tuple[int, bool, Any, Info]] = []
        i = 0
        while i < len(jobs):
            j = i
            while j < len(jobs) and jobs[j].op == "run":
                j += 1
            group = jobs[i:j] if j > i else [jobs[i]]
            start = time.monotonic()
            results = self._run_many(group) if j > i else [self._one(jobs[i])]
            took = time.monotonic() - start
            for job, result in zip(group, results, strict=True):
                info = Info(wait=start - job.received, compute=took, batch=len(group))
                out.append((job.id, not isinstance(result, GradsvcError), result, info))
            i += len(group)
        return out

    def _run_many(self, jobs: list[Job]) -> list[Answer | GradsvcError]:
        from service.workers.sessions import guarded

        run_jobs = [replace(job.args[0], deadline=job.deadline) for job in jobs]
        results = guarded(self.sessions.run_many, run_jobs)
        if isinstance(results, GradsvcError):
            return [results] * len(jobs)
        return results

    def _one(self, job: Job) -> Any:
        if time.time() > job.deadline:
            return ComputeTimeout("the request waited past the compute timeout")
        op = self.ops.get(job.op)
        if op is None:
            return GradsvcError(f"unknown operation {job.op!r}")
        from service.workers.sessions import guarded

        args = (*job.args, job.deadline) if job.op == "run_many" else job.args
        return guarded(op, *args)

    def _items(self, jobs: list[RunJob], deadline: float) -> list[Answer | GradsvcError]:
        """Many sessions' steps sent as one request (``POST /v1/sessions/step``)."""
        return self.sessions.run_many([replace(job, deadline=deadline) for job in jobs])

    def _train(self, owner: str, session_id: str, job_id: str, request: Any, idem: Any) -> Answer:
        """Start a training job; under an Idempotency-Key, a retry gets the first job back."""
        import orjson

        from service.workers.sessions import remembered

        def started() -> Answer:
            view = self.trainer.start(owner, session_id, job_id, request)
            return Answer(202, orjson.dumps(view), {"Location": f"/v1/jobs/{job_id}"})

        return remembered(self.sessions.store, idem, started)

    def _stateless(self, kind: Any, body: Any, idem: Any) -> Answer:
        import orjson

        from service.engine.step import run
        from service.workers.sessions import remembered

        limits = self.sessions.limits

        def computed() -> Answer:
            return Answer(200, orjson.dumps(run(kind, body, limits)))

        return remembered(self.sessions.store, idem, computed)
