"""Jobs in Redis: each call one Lua script, so its checks and writes are one atomic step.

Keys, all under the store's prefix::

    j:{id}          hash: the job (``JobRecord``'s fields; "" for None); a finished job
                    gets a Redis TTL of the job TTL (its ``expires_at`` decides, the TTL
                    only reclaims the space)
    jq              sorted set: queued jobs, scored by created_at (the oldest runs first)
    jr              sorted set: running jobs, scored by lease expiry (a lapsed one is
                    ``ZRANGEBYSCORE jr -inf (now``)
    ja:{owner}      set: the owner's active (queued or running) jobs, for the job limit

The session's hold is the ``hold`` field of its hash ``s:{id}``. An active job's dataset
counts in its owner's bytes (``service.store.usage``) until the job ends.
"""

from __future__ import annotations

import math
from dataclasses import fields
from typing import Any, cast

import redis

from service.store.base import Commit, JobRecord, Progress
from service.store.usage import job_bytes, redis_lua

_CREATED, _TAKEN, _GONE, _FULL, _BUSY, _QUOTA = 0, 1, 2, 3, 4, 5
CREATE_RESULTS = {
    _CREATED: Commit.OK,
    _TAKEN: Commit.CONFLICT,
    _GONE: Commit.GONE,
    _FULL: Commit.FULL,
    _BUSY: Commit.BUSY,
    _QUOTA: Commit.QUOTA,
}
"""What every write script answers, here and in ``service.store.redis``."""
_NAMES = [f.name for f in fields(JobRecord)]
_LIGHT = [n for n in _NAMES if n != "dataset"]
"""What a read that does not run the job fetches: everything but the dataset."""
_FLOATS = {"created_at", "updated_at", "lease_expires"}
_INTS = {"start_step", "epoch", "batch", "steps_done", "step", "attempts", "failures"}
_OPTIONAL = {"loss": float, "error": str, "lease_holder": str, "expires_at": float}

# KEYS: session, job, jq, ja, the usage keys[, idem]. ARGV: idem ttl, idem created_at, owner,
# job id, limit, created_at, byte quota (0: none), dataset bytes, idem bytes, the number n of
# job field/value items, n items, then the idem's items.
CREATE = (
    redis_lua(5)
    + """
local function idem_taken(key, ttl, created_at)
  local old = redis.call('HGET', key, 'created_at')
  return old and tonumber(old) + tonumber(ttl) > tonumber(created_at)
end
local idem = KEYS[8]
local found = redis.call('HMGET', KEYS[1], 'owner', 'hold', 'step')
if found[1] ~= ARGV[3] then return 2 end
if found[2] and found[2] ~= '' then return 4 end
if redis.call('EXISTS', KEYS[2]) == 1 then return 1 end
if idem and idem_taken(idem, ARGV[1], ARGV[2]) then return 1 end
local limit = tonumber(ARGV[5])
if limit > 0 and redis.call('SCARD', KEYS[4]) >= limit then return 3 end
local size, idem_size = tonumber(ARGV[8]), tonumber(ARGV[9])
local grows = size + (idem and idem_grows(idem, idem_size) or 0)
if over(ARGV[3], grows, tonumber(ARGV[7])) then return 5 end
local n = tonumber(ARGV[10])
redis.call('HSET', KEYS[2], 'counted', '1', unpack(ARGV, 11, 10 + n))
redis.call('HSET', KEYS[2], 'start_step', found[3], 'step', found[3])
redis.call('ZADD', KEYS[3], ARGV[6], ARGV[4])
redis.call('SADD', KEYS[4], ARGV[4])
redis.call('HSET', KEYS[1], 'hold', ARGV[4])
charge(ARGV[3], size)
if idem then
  redis.call('DEL', idem)
  redis.call('HSET', idem, unpack(ARGV, 11 + n, #ARGV))
  redis.call('PEXPIRE', idem, math.ceil(tonumber(ARGV[1]) * 1000))
  count_idem(ARGV[3], idem, idem_size, ARGV[2])
end
return 0
"""
)

# KEYS: jq, jr. ARGV: prefix, worker, now, lease expiry.
CLAIM = """
local id = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[3], 'LIMIT', 0, 1)[1]
if not id then id = redis.call('ZRANGE', KEYS[1], 0, 0)[1] end
if not id then return false end
local key = ARGV[1] .. 'j:' .. id
redis.call('ZREM', KEYS[1], id)
redis.call('ZADD', KEYS[2], ARGV[4], id)
redis.call('HINCRBY', key, 'attempts', 1)
redis.call('HSET', key, 'status', 'running', 'lease_holder', ARGV[2],
           'lease_expires', ARGV[4], 'updated_at', ARGV[3])
return redis.call('HGETALL', key)
"""

# KEYS: job, jr. ARGV: id, worker, now, lease expiry, then progress field/value items.
RENEW = """
local found = redis.call('HMGET', KEYS[1], 'status', 'lease_holder')
if found[1] ~= 'running' or found[2] ~= ARGV[2] then return false end
redis.call('HSET', KEYS[1], 'lease_expires', ARGV[4], 'updated_at', ARGV[3])
if #ARGV > 4 then redis.call('HSET', KEYS[1], unpack(ARGV, 5, #ARGV)) end
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
return redis.call('HMGET', KEYS[1], LIGHT)
""".replace("LIGHT", ", ".join(f"'{n}'" for n in _LIGHT))

# KEYS of FINISH and CANCEL: job, the usage keys. The dataset's bytes go with the dataset.
_END = (
    redis_lua(2)
    + """
local function finish(key, prefix, id, ttl, first)
  local found = redis.call('HMGET', key, 'owner', 'session')
  charge(found[1], -held(key, 'dataset'))
  redis.call('HSET', key, 'dataset', '', 'lease_holder', '', unpack(ARGV, first, #ARGV))
  redis.call('ZREM', prefix .. 'jq', id)
  redis.call('ZREM', prefix .. 'jr', id)
  redis.call('SREM', prefix .. 'ja:' .. found[1], id)
  local session = prefix .. 's:' .. found[2]
  if redis.call('HGET', session, 'hold') == id then redis.call('HDEL', session, 'hold') end
  redis.call('EXPIRE', key, ttl)
end
"""
)

# KEYS: job. ARGV: prefix, id, ttl seconds, worker, then the final field/value items.
FINISH = (
    _END
    + """
local found = redis.call('HMGET', KEYS[1], 'status', 'lease_holder')
if found[1] ~= 'running' or found[2] ~= ARGV[4] then return 0 end
finish(KEYS[1], ARGV[1], ARGV[2], ARGV[3], 5)
return 1
"""
)

# KEYS: job. ARGV: prefix, id, ttl seconds, owner, now, then the cancelled field/value items.
CANCEL = (
    _END
    + """
local found = redis.call('HMGET', KEYS[1], 'owner', 'status')
if found[1] ~= ARGV[4] then return 0 end
if found[2] == 'queued' then
  finish(KEYS[1], ARGV[1], ARGV[2], ARGV[3], 6)
elseif found[2] == 'running' then
  redis.call('HSET', KEYS[1], 'cancel', '1', 'updated_at', ARGV[5])
end
return 1
"""
)


def encode(values: dict[str, Any]) -> list[str | bytes | int]:
    """Field/value items: floats exactly (repr), None as "", booleans as 1/0."""
    items: list[str | bytes | int] = []
    for name, value in values.items():
        if value is None:
            value = ""
        elif isinstance(value, bool):
            value = int(value)
        elif isinstance(value, float):
            value = repr(value)
        items += [name, value]
    return items


def _light(values: list[bytes | None]) -> JobRecord | None:
    """A job from HMGET of the ``_LIGHT`` fields (its dataset left out, as empty)."""
    if values[0] is None:
        return None
    return decode({n.encode(): v for n, v in zip(_LIGHT, values, strict=True) if v is not None})


def decode(flat: list[bytes] | dict[bytes, bytes]) -> JobRecord | None:
    raw = flat if isinstance(flat, dict) else dict(zip(flat[::2], flat[1::2], strict=True))
    if not raw:
        return None
    values: dict[str, Any] = {}
    for name in _NAMES:
        value = raw.get(name.encode(), b"")
        if name == "dataset":
            values[name] = value
        elif name in _FLOATS:
            values[name] = float(value)
        elif name in _INTS:
            values[name] = int(value) if value else 0  # a job from before ``failures``
        elif name == "cancel":
            values[name] = value == b"1"
        elif name in _OPTIONAL:
            values[name] = _OPTIONAL[name](value.decode()) if value else None
        else:
            values[name] = value.decode()
    return JobRecord(**values)


class RedisJobs:
    """The job half of ``RedisStore``: the same client and prefix."""

    def __init__(self, client: redis.Redis, prefix: str, usage: list[str]) -> None:
        self._redis, self.prefix, self._usage = client, prefix, usage
        self._create = client.register_script(CREATE)
        self._claim = client.register_script(CLAIM)
        self._renew = client.register_script(RENEW)
        self._finish = client.register_script(FINISH)
        self._cancel = client.register_script(CANCEL)

    def _key(self, job_id: str) -> str:
        return f"{self.prefix}j:{job_id}"

    def create(
        self,
        job: JobRecord,
        session_key: str,
        idem: tuple[str, int, list[str | bytes | int]] | None,
        idem_ttl: str,
        limit: int,
        max_bytes: int,
    ) -> Commit:
        """``idem``: the record's key, its bytes and its field/value items."""
        items = encode(vars(job))
        keys = [session_key, self._key(job.id), f"{self.prefix}jq", f"{self.prefix}ja:{job.owner}"]
        keys += self._usage
        args: list[str | bytes | int] = [idem_ttl, "0", job.owner, job.id, limit]  # ttl in s
        args += [repr(job.created_at), max_bytes, job_bytes(job), 0, len(items), *items]
        if idem is not None:
            keys.append(idem[0])
            args[1] = _created(idem[2])
            args[8] = idem[1]
            args += idem[2]
        return CREATE_RESULTS[int(self._create(keys=keys, args=args))]

    def get(self, owner: str, job_id: str, now: float) -> JobRecord | None:
        job = _light(cast(list[bytes | None], self._redis.hmget(self._key(job_id), _LIGHT)))
        if job is None or job.owner != owner or (job.expires_at or now + 1) <= now:
            return None
        return job

    def claim(self, worker: str, now: float, lease: float) -> JobRecord | None:
        keys = [f"{self.prefix}jq", f"{self.prefix}jr"]
        flat = self._claim(keys=keys, args=[self.prefix, worker, repr(now), repr(now + lease)])
        return decode(cast(list[bytes], flat)) if flat else None

    def renew(
        self,
        job_id: str,
        worker: str,
        now: float,
        lease: float,
        progress: Progress | None,
        failures: int | None = None,
    ) -> JobRecord | None:
        args: list[str | bytes | int] = [job_id, worker, repr(now), repr(now + lease)]
        if progress is not None:
            args += encode(vars(progress))
        if failures is not None:  # only the lease's holder writes it: no lost update
            args += encode({"failures": failures})
        values = self._renew(keys=[self._key(job_id), f"{self.prefix}jr"], args=args)
        return _light(cast(list[bytes | None], values)) if values else None

    def finish(
        self,
        job_id: str,
        worker: str,
        status: str,
        progress: Progress,
        error: str | None,
        now: float,
        ttl: float,
    ) -> bool:
        final = {"status": status, "error": error, "updated_at": now, "expires_at": now + ttl}
        args: list[str | bytes | int] = [self.prefix, job_id, _seconds(ttl), worker]
        args += encode({**final, **vars(progress)})
        return bool(self._finish(keys=[self._key(job_id), *self._usage], args=args))

    def cancel(self, owner: str, job_id: str, now: float, ttl: float) -> JobRecord | None:
        final = {"status": "cancelled", "cancel": True, "updated_at": now, "expires_at": now + ttl}
        args: list[str | bytes | int] = [self.prefix, job_id, _seconds(ttl), owner, repr(now)]
        args += encode(final)
        if not self._cancel(keys=[self._key(job_id), *self._usage], args=args):
            return None
        return self.get(owner, job_id, now)


def _seconds(ttl: float) -> int:
    return max(1, math.ceil(ttl))


def _created(idem_items: list[str | bytes | int]) -> str:
    at = idem_items.index("created_at")
    return str(idem_items[at + 1])
