"""A worker's queue, shared fairly between the keys that have work in it.

Requests wait here, in the API process, not in the worker: one queue per key, and the worker
gets one *pass* at a time, composed by taking the keys in turn (round robin, one request per
key per turn). So however deep Bob's backlog, Alice's next request goes in the very next
pass, and the most she waits is the pass already running. A pass holds:

- session steps, gradients and forwards (``Run``), at most one per session, so each session's
  requests apply one pass after another in arrival order and a pass is one round of
  computations, batched across sessions of one signature;
- then at most one other request per key (a stateless computation, a bulk step, a read...),
  each a computation of its own, run after the pass's ``Run`` group.

A key's own requests keep their order: a key adds ``Run`` requests while its queue's head is
one whose session the pass does not have yet, then at most one other request, then stops.

Waiting here is free to undo: a request that is still queued at its deadline is answered 504
without ever reaching a worker, and one that a lost worker never started goes back to the head
of its key's queue for the next worker to run.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from service.workers import messages as m


@dataclass(eq=False)
class Ticket:
    """One request, from its arrival until it is answered."""

    id: int
    owner: str
    message: m.Message[Any]
    future: asyncio.Future[Any]
    deadline: float
    """time.time() by which it must have started: past it while queued, it is a 504"""
    arrived: float = 0.0
    session: str | None = None
    """the session a ``Run`` applies to (one per session per pass)"""
    started: bool = False
    """the worker has begun computing it: it is not run again if that worker is lost"""
    writing: bool = False
    """the worker may have written for it: only its answer says how it ended"""
    abandoned: bool = False
    """its caller went away while the worker had it: never run again elsewhere"""
    sent: float = 0.0
    """time.time() when it went to the worker (its queue wait ends there)"""
    expiry: asyncio.TimerHandle | None = None

    def cancel_expiry(self) -> None:
        if self.expiry is not None:
            self.expiry.cancel()
            self.expiry = None

    @property
    def batched(self) -> bool:
        return isinstance(self.message, m.Run)


@dataclass
class FairQueue:
    """Per-key FIFO queues, taken in turn."""

    queues: collections.OrderedDict[str, collections.deque[Ticket]] = field(
        default_factory=collections.OrderedDict
    )
    """the keys with work queued, in the order their turns come"""

    def __len__(self) -> int:
        return sum(len(q) for q in self.queues.values())

    def __iter__(self) -> Iterator[Ticket]:
        for queue in self.queues.values():
            yield from queue

    def batched(self) -> int:
        return sum(1 for t in self if t.batched)

    def push(self, ticket: Ticket) -> None:
        self.queues.setdefault(ticket.owner, collections.deque()).append(ticket)

    def requeue(self, tickets: list[Ticket]) -> None:
        """Tickets a lost worker never started: back at the head of their keys' queues, in
        the order they had, and their keys first in line."""
        for ticket in reversed(tickets):
            queue = self.queues.setdefault(ticket.owner, collections.deque())
            queue.appendleft(ticket)
            self.queues.move_to_end(ticket.owner, last=False)

    def remove(self, ticket: Ticket) -> bool:
        queue = self.queues.get(ticket.owner)
        if queue is None or ticket not in queue:
            return False
        queue.remove(ticket)
        if not queue:
            del self.queues[ticket.owner]
        return True

    def next_pass(self, limit: int) -> list[Ticket]:
        """The next pass: ``Run`` tickets first (one per session, at most ``limit``), then at
        most one other ticket per key; keys taken in turn, one ticket per key per turn."""
        runs: list[Ticket] = []
        others: list[Ticket] = []
        sessions: set[tuple[str, str | None]] = set()
        done: set[str] = set()  # keys whose share of this pass is complete
        ring = list(self.queues)
        last: str | None = None  # the key served last
        progressed = True
        while progressed:
            progressed = False
            for owner, queue in list(self.queues.items()):
                if owner in done:
                    continue
                head = queue[0]
                if head.batched and len(runs) < limit and (owner, head.session) not in sessions:
                    runs.append(queue.popleft())
                    sessions.add((owner, head.session))
                elif not head.batched:
                    others.append(queue.popleft())
                    done.add(owner)
                else:
                    done.add(owner)
                    continue
                progressed, last = True, owner
                if not queue:
                    del self.queues[owner]
                    done.add(owner)
        # Whoever got nothing (the pass was full of steps) goes first next time; the keys
        # served go to the back, the turn continuing after the last one served.
        served = [o for o in ring if o in {t.owner for t in runs + others}]
        if last is not None:
            cut = served.index(last) + 1
            for owner in served[cut:] + served[:cut]:
                if owner in self.queues:
                    self.queues.move_to_end(owner)
        return runs + others
