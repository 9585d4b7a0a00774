"""A real gradsvc process on a free loopback port, for end-to-end and fault tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def status_kib(pid: int, name: str) -> int:
    """One size from a process's ``/proc/<pid>/status`` (``VmRSS``, ``VmHWM``...), in KiB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(name + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {name} for pid {pid}")


def high_water_kib(pid: int) -> int:
    """A process's peak resident memory so far (the kernel's VmHWM), in KiB."""
    return status_kib(pid, "VmHWM")


class Server:
    """``python -m service serve`` with its output in a log file (a pipe nobody reads would
    fill up and stall the server)."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, port: int = 0) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = args
        # A second of drain after SIGTERM, unless a test says otherwise: the default 20 s
        # would be waited out by every test that stops a server cleanly.
        self.env = {"GRADSVC_DRAIN_SECONDS": "1", **os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = Path(tempfile.mkstemp(prefix="gradsvc-", suffix=".log")[1])

    def start(self, timeout: float = 60.0) -> Server:
        cmd = [sys.executable, "-m", "service", "serve", "--port", str(self.port), *self.args]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                cmd, cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=1) as http:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"server exited with {self.proc.returncode}:\n{self.output()}"
                    )
                try:
                    if http.get(self.url + "/readyz").status_code == 200:
                        return self
                except httpx.TransportError:
                    pass
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"server did not become ready:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM, and the exit status."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL: no draining, no shutdown hooks, as a crash or an OOM killer would."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
