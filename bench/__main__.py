"""``python -m bench``: measure every row, print the tables, write docs/benchmarks.md."""

from __future__ import annotations

import asyncio
import sys
import time

import httpx

from bench import breakdown, document, inprocess, report
from bench.config import Config
from bench.driver import HEADERS, check_loopback, load
from bench.servers import TARGETS, Target, running
from bench.stats import Stats
from bench.workloads import Workload, build_all


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def verify(base: str, workload: Workload) -> None:
    """One request, checked against the engine's answer, before the row is loaded."""
    url = base + workload.path
    check_loopback(url)
    response = httpx.post(
        url, content=workload.raw, headers=HEADERS, timeout=120.0, trust_env=False
    )
    if response.status_code != 200:
        raise SystemExit(f"{url} {workload.name}: HTTP {response.status_code}: {response.text}")
    problem = workload.check(response.json())
    if problem:
        raise SystemExit(f"{url} {workload.name}: wrong answer: {problem}")


def measure_target(config: Config, target: Target, workloads: list[Workload]) -> report.Results:
    results: report.Results = {}
    chosen = [w for w in workloads if target.accepts(w)]
    log(f"{target.name}: starting")
    with running(target) as base:
        for workload in chosen:
            if target.checked:
                verify(base, workload)
            stats = asyncio.run(
                load(
                    base + workload.path,
                    workload.raw,
                    clients=config.clients,
                    max_requests=config.max_requests,
                    seconds=config.seconds,
                    warmup=config.warmup,
                )
            )
            results[(workload.name, target.name)] = stats
            log(f"  {workload.name}: {_line(stats)}")
    return results


def measure_in_process(config: Config, workloads: list[Workload]) -> report.Results:
    results: report.Results = {}
    for workload in workloads:
        for name, make in inprocess.LOOPS.items():
            stats = inprocess.loop(
                make(workload), seconds=config.loop_seconds, iterations=config.loop_iterations
            )
            results[(workload.name, name)] = stats
            log(f"{name}: {workload.name}: {_line(stats)}")
    return results


def _line(stats: Stats) -> str:
    return (
        f"{stats.rate:.1f}/s, p50 {stats.p50_ms:.2f} ms, p99 {stats.p99_ms:.2f} ms, "
        f"n={stats.ok}, errors={stats.errors}"
    )


def main() -> int:
    started = time.monotonic()
    config = Config.from_env()
    log(f"bench: {'quick' if config.quick else 'full'} run, {config.clients} clients")
    workloads = build_all()
    results = measure_in_process(config, workloads)
    stage_seconds = 0.3 if config.quick else 1.5
    stages = {w.name: breakdown.stages(w, seconds=stage_seconds) for w in workloads}
    for target in TARGETS:
        results |= measure_target(config, target, workloads)
    rows = [report.Row(t.name, "HTTP", t.summary) for t in TARGETS] + list(report.IN_PROCESS)
    print(report.ratios_table(workloads, results))
    print()
    print(report.results_table(workloads, results, rows))
    print()
    print(report.breakdown_table(workloads, stages))
    errors = report.errors_text(results)
    if errors:
        print("\nErrors:\n" + errors)
    if config.out is not None:
        text = document.render(config, report.machine(), workloads, TARGETS, results, stages)
        config.out.parent.mkdir(parents=True, exist_ok=True)
        config.out.write_text(text, encoding="utf-8")
        log(f"wrote {config.out}")
    else:
        log("quick run: no report written (set BENCH_OUT=path to write one)")
    log(f"bench: done in {time.monotonic() - started:.0f} s")
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
