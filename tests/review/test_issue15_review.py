"""Review of issue 15 (batch-norm buffers, grad_outputs, nullable history losses): each test
holds a finding that was a wrong answer or lost state before its fix."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
import torch
from fastapi.testclient import TestClient

from service.engine import optimizers, specs, state
from service.engine.limits import DEFAULT_LIMITS
from service.errors import InvalidInput
from service.store import Commit, HistoryRow, SessionRecord
from service.store.sqlite import SqliteStore
from service.workers.sessions import Sessions
from tests.api.test_batchnorm import BATCH, SESSION, X
from tests.conftest import assert_problem
from tests.engine.test_batchnorm import CASES, OPTIMIZER, _built, _stepped
from tests.store.test_history_lr import OLD_HISTORY, OLD_SESSIONS

APPLY = specs.SessionApplyRequest()


def _job(client: TestClient, location: str) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while True:
        job: dict[str, Any] = client.get(location).json()
        if job["status"] not in ("queued", "running") or time.monotonic() > deadline:
            return job
        time.sleep(0.05)


def test_a_batch_norm_job_whose_last_batch_holds_one_row_is_refused_before_it_starts(
    client: TestClient,
) -> None:
    sid = client.post("/v1/sessions", json=SESSION).json()["id"]
    x, y = [*X, [0.1, 0.2]], [*BATCH["y"], [0.5]]  # 5 rows in batches of 4: the last holds 1
    body = {"dataset": {"x": x, "y": y}, "epochs": 2, "batch_size": 4, "shuffle": False}
    problem = assert_problem(client.post(f"/v1/sessions/{sid}/train", json=body), 422)
    assert problem["errors"][0]["loc"] == ["body", "batch_size"], problem
    assert client.get(f"/v1/sessions/{sid}").json()["step"] == 0
    # Two rows at the end are fine, and the job's steps keep their running statistics.
    body["dataset"] = {"x": [*x, [0.3, -0.4]], "y": [*y, [1.5]]}
    r = client.post(f"/v1/sessions/{sid}/train", json=body)
    assert r.status_code == 202, r.text
    assert _job(client, r.headers["location"])["status"] == "succeeded"
    view = client.get(f"/v1/sessions/{sid}").json()
    assert view["step"] == view["buffers"]["1.num_batches_tracked"] == 4


class Resent(SqliteStore):
    """A store whose client resends a commit that did land (a connection lost before the
    reply, as redis-py's retry does): the first commit is written, and answered CONFLICT."""

    resend = True

    def commit(self, record: SessionRecord, expected: int, *args: Any, **kwargs: Any) -> Commit:
        outcome = super().commit(record, expected, *args, **kwargs)
        if self.resend and outcome is Commit.OK:
            self.resend = False
            return super().commit(record, expected, *args, **kwargs)  # the resent try
        return outcome


@pytest.mark.parametrize("verb", ["accumulate", "apply"])
def test_a_verb_whose_commit_was_resent_is_applied_once(tmp_path: Path, verb: str) -> None:
    store = Resent(str(tmp_path / "resent.db"))
    sessions = Sessions(store, DEFAULT_LIMITS, 0)
    sessions.create("o", "s", specs.SessionCreate.model_validate(SESSION), None)
    batch = specs.SessionAccumulateRequest.model_validate({"batch": BATCH})
    if verb == "apply":
        store.resend = False
        sessions.accumulate("o", "s", batch, None, None)
        store.resend = True
        body = orjson.loads(sessions.apply("o", "s", APPLY, None, None).body)
        assert body["step"] == 1
        assert [row.step for row in store.history("o", "s", 10)] == [1]
    else:
        body = orjson.loads(sessions.accumulate("o", "s", batch, None, None).body)
        assert body["accumulated"] == 1
    record = store.get("o", "s")
    assert record is not None and record.version == 2 + (verb == "apply")
    view = orjson.loads(sessions.read("o", "s").body)
    assert view["buffers"]["1.num_batches_tracked"] == 1
    store.close()


def test_a_batch_count_a_step_would_overflow_is_refused_on_restore() -> None:
    """torch adds 1 to an int64 count that wraps at 2**63: a step would commit a negative one,
    and then the session's own checkpoint would be refused."""
    _, _, data = _stepped()
    tensors, metadata = state.read(data)
    tensors[state.BUFFER + "0.num_batches_tracked"] = torch.tensor(2**63 - 1)
    fresh = _built(CASES[0][0])
    sgd = OPTIMIZER.validate_python({"type": "sgd", "lr": 0.1})
    with pytest.raises(InvalidInput, match="num_batches_tracked"):
        state.restore(
            fresh, optimizers.build(sgd, fresh.trainable().values()), state._save(tensors, metadata)
        )


def test_an_old_history_with_a_row_of_a_deleted_session_is_rebuilt(tmp_path: Path) -> None:
    """The sqlite3 shell keeps foreign keys off: a session deleted there leaves its history
    rows behind, and copying them into the rebuilt table (foreign keys on) stopped the store
    from opening at all."""
    path = tmp_path / "orphan.db"
    with sqlite3.connect(path) as db:
        db.execute(OLD_SESSIONS)
        db.execute(OLD_HISTORY)
        db.execute("INSERT INTO sessions VALUES ('s_1', 'o', NULL, '{}', x'00', 1, 2, 1.0, 2.0)")
        rows = [("s_1", 1, 0.5, 1.0, 3.0), ("s_gone", 1, 0.5, 1.0, 3.0)]
        db.executemany("INSERT INTO history VALUES (?, ?, ?, ?, ?)", rows)
    store = SqliteStore(str(path))
    try:
        assert store.history("o", "s_1", 10) == [HistoryRow(1, 0.5, 1.0, 3.0)]
    finally:
        store.close()
