"""What a worker's pass holds at once: a POST /v1/sessions/step share budgeted as a whole,
and many steps of one large session staged one state's worth at a time.

Real SQLite files, the worker's own ``Sessions``, as in ``test_rounds``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest

from service.engine import specs
from service.engine.limits import DEFAULT_LIMITS, Limits
from service.errors import GradsvcError, TooLarge
from service.store import Commit, CommitItem
from service.store.sqlite import SqliteStore
from service.workers import rounds
from service.workers.jobs import Answer, RunJob
from service.workers.sessions import Sessions

OWNER = "alice"
WIDE = {
    "model": {"type": "linear", "in_features": 200, "out_features": 100},
    "loss": "mse",
    "optimizer": {"type": "adam", "lr": 1e-3},
}
"""20,100 float32 parameters and, once stepped, Adam's two moments: a state of 241 kB."""


class Recording(SqliteStore):
    """A store that notes the state bytes each group commit carries."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.commits: list[int] = []

    def commit_many(self, items: Sequence[CommitItem]) -> list[Commit]:
        self.commits.append(sum(len(item.record.state) for item in items))
        return super().commit_many(items)


def step(sid: str, y: float = 1.0, include: frozenset[str] = frozenset({"loss"})) -> RunJob:
    request = specs.SessionGradientsRequest.model_construct(
        batch=specs.Batch.model_construct(x=[[0.5] * 200], y=[[y] * 100]),
        encoding="list",
        explain=False,
    )
    return RunJob("step", OWNER, sid, request, include=include)


def worker(tmp_path: Path, limits: Limits = DEFAULT_LIMITS) -> tuple[Sessions, Recording]:
    """A worker with these limits, on a store with the session "wide" in it."""
    store = Recording(str(tmp_path / "budget.db"))
    created = Sessions(store, DEFAULT_LIMITS, 0)
    created.create(OWNER, "wide", specs.SessionCreate.model_validate(WIDE), None)
    return Sessions(store, limits, 0, batching=True), store


def view(sessions: Sessions, sid: str) -> dict[str, Any]:
    return dict(orjson.loads(sessions.read(OWNER, sid).body))


def test_300_steps_of_one_large_session_stage_one_state_at_a_time(tmp_path: Path) -> None:
    """The issue's bulk (300 items on one Adam session) used to stage 300 states for one
    group commit (300 x 12 MB for its million parameters); now a chain stages states only up
    to ``STAGED_BYTES`` (one state of that size), then goes on in the next pass from the state
    just committed, every step applied in order, exactly once."""
    sessions, store = worker(tmp_path)
    fresh = store.get(OWNER, "wide")
    assert fresh is not None
    state = 3 * len(fresh.state)  # once stepped: the parameters and Adam's two moments
    got = sessions.run_many([step("wide", y=i % 7) for i in range(300)])
    assert [orjson.loads(a.body)["step"] for a in got if isinstance(a, Answer)] == list(
        range(1, 301)
    )
    assert view(sessions, "wide")["step"] == 300
    assert [row.step for row in store.history(OWNER, "wide", 500)] == list(range(1, 301))
    assert max(store.commits) <= rounds.STAGED_BYTES + state
    assert len(store.commits) >= 300 // rounds.staged_at_once(state, 300)


def test_a_share_over_the_budget_is_refused_as_a_whole(tmp_path: Path) -> None:
    """Each item alone fits; all of them at once, with their answers, do not: every item is
    too-large, with the estimate, and nothing is applied."""
    sessions, store = worker(tmp_path, Limits(request_bytes=16 * 1024**2))
    everything = frozenset({"loss", "params", "grads", "outputs"})
    alone = sessions.step_many([step("wide", include=everything)])
    assert isinstance(alone[0], Answer)
    before = view(sessions, "wide")
    with pytest.raises(TooLarge) as refused:
        sessions.step_many([step("wide", include=everything) for _ in range(20)])
    assert "would need about" in refused.value.detail
    assert "the limit is 16.0 MiB (--max-request-bytes)" in refused.value.detail
    assert view(sessions, "wide") == before
    assert len(store.history(OWNER, "wide", 100)) == 1


def test_an_answer_over_its_limit_is_not_committed(tmp_path: Path) -> None:
    """A step whose answer is over --max-answer-bytes is refused before its commit, and the
    next step of the chain starts from the state before it."""
    sessions, store = worker(tmp_path, Limits(answer_bytes=256 * 1024))
    jobs = [step("wide"), step("wide", include=frozenset({"params"})), step("wide")]
    got: list[Answer | GradsvcError] = sessions.run_many(jobs)
    assert isinstance(got[1], TooLarge) and "--max-answer-bytes" in got[1].detail
    assert [orjson.loads(a.body)["step"] for a in got if isinstance(a, Answer)] == [1, 2]
    assert [row.step for row in store.history(OWNER, "wide", 10)] == [1, 2]


def test_a_view_over_the_answer_limit_points_to_the_checkpoint(tmp_path: Path) -> None:
    sessions, _ = worker(tmp_path, Limits(answer_bytes=256 * 1024))
    with pytest.raises(TooLarge) as refused:
        sessions.read(OWNER, "wide")
    assert "GET /v1/sessions/{id}/checkpoint" in refused.value.detail
    data, record = sessions.checkpoint(OWNER, "wide")
    assert len(data) > 20_100 * 4 and record.step == 0  # every parameter, as raw bytes
