"""The worker's end of its socket: jobs in, replies out, in the worker's one thread."""

from __future__ import annotations

import collections
import queue
import select
import socket
import time

from service.errors import GradsvcError
from service.workers import framing
from service.workers.messages import Job, Progress, Reply


class Inbox:
    """Reading takes every byte that has arrived and every job in it at once (a reader
    thread would need the GIL for each job, and get it only between the computation's
    bytecodes). A job's ``received`` is stamped as it is read. ``None`` from ``get``: the
    pool is gone."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.setblocking(True)
        self.decoder = framing.Decoder[Job](Job)
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

    def send(self, reply: Reply | Progress) -> None:
        try:
            pieces = framing.encode(reply)
        except Exception:  # an exception that does not pickle must still answer its job
            assert isinstance(reply, Reply)
            error = GradsvcError("the worker could not send its answer; this is a bug")
            pieces = framing.encode(Reply(reply.job_id, False, error, reply.info))
        for piece in pieces:
            self.sock.sendall(piece)

    def _read(self, timeout: float | None) -> None:
        ready, _, _ = select.select([self.sock], [], [], timeout)
        if not ready:
            return
        arrived: list[Job] = []
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
            arrived += self.decoder.feed(chunk)
        now = time.monotonic()
        for job in arrived:
            job.received = now
            self.jobs.append(job)
