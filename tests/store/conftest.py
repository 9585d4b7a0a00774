"""Store fixtures: a real redis-server on a free loopback port, and each store in turn."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from service.store.base import SessionStore
from service.store.memory import MemoryStore
from service.store.redis import RedisStore
from service.store.sqlite import SqliteStore

StoreFactory = Callable[[], SessionStore]
"""Another store on the same data: the same object (memory), file (sqlite) or prefix (redis)."""


@pytest.fixture(params=["memory", "sqlite", "redis"])
def store_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreFactory]:
    """Opens stores of one kind on one fresh data set; closes them all at the end."""
    opened: list[SessionStore] = []
    kind: str = request.param
    if kind == "memory":
        shared = MemoryStore()
        opened.append(shared)

        def open_one() -> SessionStore:
            return shared

    elif kind == "sqlite":
        path = str(tmp_path / "gradsvc.db")

        def open_one() -> SessionStore:
            opened.append(SqliteStore(path))
            return opened[-1]

    else:
        url: str = request.getfixturevalue("redis_url")
        prefix = f"gradsvc-test:{uuid.uuid4().hex}:"

        def open_one() -> SessionStore:
            opened.append(RedisStore(url, prefix=prefix))
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
