"""Store fixtures: a real redis-server on a free loopback port, and each store in turn."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import pytest
import redis

from service.store.base import IDEMPOTENCY_TTL, SessionStore
from service.store.memory import MemoryStore
from service.store.redis import RedisStore
from service.store.sqlite import SqliteStore


class StoreFactory(Protocol):
    """Another store on the same data: the same object (memory), file (sqlite) or prefix
    (redis); ``idempotency_ttl`` and ``max_stored_bytes`` for the stores it opens (memory:
    the first call's)."""

    def __call__(
        self, idempotency_ttl: float = IDEMPOTENCY_TTL, max_stored_bytes: int = 0
    ) -> SessionStore: ...


@pytest.fixture(params=["memory", "sqlite", "redis"])
def store_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreFactory]:
    """Opens stores of one kind on one fresh data set; closes them all at the end."""
    opened: list[SessionStore] = []
    kind: str = request.param
    if kind == "memory":

        def open_one(
            idempotency_ttl: float = IDEMPOTENCY_TTL, max_stored_bytes: int = 0
        ) -> SessionStore:
            if not opened:
                opened.append(
                    MemoryStore(idempotency_ttl=idempotency_ttl, max_stored_bytes=max_stored_bytes)
                )
            return opened[0]

    elif kind == "sqlite":
        path = str(tmp_path / "gradsvc.db")

        def open_one(
            idempotency_ttl: float = IDEMPOTENCY_TTL, max_stored_bytes: int = 0
        ) -> SessionStore:
            store = SqliteStore(
                path, idempotency_ttl=idempotency_ttl, max_stored_bytes=max_stored_bytes
            )
            opened.append(store)
            return opened[-1]

    else:
        url: str = request.getfixturevalue("redis_url")
        prefix = f"gradsvc-test:{uuid.uuid4().hex}:"

        def open_one(
            idempotency_ttl: float = IDEMPOTENCY_TTL, max_stored_bytes: int = 0
        ) -> SessionStore:
            opened.append(
                RedisStore(
                    url,
                    prefix=prefix,
                    idempotency_ttl=idempotency_ttl,
                    max_stored_bytes=max_stored_bytes,
                )
            )
            return opened[-1]

    yield open_one
    if kind == "redis":
        _drop_keys(request.getfixturevalue("redis_url"), prefix)
    for store in opened:
        store.close()


def _drop_keys(url: str, prefix: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture
def store(store_factory: StoreFactory) -> SessionStore:
    """A fresh store of each kind: memory, sqlite (in tmp_path), redis (a prefix of its own)."""
    return store_factory()
