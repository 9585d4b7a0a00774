"""The durable stores behind the stateful rows, each set up in a scratch directory and removed
at the end.

- ``sqlite``: a file the service opens itself (WAL, ``synchronous=FULL``: an fsync per
  committed step), so its cost is in the service's own CPU and latency.
- ``redis``: a real ``redis-server`` on a free 127.0.0.1 port, its own process (whose CPU is
  measured beside the service's), with persistence off (``--save '' --appendonly no``): the
  rows measure the service's round trips to Redis, not Redis's disk. A production Redis
  would run with AOF (``--appendonly yes``), which these rows do not include.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from bench.driver import LOOPBACK
from bench.servers import ServerError, free_port, process_cpu_seconds, stop, tail

STORES = ("sqlite", "redis")


class Unavailable(RuntimeError):
    """This machine cannot run the store (redis-server is not installed)."""


@dataclass(frozen=True)
class Store:
    name: str
    url: str
    """What ``gradsvc serve --store`` takes."""
    detail: str
    """One line for the report: what the store is and where its data lives."""
    cpu_seconds: Callable[[], float] | None = None
    """The store process's CPU seconds, where it is a process of its own."""


@contextlib.contextmanager
def opened(name: str) -> Iterator[Store]:
    """The store ``name`` (one of ``STORES``), ready; removed at the end."""
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
        if name == "sqlite":
            path = Path(tmp) / "gradsvc.db"
            detail = (
                f"a SQLite file in a scratch directory on {filesystem(Path(tmp))}, opened by the "
                "service (WAL, `synchronous=FULL`: an fsync per committed step)"
            )
            # open_store strips "sqlite:///": an absolute path keeps its own leading slash.
            yield Store(name, f"sqlite:///{path}", detail)
        elif name == "redis":
            with redis_server(Path(tmp)) as store:
                yield store
        else:
            raise ValueError(f"unknown store {name!r}")


@contextlib.contextmanager
def redis_server(workdir: Path, *, timeout: float = 10.0) -> Iterator[Store]:
    executable = shutil.which("redis-server")
    if executable is None:
        raise Unavailable("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    log = workdir / "redis.log"
    command = [
        executable,
        *("--bind", LOOPBACK, "--port", str(port), "--dir", str(workdir)),
        *("--save", "", "--appendonly", "no", "--daemonize", "no"),
    ]
    with log.open("wb") as out:
        process = subprocess.Popen(command, cwd=workdir, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout
            while not _pong(port):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise ServerError(f"redis-server did not answer PING:\n{tail(log)}")
                time.sleep(0.05)
            detail = (
                f"`redis-server` {_version(executable)} on 127.0.0.1, "
                "its own process, persistence off (`--save '' --appendonly no`)"
            )
            yield Store(
                "redis",
                f"redis://{LOOPBACK}:{port}/0?prefix=bench",
                detail,
                lambda: process_cpu_seconds(process.pid),
            )
        finally:
            stop(process)


def _version(executable: str) -> str:
    """ "7.0.15" from "Redis server v=7.0.15 sha=...", or "(version unknown)"."""
    out = subprocess.run(
        [executable, "--version"], capture_output=True, text=True, timeout=10, check=False
    ).stdout
    words = [w.removeprefix("v=") for w in out.split() if w.startswith("v=")]
    return words[0] if words else "(version unknown)"


def _pong(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def filesystem(path: Path) -> str:
    """The type of the filesystem ``path`` is on (the mount with the longest matching
    mount point in /proc/mounts), or "an unknown filesystem"."""
    best, kind = "", "an unknown filesystem"
    resolved = str(path.resolve())
    with contextlib.suppress(OSError), open("/proc/mounts", encoding="utf-8") as fh:
        for line in fh:
            fields = line.split()
            if len(fields) < 3:
                continue
            point = fields[1]
            inside = resolved == point or resolved.startswith(point.rstrip("/") + "/")
            if inside and len(point) >= len(best):
                best, kind = point, fields[2]
    return kind
