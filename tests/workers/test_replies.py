"""A committed step is answered as committed, whatever happens after its commit: store trouble
in a later pass, a commit whose reply was lost, slow work queued behind it.

A worker (``Worker.execute``) over a real SQLite file, with the store failing at the exact
point under test.
"""

from __future__ import annotations

import math
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from service.engine import specs
from service.engine.limits import DEFAULT_LIMITS
from service.store.sqlite import SqliteStore
from service.workers import messages as m
from service.workers import rounds
from service.workers.jobs import RunJob
from service.workers.messages import Reply
from service.workers.sessions import Sessions
from service.workers.worker import Worker, WorkerConfig
from tests.workers.test_rounds import ALICE, create, step


def gradients(sid: str, y: float) -> RunJob:
    request = specs.SessionGradientsRequest.model_construct(
        batch=specs.Batch.model_construct(x=1.0, y=y), encoding="list", explain=False
    )
    return RunJob("gradients", ALICE, sid, request)


def make_worker(path: Path) -> tuple[Worker, SqliteStore]:
    store = SqliteStore(str(path))
    sessions = Sessions(store, DEFAULT_LIMITS, 0, batching=True)
    config = WorkerConfig(0, "cpu", 1, f"sqlite:///{path}", DEFAULT_LIMITS, 0, 0.005, 64, 16, 0)
    return Worker(sessions, config), store


def execute(worker: Worker, jobs: list[m.Job]) -> dict[int, tuple[Reply, int]]:
    """Each job's reply, and its place in the order they were sent."""
    sent: dict[int, tuple[Reply, int]] = {}

    def send(reply: Reply | m.Progress) -> None:
        if isinstance(reply, Reply):
            sent.setdefault(reply.job_id, (reply, len(sent)))

    worker.execute(jobs, send)
    assert sorted(sent) == sorted(job.id for job in jobs)
    return sent


def test_store_trouble_in_a_later_pass_keeps_a_committed_steps_answer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gradients behind the step run in a second pass, whose read of the store fails."""
    worker, store = make_worker(tmp_path / "a.db")
    create(worker.sessions, "s")
    committed: list[bool] = []
    real_commit, real_get = store.commit_many, store.get

    def commit_many(items: Any) -> Any:
        out = real_commit(items)
        committed.append(True)
        return out

    def get(owner: str, sid: str) -> Any:
        if committed:
            raise sqlite3.OperationalError("database is locked")
        return real_get(owner, sid)

    monkeypatch.setattr(store, "commit_many", commit_many)
    monkeypatch.setattr(store, "get", get)
    jobs = [m.Job(1, m.Run(step("s", 3)), math.inf), m.Job(2, m.Run(gradients("s", 3)), math.inf)]
    sent = execute(worker, jobs)
    assert [row.step for row in store.history(ALICE, "s", 10)] == [1]
    assert sent[1][0].ok, sent[1][0].value
    assert not sent[2][0].ok


def test_a_commit_whose_reply_was_lost_is_confirmed_from_the_history(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store committed, then the connection dropped: the worker reads the history to
    learn what committed, and answers it as committed."""
    worker, store = make_worker(tmp_path / "c.db")
    for sid in ("a", "b"):
        create(worker.sessions, sid)
    real_commit = store.commit_many

    def lost_reply(items: Any) -> Any:
        real_commit(items)
        raise ConnectionError("Connection closed by server.")

    monkeypatch.setattr(store, "commit_many", lost_reply)
    jobs = [m.Job(1, m.Run(step("a", 3)), math.inf), m.Job(2, m.Run(step("b", 3)), math.inf)]
    sent = execute(worker, jobs)
    for sid in ("a", "b"):
        assert [r.step for r in store.history(ALICE, sid, 10)] == [1]
    assert sent[1][0].ok and sent[2][0].ok


def test_a_commit_nobody_can_confirm_is_a_503_not_a_rerun(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The commit failed and the store cannot be read either: the steps end 503 (retry with
    the key) rather than running again, which could apply a committed one twice."""
    worker, store = make_worker(tmp_path / "d.db")
    create(worker.sessions, "s")
    real_commit = store.commit_many

    def down(*args: Any, **kwargs: Any) -> Any:
        raise ConnectionError("the store went away")

    def lost_reply(items: Any) -> Any:
        real_commit(items)
        monkeypatch.setattr(store, "history", down)
        raise ConnectionError("Connection closed by server.")

    monkeypatch.setattr(store, "commit_many", lost_reply)
    jobs = [m.Job(1, m.Run(step("s", 3)), math.inf), m.Job(2, m.Run(step("s", 5)), math.inf)]
    sent = execute(worker, jobs)
    assert [(r.ok, getattr(r.value, "status", 200)) for r, _ in sent.values()] == [
        (False, 503),
        (False, 503),
    ]
    monkeypatch.undo()
    assert [r.step for r in store.history(ALICE, "s", 10)] == [1, 2]  # applied once each


def test_a_committed_steps_answer_does_not_wait_behind_later_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read behind the step runs in a second pass (it must see the step committed): by
    the time it starts computing, the step's answer has already been sent. Were it held,
    a heavy read would keep a committed step's caller waiting past its deadline, and the
    pool would answer it 504."""
    worker, store = make_worker(tmp_path / "b.db")
    create(worker.sessions, "s")
    real_computed = rounds.computed
    sent: list[int] = []
    seen_when_reading: list[list[int]] = []

    def computed(ready: Any, limits: Any, batch: bool, before: Any = None) -> Any:
        if any(p.job.kind != "step" for p in ready):
            seen_when_reading.append(list(sent))
        return real_computed(ready, limits, batch, before)

    monkeypatch.setattr(rounds, "computed", computed)
    jobs = [m.Job(1, m.Run(step("s", 3)), math.inf), m.Job(2, m.Run(gradients("s", 3)), math.inf)]
    worker.execute(
        jobs, lambda reply: sent.extend([reply.job_id] if isinstance(reply, Reply) else [])
    )
    assert seen_when_reading == [[1]] and sent == [1, 2]


def test_a_refusal_of_a_step_that_did_commit_is_answered_as_committed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store client that resends a transaction after a dropped connection gets 'moved on'
    for a step its first try committed: the history shows the step is this one, so it is
    answered, not run a second time."""
    worker, store = make_worker(tmp_path / "e.db")
    create(worker.sessions, "s")
    real_commit = store.commit_many

    def resent(items: Any) -> Any:
        real_commit(items)
        return real_commit(items)  # the resend: every item now refused

    monkeypatch.setattr(store, "commit_many", resent)
    jobs = [m.Job(1, m.Run(step("s", 3)), math.inf), m.Job(2, m.Run(step("s", 5)), math.inf)]
    sent = execute(worker, jobs)
    assert [r.ok for r, _ in sent.values()] == [True, True]
    assert [r.step for r in store.history(ALICE, "s", 10)] == [1, 2]
