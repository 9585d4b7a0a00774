"""The compiled load generator: Debian's ``wrk``, driven by ``bench/load.lua``.

The async httpx driver spends 1.5-2.8 ms of CPU per request on the cores the server uses, so
fast rows partly measure it; wrk spends a few microseconds. ``ensure()`` installs wrk with
apt-get when it is missing and this process is root; otherwise it says why not, and the
rows fall back to the httpx driver, labelled as such (``bench.driver.drive``).
"""

from __future__ import annotations

import math
import os
import re
import resource
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from urllib.parse import urlsplit

from bench.stats import Stats

SCRIPT = Path(__file__).with_name("load.lua")
_missing: str | None = None
_checked = False


def ensure() -> str | None:
    """None when wrk can run here (installing it if need be), else why it cannot."""
    global _checked, _missing
    if _checked:
        return _missing
    _checked = True
    if shutil.which("wrk") is None:
        if os.geteuid() != 0:
            _missing = "wrk is not installed (as root: apt-get install -y wrk)"
        else:
            install = subprocess.run(
                ["apt-get", "install", "-y", "-q", "wrk"],
                capture_output=True,
                text=True,
                check=False,
                env=os.environ | {"DEBIAN_FRONTEND": "noninteractive"},
            )
            if install.returncode != 0 or shutil.which("wrk") is None:
                _missing = f"apt-get install -y wrk failed: {install.stderr.strip()[-300:]}"
    return _missing


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def load(
    urls: Sequence[str],
    body: bytes,
    *,
    connections: int,
    seconds: float,
    server_cpu: Callable[[], float] | None = None,
    api_cpu: Callable[[], float] | None = None,
    store_cpu: Callable[[], float] | None = None,
) -> Stats:
    """POST ``body`` for ``seconds`` over ``connections`` keep-alive connections (one wrk
    thread), the paths of ``urls`` taken round-robin; the CPU probes are read around it."""
    parts = [urlsplit(url) for url in urls]
    base = f"{parts[0].scheme}://{parts[0].netloc}"
    stats = Stats(driver="wrk")
    nan = float("nan")
    with tempfile.TemporaryDirectory(prefix="bench-wrk-") as tmp:
        body_file, paths_file = Path(tmp) / "body", Path(tmp) / "paths"
        body_file.write_bytes(body)
        paths_file.write_text("".join(p.path + "\n" for p in parts))
        command = [
            *("wrk", "-t1", f"-c{connections}", f"-d{max(1, math.ceil(seconds))}s"),
            *("--timeout", "60s", "--latency", "-s", str(SCRIPT), base),
        ]
        env = os.environ | {"BENCH_BODY": str(body_file), "BENCH_PATHS": str(paths_file)}
        before = [probe() if probe else nan for probe in (server_cpu, api_cpu, store_cpu)]
        driver_before = _children_cpu()
        done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
        stats.driver_cpu = _children_cpu() - driver_before
        after = [probe() if probe else nan for probe in (server_cpu, api_cpu, store_cpu)]
    stats.cpu, stats.api_cpu, stats.store_cpu = (a - b for a, b in zip(after, before, strict=True))
    counts = " ".join(re.findall(r"^BENCH (?!first=).*$", done.stdout, re.M))
    figures = dict(re.findall(r"(\w+)=(\d+)", counts))
    if done.returncode != 0 or "ok" not in figures:
        stats.error(f"wrk exited with {done.returncode}: {(done.stderr or done.stdout)[-300:]}")
        return stats
    stats.counted = int(figures["ok"])
    stats.elapsed = int(figures["duration_us"]) / 1e6
    stats.quantiles_ms = {0.5: int(figures["p50_us"]) / 1e3, 0.99: int(figures["p99_us"]) / 1e3}
    if stats.counted == 0:  # slow requests still in flight when the row's time ran out
        stats.error(f"no request completed within {seconds:g} s: lengthen BENCH_SECONDS")
    failed = int(figures["errors"]) + int(figures["socket_errors"])
    if failed:
        first = re.search(r"^BENCH first=(.*)$", done.stdout, re.M)
        stats.error(first.group(1) if first and first.group(1) else "socket errors")
        stats.errors = failed
    return stats
