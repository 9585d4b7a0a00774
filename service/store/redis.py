"""Redis: for several replicas sharing one store. Every multi-key write is one Lua script.

Keys, all under ``prefix``::

    s:{id}                  hash: the session (owner, name?, spec, state, step, version, ...)
    h:{id}                  sorted set: history rows scored by step
    o:{owner}               sorted set: the owner's sessions, all scored 0 so that they sort
                            by member: created_at as 8 order-preserving bytes, then the id;
                            so (created_at, id) order is lexicographic and a cursor is one
                            exclusive ZRANGEBYLEX bound, with no offsets to drift
    i:{len(owner)}:{owner}:{key}
                            hash: an idempotency record, with a Redis TTL of
                            ``idempotency_ttl`` (24 h by default): Redis purges them itself
    health                  a string /readyz's write probe sets, with a TTL of 10 s
    tx:{tx}:{id}            a refusal mark, alive only inside one ``commit_many`` transaction
    u:bytes u:idem u:sizes  the bytes each owner keeps (``service.store.usage``), changed
                            and checked by the same script as each write; ``purge`` gives
                            back the bytes of the idempotency records Redis has expired

and the jobs' keys (``service.store.jobs_redis``). A session's ``hold`` field names the
job that holds it; a commit from anyone else is refused, and so is a delete.

A script runs atomically on the server, so ``commit`` is a compare-and-set on the session's
version that writes the session, its history row and the idempotency record together, or
nothing. Whether an idempotency key is taken is decided by the records' ``created_at``, as in
the other stores; the Redis TTL only reclaims the space. A session written before quotas
counts from its next write (its hash has no ``counted`` mark until then).

Every call waits ``socket_timeout`` (5 s unless the URL says otherwise) at most, so a paused
or unreachable Redis is a ``StoreUnavailable`` rather than a hung worker; a call on a
connection that Redis dropped (a restart) is retried once, on a new one.
"""

from __future__ import annotations

import math
import secrets
import struct
import time
from collections.abc import Sequence
from typing import cast

import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry

from service.store.base import (
    IDEMPOTENCY_TTL,
    Commit,
    CommitItem,
    Cursor,
    HistoryRow,
    IdempotencyRecord,
    JobRecord,
    Progress,
    SessionRecord,
)
from service.store.jobs_redis import CREATE_RESULTS as _RESULTS
from service.store.jobs_redis import RedisJobs
from service.store.ratelimit import RedisBuckets
from service.store.trouble import redis_trouble, translated
from service.store.usage import REDIS_KEYS, REDIS_PURGE, idem_bytes, redis_lua, session_bytes

_ROW = struct.Struct(">qdddd")
"""A history row as a sorted-set member: step, loss, grad_norm, at, lr (loss and lr NaN for none);
floats exactly. A member of ``_OLD_ROW``'s size was written before rows kept lr."""
_OLD_ROW = struct.Struct(">qddd")
_STAMP = struct.Struct(">Q")
_SIGN_BIT, _ALL_BITS = 1 << 63, (1 << 64) - 1

# ARGV[1] is the TTL in seconds; ARGV[2] the new record's created_at; then field/value pairs.
_LUA_IDEM = """
local function idem_taken(key, ttl, created_at)
  local old = redis.call('HGET', key, 'created_at')
  return old and tonumber(old) + tonumber(ttl) > tonumber(created_at)
end
local function idem_put(key, ttl, first, last)
  redis.call('DEL', key)
  redis.call('HSET', key, unpack(ARGV, first, last))
  redis.call('PEXPIRE', key, math.ceil(tonumber(ttl) * 1000))
end
"""

# KEYS: session, history, owner index, the usage keys[, idem]. ARGV: ttl, idem created_at, the
# index member, the owner's session limit (0: none), owner, byte quota (0: none), state bytes,
# idem bytes, the number of session field/value items n, n items, then the idem's items.
_CREATE = (
    _LUA_IDEM
    + redis_lua(4)
    + """
local idem = KEYS[7]
if redis.call('EXISTS', KEYS[1]) == 1 then return 1 end
if idem and idem_taken(idem, ARGV[1], ARGV[2]) then return 1 end
local limit = tonumber(ARGV[4])
if limit > 0 and redis.call('ZCARD', KEYS[3]) >= limit then return 3 end
local size, idem_size = tonumber(ARGV[7]), tonumber(ARGV[8])
local grows = size + (idem and idem_grows(idem, idem_size) or 0)
if over(ARGV[5], grows, tonumber(ARGV[6])) then return 5 end
local n = tonumber(ARGV[9])
redis.call('HSET', KEYS[1], 'counted', '1', unpack(ARGV, 10, 9 + n))
redis.call('DEL', KEYS[2])
redis.call('ZADD', KEYS[3], 0, ARGV[3])
charge(ARGV[5], size)
if idem then
  idem_put(idem, ARGV[1], 10 + n, #ARGV)
  count_idem(ARGV[5], idem, idem_size, ARGV[2])
end
return 0
"""
)

# KEYS: session, history, the transaction's refusal mark for this session, the usage keys[,
# idem]. ARGV: ttl, idem created_at, owner, expected version, has name ('1' or '0'), has
# history ('1' or '0'), history step, history member, the holder ('' for none), the time after
# which the caller has given up waiting (server clock), byte quota (0: none), state bytes, idem
# bytes, the number of session field/value items n, n items, then the idem's field/value
# items. A refusal sets the mark, and a marked session's later items in the same MULTI are
# refused: ``commit_many`` commits each session's items as a prefix. A script that only runs
# once its caller has timed out (the server was paused, say) refuses: its caller has been told
# the outcome is unknown, and must not find it applied behind it.
_COMMIT = (
    _LUA_IDEM
    + redis_lua(4)
    + """
local idem = KEYS[7]
local function refuse(code)
  redis.call('SET', KEYS[3], '1', 'EX', 60)
  return code
end
if redis.call('EXISTS', KEYS[3]) == 1 then return 1 end
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[3] then return refuse(2) end
if (redis.call('HGET', KEYS[1], 'hold') or '') ~= ARGV[9] then return refuse(4) end
if tonumber(redis.call('HGET', KEYS[1], 'version')) ~= tonumber(ARGV[4]) then return refuse(1) end
if idem and idem_taken(idem, ARGV[1], ARGV[2]) then return refuse(1) end
local clock = redis.call('TIME')
if tonumber(clock[1]) + tonumber(clock[2]) / 1e6 > tonumber(ARGV[10]) then return refuse(1) end
local size, idem_size = tonumber(ARGV[12]), tonumber(ARGV[13])
local state_grows = size - held(KEYS[1], 'state')
local grows = state_grows + (idem and idem_grows(idem, idem_size) or 0)
if over(ARGV[3], grows, tonumber(ARGV[11])) then return refuse(5) end
local n = tonumber(ARGV[14])
redis.call('HSET', KEYS[1], 'counted', '1', unpack(ARGV, 15, 14 + n))
if ARGV[5] == '0' then redis.call('HDEL', KEYS[1], 'name') end
if ARGV[6] == '1' then redis.call('ZADD', KEYS[2], ARGV[7], ARGV[8]) end
charge(ARGV[3], state_grows)
if idem then
  idem_put(idem, ARGV[1], 15 + n, #ARGV)
  count_idem(ARGV[3], idem, idem_size, ARGV[2])
end
return 0
"""
)

# KEYS: session, history, owner index, the usage keys. ARGV: owner.
_DELETE = (
    redis_lua(4)
    + """
local found = redis.call('HMGET', KEYS[1], 'owner', 'index', 'hold')
if found[1] ~= ARGV[1] or found[3] then return 0 end
charge(ARGV[1], -held(KEYS[1], 'state'))
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('ZREM', KEYS[3], found[2])
return 1
"""
)

# KEYS: idem, the usage keys. ARGV: ttl, created_at, owner, byte quota (0: none), idem bytes,
# the idem's field/value items.
_REMEMBER = (
    _LUA_IDEM
    + redis_lua(2)
    + """
if idem_taken(KEYS[1], ARGV[1], ARGV[2]) then return 1 end
local size = tonumber(ARGV[5])
if over(ARGV[3], idem_grows(KEYS[1], size), tonumber(ARGV[4])) then return 5 end
idem_put(KEYS[1], ARGV[1], 6, #ARGV)
count_idem(ARGV[3], KEYS[1], size, ARGV[2])
return 0
"""
)


TIMEOUT = 5.0
"""Seconds a call waits for Redis (connect, or an answer), unless the URL sets its own."""
PROBE_TIMEOUT = 1.0


@translated(redis_trouble)
class RedisStore:
    def __init__(
        self,
        url: str,
        *,
        prefix: str = "gradsvc:",
        idempotency_ttl: float = IDEMPOTENCY_TTL,
        max_stored_bytes: int = 0,
    ) -> None:
        self.prefix = prefix
        self.url = url
        self.idempotency_ttl = idempotency_ttl
        self.max_stored_bytes = max_stored_bytes
        self._usage = [f"{prefix}{key}" for key in REDIS_KEYS]
        # Bytes in, bytes out: state and bodies must round-trip exactly. A dropped connection
        # is retried once (Redis restarted); a timeout is not (the server may still run it).
        self._redis = redis.Redis.from_url(
            url,
            decode_responses=False,
            socket_timeout=TIMEOUT,
            socket_connect_timeout=TIMEOUT,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 1, (redis.ConnectionError,)),
        )
        self._probe: redis.Redis | None = None
        self._ttl = repr(float(idempotency_ttl))
        self._create = self._redis.register_script(_CREATE)
        self._commit = self._redis.register_script(_COMMIT)
        self._delete = self._redis.register_script(_DELETE)
        self._remember = self._redis.register_script(_REMEMBER)
        self._purge = self._redis.register_script(REDIS_PURGE)
        self._jobs = RedisJobs(self._redis, prefix, self._usage)

    def buckets(self, rate: float, burst: int) -> RedisBuckets:
        """Rate limits shared by every replica on this Redis, asked asynchronously."""
        return RedisBuckets(self.url, rate, burst, self.prefix)

    def _session_key(self, session_id: str) -> str:
        return f"{self.prefix}s:{session_id}"

    def _history_key(self, session_id: str) -> str:
        return f"{self.prefix}h:{session_id}"

    def _owner_key(self, owner: str) -> str:
        return f"{self.prefix}o:{owner}"

    def _idem_key(self, owner: str, key: str) -> str:
        # The owner's length keeps ("a:b", "c") and ("a", "b:c") apart.
        return f"{self.prefix}i:{len(owner)}:{owner}:{key}"

    def create(
        self, record: SessionRecord, idem: IdempotencyRecord | None = None, limit: int = 0
    ) -> Commit:
        fields = _session_fields(record)
        keys = [
            self._session_key(record.id),
            self._history_key(record.id),
            self._owner_key(record.owner),
            *self._usage,
        ]
        args: list[str | bytes | int] = [self._ttl, _idem_created(idem)]
        args += [_index_member(record.created_at, record.id), limit, record.owner]
        args += [self.max_stored_bytes, session_bytes(record), idem_bytes(idem)]
        args += [len(fields), *fields]
        if idem is not None:
            keys.append(self._idem_key(idem.owner, idem.key))
            args += _idem_fields(idem)
        return _RESULTS[int(self._create(keys=keys, args=args))]

    def get(self, owner: str, session_id: str) -> SessionRecord | None:
        raw = cast(dict[bytes, bytes], self._redis.hgetall(self._session_key(session_id)))
        return _session(session_id, raw, owner)

    def get_many(self, keys: Sequence[tuple[str, str]]) -> list[SessionRecord | None]:
        pipe = self._redis.pipeline(transaction=False)  # one round trip, not one per key
        for _, session_id in keys:
            pipe.hgetall(self._session_key(session_id))
        raws = cast(list[dict[bytes, bytes]], pipe.execute())
        return [_session(sid, raw, owner) for (owner, sid), raw in zip(keys, raws, strict=True)]

    def sessions(self, owner: str, limit: int, after: Cursor | None = None) -> list[SessionRecord]:
        found: list[SessionRecord] = []
        bound = b"-" if after is None else b"(" + _index_member(*after)
        while len(found) < limit:
            members = cast(
                list[bytes],
                self._redis.zrangebylex(
                    self._owner_key(owner), bound, b"+", start=0, num=limit - len(found)
                ),
            )
            if not members:
                break
            ids = [m[_STAMP.size :].decode() for m in members]
            with self._redis.pipeline(transaction=True) as pipe:
                for sid in ids:
                    pipe.hgetall(self._session_key(sid))
                raws = cast(list[dict[bytes, bytes]], pipe.execute())
            # A session deleted since the index was read is skipped; the next ones fill in.
            found += [
                r for sid, raw in zip(ids, raws, strict=True) if (r := _session(sid, raw, owner))
            ]
            bound = b"(" + members[-1]
        return found

    def commit(
        self,
        record: SessionRecord,
        expected_version: int,
        history: HistoryRow | None = None,
        idem: IdempotencyRecord | None = None,
    ) -> Commit:
        return self.commit_many([CommitItem(record, expected_version, history, idem)])[0]

    def commit_many(self, items: Sequence[CommitItem]) -> list[Commit]:
        if not items:
            return []
        # MULTI/EXEC: the scripts run back to back, in one round trip, nothing in between.
        # The refusal marks are this transaction's own keys, gone when it ends.
        tx = secrets.token_hex(8)
        marks = {self._mark_key(tx, item.record.id) for item in items}
        pipe = self._redis.pipeline(transaction=True)
        for item in items:
            keys, args = self._commit_call(item, self._mark_key(tx, item.record.id))
            self._commit(keys=keys, args=args, client=pipe)
        pipe.delete(*marks)
        outcomes = pipe.execute()[: len(items)]
        return [_RESULTS[int(outcome)] for outcome in outcomes]

    def _mark_key(self, tx: str, session_id: str) -> str:
        return f"{self.prefix}tx:{tx}:{session_id}"

    def _commit_call(
        self, item: CommitItem, mark: str
    ) -> tuple[list[str], list[str | bytes | int]]:
        record, expected_version, history, idem = (
            item.record,
            item.expected_version,
            item.history,
            item.idem,
        )
        fields: list[str | bytes | int] = [
            "spec",
            record.spec,
            "state",
            record.state,
            "step",
            record.step,
            "version",
            expected_version + 1,
            "updated_at",
            repr(record.updated_at),
        ]
        if record.name is not None:
            fields += ["name", record.name]
        keys = [self._session_key(record.id), self._history_key(record.id), mark, *self._usage]
        args: list[str | bytes | int] = [self._ttl, _idem_created(idem), record.owner]
        args += [expected_version, "0" if record.name is None else "1"]
        if history is None:
            args += ["0", 0, b""]
        else:
            lr = math.nan if history.lr is None else history.lr
            loss = math.nan if history.loss is None else history.loss
            member = _ROW.pack(history.step, loss, history.grad_norm, history.at, lr)
            args += ["1", history.step, member]
        # The caller stops waiting at socket_timeout; refusing a second before that leaves room
        # for the replicas' and the Redis server's clocks to differ by up to a second.
        not_after = repr(time.time() + TIMEOUT * 0.8)
        args += [item.holder or "", not_after, self.max_stored_bytes, session_bytes(record)]
        args += [idem_bytes(idem), len(fields), *fields]
        if idem is not None:
            keys.append(self._idem_key(idem.owner, idem.key))
            args += _idem_fields(idem)
        return keys, args

    def delete(self, owner: str, session_id: str) -> bool:
        keys = [
            self._session_key(session_id),
            self._history_key(session_id),
            self._owner_key(owner),
            *self._usage,
        ]
        return bool(self._delete(keys=keys, args=[owner]))

    def history(
        self, owner: str, session_id: str, limit: int, after_step: int = 0
    ) -> list[HistoryRow]:
        if limit <= 0:
            return []
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.hget(self._session_key(session_id), "owner")
            pipe.zrangebyscore(
                self._history_key(session_id), f"({after_step}", "+inf", start=0, num=limit
            )
            found_owner, members = cast(tuple[bytes | None, list[bytes]], pipe.execute())
        if found_owner is None or found_owner.decode() != owner:
            return []
        return [_history_row(m) for m in members]

    def idempotency(self, owner: str, key: str, now: float) -> IdempotencyRecord | None:
        raw = cast(dict[bytes, bytes], self._redis.hgetall(self._idem_key(owner, key)))
        if not raw:
            return None
        record = IdempotencyRecord(
            owner=raw[b"owner"].decode(),
            key=raw[b"key"].decode(),
            fingerprint=raw[b"fingerprint"].decode(),
            status=int(raw[b"status"]),
            body=raw[b"body"],
            headers=raw[b"headers"].decode(),
            created_at=float(raw[b"created_at"]),
        )
        return record if record.created_at + self.idempotency_ttl > now else None

    def remember(self, idem: IdempotencyRecord) -> Commit:
        keys = [self._idem_key(idem.owner, idem.key), *self._usage]
        args: list[str | bytes | int] = [self._ttl, _idem_created(idem), idem.owner]
        args += [self.max_stored_bytes, idem_bytes(idem), *_idem_fields(idem)]
        return _RESULTS[int(self._remember(keys=keys, args=args))]

    def stored_bytes(self, owner: str) -> int:
        return int(cast(bytes | None, self._redis.hget(self._usage[0], owner)) or 0)

    # -- jobs (service.store.jobs_redis) ----------------------------------------------------

    def create_job(
        self, job: JobRecord, idem: IdempotencyRecord | None = None, limit: int = 0
    ) -> Commit:
        claim = None
        if idem is not None:
            claim = (self._idem_key(idem.owner, idem.key), idem_bytes(idem), _idem_fields(idem))
        return self._jobs.create(
            job, self._session_key(job.session), claim, self._ttl, limit, self.max_stored_bytes
        )

    def get_job(self, owner: str, job_id: str, now: float) -> JobRecord | None:
        return self._jobs.get(owner, job_id, now)

    def claim_job(self, worker: str, now: float, lease_seconds: float) -> JobRecord | None:
        return self._jobs.claim(worker, now, lease_seconds)

    def renew_lease(
        self,
        job_id: str,
        worker: str,
        now: float,
        lease_seconds: float,
        progress: Progress | None = None,
        failures: int | None = None,
    ) -> JobRecord | None:
        return self._jobs.renew(job_id, worker, now, lease_seconds, progress, failures)

    def finish_job(
        self,
        job_id: str,
        worker: str,
        status: str,
        progress: Progress,
        error: str | None,
        now: float,
        ttl: float,
    ) -> bool:
        return self._jobs.finish(job_id, worker, status, progress, error, now, ttl)

    def cancel_job(self, owner: str, job_id: str, now: float, ttl: float) -> JobRecord | None:
        return self._jobs.cancel(owner, job_id, now, ttl)

    def ping(self) -> bool:
        try:
            return bool(self._redis.ping())
        except redis.RedisError:
            return False

    def writable(self) -> None:
        """Raise the trouble a write would meet now (unreachable, paused, loading, at its
        maxmemory, a read-only replica), else return: a real SET with a short TTL, on a
        client of its own that waits a second at most."""
        if self._probe is None:
            self._probe = redis.Redis.from_url(
                self.url,
                socket_timeout=PROBE_TIMEOUT,
                socket_connect_timeout=PROBE_TIMEOUT,
                retry=Retry(NoBackoff(), 0),
            )
        self._probe.set(f"{self.prefix}health", repr(time.time()), px=10_000)

    def purge(self, now: float, batch: int = 500) -> int:
        """Give back the bytes of the idempotency records older than the TTL, ``batch`` per
        script; the number of them. Redis deletes the records themselves (each carries a
        Redis TTL of the same length)."""
        given_back = 0
        while True:
            cutoff = repr(now - self.idempotency_ttl)
            count = int(self._purge(keys=self._usage, args=[cutoff, batch]))
            given_back += count
            if count < batch:
                return given_back

    def close(self) -> None:
        self._redis.close()
        if self._probe is not None:
            self._probe.close()


def _session_fields(r: SessionRecord) -> list[str | bytes | int]:
    fields: list[str | bytes | int] = [
        "owner",
        r.owner,
        "spec",
        r.spec,
        "state",
        r.state,
        "step",
        r.step,
        "version",
        r.version,
        "created_at",
        repr(r.created_at),
        "updated_at",
        repr(r.updated_at),
        "index",
        _index_member(r.created_at, r.id),
    ]
    if r.name is not None:
        fields += ["name", r.name]
    if r.hold is not None:
        fields += ["hold", r.hold]
    return fields


def _history_row(member: bytes) -> HistoryRow:
    if len(member) == _OLD_ROW.size:
        return HistoryRow(*_OLD_ROW.unpack(member))
    step, loss, grad_norm, at, lr = _ROW.unpack(member)
    return HistoryRow(
        step, None if math.isnan(loss) else loss, grad_norm, at, None if math.isnan(lr) else lr
    )


def _index_member(created_at: float, session_id: str) -> bytes:
    """created_at as bytes that sort as the floats do, then the id: (created_at, id) order."""
    (bits,) = _STAMP.unpack(struct.pack(">d", created_at + 0.0))  # + 0.0: no -0.0
    bits = bits ^ _ALL_BITS if bits & _SIGN_BIT else bits | _SIGN_BIT
    return _STAMP.pack(bits) + session_id.encode()


def _session(session_id: str, raw: dict[bytes, bytes], owner: str) -> SessionRecord | None:
    if not raw or raw[b"owner"].decode() != owner:
        return None
    name, hold = raw.get(b"name"), raw.get(b"hold")
    return SessionRecord(
        id=session_id,
        owner=owner,
        name=None if name is None else name.decode(),
        spec=raw[b"spec"].decode(),
        state=raw[b"state"],
        step=int(raw[b"step"]),
        version=int(raw[b"version"]),
        created_at=float(raw[b"created_at"]),
        updated_at=float(raw[b"updated_at"]),
        hold=hold.decode() if hold else None,
    )


def _idem_created(idem: IdempotencyRecord | None) -> str:
    return "0" if idem is None else repr(idem.created_at)


def _idem_fields(i: IdempotencyRecord) -> list[str | bytes | int]:
    return [
        "owner",
        i.owner,
        "key",
        i.key,
        "fingerprint",
        i.fingerprint,
        "status",
        i.status,
        "body",
        i.body,
        "headers",
        i.headers,
        "created_at",
        repr(i.created_at),
    ]
