"""Token buckets per API key: in this process, or shared by every replica through Redis.

A bucket holds up to ``burst`` tokens and gains ``rate`` per second; a request takes one.
``take`` answers 0 when the request may go, else the seconds until a token is there.
"""

from __future__ import annotations

import threading
from typing import Protocol, cast

import redis

from service.store.trouble import redis_trouble, translated


class Buckets(Protocol):
    remote: bool
    """whether ``take`` is a round trip (to Redis), to be made off the event loop"""

    def take(self, key: str, now: float) -> float: ...


class MemoryBuckets:
    remote = False

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self._lock = threading.Lock()
        self._state: dict[str, tuple[float, float]] = {}

    def take(self, key: str, now: float) -> float:
        with self._lock:
            tokens, last = self._state.get(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + max(0.0, now - last) * self.rate)
            if tokens >= 1.0:
                self._state[key] = (tokens - 1.0, now)
                return 0.0
            self._state[key] = (tokens, now)
            return (1.0 - tokens) / self.rate


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


@translated(redis_trouble)
class RedisBuckets:
    remote = True

    def __init__(self, client: redis.Redis, rate: float, burst: int, prefix: str) -> None:
        self.rate, self.burst, self.prefix = rate, burst, prefix
        self._take = client.register_script(_TAKE)

    def take(self, key: str, now: float) -> float:
        answer = self._take(keys=[f"{self.prefix}rate:{key}"], args=[self.rate, self.burst, now])
        return float(cast(bytes, answer))
