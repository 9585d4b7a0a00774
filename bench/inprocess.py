"""The in-process limits: the same step in a plain Python loop, with no HTTP.

- ``engine``: the service's own engine on the parsed body, validate then run, as a worker
  does (no JSON parsing or rendering, no event loop, no thread hop);
- ``torch``: the workload's raw torch step on tensors already built, nothing encoded.

Both run with as many torch threads as each of the service's worker processes gets, so that
a call does the same work in the same way as in the service.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from bench.stats import Stats
from bench.workloads import Workload
from service.config import Settings
from service.engine.specs import StepRequest
from service.engine.step import run
from service.workers.devices import layout


def service_torch_threads() -> int:
    """Torch threads per worker process of a default ``gradsvc serve`` on the CPU, as
    ``service.workers.devices.layout`` shares the cores between them."""
    settings = Settings()
    return layout("cpu", settings.workers_per_device).threads


def loop(step: Callable[[], object], *, seconds: float, iterations: int, warmup: int = 2) -> Stats:
    """Call ``step`` one at a time until ``iterations`` calls or ``seconds`` have passed."""
    for _ in range(warmup):
        step()
    stats = Stats()
    cpu_before = time.process_time()
    start = time.perf_counter()
    deadline = start + seconds
    while stats.ok < iterations and time.perf_counter() < deadline:
        began = time.perf_counter()
        step()
        stats.latencies.append(time.perf_counter() - began)
    stats.elapsed = time.perf_counter() - start
    stats.cpu = time.process_time() - cpu_before
    return stats


def engine_step(workload: Workload) -> Callable[[], object]:
    body = workload.body

    def step() -> object:
        return run("step", StepRequest.model_validate(body))

    return step


LOOPS: dict[str, Callable[[Workload], Callable[[], object]]] = {
    "engine": engine_step,
    "torch": lambda workload: workload.torch_step,
}
