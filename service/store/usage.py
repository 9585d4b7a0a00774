"""Bytes stored per owner: what counts, the rule, and how each store keeps the running total.

``--max-stored-bytes-per-key`` bounds what one key keeps in the store. Counted: a session's
state (the bytes of its parameters and optimizer state), an idempotency record's kept
answer, and an active job's dataset (given back when the job ends: a finished job keeps
no dataset). Not counted: history rows (a few dozen bytes a step, one per step), specs and
names (bounded by the request limits) and the small records finished jobs leave for their TTL.

The rule (``over``): a write is refused when it grows its owner's total past the limit. A
write that grows nothing, such as a step (its new state is the size of the old) without an
Idempotency-Key, goes through even with the owner exactly at, or over, the limit (which an
operator may have lowered); so does one that shrinks it. A delete, a job's end and the purge of
expired idempotency records give their bytes back.

Each store keeps a running total per owner, changed by the same transaction (SQLite) or
script (Redis) or lock (memory) as the write, and checked there: concurrent writers, on any
replica, never take an owner past its limit together, and no write sums an owner's rows.
"""

from __future__ import annotations

import sqlite3

from service.store.base import IdempotencyRecord, JobRecord, SessionRecord


def session_bytes(record: SessionRecord) -> int:
    return len(record.state)


def idem_bytes(idem: IdempotencyRecord | None) -> int:
    return 0 if idem is None else len(idem.body)


def job_bytes(job: JobRecord) -> int:
    return len(job.dataset)


def over(used: int, grows: int, limit: int) -> bool:
    """Whether a write that grows its owner's ``used`` bytes by ``grows`` is over ``limit``
    (0: no limit). Only growth is refused."""
    return limit > 0 and grows > 0 and used + grows > limit


# -- SQLite: a table of totals, updated in the write's own transaction ----------------------

SQLITE_TABLE = "CREATE TABLE usage (owner TEXT PRIMARY KEY, bytes INTEGER NOT NULL)"
_SQLITE_SEED = """
INSERT INTO usage (owner, bytes)
SELECT owner, SUM(n) FROM (
    SELECT owner, length(state) AS n FROM sessions
    UNION ALL SELECT owner, length(body) FROM idempotency
    UNION ALL SELECT owner, length(dataset) FROM jobs
) GROUP BY owner
"""


def sqlite_ready(db: sqlite3.Connection) -> bool:
    return db.execute("SELECT 1 FROM sqlite_master WHERE name = 'usage'").fetchone() is not None


def sqlite_prepare(db: sqlite3.Connection) -> None:
    """Make the totals table, inside the caller's write transaction: once, with what a file
    from before quotas already holds (every worker opens the file at once: one makes it)."""
    if not sqlite_ready(db):
        db.execute(SQLITE_TABLE)
        db.execute(_SQLITE_SEED)


def sqlite_used(db: sqlite3.Connection, owner: str) -> int:
    row = db.execute("SELECT bytes FROM usage WHERE owner = ?", (owner,)).fetchone()
    return int(row[0]) if row else 0


def sqlite_add(db: sqlite3.Connection, owner: str, delta: int) -> None:
    if delta:
        db.execute(
            "INSERT INTO usage (owner, bytes) VALUES (?, ?) "
            "ON CONFLICT (owner) DO UPDATE SET bytes = bytes + excluded.bytes",
            (owner, delta),
        )


# -- Redis: a hash of totals, updated in the write's own script -----------------------------

REDIS_KEYS = ("u:bytes", "u:idem", "u:sizes")
"""Under the store's prefix: the totals (hash owner → bytes); the counted idempotency
records (sorted set of their keys, scored by created_at, for the purge: Redis expires the
records themselves, unseen); their sizes and owners (hash key → "size:owner"). A session's
or a job's hash written since carries a ``counted`` field: one from before quotas has none,
and counts from its next write."""


def redis_lua(first: int) -> str:
    """Lua functions for a script that gets ``REDIS_KEYS`` as ``KEYS[first]`` onwards."""
    bytes_, idem, sizes = (f"KEYS[{first + i}]" for i in range(3))
    return f"local U = {{bytes = {bytes_}, idem = {idem}, sizes = {sizes}}}" + _REDIS_FUNCTIONS


_REDIS_FUNCTIONS = """
local function used(owner)
  return tonumber(redis.call('HGET', U.bytes, owner) or '0')
end
local function over(owner, grows, limit)
  return limit > 0 and grows > 0 and used(owner) + grows > limit
end
local function charge(owner, delta)
  if delta == 0 then return end
  local left = redis.call('HINCRBY', U.bytes, owner, string.format('%d', delta))
  if left <= 0 then redis.call('HDEL', U.bytes, owner) end
end
-- The bytes of a hash's field that the totals hold: none for a hash written before quotas
-- (it has no 'counted' mark), whose bytes were never added.
local function held(key, field)
  if redis.call('HEXISTS', key, 'counted') == 0 then return 0 end
  return redis.call('HSTRLEN', key, field)
end
local function counted(member)
  local old = redis.call('HGET', U.sizes, member)
  if not old then return 0, nil end
  local size, owner = string.match(old, '^(%d+):(.*)$')
  return tonumber(size), owner
end
-- What putting a record of ``size`` bytes at ``member`` adds (less an expired one it replaces).
local function idem_grows(member, size)
  local old = counted(member)
  return size - old
end
local function count_idem(owner, member, size, created_at)
  local old, who = counted(member)
  if who then charge(who, -old) end
  redis.call('HSET', U.sizes, member, string.format('%d', size) .. ':' .. owner)
  redis.call('ZADD', U.idem, created_at, member)
  charge(owner, size)
end
local function forget_idem(member)
  local old, who = counted(member)
  if who then charge(who, -old) end
  redis.call('HDEL', U.sizes, member)
  redis.call('ZREM', U.idem, member)
end
"""

# KEYS: REDIS_KEYS. ARGV: the cutoff (created_at at or before it has expired), the batch.
REDIS_PURGE = (
    redis_lua(1)
    + """
local members = redis.call('ZRANGEBYSCORE', U.idem, '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, member in ipairs(members) do forget_idem(member) end
return #members
"""
)
