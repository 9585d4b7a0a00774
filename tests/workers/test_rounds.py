"""The runner's chains, one failure at a time: each case is what a worker does with jobs that
arrived together, against the same jobs applied one at a time.

Real SQLite files; the failures are real ones (a non-finite loss, a bad shape, another
writer's commit in between, a deadline passed before the commit), made to happen at the
exact point of the chain under test.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest

from service.engine import specs
from service.engine.limits import DEFAULT_LIMITS
from service.errors import GradsvcError
from service.store import CommitItem, SessionStore
from service.store.sqlite import SqliteStore
from service.workers import rounds
from service.workers.jobs import Answer, RunJob
from service.workers.sessions import Sessions
from tests.conftest import SEED_STEP

ALICE, BOB = "alice", "bob"
SEED = {k: v for k, v in SEED_STEP.items() if k != "batch"}
"""The notebook's session: w · x + 1, squared loss, SGD 0.1."""


@pytest.fixture
def store(tmp_path: Path) -> SessionStore:
    return SqliteStore(str(tmp_path / "rounds.db"))


def worker(store: SessionStore) -> Sessions:
    return Sessions(store, DEFAULT_LIMITS, 0, batching=True)


def create(sessions: Sessions, sid: str, owner: str = ALICE) -> None:
    sessions.create(owner, sid, specs.SessionCreate.model_validate(SEED), None)


def step(
    sid: str, y: float, owner: str = ALICE, x: Any = 1.0, deadline: float = math.inf
) -> RunJob:
    request = specs.SessionGradientsRequest.model_construct(
        batch=specs.Batch.model_construct(x=x, y=y), encoding="list", explain=False
    )
    return RunJob("step", owner, sid, request, deadline=deadline)


def outcome(result: Answer | GradsvcError) -> tuple[Any, ...]:
    if isinstance(result, GradsvcError):
        return (result.status, result.type)
    body = orjson.loads(result.body)
    return (result.status, body["step"], body["params"]["w"][0])


def state(sessions: Sessions, sid: str, owner: str = ALICE) -> tuple[int, float, list[int]]:
    view = orjson.loads(sessions.read(owner, sid).body)
    history = [row.step for row in sessions.store.history(owner, sid, 100)]
    return view["step"], view["params"]["w"][0], history


def one_at_a_time(store: SessionStore, sid: str, jobs: Sequence[RunJob]) -> list[Any]:
    alone = worker(store)
    create(alone, sid)
    return [outcome(alone.run_many([job])[0]) for job in jobs]


def test_a_failed_item_is_skipped_and_the_next_starts_from_the_last_applied(
    store: SessionStore, tmp_path: Path
) -> None:
    """The issue's bulk request: y = 3, 1e308 (not finite), 5, 7 on one seed session."""
    sessions = worker(store)
    create(sessions, "s")
    jobs = [step("s", 3), step("s", 1e308), step("s", 5), step("s", 7)]
    got = [outcome(r) for r in sessions.run_many(jobs)]
    want = one_at_a_time(SqliteStore(str(tmp_path / "alone.db")), "s", jobs)
    assert got == want
    assert [g[:2] for g in got] == [(200, 1), (422, "non-finite"), (200, 2), (200, 3)]
    assert state(sessions, "s") == (3, pytest.approx(1.851, abs=1e-12), [1, 2, 3])


def test_failures_of_every_kind_mid_chain(store: SessionStore, tmp_path: Path) -> None:
    """Non-finite and shape errors between good steps of two sessions, batched together."""
    sessions = worker(store)
    for sid in ("a", "b"):
        create(sessions, sid)
    jobs = [
        step("a", 3),
        step("b", 3),
        step("a", 4, x=[1.0, 2.0, 3.0]),  # y does not match the outputs' shape
        step("b", 1e308),
        step("a", 5),
        step("b", 5),
        step("a", 1e308),
        step("b", 7),
    ]
    got = [outcome(r) for r in sessions.run_many(jobs)]
    for sid in ("a", "b"):
        mine = [j for j in jobs if j.session_id == sid]
        want = one_at_a_time(SqliteStore(str(tmp_path / f"alone-{sid}.db")), sid, mine)
        assert [g for g, j in zip(got, jobs, strict=True) if j.session_id == sid] == want
    assert state(sessions, "a")[2] == [1, 2] and state(sessions, "b")[2] == [1, 2, 3]


def test_a_lost_compare_and_set_mid_chain_reruns_the_rest_on_the_newer_state(
    store: SessionStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another writer commits a step of the session between this worker's compute and its
    group commit: none of the chain's steps may commit on the old state; all run again."""
    assert isinstance(store, SqliteStore)
    ours, theirs = worker(store), worker(SqliteStore(store.path))  # another process's view
    create(ours, "s")
    real = store.commit_many
    raced = []

    def racing(items: Sequence[CommitItem]) -> Any:
        if not raced:
            raced.append(theirs.run(step("s", 10)))  # the other replica's step lands first
        return real(items)

    monkeypatch.setattr(store, "commit_many", racing)
    got = [outcome(r) for r in ours.run_many([step("s", 3), step("s", 5), step("s", 7)])]
    assert [g[:2] for g in got] == [(200, 2), (200, 3), (200, 4)]
    # Their step: w 1 → 1.8 (y = 10); then ours on top: y = 3, 5, 7.
    w = 1.8
    for y in (3, 5, 7):
        w -= 0.1 * (w + 1 - y)
    assert state(ours, "s") == (4, pytest.approx(w, abs=1e-12), [1, 2, 3, 4])
    assert got[-1][2] == pytest.approx(w, abs=1e-12)


def test_a_step_past_its_deadline_at_commit_time_commits_nothing_after_it(
    store: SessionStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second step's caller has been answered 504 by the time the pass commits: it is
    not committed, and the third (computed on it) runs again on the first's result."""
    sessions = worker(store)
    create(sessions, "s")
    clock = [0.0]
    monkeypatch.setattr(rounds.time, "time", lambda: clock[0])
    real_commit = rounds.Pass._commit

    def late(self: rounds.Pass, chains: Any) -> None:
        clock[0] = 10.0
        real_commit(self, chains)

    monkeypatch.setattr(rounds.Pass, "_commit", late)
    jobs = [step("s", 3, deadline=100), step("s", 5, deadline=5), step("s", 7, deadline=100)]
    got = [outcome(r) for r in sessions.run_many(jobs)]
    w = 1.1 - 0.1 * (1.1 + 1 - 7)
    assert got == [
        (200, 1, pytest.approx(1.1)),
        (504, "compute-timeout"),
        (200, 2, pytest.approx(w)),
    ]
    assert state(sessions, "s")[2] == [1, 2]


def test_another_keys_step_never_sees_a_staged_state(store: SessionStore) -> None:
    """Bob's step on Alice's session in the same batch as hers: not found, and her steps
    are exactly hers."""
    sessions = worker(store)
    create(sessions, "s", ALICE)
    jobs = [step("s", 3), step("s", 100, owner=BOB), step("s", 5), step("s", 100, owner=BOB)]
    got = [outcome(r) for r in sessions.run_many(jobs)]
    assert [g[:2] for g in got] == [(200, 1), (404, "not-found"), (200, 2), (404, "not-found")]
    assert state(sessions, "s") == (2, pytest.approx(1.39, abs=1e-12), [1, 2])


def test_the_cache_holds_only_committed_versions(store: SessionStore) -> None:
    """A failed step after a good one: the model its failure may have touched is rebuilt
    from the good step's bytes, and what the cache keeps is exactly the committed state."""
    sessions = worker(store)
    create(sessions, "s")
    sessions.run_many([step("s", 3), step("s", 1e308), step("s", 5)])
    record = store.get(ALICE, "s")
    assert record is not None and record.step == 2
    cached = sessions.cache.get((ALICE, "s"), record.version)
    assert cached is not None
    assert cached.model.named_parameters()["w"].item() == pytest.approx(1.39, abs=1e-12)
    assert state(sessions, "s")[:2] == (2, pytest.approx(1.39, abs=1e-12))


def test_a_bulk_of_failing_items_on_one_session_takes_one_pass(
    store: SessionStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Failures do not stop a chain: a thousand items that all fail are one pass, not a
    thousand (each with its own commit)."""
    sessions = worker(store)
    create(sessions, "s")
    passes = []
    real = rounds.Pass.run

    def counted(self: rounds.Pass, pending: list[int]) -> list[int]:
        passes.append(len(pending))
        return real(self, pending)

    monkeypatch.setattr(rounds.Pass, "run", counted)
    jobs = [step("s", 1e308 if i % 2 else 3) for i in range(1000)]
    got = sessions.run_many(jobs)
    assert passes == [1000]
    assert sum(not isinstance(r, GradsvcError) for r in got) == 500
    assert state(sessions, "s")[0] == 500
