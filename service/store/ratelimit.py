"""Token buckets per API key: in this process, or shared by every replica through Redis.

A bucket holds up to ``burst`` tokens and gains ``rate`` per second; a request takes one.
``take`` answers 0 when the request may go, else the seconds until a token is there.

The API process asks before any route runs, on its event loop, so ``take`` is a coroutine
and a Redis bucket is asked with ``redis.asyncio``: a stalled Redis holds only the requests
that wait for it, never the loop (``/healthz``) nor a thread pool. It waits ``TIMEOUT`` at
most, and any Redis failure is ``StoreUnavailable`` (503 with ``Retry-After``): a limit that
cannot be checked is not a reason to answer 500, nor to let the request through.
"""

from __future__ import annotations

from typing import Protocol, cast

import redis
import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from service.errors import StoreUnavailable
from service.store import trouble
from service.store.trouble import redis_trouble

TIMEOUT = 1.0
"""Seconds a bucket in Redis is waited for (connect, a free connection, or the answer) at
most; the store URL may ask for less."""
CONNECTIONS = 64
"""Connections to Redis at most: a stall queues the requests here (up to ``TIMEOUT``) rather
than opening a socket for each."""


class Buckets(Protocol):
    async def take(self, key: str, now: float) -> float:
        """0 if ``key`` may make a request at ``now``, else the seconds until it may.
        Raises ``StoreUnavailable`` when the buckets cannot be read."""
        ...

    async def aclose(self) -> None: ...


class MemoryBuckets:
    """This process's own buckets (used from one event loop: no lock)."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self._state: dict[str, tuple[float, float]] = {}

    async def take(self, key: str, now: float) -> float:
        tokens, last = self._state.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + max(0.0, now - last) * self.rate)
        if tokens >= 1.0:
            self._state[key] = (tokens - 1.0, now)
            return 0.0
        self._state[key] = (tokens, now)
        return (1.0 - tokens) / self.rate

    async def aclose(self) -> None:
        return None


# KEYS[1] the bucket; ARGV: rate, burst, now. One script: read, refill, take, write.
_TAKE = """
local rate, burst, now = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'last')
local tokens, last = tonumber(state[1]) or burst, tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - last) * rate)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / rate end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'last', tostring(now))
redis.call('EXPIRE', KEYS[1], math.ceil(burst / rate) + 60)
return tostring(wait)
"""


class RedisBuckets:
    """Buckets in Redis at ``url`` (under ``prefix``), on an asyncio client of their own."""

    def __init__(self, url: str, rate: float, burst: int, prefix: str) -> None:
        self.rate, self.burst, self.prefix = rate, burst, prefix
        # A dropped connection (Redis restarted) is tried once more, as the store does; a
        # timeout is not: the wait is already as long as a request should spend here.
        pool = redis.asyncio.BlockingConnectionPool.from_url(
            url,
            max_connections=CONNECTIONS,
            timeout=TIMEOUT,
            retry=Retry(ExponentialBackoff(cap=0.2, base=0.05), 1, (redis.ConnectionError,)),
        )
        options = pool.connection_kwargs
        for name in ("socket_timeout", "socket_connect_timeout"):
            options[name] = min(options.get(name) or TIMEOUT, TIMEOUT)
        self._client = redis.asyncio.Redis(connection_pool=pool)
        self._take = self._client.register_script(_TAKE)

    async def take(self, key: str, now: float) -> float:
        try:
            answer = await self._take(
                keys=[f"{self.prefix}rate:{key}"], args=[self.rate, self.burst, now]
            )
        except (redis.RedisError, OSError) as exc:
            error = _unavailable(exc)
            trouble.count(error)
            raise error from exc
        return float(cast(bytes, answer))

    async def aclose(self) -> None:
        await self._client.aclose()
        await self._client.connection_pool.disconnect()


def _unavailable(exc: BaseException) -> StoreUnavailable:
    trouble = redis_trouble(exc)
    if isinstance(trouble, StoreUnavailable):
        return trouble
    # A full Redis, or an answer we cannot use: still "retry shortly" for this request.
    return StoreUnavailable(
        f"the request rate of this key could not be checked in Redis ({type(exc).__name__}); "
        "nothing was done: retry shortly"
    )
