"""The HTTP targets, each run as a real uvicorn subprocess on a free 127.0.0.1 port.

``running(target)`` starts one, waits until it answers its readiness path, yields a
``Server`` (its base URL and a probe of its CPU time), and terminates it (SIGTERM, then
SIGKILL after a grace period).
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.config import ROOT
from bench.driver import LOOPBACK
from bench.workloads import Workload


@dataclass(frozen=True)
class Target:
    name: str
    summary: str
    command: Callable[[int], list[str]]
    ready_path: str
    accepts: Callable[[Workload], bool]
    checked: bool = True
    """Its answers must be the workload's answer (the floor's constant is not)."""


def _uvicorn(app: str) -> Callable[[int], list[str]]:
    def command(port: int) -> list[str]:
        return [
            sys.executable,
            *("-m", "uvicorn", app, "--app-dir", str(ROOT)),
            *("--host", LOOPBACK, "--port", str(port)),
            *("--log-level", "warning", "--no-access-log"),
        ]

    return command


def _gradsvc(port: int) -> list[str]:
    script = Path(sys.executable).with_name("gradsvc")
    entry = [str(script)] if script.exists() else [sys.executable, "-m", "service"]
    return [*entry, "serve", "--host", LOOPBACK, "--port", str(port), "--log-level", "warning"]


def gradsvc_with_store(name: str, summary: str, store_url: str, *args: str) -> Target:
    """``gradsvc serve --store store_url [args]``, defaults otherwise: a stateful row's."""
    return Target(
        name=name,
        summary=summary,
        command=lambda port: [*_gradsvc(port), "--store", store_url, *args],
        ready_path="/readyz",
        accepts=lambda workload: False,
    )


TARGETS: tuple[Target, ...] = (
    Target(
        name="floor",
        summary="`bench/floor.py` under uvicorn: reads the body, answers a constant",
        command=_uvicorn("bench.floor:app"),
        ready_path="/healthz",
        accepts=lambda workload: True,
        checked=False,
    ),
    Target(
        name="peer",
        summary="`bench/naive_peer.py` under uvicorn: the endpoint a user would write",
        command=_uvicorn("bench.naive_peer:app"),
        ready_path="/healthz",
        accepts=lambda workload: workload.list_only,
    ),
    Target(
        name="service",
        summary="`gradsvc serve` with its defaults (worker processes: one per two cores)",
        command=_gradsvc,
        ready_path="/readyz",
        accepts=lambda workload: True,
    ),
)


@dataclass(frozen=True)
class Server:
    base: str
    """``http://127.0.0.1:PORT``"""
    pid: int

    def cpu_seconds(self) -> float:
        """The server's CPU with its worker processes' (gradsvc computes in children)."""
        return process_cpu_seconds(self.pid) + sum(
            process_cpu_seconds(child) for child in children(self.pid)
        )

    def api_cpu_seconds(self) -> float:
        """The server's own process only: for gradsvc, the API process (HTTP, JSON, routing)."""
        return process_cpu_seconds(self.pid)


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text(encoding="ascii").rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:  # the parent's pid, field 4
            found.append(int(stat.parent.name))
    return found


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (all its threads); NaN where /proc
    cannot say."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return math.nan
    # After the command name: state is field 3, utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


class ServerError(RuntimeError):
    pass


def _wait_ready(process: subprocess.Popen[bytes], url: str, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client(trust_env=False, timeout=2.0) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise ServerError(f"exited with {process.returncode}:\n{tail(log)}")
            with contextlib.suppress(httpx.HTTPError):
                if client.get(url).status_code == 200:
                    return
            time.sleep(0.1)
    raise ServerError(f"not ready after {timeout:.0f} s:\n{tail(log)}")


def tail(log: Path, lines: int = 20) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def stop(process: subprocess.Popen[bytes], grace: float = 15.0) -> int:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


@contextlib.contextmanager
def running(target: Target, *, timeout: float = 90.0) -> Iterator[Server]:
    """Start ``target`` on a free loopback port; yield it, ready. It runs in a scratch
    directory, so that whatever it writes there (the service's default store) is removed."""
    port = free_port()
    base = f"http://{LOOPBACK}:{port}"
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        log = Path(tmp) / f"{target.name}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                target.command(port), cwd=tmp, env=env, stdout=out, stderr=subprocess.STDOUT
            )
            try:
                try:
                    _wait_ready(process, base + target.ready_path, timeout, log)
                except ServerError as exc:
                    raise ServerError(f"{target.name}: {exc}") from None
                yield Server(base, process.pid)
            finally:
                code = stop(process)
        if code not in (0, -15):
            print(f"warning: {target.name} exited with {code}:\n{tail(log)}", file=sys.stderr)
