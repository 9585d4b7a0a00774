"""SQLite's ``commit_many``: a group of session commits in one transaction, in few statements.

Item by item, a commit is five or six statements (read the session, read the idempotency
record, read the owner's total, update, insert the history row, put the record, add to the
total). For a group, the reads are one statement per table over all its items, every
item's outcome is then decided here in order against what those reads found and what the
group's earlier items changed, and the writes are one ``executemany`` per table, with one
total update per owner. The outcomes, the rows and the totals are those item by item gives:
the decisions are the same comparisons, made on the same values.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from service.store import usage
from service.store.base import Commit, CommitItem, IdempotencyRecord, prefix_commits

_CHUNK = 900
"""Parameters per ``IN (...)`` (SQLite's default bound on a statement's parameters is 999)."""


@dataclass
class _Row:
    """What a commit compares of a session row: as read, then as the group left it."""

    owner: str
    version: int
    hold: str | None
    size: int


def _chunks(values: list[str]) -> Iterator[tuple[str, list[str]]]:
    for start in range(0, len(values), _CHUNK):
        chunk = values[start : start + _CHUNK]
        yield ",".join("?" * len(chunk)), chunk


def _sessions(db: sqlite3.Connection, ids: list[str]) -> dict[str, _Row]:
    rows: dict[str, _Row] = {}
    for marks, chunk in _chunks(ids):
        query = (
            f"SELECT id, owner, version, hold, length(state) FROM sessions WHERE id IN ({marks})"
        )
        for id_, owner, version, hold, size in db.execute(query, chunk):
            rows[id_] = _Row(owner, version, hold, int(size))
    return rows


def _idems(db: sqlite3.Connection, keys: list[str]) -> dict[tuple[str, str], tuple[float, int]]:
    found: dict[tuple[str, str], tuple[float, int]] = {}
    for marks, chunk in _chunks(keys):
        query = (
            f"SELECT owner, key, created_at, length(body) FROM idempotency WHERE key IN ({marks})"
        )
        for owner, key, created_at, size in db.execute(query, chunk):
            found[(owner, key)] = (created_at, int(size))
    return found


def _used(db: sqlite3.Connection, owners: list[str]) -> dict[str, int]:
    used = dict.fromkeys(owners, 0)
    for marks, chunk in _chunks(owners):
        query = f"SELECT owner, bytes FROM usage WHERE owner IN ({marks})"
        for owner, total in db.execute(query, chunk):
            used[owner] = int(total)
    return used


def commit_group(
    db: sqlite3.Connection, items: Sequence[CommitItem], *, ttl: float, limit: int
) -> list[Commit]:
    """Commit ``items`` in ``db``'s open write transaction, each session's as a prefix.

    Args:
        db: a connection inside ``BEGIN IMMEDIATE``: nothing else writes until it ends.
        items: the commits, in order.
        ttl: seconds an idempotency record holds its key.
        limit: the byte quota per owner (0: none).

    Returns:
        Each item's outcome, in order: what committing them one by one in this
        transaction gives, each session's only up to its first refusal.
    """
    idem_items = [item.idem for item in items if item.idem is not None]
    rows = _sessions(db, list(dict.fromkeys(item.record.id for item in items)))
    idems = _idems(db, list(dict.fromkeys(idem.key for idem in idem_items)))
    used: dict[str, int] = {}
    if limit > 0:  # the totals are read only to refuse growth past a limit
        owners = [item.record.owner for item in items] + [idem.owner for idem in idem_items]
        used = _used(db, list(dict.fromkeys(owners)))
    updates: list[tuple[object, ...]] = []
    history: list[tuple[object, ...]] = []
    puts: list[tuple[object, ...]] = []
    charges: dict[str, int] = {}

    def idem_grows(idem: IdempotencyRecord | None) -> int | None:
        # SqliteStore._idem_grows on the record as the group has left it.
        if idem is None:
            return 0
        old = idems.get((idem.owner, idem.key))
        if old is None:
            return usage.idem_bytes(idem)
        if old[0] + ttl > idem.created_at:
            return None
        return usage.idem_bytes(idem) - old[1]

    def charge(owner: str, delta: int) -> None:
        charges[owner] = charges.get(owner, 0) + delta
        if limit > 0:
            used[owner] += delta

    def one(item: CommitItem) -> Commit:
        record, expected = item.record, item.expected_version
        row = rows.get(record.id)
        if row is None or row.owner != record.owner:
            return Commit.GONE
        if row.hold != item.holder:
            return Commit.BUSY
        grows_idem = idem_grows(item.idem)
        if row.version != expected or grows_idem is None:
            return Commit.CONFLICT
        size = usage.session_bytes(record)
        grows = size - row.size
        if limit > 0 and usage.over(used[record.owner], grows + grows_idem, limit):
            return Commit.QUOTA
        charge(record.owner, grows)
        row.version, row.size = expected + 1, size
        updates.append(
            (record.name, record.spec, record.state, record.step, expected + 1)
            + (record.updated_at, record.id)
        )
        if (step := item.history) is not None:
            history.append((record.id, step.step, step.loss, step.grad_norm, step.at, step.lr))
        if (idem := item.idem) is not None:
            charge(idem.owner, grows_idem)
            idems[(idem.owner, idem.key)] = (idem.created_at, usage.idem_bytes(idem))
            puts.append(
                (idem.owner, idem.key, idem.fingerprint, idem.status, idem.body)
                + (idem.headers, idem.created_at)
            )
        return Commit.OK

    outcomes = prefix_commits(items, one)
    db.executemany(
        "UPDATE sessions SET name = ?, spec = ?, state = ?, step = ?, version = ?, "
        "updated_at = ? WHERE id = ?",
        updates,
    )
    db.executemany(
        "INSERT INTO history (session_id, step, loss, grad_norm, at, lr) VALUES (?, ?, ?, ?, ?, ?)",
        history,
    )
    db.executemany("INSERT OR REPLACE INTO idempotency VALUES (?, ?, ?, ?, ?, ?, ?)", puts)
    for owner, delta in charges.items():
        usage.sqlite_add(db, owner, delta)
    return outcomes
