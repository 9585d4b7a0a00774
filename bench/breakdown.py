"""Where one service request's time goes, stage by stage, measured in this process.

The stages are what the service does with a body, in order: parse the JSON (orjson, on the
event loop), validate it into a ``StepRequest``, run the step (build, decode, compute,
encode: in a worker process), render the answer (orjson). The standard library's
``json.loads`` is timed too, for comparison: it is what FastAPI would use by default.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import orjson

from bench.workloads import Workload
from service.engine.specs import StepRequest
from service.engine.step import run

STAGES = ("parse (orjson)", "validate", "run", "render (orjson)", "parse (json)")


def _median_ms(fn: Callable[[], Any], *, seconds: float, repeats: int) -> float:
    fn()
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while len(times) < repeats and (len(times) < 3 or time.perf_counter() < deadline):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return 1000.0 * statistics.median(times)


def stages(workload: Workload, *, seconds: float, repeats: int = 200) -> dict[str, float]:
    """Median milliseconds per stage, each stage timed on its own."""
    raw = workload.raw
    parsed = json.loads(raw)
    request = StepRequest.model_validate(parsed)
    answer = run("step", request)
    calls: dict[str, Callable[[], Any]] = {
        "parse (json)": lambda: json.loads(raw),
        "validate": lambda: StepRequest.model_validate(parsed),
        "run": lambda: run("step", request),
        "render (orjson)": lambda: orjson.dumps(answer),
        "parse (orjson)": lambda: orjson.loads(raw),
    }
    return {name: _median_ms(calls[name], seconds=seconds, repeats=repeats) for name in STAGES}
