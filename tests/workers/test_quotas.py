"""Per-key quotas as a worker meets them: each refusal is a 429 ``quota-exceeded`` that names
its limit, has no Retry-After, and changes nothing; what does not grow goes through.

A real SQLite file; the byte quota is set to what the key already keeps, so that the key is
exactly at it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import orjson
import pytest

from service.engine import specs
from service.engine.limits import DEFAULT_LIMITS
from service.errors import GradsvcError, QuotaExceeded
from service.store.sqlite import SqliteStore
from service.workers.idempotent import remembered
from service.workers.jobs import Answer, Idem, RunJob
from service.workers.runner import Runner
from service.workers.sessions import Sessions
from service.workers.training import Trainer
from tests.conftest import SEED_STEP

ALICE = "alice"
SEED = specs.SessionCreate.model_validate({k: v for k, v in SEED_STEP.items() if k != "batch"})


@pytest.fixture
def sessions(tmp_path: Path) -> Sessions:
    return Sessions(SqliteStore(str(tmp_path / "quotas.db")), DEFAULT_LIMITS, 2)


def at_quota(sessions: Sessions) -> int:
    """Set the byte quota to what Alice keeps now, and return it."""
    used = sessions.store.stored_bytes(ALICE)
    sessions.store.max_stored_bytes = used
    return used


def key(name: str) -> Idem:
    return Idem(ALICE, name, f"fingerprint of {name}")


def run(kind: Any, sid: str, idem: Idem | None = None) -> RunJob:
    request = specs.SessionGradientsRequest.model_construct(
        batch=specs.Batch.model_construct(x=1.0, y=3.0), encoding="list", explain=False
    )
    return RunJob(kind, ALICE, sid, request, idem=idem, deadline=math.inf)


def outcome(result: Answer | GradsvcError) -> tuple[Any, ...]:
    if isinstance(result, GradsvcError):
        assert not hasattr(result, "retry_after")
        return (result.status, result.type)
    return (result.status, orjson.loads(result.body).get("step"))


def quota(call: Any, *args: Any) -> str:
    with pytest.raises(QuotaExceeded) as refused:
        call(*args)
    assert (refused.value.status, refused.value.type) == (429, "quota-exceeded")
    assert not hasattr(refused.value, "retry_after")  # waiting does not help
    return refused.value.detail


def test_sessions_per_key_is_a_quota(sessions: Sessions) -> None:
    for sid in ("s1", "s2"):
        sessions.create(ALICE, sid, SEED, None)
    detail = quota(sessions.create, ALICE, "s3", SEED, None)
    assert "2 sessions" in detail and "--max-sessions-per-key" in detail
    sessions.delete(ALICE, "s1")
    sessions.create(ALICE, "s3", SEED, None)


def test_a_session_over_the_byte_quota_names_what_is_used_and_the_limit(
    sessions: Sessions,
) -> None:
    sessions.create(ALICE, "s1", SEED, None)
    limit = at_quota(sessions)
    detail = quota(sessions.create, ALICE, "s2", SEED, None)
    assert f"{limit} bytes of its {limit}" in detail and "DELETE /v1/sessions/" in detail
    assert sessions.store.get(ALICE, "s2") is None


def test_at_the_quota_a_step_that_grows_nothing_commits_and_one_that_would_is_refused(
    sessions: Sessions,
) -> None:
    """One batch, two sessions: a step under an Idempotency-Key (its kept answer would grow
    the key's bytes) is refused alone; the steps without one commit, the refused step's
    successor on its own session included; gradients under a key are refused too."""
    for sid in ("a", "b"):
        sessions.create(ALICE, sid, SEED, None)
    limit = at_quota(sessions)
    jobs = [
        run("step", "a", key("k1")),
        run("step", "a"),
        run("step", "b"),
        run("gradients", "b", key("k2")),
        run("gradients", "b"),
    ]
    got = [outcome(r) for r in sessions.run_many(jobs)]
    assert got == [
        (429, "quota-exceeded"),
        (200, 1),
        (200, 1),
        (429, "quota-exceeded"),
        (200, None),
    ]
    store = sessions.store
    assert [h.step for h in store.history(ALICE, "a", 10)] == [1]
    assert store.idempotency(ALICE, "k1", math.inf) is None
    assert store.idempotency(ALICE, "k2", math.inf) is None
    assert store.stored_bytes(ALICE) == limit


def test_an_answer_kept_under_its_key_is_refused_at_the_quota(sessions: Sessions) -> None:
    sessions.create(ALICE, "s1", SEED, None)
    at_quota(sessions)
    store = sessions.store
    answer = Answer(200, b'{"loss": 0.5}')
    assert "--max-stored-bytes-per-key" in quota(remembered, store, key("k"), lambda: answer)
    assert remembered(store, None, lambda: answer) is answer  # without a key, nothing is kept


def test_training_jobs_over_their_quotas_are_refused(sessions: Sessions) -> None:
    trainer = Trainer(sessions, DEFAULT_LIMITS, 1000, Runner(sessions, 60.0), max_jobs_per_key=1)
    for sid in ("s1", "s2"):
        sessions.create(ALICE, sid, SEED, None)
    line = {"x": [0.0, 1.0], "y": [1.0, 3.0]}
    request = specs.TrainRequest.model_validate({"dataset": line, "epochs": 1, "batch_size": 1})
    started = orjson.loads(trainer.start(ALICE, "s1", "j1", request).body)
    detail = quota(trainer.start, ALICE, "s2", "j2", request)
    assert "1 active training jobs" in detail and "DELETE /v1/jobs/" in detail
    # Its dataset is stored while it is active: at the quota, a second one does not fit.
    assert sessions.store.cancel_job(ALICE, started["id"], 0.0, 60.0) is not None
    at_quota(sessions)
    assert "--max-stored-bytes-per-key" in quota(trainer.start, ALICE, "s2", "j2", request)
    assert sessions.store.get(ALICE, "s2") is not None
    assert sessions.store.get_job(ALICE, "j2", 0.0) is None
