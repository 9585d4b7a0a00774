"""SQLite's grouped ``commit_many`` against committing the same items one by one: the same
outcomes and, table by table, the same rows, byte for byte."""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path

import pytest

from service.store import usage
from service.store.base import (
    Commit,
    CommitItem,
    HistoryRow,
    IdempotencyRecord,
    SessionRecord,
    prefix_commits,
)
from service.store.sqlite import SqliteStore

TTL = 100.0
OWNERS = ("alice", "bob")


def one_by_one(store: SqliteStore, items: list[CommitItem]) -> list[Commit]:
    """``commit_many`` as it was: every item's statements in turn, in one transaction."""

    def commit_one(db: sqlite3.Connection, item: CommitItem) -> Commit:
        record, expected = item.record, item.expected_version
        row = db.execute(
            "SELECT version, hold, length(state) FROM sessions WHERE id = ? AND owner = ?",
            (record.id, record.owner),
        ).fetchone()
        if row is None:
            return Commit.GONE
        if row[1] != item.holder:
            return Commit.BUSY
        idem_grows = store._idem_grows(db, item.idem)
        if row[0] != expected or idem_grows is None:
            return Commit.CONFLICT
        grows = usage.session_bytes(record) - int(row[2])
        if store._over(db, record.owner, grows + idem_grows):
            return Commit.QUOTA
        usage.sqlite_add(db, record.owner, grows)
        db.execute(
            "UPDATE sessions SET name = ?, spec = ?, state = ?, step = ?, version = ?, "
            "updated_at = ? WHERE id = ?",
            (record.name, record.spec, record.state, record.step, expected + 1)
            + (record.updated_at, record.id),
        )
        if (h := item.history) is not None:
            db.execute(
                "INSERT INTO history (session_id, step, loss, grad_norm, at, lr) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (record.id, h.step, h.loss, h.grad_norm, h.at, h.lr),
            )
        store._put_idem(db, item.idem, idem_grows)
        return Commit.OK

    with store._write() as db:
        return prefix_commits(items, lambda item: commit_one(db, item))


def tables(store: SqliteStore) -> list[list[tuple[object, ...]]]:
    db = store._conn()
    return [
        db.execute(f"SELECT * FROM {table} ORDER BY 1, 2").fetchall()
        for table in ("sessions", "history", "idempotency", "usage")
    ]


def group(rng: random.Random, known: dict[str, SessionRecord], at: float) -> list[CommitItem]:
    """A group of chains: stale and current versions, sessions gone or held, states that
    grow and shrink, idempotency keys fresh, reused within the group, taken or expired."""
    items: list[CommitItem] = []
    for sid in rng.sample(sorted(known) + ["gone"], 5):
        base = known.get(sid) or SessionRecord(sid, "alice", None, "{}", b"s", 0, 1, 0.0, 0.0)
        version = base.version + rng.choice((0, 0, 0, -1, 1))
        record = base
        for _ in range(rng.randint(1, 3)):
            size = rng.choice((8, 8, 8, 1, 40, 400))
            record = SessionRecord(
                record.id,
                record.owner if rng.random() < 0.95 else "bob",
                rng.choice((None, "n✓")),
                '{"m": 1}',
                rng.randbytes(size),
                record.step + 1,
                0,
                record.created_at,
                at,
            )
            idem = None
            if rng.random() < 0.4:
                idem = IdempotencyRecord(
                    record.owner,
                    f"k{rng.randint(0, 6)}",
                    "POST x",
                    200,
                    rng.randbytes(rng.choice((3, 30))),
                    "{}",
                    at - rng.choice((0.0, 0.0, 2 * TTL)),
                )
            loss = rng.choice((None, rng.random()))
            history = HistoryRow(record.step, loss, rng.random(), at, rng.choice((None, 0.1)))
            holder = "job" if rng.random() < 0.05 else None
            items.append(CommitItem(record, version, history, idem, holder))
            version += 1
    return items


@pytest.mark.parametrize("seed", range(4))
def test_a_grouped_commit_is_the_item_by_item_commit(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    limit = (0, 300, 500, 800)[seed]
    grouped = SqliteStore(str(tmp_path / "grouped.db"), idempotency_ttl=TTL, max_stored_bytes=limit)
    single = SqliteStore(str(tmp_path / "single.db"), idempotency_ttl=TTL, max_stored_bytes=limit)
    known: dict[str, SessionRecord] = {}
    for n in range(8):
        record = SessionRecord(f"s{n}", OWNERS[n % 2], None, "{}", b"x" * 8, 0, 1, 1.0, 1.0)
        for store in (grouped, single):
            assert store.create(record) is Commit.OK
        known[record.id] = record
    for store in (grouped, single):
        store._conn().execute("UPDATE sessions SET hold = 'job' WHERE id = 's3'")
    seen: set[Commit] = set()
    for n in range(12):
        items = group(rng, known, at=1000.0 + n * TTL / 3)
        outcomes = grouped.commit_many(items)
        assert outcomes == one_by_one(single, items)
        assert tables(grouped) == tables(single)
        seen.update(outcomes)
        for sid in known:
            found = grouped.get(known[sid].owner, sid)
            assert found is not None
            known[sid] = found
    # The scenario reaches every outcome a commit can have, quota aside when there is none.
    assert seen >= {Commit.OK, Commit.CONFLICT, Commit.GONE, Commit.BUSY}
    if limit:
        assert Commit.QUOTA in seen
