"""A real redis-server for the tests: GRADSVC_TEST_REDIS_URL, or one of our own on loopback."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def answers(url: str) -> bool:
    """Whether a Redis server answers at ``url`` (within half a second)."""
    client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def _start(server: str, workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    # The port is free when we look and may be taken before redis binds it: then try another.
    for _ in range(5):
        port = _free_port()
        url = f"redis://127.0.0.1:{port}/0"
        log = workdir / f"redis-{port}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [
                    server,
                    "--bind",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(workdir),
                    "--daemonize",
                    "no",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 10
        while proc.poll() is None and time.monotonic() < deadline:
            if answers(url):
                return proc, url
            time.sleep(0.05)
        _stop(proc)
    raise RuntimeError(f"redis-server did not answer PING; see {workdir}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """GRADSVC_TEST_REDIS_URL if set, else a redis-server of our own, stopped at the end."""
    configured = os.environ.get("GRADSVC_TEST_REDIS_URL")
    if configured:
        yield configured
        return
    server = shutil.which("redis-server")
    if server is None:
        reason = "redis-server is not installed (apt-get install redis-server)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}: in CI the Redis tests must run", pytrace=False)
        pytest.skip(reason)
    proc, url = _start(server, tmp_path_factory.mktemp("redis"))
    try:
        yield url
    finally:
        _stop(proc)
