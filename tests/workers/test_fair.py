"""The fair queue on its own: who goes in the next pass, and in what order."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

from service.engine import specs
from service.workers import messages as m
from service.workers.fair import FairQueue, Ticket
from service.workers.jobs import RunJob

_ids = itertools.count(1)
_LOOP = asyncio.new_event_loop()  # futures need one; nothing here runs it
_REQUEST = specs.SessionGradientsRequest.model_validate({"batch": {"x": 1, "y": 3}})


def run(owner: str, session: str) -> Ticket:
    job = RunJob("step", owner, session, _REQUEST)
    return ticket(owner, m.Run(job), session)


def other(owner: str, session: str = "s") -> Ticket:
    return ticket(owner, m.Read(owner, session))


def ticket(owner: str, message: m.Message[Any], session: str | None = None) -> Ticket:
    future: asyncio.Future[Any] = _LOOP.create_future()
    return Ticket(next(_ids), owner, message, future, deadline=0.0, session=session)


def teardown_module() -> None:
    _LOOP.close()


def names(tickets: list[Ticket], table: dict[int, str]) -> list[str]:
    return [table[t.id] for t in tickets]


def test_a_backlog_on_one_session_gives_one_link_per_pass_and_others_get_the_next() -> None:
    queue = FairQueue()
    table: dict[int, str] = {}
    for k in range(80):
        t = run("bob", "b1")
        table[t.id] = f"bob{k}"
        queue.push(t)
    first = queue.next_pass(256)
    assert names(first, table) == ["bob0"]
    alice = run("alice", "a1")
    table[alice.id] = "alice"
    queue.push(alice)
    second = queue.next_pass(256)
    assert names(second, table) == ["bob1", "alice"]  # Bob's turn came first, then Alice's
    assert names(queue.next_pass(256), table) == ["bob2"]


def test_keys_take_turns_one_request_each_until_the_pass_is_full() -> None:
    queue = FairQueue()
    table: dict[int, str] = {}
    for k in range(5):
        for owner in ("bob", "carol"):
            t = run(owner, f"{owner}{k}")
            table[t.id] = f"{owner}{k}"
            queue.push(t)
    alice = run("alice", "a")
    table[alice.id] = "alice"
    queue.push(alice)
    assert names(queue.next_pass(4), table) == ["bob0", "carol0", "alice", "bob1"]
    # Bob was served last: Carol goes first in the next pass
    assert names(queue.next_pass(3), table) == ["carol1", "bob2", "carol2"]


def test_a_key_adds_steps_then_at_most_one_other_request_and_keeps_its_order() -> None:
    queue = FairQueue()
    table: dict[int, str] = {}
    for name, t in [
        ("bob-step-a", run("bob", "a")),
        ("bob-step-b", run("bob", "b")),
        ("bob-read-1", other("bob")),
        ("bob-read-2", other("bob")),
        ("bob-step-c", run("bob", "c")),
        ("alice-read", other("alice")),
        ("alice-step", run("alice", "x")),
    ]:
        table[t.id] = name
        queue.push(t)
    first = queue.next_pass(256)
    # steps first (the worker runs them as one group), then one other request per key: a
    # key's other request came after its steps, so its order holds
    assert names(first, table) == ["bob-step-a", "bob-step-b", "alice-read", "bob-read-1"]
    assert names(queue.next_pass(256), table) == ["alice-step", "bob-read-2"]
    assert names(queue.next_pass(256), table) == ["bob-step-c"]
    assert len(queue) == 0


def test_what_a_lost_worker_never_ran_goes_back_first_in_its_order() -> None:
    queue = FairQueue()
    table: dict[int, str] = {}
    for name, t in [("bob-1", run("bob", "b")), ("alice-1", run("alice", "a"))]:
        table[t.id] = name
        queue.push(t)
    taken = queue.next_pass(256)
    later = run("alice", "a")
    table[later.id] = "alice-2"
    queue.push(later)
    queue.requeue(taken)
    assert names(queue.next_pass(256), table) == ["bob-1", "alice-1"]
    assert names(queue.next_pass(256), table) == ["alice-2"]
