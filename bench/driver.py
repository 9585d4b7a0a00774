"""The load generator: a fixed number of concurrent async httpx clients, bounded in requests
and in time, against 127.0.0.1 only; one URL, or several taken in turn (the sessions of a
stateful row).

Bodies are encoded once, before timing, so that the driver's own cost per request is the HTTP
round trip and reading the answer. The driver shares this machine's cores with the server:
a fast server is partly measured through the driver, so compare rows, not absolute numbers.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Sequence

import httpx

from bench import wrk
from bench.stats import Stats

LOOPBACK = "127.0.0.1"
HEADERS = {"content-type": "application/json"}


class WrongAnswer(RuntimeError):
    """A target answered, but not what the workload expects: its row is not loaded."""


def check_loopback(url: str) -> None:
    host = httpx.URL(url).host
    if host != LOOPBACK:
        raise ValueError(f"the benchmark targets {LOOPBACK} only, not {host!r}")


async def load(
    url: str | Sequence[str],
    body: bytes,
    *,
    clients: int,
    max_requests: int,
    seconds: float,
    warmup: int = 1,
    timeout: float = 60.0,
    server_cpu: Callable[[], float] | None = None,
    store_cpu: Callable[[], float] | None = None,
) -> Stats:
    """POST ``body`` to ``url`` from ``clients`` concurrent clients until ``max_requests``
    have been sent or ``seconds`` have passed; a non-200 answer or a transport error counts
    as an error. Given several URLs, each request takes the next one, round-robin across all
    clients. Each client first sends ``warmup`` untimed requests. ``server_cpu`` (and
    ``store_cpu``, for a store in its own process) read CPU seconds, so that the row can say
    what each request cost."""
    urls = [url] if isinstance(url, str) else list(url)
    for each in urls:
        check_loopback(each)
    turn = itertools.cycle(urls)
    stats = Stats(driver="async httpx")
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(trust_env=False, timeout=timeout, limits=limits) as client:

        async def send(record: bool) -> None:
            started = time.perf_counter()
            try:
                response = await client.post(next(turn), content=body, headers=HEADERS)
            except httpx.HTTPError as exc:
                if record:
                    stats.error(f"{type(exc).__name__}: {exc}")
                return
            if not record:
                stats.untimed_ok += int(response.status_code == 200)
                return
            if response.status_code == 200:
                stats.latencies.append(time.perf_counter() - started)
            else:
                stats.error(f"HTTP {response.status_code}: {response.text}")

        async def warm() -> None:
            for _ in range(warmup):
                await send(record=False)

        await asyncio.gather(*(warm() for _ in range(clients)))
        budget = max_requests
        cpu_before = server_cpu() if server_cpu else float("nan")
        store_before = store_cpu() if store_cpu else float("nan")
        driver_before = time.process_time()
        start = time.perf_counter()
        deadline = start + seconds

        async def worker() -> None:
            nonlocal budget
            while budget > 0 and time.perf_counter() < deadline:
                budget -= 1
                await send(record=True)

        await asyncio.gather(*(worker() for _ in range(clients)))
        stats.elapsed = time.perf_counter() - start
        stats.driver_cpu = time.process_time() - driver_before
        stats.cpu = (server_cpu() if server_cpu else float("nan")) - cpu_before
        stats.store_cpu = (store_cpu() if store_cpu else float("nan")) - store_before
    return stats


def drive(
    url: str | Sequence[str],
    body: bytes,
    *,
    clients: int,
    max_requests: int,
    seconds: float,
    warmup: int = 1,
    server_cpu: Callable[[], float] | None = None,
    api_cpu: Callable[[], float] | None = None,
    store_cpu: Callable[[], float] | None = None,
    httpx_only: bool = False,
) -> Stats:
    """One row under wrk (``bench.wrk``, ``clients`` connections, ``seconds`` long), or under
    the async httpx driver where wrk cannot run here (or ``httpx_only``), labelled so."""
    urls = [url] if isinstance(url, str) else list(url)
    for each in urls:
        check_loopback(each)
    missing = None if httpx_only else wrk.ensure()
    if not httpx_only and missing is None:
        return wrk.load(
            urls,
            body,
            connections=clients,
            seconds=seconds,
            server_cpu=server_cpu,
            api_cpu=api_cpu,
            store_cpu=store_cpu,
        )
    api_before = api_cpu() if api_cpu else float("nan")
    stats = asyncio.run(
        load(
            urls,
            body,
            clients=clients,
            max_requests=max_requests,
            seconds=seconds,
            warmup=warmup,
            server_cpu=server_cpu,
            store_cpu=store_cpu,
        )
    )
    stats.api_cpu = (api_cpu() if api_cpu else float("nan")) - api_before
    stats.driver = "async httpx" + (f" (fallback: {missing})" if missing else "")
    return stats
