"""The SessionStore contract, the same for every store: memory, sqlite and redis."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path

import pytest
import redis

from service.store.base import (
    IDEMPOTENCY_TTL,
    Commit,
    CommitItem,
    HistoryRow,
    IdempotencyRecord,
    JobRecord,
    Progress,
    SessionRecord,
    SessionStore,
)
from service.store.redis import RedisStore, _index_member
from service.store.sqlite import SqliteStore
from tests.store.conftest import StoreFactory

ALICE, BOB = "alice", "bob"
EVERY_BYTE = bytes(range(256)) + b"\x00\r\n" + os.urandom(4096)


def session(
    sid: str = "s1", owner: str = ALICE, created_at: float | None = None, **changes: object
) -> SessionRecord:
    now = time.time() if created_at is None else created_at
    record = SessionRecord(
        id=sid,
        owner=owner,
        name="first ✓",
        spec='{"model": {"type": "linear"}, "device": "cpu"}',
        state=EVERY_BYTE,
        step=0,
        version=1,
        created_at=now,
        updated_at=now,
    )
    return replace(record, **changes)


def idem(key: str = "k1", owner: str = ALICE, created_at: float | None = None) -> IdempotencyRecord:
    return IdempotencyRecord(
        owner=owner,
        key=key,
        fingerprint=f"POST /v1/sessions sha256:{key}",
        status=201,
        body=b'{"id": "s1"}\x00\xff' + EVERY_BYTE,
        headers='{"Location": "/v1/sessions/s1", "ETag": "\\"1\\""}',
        created_at=time.time() if created_at is None else created_at,
    )


def row(step: int) -> HistoryRow:
    return HistoryRow(step=step, loss=1.0 / (step + 3), grad_norm=0.1 * step, at=time.time())


def stepped(record: SessionRecord, state: bytes = b"next") -> SessionRecord:
    """The record after one step: what a worker commits."""
    return replace(record, state=state, step=record.step + 1, updated_at=time.time())


def test_create_and_get_round_trip_bytes_exactly(store: SessionStore) -> None:
    record = session()
    assert store.create(record) is Commit.OK
    got = store.get(ALICE, "s1")
    assert got == record
    assert got is not None and got.state == EVERY_BYTE
    unnamed = session("s2", name=None, state=b"", created_at=1_700_000_000.123456789)
    assert store.create(unnamed) is Commit.OK
    assert store.get(ALICE, "s2") == unnamed
    assert store.get(ALICE, "missing") is None
    assert store.ping() is True


def test_get_many_reads_each_as_get_in_their_order(store: SessionStore) -> None:
    first, second = session("s1"), session("s2", owner=BOB, state=b"")
    assert store.create(first) is Commit.OK and store.create(second) is Commit.OK
    keys = [(BOB, "s2"), (ALICE, "s1"), (ALICE, "s2"), (ALICE, "missing"), (ALICE, "s1")]
    assert store.get_many(keys) == [second, first, None, None, first]
    assert store.get_many(keys) == [store.get(*key) for key in keys]
    assert store.get_many([]) == []


def test_create_refuses_an_id_that_exists(store: SessionStore) -> None:
    original = session()
    assert store.create(original) is Commit.OK
    assert store.create(session(state=b"other")) is Commit.CONFLICT
    assert store.create(session(owner=BOB)) is Commit.CONFLICT
    assert store.get(ALICE, "s1") == original
    assert store.get(BOB, "s1") is None


def test_another_owner_sees_nothing(store: SessionStore) -> None:
    record = session()
    assert store.create(record) is Commit.OK
    assert store.commit(stepped(record), 1, history=row(1)) is Commit.OK
    mine = store.get(ALICE, "s1")
    assert mine is not None
    assert store.get(BOB, "s1") is None
    assert store.commit(replace(stepped(mine), owner=BOB), mine.version) is Commit.GONE
    assert store.history(BOB, "s1", 10) == []
    assert store.sessions(BOB, 10) == []
    assert store.delete(BOB, "s1") is False
    assert store.get(ALICE, "s1") == mine
    assert [h.step for h in store.history(ALICE, "s1", 10)] == [1]
    assert store.sessions(ALICE, 10) == [mine]


def test_sessions_page_in_creation_order(store: SessionStore) -> None:
    base = time.time()
    # Two pairs share a created_at: those are ordered by id.
    stamps = {"g": 0.0, "c": 1.0, "a": 2.0, "f": 2.0, "b": 3.0, "e": 3.0, "d": 4.0}
    for sid, offset in stamps.items():
        assert store.create(session(sid, created_at=base + offset)) is Commit.OK
    assert store.create(session("z", owner=BOB, created_at=base + 1.5)) is Commit.OK
    expected = ["g", "c", "a", "f", "b", "e", "d"]

    seen: list[str] = []
    pages = 0
    after = None
    while True:
        page = store.sessions(ALICE, 3, after)
        if not page:
            break
        pages += 1
        assert len(page) <= 3
        seen += [r.id for r in page]
        after = (page[-1].created_at, page[-1].id)
    assert seen == expected
    assert pages == 3
    assert [r.id for r in store.sessions(BOB, 3)] == ["z"]


def test_a_cursor_on_a_deleted_session_still_continues(store: SessionStore) -> None:
    base = time.time()
    for i, sid in enumerate(["a", "b", "c", "d", "e", "f", "g"]):
        assert store.create(session(sid, created_at=base + (i // 2))) is Commit.OK
    first = store.sessions(ALICE, 3)
    assert [r.id for r in first] == ["a", "b", "c"]
    assert store.delete(ALICE, "c") is True
    assert store.delete(ALICE, "d") is True
    cursor = (first[-1].created_at, first[-1].id)
    assert [r.id for r in store.sessions(ALICE, 3, cursor)] == ["e", "f", "g"]
    assert [r.id for r in store.sessions(ALICE, 10)] == ["a", "b", "e", "f", "g"]


def test_commit_is_a_compare_and_set(store: SessionStore) -> None:
    record = session()
    assert store.create(record) is Commit.OK
    assert store.commit(stepped(record, b"one"), 1, history=row(1)) is Commit.OK
    current = store.get(ALICE, "s1")
    assert current is not None
    assert (current.version, current.step, current.state) == (2, 1, b"one")

    stale = store.commit(stepped(record, b"stale"), 1, history=row(1), idem=idem("late"))
    assert stale is Commit.CONFLICT
    assert store.get(ALICE, "s1") == current
    assert [h.step for h in store.history(ALICE, "s1", 10)] == [1]
    assert store.idempotency(ALICE, "late", time.time()) is None
    assert store.remember(idem("late")) is Commit.OK  # the key was not taken either

    assert store.commit(stepped(session("nope")), 1) is Commit.GONE
    assert store.get(ALICE, "nope") is None


def test_a_history_row_without_a_loss_reads_back_as_none(store: SessionStore) -> None:
    # An apply of batches sent with grad_outputs only has no loss; lr is kept beside it.
    record = session()
    assert store.create(record) is Commit.OK
    lossless, lossy = replace(row(1), loss=None, lr=0.05), row(2)
    assert store.commit(stepped(record), 1, history=lossless) is Commit.OK
    assert store.commit(replace(stepped(record), step=2), 2, history=lossy) is Commit.OK
    assert store.history(ALICE, "s1", 10) == [lossless, lossy]


def test_commit_writes_state_history_and_idempotency_together(store: SessionStore) -> None:
    record = session()
    assert store.create(record) is Commit.OK
    answer = idem("step-1")
    history = row(1)
    new = replace(stepped(record, EVERY_BYTE[::-1]), name=None)
    assert store.commit(new, 1, history=history, idem=answer) is Commit.OK
    assert store.get(ALICE, "s1") == replace(new, version=2)
    assert store.history(ALICE, "s1", 10) == [history]
    assert store.idempotency(ALICE, "step-1", time.time()) == answer
    # A commit without history (a PATCH) adds no row.
    renamed = replace(new, name="renamed")
    assert store.commit(renamed, 2) is Commit.OK
    assert store.get(ALICE, "s1") == replace(renamed, version=3)
    assert store.history(ALICE, "s1", 10) == [history]


def test_commit_many_sets_each_session_on_its_own(store: SessionStore) -> None:
    """A group commit: one transaction, each item compared-and-set as commit() would."""
    records = [session(f"g{i}") for i in range(4)]
    for record in records:
        assert store.create(record) is Commit.OK
    assert store.commit(stepped(records[1], b"moved"), 1) is Commit.OK  # g1 is at version 2
    outcomes = store.commit_many(
        [
            CommitItem(stepped(records[0], b"zero"), 1, row(1), idem("g0")),
            CommitItem(stepped(records[1], b"stale"), 1, row(1), idem("g1")),
            CommitItem(stepped(session("gone"), b"x"), 1, row(1)),
            CommitItem(stepped(records[2], b"two"), 1, row(1), idem("g0")),  # key just taken
            CommitItem(stepped(records[3], b"three"), 1, row(1), idem("g3")),
        ]
    )
    assert outcomes == [Commit.OK, Commit.CONFLICT, Commit.GONE, Commit.CONFLICT, Commit.OK]
    states = {sid: store.get(ALICE, sid) for sid in ("g0", "g1", "g2", "g3")}
    assert {sid: (r.state, r.version) for sid, r in states.items() if r} == {
        "g0": (b"zero", 2),
        "g1": (b"moved", 2),
        "g2": (EVERY_BYTE, 1),
        "g3": (b"three", 2),
    }
    assert [h.step for h in store.history(ALICE, "g2", 10)] == []
    assert [h.step for h in store.history(ALICE, "g3", 10)] == [1]
    assert store.idempotency(ALICE, "g1", time.time()) is None
    assert store.idempotency(ALICE, "g3", time.time()) is not None
    assert store.commit_many([]) == []


def test_commit_many_commits_each_session_as_a_prefix(store: SessionStore) -> None:
    """After one of a session's items is refused, its later items are refused too, even one
    whose expected version matches (another writer moved the session to it): a chain never
    commits past a gap. Other sessions' items are unaffected."""
    chain, other = session("c"), session("o")
    for record in (chain, other):
        assert store.create(record) is Commit.OK
    assert store.commit(stepped(chain, b"theirs"), 1, row(1)) is Commit.OK  # c: version 2
    ours1 = stepped(chain, b"ours1")  # computed on version 1, which is gone
    ours2 = stepped(ours1, b"ours2")  # computed on ours1: expects version 2, which matches
    outcomes = store.commit_many(
        [
            CommitItem(ours1, 1, row(1), idem("c1")),
            CommitItem(stepped(other, b"o1"), 1, row(1)),
            CommitItem(ours2, 2, row(2), idem("c2")),
            CommitItem(stepped(stepped(other), b"o2"), 2, row(2)),
        ]
    )
    assert outcomes == [Commit.CONFLICT, Commit.OK, Commit.CONFLICT, Commit.OK]
    after = store.get(ALICE, "c")
    assert after is not None and (after.state, after.version) == (b"theirs", 2)
    assert [h.step for h in store.history(ALICE, "c", 10)] == [1]
    assert store.idempotency(ALICE, "c2", time.time()) is None
    moved = store.get(ALICE, "o")
    assert moved is not None and (moved.state, moved.version) == (b"o2", 3)
    # A gone session's later items are refused too, and a later transaction starts afresh.
    gone = [CommitItem(stepped(session("nope")), 1), CommitItem(stepped(session("nope")), 2)]
    assert store.commit_many(gone) == [Commit.GONE, Commit.CONFLICT]
    assert store.commit_many([CommitItem(stepped(after, b"next"), 2, row(2))]) == [Commit.OK]


def test_a_taken_idempotency_key_is_a_conflict(store: SessionStore) -> None:
    assert store.create(session("s1"), idem("k")) is Commit.OK
    assert store.create(session("s2"), idem("k")) is Commit.CONFLICT
    assert store.get(ALICE, "s2") is None
    assert [r.id for r in store.sessions(ALICE, 10)] == ["s1"]

    record = store.get(ALICE, "s1")
    assert record is not None
    assert store.commit(stepped(record), record.version, row(1), idem("k")) is Commit.CONFLICT
    assert store.get(ALICE, "s1") == record
    assert store.history(ALICE, "s1", 10) == []

    assert store.remember(idem("k")) is Commit.CONFLICT
    kept = store.idempotency(ALICE, "k", time.time())
    assert kept is not None and kept.fingerprint == idem("k").fingerprint

    # Keys are per owner: Bob's "k" is another key.
    assert store.remember(idem("k", owner=BOB)) is Commit.OK
    assert store.create(session("s3", owner=BOB), idem("k2", owner=BOB)) is Commit.OK


def test_remember_stores_an_answer(store: SessionStore) -> None:
    answer = idem("r")
    assert store.remember(answer) is Commit.OK
    assert store.idempotency(ALICE, "r", time.time()) == answer
    assert store.idempotency(BOB, "r", time.time()) is None
    assert store.idempotency(ALICE, "other", time.time()) is None


def test_idempotency_records_expire_after_the_ttl(store: SessionStore) -> None:
    now = time.time()
    old = idem("k", created_at=now - IDEMPOTENCY_TTL - 1)
    assert store.remember(old) is Commit.OK
    assert store.idempotency(ALICE, "k", now) is None
    assert store.idempotency(ALICE, "k", now - IDEMPOTENCY_TTL / 2) == old

    fresh = idem("k", created_at=now)
    assert store.remember(fresh) is Commit.OK
    assert store.idempotency(ALICE, "k", now) == fresh

    assert store.remember(idem("c", created_at=now - IDEMPOTENCY_TTL - 1)) is Commit.OK
    assert store.create(session("s1"), idem("c", created_at=now)) is Commit.OK
    assert store.remember(idem("m", created_at=now - IDEMPOTENCY_TTL - 1)) is Commit.OK
    record = store.get(ALICE, "s1")
    assert record is not None
    assert store.commit(stepped(record), 1, row(1), idem("m", created_at=now)) is Commit.OK
    assert store.idempotency(ALICE, "m", now) == idem("m", created_at=now)


def test_history_pages_by_step(store: SessionStore) -> None:
    record = session()
    assert store.create(record) is Commit.OK
    rows = []
    for step in range(1, 8):
        rows.append(row(step))
        assert store.commit(stepped(record), record.version, rows[-1]) is Commit.OK
        current = store.get(ALICE, "s1")
        assert current is not None
        record = current
    assert store.history(ALICE, "s1", 3) == rows[:3]
    assert store.history(ALICE, "s1", 3, after_step=3) == rows[3:6]
    assert store.history(ALICE, "s1", 3, after_step=6) == rows[6:]
    assert store.history(ALICE, "s1", 3, after_step=7) == []
    assert store.history(ALICE, "s1", 100) == rows


def test_delete_removes_the_session_and_its_history(store: SessionStore) -> None:
    record = session()
    assert store.create(record) is Commit.OK
    assert store.commit(stepped(record), 1, row(1)) is Commit.OK
    assert store.delete(ALICE, "s1") is True
    assert store.get(ALICE, "s1") is None
    assert store.history(ALICE, "s1", 10) == []
    assert store.sessions(ALICE, 10) == []
    assert store.delete(ALICE, "s1") is False
    assert store.commit(stepped(record), 2) is Commit.GONE
    # The id can be used again, and the new session starts with no history.
    assert store.create(session()) is Commit.OK
    assert store.history(ALICE, "s1", 10) == []


def test_concurrent_steps_each_apply_once(store_factory: StoreFactory) -> None:
    first = store_factory()
    assert first.create(session(state=b"0")) is Commit.OK
    threads, steps = 8, 50
    errors: list[BaseException] = []

    def work() -> None:
        store = store_factory()
        try:
            for _ in range(steps):
                while True:
                    record = store.get(ALICE, "s1")
                    assert record is not None
                    new = replace(stepped(record), state=str(record.step + 1).encode())
                    result = store.commit(new, record.version, row(record.step + 1))
                    if result is Commit.OK:
                        break
                    assert result is Commit.CONFLICT
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    assert errors == []
    final = first.get(ALICE, "s1")
    assert final is not None
    assert (final.step, final.state, final.version) == (400, b"400", 401)
    history = first.history(ALICE, "s1", 1000)
    assert [h.step for h in history] == list(range(1, threads * steps + 1))


def test_redis_idempotency_records_carry_a_ttl(redis_url: str) -> None:
    prefix = f"gradsvc-test:{uuid.uuid4().hex}:"
    store = RedisStore(redis_url, prefix=prefix)
    client = redis.Redis.from_url(redis_url)
    try:
        assert store.remember(idem("t")) is Commit.OK
        keys = list(client.scan_iter(match=f"{prefix}i:*"))
        assert len(keys) == 1
        assert IDEMPOTENCY_TTL - 60 < client.ttl(keys[0]) <= IDEMPOTENCY_TTL
        client.delete(*client.scan_iter(match=f"{prefix}*"))
    finally:
        client.close()
        store.close()


def test_redis_delete_leaves_no_keys_behind(redis_url: str) -> None:
    prefix = f"gradsvc-test:{uuid.uuid4().hex}:"
    store = RedisStore(redis_url, prefix=prefix)
    client = redis.Redis.from_url(redis_url)
    try:
        record = session()
        assert store.create(record) is Commit.OK
        assert store.commit(stepped(record), 1, row(1)) is Commit.OK
        # the session, its history, the index and the bytes its owner keeps
        assert len(list(client.scan_iter(match=f"{prefix}*"))) == 4
        assert store.delete(ALICE, "s1") is True
        assert list(client.scan_iter(match=f"{prefix}*")) == []
    finally:
        client.close()
        store.close()


def test_redis_index_members_sort_as_created_at_then_id() -> None:
    stamps = [-1e300, -2.5, -1.0, -0.0, 0.0, 1e-300, 1.0, 1.5, 1_700_000_000.25, 1e300]
    pairs = [(t, sid) for t in stamps for sid in ("", "a", "a\x00", "ab", "b", "é")]
    members = sorted(pairs, key=lambda p: _index_member(*p))
    assert members == sorted(pairs)


# -- jobs, holds and leases ----------------------------------------------------------------

TTL = 3600.0


def job(jid: str = "j1", sid: str = "s1", owner: str = ALICE, at: float | None = None) -> JobRecord:
    now = time.time() if at is None else at
    return JobRecord(
        id=jid,
        owner=owner,
        session=sid,
        spec='{"epochs": 2, "batch_size": 1, "shuffle": true, "seed": 0, "rows": 4}',
        dataset=EVERY_BYTE,
        start_step=0,
        created_at=now,
        updated_at=now,
    )


def progress(steps: int, loss: float | None = 0.25) -> Progress:
    return Progress(epoch=steps // 4, batch=steps % 4, steps_done=steps, step=steps, loss=loss)


def test_a_job_holds_its_session_from_the_moment_it_is_created(store: SessionStore) -> None:
    record = session()
    assert store.create(record) is Commit.OK
    assert store.create_job(job()) is Commit.OK
    got = store.get(ALICE, "s1")
    assert got is not None and got.hold == "j1"
    stored = store.get_job(ALICE, "j1", time.time())
    # Reads leave the dataset out (a stream reads a job ten times a second); claims have it.
    assert stored is not None and (stored.status, stored.dataset) == ("queued", b"")
    assert store.get_job(BOB, "j1", time.time()) is None
    # A second job on the held session, or a job on a missing one, is refused whole.
    assert store.create_job(job("j2")) is Commit.BUSY
    assert store.create_job(job("j3", sid="nope")) is Commit.GONE
    assert store.get_job(ALICE, "j2", time.time()) is None
    claimed = store.claim_job("w1", time.time(), 10)
    assert claimed is not None and claimed.dataset == EVERY_BYTE
    renewed = store.renew_lease("j1", "w1", time.time(), 10)
    assert renewed is not None and renewed.dataset == b"" and renewed.spec == stored.spec


def test_commits_of_a_held_session_are_the_holders_alone(store: SessionStore) -> None:
    record = session()
    assert store.create(record) is Commit.OK
    assert store.create_job(job()) is Commit.OK
    assert store.commit(stepped(record), 1) is Commit.BUSY
    other = CommitItem(stepped(record), 1, holder="j9")
    mine = CommitItem(stepped(record), 1, row(1), holder="j1")
    assert store.commit_many([other]) == [Commit.BUSY]
    assert store.commit_many([mine]) == [Commit.OK]
    got = store.get(ALICE, "s1")
    assert got is not None and (got.step, got.hold) == (1, "j1")  # a commit keeps the hold
    assert store.delete(ALICE, "s1") is False
    assert store.get(ALICE, "s1") is not None
    # Once the job is over the session is free again, and its holder's commits are refused.
    claimed = store.claim_job("w1", time.time(), 10)
    assert claimed is not None
    assert store.finish_job("j1", "w1", "succeeded", progress(1), None, time.time(), TTL)
    late = CommitItem(stepped(got), got.version, holder="j1")
    assert store.commit_many([late]) == [Commit.BUSY]
    assert store.commit(stepped(got), got.version) is Commit.OK
    assert store.delete(ALICE, "s1") is True


def test_a_claim_is_exclusive_and_a_lapsed_lease_is_reclaimed(
    store_factory: StoreFactory,
) -> None:
    first = store_factory()
    for n in range(3):
        assert first.create(session(f"s{n}")) is Commit.OK
        assert first.create_job(job(f"j{n}", f"s{n}", at=1000.0 + n)) is Commit.OK
    now = time.time()
    claims: list[str] = []
    lock = threading.Lock()

    def claim(worker: str) -> None:
        store = store_factory()
        while (got := store.claim_job(worker, now, 10)) is not None:
            with lock:
                claims.append(got.id)

    threads = [threading.Thread(target=claim, args=(f"w{n}",)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claims) == ["j0", "j1", "j2"]
    j0 = first.get_job(ALICE, "j0", now)
    assert j0 is not None and (j0.status, j0.attempts) == ("running", 1)
    holder = j0.lease_holder
    assert holder is not None
    # Renewed, the lease holds; a stranger can neither renew it nor finish the job.
    assert first.renew_lease("j0", holder, now + 5, 10, progress(2)) is not None
    for other in ("j1", "j2"):
        running = first.get_job(ALICE, other, now)
        assert running is not None and running.lease_holder is not None
        assert first.renew_lease(other, running.lease_holder, now + 100, 100) is not None
    assert first.claim_job("late", now + 12, 10) is None
    assert first.renew_lease("j0", "late", now + 12, 10) is None
    assert not first.finish_job("j0", "late", "failed", progress(0), None, now, TTL)
    # Lapsed, any worker takes it over, with one more attempt and the progress kept.
    again = first.claim_job("w9", now + 16, 10)
    assert again is not None and again.id == "j0"
    assert (again.attempts, again.lease_holder, again.steps_done, again.loss) == (2, "w9", 2, 0.25)
    assert first.renew_lease("j0", holder, now + 16, 10) is None
    assert first.finish_job("j0", "w9", "succeeded", progress(8, None), None, now + 17, TTL)
    done = first.get_job(ALICE, "j0", now + 17)
    assert done is not None
    assert (done.status, done.steps_done, done.loss, done.lease_holder) == (
        "succeeded",
        8,
        None,
        None,
    )
    s0 = first.get(ALICE, "s0")
    assert s0 is not None and s0.hold is None


def test_a_runs_failures_are_counted_apart_from_its_attempts(store: SessionStore) -> None:
    """A drain's hand-over is a run (``attempts``) but no failure: only a let-go that says
    so counts towards the job's allowance, and a claim keeps the count."""
    now = time.time()
    assert store.create(session()) is Commit.OK
    assert store.create_job(job()) is Commit.OK
    for n in range(1, 4):  # three hand-overs: each a run, none a failure
        claimed = store.claim_job(f"w{n}", now, 10)
        assert claimed is not None and (claimed.attempts, claimed.failures) == (n, 0)
        assert store.renew_lease("j1", f"w{n}", now, -1.0, progress(n)) is not None
    claimed = store.claim_job("w4", now, 10)
    assert claimed is not None and (claimed.attempts, claimed.failures) == (4, 0)
    failed = store.renew_lease("j1", "w4", now, -1.0, progress(4), failures=1)
    assert failed is not None and failed.failures == 1
    again = store.claim_job("w5", now, 10)
    assert again is not None and (again.attempts, again.failures, again.steps_done) == (5, 1, 4)


def test_cancel_ends_a_queued_job_and_flags_a_running_one(store: SessionStore) -> None:
    now = time.time()
    for n in range(2):
        assert store.create(session(f"s{n}")) is Commit.OK
        assert store.create_job(job(f"j{n}", f"s{n}", at=now + n)) is Commit.OK
    assert store.claim_job("w1", now, 10) is not None  # j0, the older
    assert store.cancel_job(BOB, "j1", now, TTL) is None
    queued = store.cancel_job(ALICE, "j1", now, TTL)
    assert queued is not None and (queued.status, queued.cancel) == ("cancelled", True)
    s1 = store.get(ALICE, "s1")
    assert s1 is not None and s1.hold is None
    running = store.cancel_job(ALICE, "j0", now, TTL)
    assert running is not None and (running.status, running.cancel) == ("running", True)
    seen = store.renew_lease("j0", "w1", now, 10)
    assert seen is not None and seen.cancel
    assert store.finish_job("j0", "w1", "cancelled", progress(1), None, now, TTL)
    assert store.claim_job("w2", now + 60, 10) is None  # nothing left to run


def test_one_idempotency_key_makes_one_job(store_factory: StoreFactory) -> None:
    first = store_factory()
    for n in range(8):
        assert first.create(session(f"s{n}")) is Commit.OK
    outcomes: list[Commit] = []

    def start(n: int) -> None:
        outcomes.append(store_factory().create_job(job(f"j{n}", f"s{n}"), idem("train")))

    threads = [threading.Thread(target=start, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(o.value for o in outcomes) == ["conflict"] * 7 + ["ok"]
    held = [first.get(ALICE, f"s{n}") for n in range(8)]
    assert sum(r is not None and r.hold is not None for r in held) == 1
    assert first.idempotency(ALICE, "train", time.time()) is not None


def test_the_active_job_limit_counts_the_owners_own(store: SessionStore) -> None:
    for n, owner in enumerate([ALICE, ALICE, BOB]):
        assert store.create(session(f"s{n}", owner=owner)) is Commit.OK
    assert store.create_job(job("j0", "s0"), limit=1) is Commit.OK
    assert store.create_job(job("j1", "s1"), limit=1) is Commit.FULL
    assert store.create_job(job("j2", "s2", owner=BOB), limit=1) is Commit.OK
    assert store.cancel_job(ALICE, "j0", time.time(), TTL) is not None
    assert store.create_job(job("j1", "s1"), limit=1) is Commit.OK


def test_finished_jobs_are_purged_after_the_ttl_each_by_its_own_time(
    store: SessionStore,
) -> None:
    now = time.time()
    for n, owner in enumerate([ALICE, BOB]):
        assert store.create(session(f"s{n}", owner=owner)) is Commit.OK
        assert store.create_job(job(f"j{n}", f"s{n}", owner=owner, at=now)) is Commit.OK
    assert store.cancel_job(ALICE, "j0", now, 100) is not None
    assert store.cancel_job(BOB, "j1", now + 50, 100) is not None
    assert store.get_job(ALICE, "j0", now + 99) is not None
    assert store.get_job(ALICE, "j0", now + 101) is None
    assert store.get_job(BOB, "j1", now + 101) is not None
    assert store.get_job(BOB, "j1", now + 151) is None
    assert store.claim_job("w", now + 200, 10) is None  # purging is no claim


def test_a_job_starts_from_the_step_its_session_is_at(store: SessionStore) -> None:
    record = session()
    assert store.create(record) is Commit.OK
    assert store.commit(stepped(record), 1, row(1)) is Commit.OK  # after the caller read it
    assert store.create_job(replace(job(), start_step=0)) is Commit.OK
    stored = store.get_job(ALICE, "j1", time.time())
    assert stored is not None and (stored.start_step, stored.step) == (1, 1)


def test_sqlite_opens_a_file_from_before_jobs(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as old:
        old.executescript(
            "CREATE TABLE sessions (id TEXT PRIMARY KEY, owner TEXT NOT NULL, name TEXT, "
            "spec TEXT NOT NULL, state BLOB NOT NULL, step INTEGER NOT NULL, "
            "version INTEGER NOT NULL, created_at REAL NOT NULL, updated_at REAL NOT NULL);"
            "INSERT INTO sessions VALUES ('s1', 'alice', NULL, '{}', x'00', 3, 4, 1.0, 2.0);"
        )
    stores = [SqliteStore(str(path)) for _ in range(2)]
    try:
        record = stores[1].get(ALICE, "s1")
        assert record is not None and (record.step, record.hold) == (3, None)
        assert stores[1].stored_bytes(ALICE) == 1  # what it held before quotas, counted once
        assert stores[0].create_job(job()) is Commit.OK
        assert stores[1].stored_bytes(ALICE) == 1 + len(EVERY_BYTE)
    finally:
        for store in stores:
            store.close()


def test_expired_records_are_purged_in_batches(store_factory: StoreFactory) -> None:
    """With a tiny TTL: records older than it are deleted by ``purge`` (Redis: by its own key
    TTLs, which follow the setting), a batch at a time; younger ones stay. Reading with a
    ``now`` from before the expiry shows whether a record is still physically there."""
    ttl = 0.5
    store = store_factory(idempotency_ttl=ttl)
    written = time.time()
    old = [idem(f"old-{i}", created_at=written) for i in range(5)]
    for record in old:
        assert store.remember(record) is Commit.OK
    assert store.idempotency(ALICE, "old-0", written + ttl / 2) == old[0]
    time.sleep(ttl + 0.2)
    fresh = idem("fresh")
    assert store.remember(fresh) is Commit.OK
    assert store.idempotency(ALICE, "old-0", time.time()) is None  # expired: not served
    deleted = store.purge(time.time(), batch=2)
    assert deleted in (0, 5)  # Redis deletes them itself (0); the others here, two at a time
    for record in old:
        assert store.idempotency(ALICE, record.key, written) is None  # gone, not only stale
    assert store.idempotency(ALICE, "fresh", fresh.created_at) == fresh
    assert store.purge(time.time()) == 0
    # An expired key may be taken again, by a commit as by remember.
    assert store.create(session("s1"), idem("old-1")) is Commit.OK


def test_a_healthy_store_is_writable(store: SessionStore) -> None:
    store.writable()
    store.writable()
    assert store.create(session()) is Commit.OK


def test_redis_key_ttls_follow_the_setting(redis_url: str) -> None:
    prefix = f"gradsvc-test:{uuid.uuid4().hex}:"
    store = RedisStore(redis_url, prefix=prefix, idempotency_ttl=90.0)
    client = redis.Redis.from_url(redis_url)
    try:
        assert store.remember(idem("t")) is Commit.OK
        (key,) = client.scan_iter(match=f"{prefix}i:*")
        assert 85_000 < client.pttl(key) <= 90_000
        client.delete(key)
    finally:
        client.close()
        store.close()


def test_redis_refuses_a_commit_that_runs_after_its_caller_gave_up(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A commit script carries the time its caller stops waiting; run later (the server was
    paused, the transaction queued), it refuses, so a caller told "unknown" finds nothing
    applied behind its back."""
    import service.store.redis as redis_store

    store = RedisStore(redis_url, prefix=f"gradsvc-test:{uuid.uuid4().hex}:")
    try:
        record = session()
        assert store.create(record) is Commit.OK
        sent_long_ago = time.time() - 2 * redis_store.TIMEOUT
        monkeypatch.setattr(redis_store.time, "time", lambda: sent_long_ago)
        assert store.commit_many([CommitItem(stepped(record), 1, row(1))]) == [Commit.CONFLICT]
        monkeypatch.undo()
        assert store.get(ALICE, "s1") == record
        assert store.commit_many([CommitItem(stepped(record), 1, row(1))]) == [Commit.OK]
    finally:
        store.close()


# -- bytes stored per owner ----------------------------------------------------------------

STATE, ANSWER = len(EVERY_BYTE), len(idem().body)
"""What a test session's state and a test idempotency record count."""


def test_the_bytes_an_owner_keeps_are_counted_and_given_back(store: SessionStore) -> None:
    assert store.stored_bytes(ALICE) == 0
    record = session()
    assert store.create(record, idem("made")) is Commit.OK
    assert store.stored_bytes(ALICE) == STATE + ANSWER
    assert store.commit(stepped(record, b"x" * 10), 1, row(1)) is Commit.OK  # a smaller state
    assert store.remember(idem("read")) is Commit.OK
    assert store.stored_bytes(ALICE) == 10 + 2 * ANSWER
    # An active job's dataset counts until the job ends, however it ends.
    assert store.create_job(job("j1", at=1.0)) is Commit.OK
    assert store.stored_bytes(ALICE) == 10 + 2 * ANSWER + STATE
    assert store.cancel_job(ALICE, "j1", time.time(), TTL) is not None  # queued: ended at once
    assert store.create_job(job("j2", at=2.0)) is Commit.OK
    claimed = store.claim_job("w", time.time(), 10)
    assert claimed is not None and claimed.id == "j2"
    assert store.finish_job("j2", "w", "succeeded", progress(1), None, time.time(), TTL)
    assert store.stored_bytes(ALICE) == 10 + 2 * ANSWER
    # Owners are counted apart; a deleted session gives its state back.
    assert store.create(session("b1", owner=BOB)) is Commit.OK
    assert store.delete(ALICE, "s1") is True
    assert (store.stored_bytes(ALICE), store.stored_bytes(BOB)) == (2 * ANSWER, STATE)


def test_expired_records_give_their_bytes_back(store: SessionStore) -> None:
    now = time.time()
    expired = now - IDEMPOTENCY_TTL - 1
    assert store.remember(idem("old", created_at=expired)) is Commit.OK
    assert store.remember(idem("again", created_at=expired)) is Commit.OK
    assert store.remember(idem("new", created_at=now)) is Commit.OK
    assert store.stored_bytes(ALICE) == 3 * ANSWER
    # A record that takes an expired one's key replaces it, bytes and all.
    assert store.remember(idem("again", created_at=now)) is Commit.OK
    assert store.stored_bytes(ALICE) == 3 * ANSWER
    assert store.purge(now) >= 1
    assert store.stored_bytes(ALICE) == 2 * ANSWER
    assert store.purge(now) == 0
    assert store.stored_bytes(ALICE) == 2 * ANSWER


def test_a_write_over_the_byte_quota_is_refused_and_changes_nothing(
    store_factory: StoreFactory,
) -> None:
    store = store_factory(max_stored_bytes=2 * STATE)
    s1, s2 = session("s1"), session("s2")
    assert store.create(s1) is Commit.OK and store.create(s2) is Commit.OK  # exactly at it
    now = time.time()
    # Whatever would grow: a session, a kept answer, a larger state, a dataset.
    assert store.create(session("s3")) is Commit.QUOTA
    assert store.remember(idem("r")) is Commit.QUOTA
    assert store.commit(stepped(s1, EVERY_BYTE + b"!"), 1, row(1)) is Commit.QUOTA
    assert store.commit(stepped(s1, EVERY_BYTE[::-1]), 1, row(1), idem("k")) is Commit.QUOTA
    assert store.create_job(job("j1", "s1")) is Commit.QUOTA
    assert store.get(ALICE, "s3") is None and store.get(ALICE, "s1") == s1
    assert store.history(ALICE, "s1", 10) == [] and store.get_job(ALICE, "j1", now) is None
    assert store.idempotency(ALICE, "r", now) is None and store.idempotency(ALICE, "k", now) is None
    assert store.stored_bytes(ALICE) == 2 * STATE
    # A step that grows nothing goes through at the quota; so does one that shrinks.
    assert store.commit(stepped(s1, EVERY_BYTE[::-1]), 1, row(1)) is Commit.OK
    at = store.get(ALICE, "s1")
    assert at is not None
    outcomes = store.commit_many(
        [
            CommitItem(stepped(at, EVERY_BYTE + b"!"), 2, row(2)),
            CommitItem(stepped(stepped(at), b"small"), 3, row(3)),  # after a refusal: none
            CommitItem(stepped(s2, b"small"), 1, row(1)),
        ]
    )
    assert outcomes == [Commit.QUOTA, Commit.CONFLICT, Commit.OK]
    assert [h.step for h in store.history(ALICE, "s1", 10)] == [1]
    assert store.stored_bytes(ALICE) == STATE + 5
    # The room made is there to use; another owner has a quota of its own.
    assert store.create(session("s3", state=b"y" * (STATE - 5))) is Commit.OK
    assert store.create(session("b1", owner=BOB)) is Commit.OK
    assert store.create(session("s4", state=b"z")) is Commit.QUOTA
    assert store.delete(ALICE, "s3") is True
    assert store.create_job(job("j1", "s1")) is Commit.QUOTA  # 5 bytes short
    assert store.delete(ALICE, "s2") is True
    assert store.create_job(job("j1", "s1")) is Commit.OK


def test_concurrent_writers_never_take_an_owner_over_its_quota(
    store_factory: StoreFactory,
) -> None:
    """Writers on separate connections (redis: clients; sqlite: connections) race at the
    quota: the check and the write are one step, so exactly as many fit as the limit allows."""
    limit = 5 * STATE
    outcomes: list[Commit] = []

    def work(n: int) -> None:
        store = store_factory(max_stored_bytes=limit)
        for i in range(3):
            outcomes.append(store.create(session(f"t{n}-{i}")))

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(o.value for o in outcomes) == ["ok"] * 5 + ["quota"] * 7
    assert store_factory().stored_bytes(ALICE) == limit


def test_concurrent_jobs_never_take_an_owner_over_its_active_job_limit(
    store_factory: StoreFactory,
) -> None:
    first = store_factory()
    for n in range(6):
        assert first.create(session(f"s{n}")) is Commit.OK
    outcomes: list[Commit] = []

    def start(n: int) -> None:
        outcomes.append(store_factory().create_job(job(f"j{n}", f"s{n}"), limit=2))

    threads = [threading.Thread(target=start, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(o.value for o in outcomes) == ["full"] * 4 + ["ok"] * 2


def test_one_owners_flood_of_jobs_keeps_another_owners_finished_job(store: SessionStore) -> None:
    """Finished jobs are kept for their TTL each, whoever else makes jobs: more than a
    thousand of Bob's, four active at a time, leave Alice's finished one readable as it
    ended."""
    if isinstance(store, SqliteStore):  # two thousand fsyncs would test the disk, not this
        fast = SqliteStore(store.path, synchronous="off")
        try:
            _flood(fast)
        finally:
            fast.close()
    else:
        _flood(store)


def _flood(store: SessionStore) -> None:
    now = time.time()
    assert store.create(session("a")) is Commit.OK
    assert store.create_job(job("alice", "a", at=now)) is Commit.OK
    assert store.cancel_job(ALICE, "alice", now, TTL) is not None
    for n in range(4):
        assert store.create(session(f"b{n}", owner=BOB)) is Commit.OK
    for n in range(1001):
        assert store.create_job(job(f"bob{n}", f"b{n % 4}", BOB, now + n), limit=4) is Commit.OK
        if n % 4 == 3:
            for k in range(n - 3, n + 1):
                assert store.cancel_job(BOB, f"bob{k}", now + n, TTL) is not None
    kept = store.get_job(ALICE, "alice", now + 1001)
    assert kept is not None and kept.status == "cancelled"


def test_redis_counts_a_session_from_before_quotas_from_its_next_write(redis_url: str) -> None:
    prefix = f"gradsvc-test:{uuid.uuid4().hex}:"
    store = RedisStore(redis_url, prefix=prefix)
    client = redis.Redis.from_url(redis_url)
    try:
        for record in (session("old"), session("gone"), session("new")):
            assert store.create(record) is Commit.OK
        for sid in ("old", "gone"):  # as a store from before quotas left them: uncounted
            client.hdel(f"{prefix}s:{sid}", "counted")
            client.hincrby(f"{prefix}u:bytes", ALICE, -STATE)
        assert store.stored_bytes(ALICE) == STATE
        assert store.commit(stepped(session("old"), b"x" * 10), 1, row(1)) is Commit.OK
        assert store.delete(ALICE, "gone") is True
        assert store.stored_bytes(ALICE) == STATE + 10
    finally:
        client.delete(*client.scan_iter(match=f"{prefix}*"))
        client.close()
        store.close()


def test_a_groups_quota_is_each_owners_own_and_counts_the_groups_earlier_items(
    store_factory: StoreFactory,
) -> None:
    """In one ``commit_many``, an owner over its quota is refused while another owner's
    items go on; each item is judged on its owner's total as the group's earlier items left
    it; and a key the group has just taken is taken."""
    store = store_factory(max_stored_bytes=3 * STATE)
    a1, a2, b1 = session("a1"), session("a2"), session("b1", owner=BOB)
    for record in (a1, a2, b1):
        assert store.create(record) is Commit.OK
    double = EVERY_BYTE * 2
    b1_double = stepped(b1, double)
    a2_small = stepped(a2, b"small")
    outcomes = store.commit_many(
        [
            CommitItem(stepped(a1, double + b"!"), 1, row(1)),  # alice 3S + 1: over
            CommitItem(b1_double, 1, row(1)),  # bob 2S
            CommitItem(a2_small, 1, row(1)),  # alice S + 5
            CommitItem(stepped(stepped(a1), b"x"), 2, row(2)),  # after a1's refusal
            CommitItem(stepped(b1_double, double), 2, row(2), idem("k", BOB)),  # 3S + 14
            CommitItem(stepped(a2_small, b"small"), 2, row(2), idem("k")),  # 2S + 19
            CommitItem(stepped(stepped(a2_small), b"small"), 3, row(3), idem("k")),  # taken
        ]
    )
    assert outcomes == [
        Commit.QUOTA,
        Commit.OK,
        Commit.OK,
        Commit.CONFLICT,
        Commit.QUOTA,
        Commit.OK,
        Commit.CONFLICT,
    ]
    assert store.stored_bytes(ALICE) == STATE + 5 + ANSWER
    assert store.stored_bytes(BOB) == 2 * STATE
    assert [h.step for h in store.history(ALICE, "a1", 10)] == []
    assert [h.step for h in store.history(ALICE, "a2", 10)] == [1, 2]
    assert [h.step for h in store.history(BOB, "b1", 10)] == [1]
    now = time.time()
    assert store.idempotency(ALICE, "k", now) is not None
    assert store.idempotency(BOB, "k", now) is None
    after = store.get(ALICE, "a2")
    assert after is not None and (after.state, after.version) == (b"small", 3)
