"""``python -m bench``: measure every row, print the tables, write docs/benchmarks.md."""

from __future__ import annotations

import contextlib
import sys
import time

import httpx
import torch

from bench import (
    breakdown,
    document,
    goals,
    gpu,
    inprocess,
    many,
    report,
    stateful,
    stateful_report,
)
from bench.config import Config
from bench.driver import HEADERS, WrongAnswer, check_loopback, drive
from bench.goals import FLOOR_HTTPX
from bench.servers import TARGETS, Server, ServerError, Target, running
from bench.stats import Stats
from bench.workloads import Workload, build_all

Servers = dict[str, Server | str]
"""Target name -> the running server, or why it did not start."""


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
        raise WrongAnswer(f"HTTP {response.status_code}: {response.text[:300]}")
    problem = workload.check(response.json())
    if problem:
        raise WrongAnswer(f"wrong answer: {problem}")


def start_all(stack: contextlib.ExitStack) -> Servers:
    """Every target, started side by side (idle ones cost nothing), so that a workload's rows
    are measured one right after the other. A target that does not start gets an error in
    its rows instead of figures."""
    servers: Servers = {}
    for target in TARGETS:
        log(f"{target.name}: starting")
        try:
            servers[target.name] = stack.enter_context(running(target))
        except ServerError as exc:
            log(str(exc))
            servers[target.name] = str(exc)
    return servers


def measure_workload(
    config: Config, workload: Workload, servers: Servers
) -> tuple[report.Results, dict[str, float]]:
    """The workload's HTTP rows, back to back, then its in-process loops and breakdown."""
    results: report.Results = {}
    for target in TARGETS:
        if not target.accepts(workload):
            continue
        server = servers[target.name]
        if isinstance(server, str):
            stats = Stats()
            stats.error(server)
        else:
            stats = measure_row(config, target, server, workload)
        results[(workload.name, target.name)] = stats
        if target.name == "floor" and workload.name == "seed" and not isinstance(server, str):
            # The old driver's floor beside wrk's: how much of a fast row the driver was.
            results[(workload.name, FLOOR_HTTPX)] = measure_row(
                config, target, server, workload, httpx_only=True
            )
    for name, make in inprocess.LOOPS.items():
        stats = inprocess.loop(
            make(workload), seconds=config.loop_seconds, iterations=config.loop_iterations
        )
        results[(workload.name, name)] = stats
        log(f"  {workload.name} {name}: {_line(stats)}")
    stages = breakdown.stages(workload, seconds=0.3 if config.quick else 1.5)
    return results, stages


def measure_row(
    config: Config, target: Target, server: Server, workload: Workload, httpx_only: bool = False
) -> Stats:
    if target.checked:
        try:
            verify(server.base, workload)
        except (WrongAnswer, httpx.HTTPError) as exc:
            stats = Stats()
            stats.error(f"{target.name} {workload.name}: {exc}")
            log(f"  {workload.name} {target.name}: {stats.first_error}")
            return stats
    stats = drive(
        server.base + workload.path,
        workload.raw,
        clients=config.clients,
        max_requests=config.max_requests,
        seconds=config.seconds,
        warmup=config.warmup,
        server_cpu=server.cpu_seconds,
        api_cpu=server.api_cpu_seconds,
        httpx_only=httpx_only,
    )
    log(f"  {workload.name} {target.name}{' (httpx)' if httpx_only else ''}: {_line(stats)}")
    return stats


def _line(stats: Stats) -> str:
    return (
        f"{stats.rate:.1f}/s, p50 {stats.p50_ms:.2f} ms, p99 {stats.p99_ms:.2f} ms, "
        f"CPU {stats.cpu_ms:.2f} ms/req (API {stats.api_cpu_ms:.2f}), n={stats.ok}, "
        f"errors={stats.errors}, driver {stats.driver}"
    )


def gpu_figures(config: Config) -> dict[str, object] | str:
    """``bench.gpu``'s figures where a CUDA device exists, else why there are none."""
    if not torch.cuda.is_available():
        return "not measured: no GPU here"
    log("gpu:")
    try:
        return gpu.measure(seconds=2.0 if config.quick else 10.0)
    except (RuntimeError, AssertionError, OSError) as exc:
        return f"not measured: {exc}"


def main() -> int:
    started = time.monotonic()
    config = Config.from_env()
    load_at_start = report.load_average()
    log(f"bench: {'quick' if config.quick else 'full'} run, {config.clients} clients")
    torch.set_num_threads(inprocess.service_torch_threads())
    workloads = build_all()
    results: report.Results = {}
    stages: dict[str, dict[str, float]] = {}
    sessions = stateful.Outcome()
    crowd = many.Outcome()
    with contextlib.ExitStack() as stack:
        servers = start_all(stack)
        for workload in workloads:
            log(f"{workload.name}:")
            results_w, stages[workload.name] = measure_workload(config, workload, servers)
            results |= results_w
            if workload.name == stateful_report.SEED:
                # Right after the stateless seed rows, so that the two are compared closely.
                sessions = stateful.measure(config, workload.reference_loss, log)
        log("many sessions:")
        crowd = many.measure(config, log)
    figures = gpu_figures(config)
    rows = [report.Row(t.name, "HTTP", t.summary) for t in TARGETS] + list(report.IN_PROCESS)
    print(report.ratios_table(workloads, results))
    print()
    print(report.cpu_ratios_table(workloads, results))
    print()
    print(report.results_table(workloads, results, rows))
    print()
    print(report.breakdown_table(workloads, stages))
    print()
    print(stateful_report.results_table(sessions, results))
    print()
    print(stateful_report.ratios_table(sessions, results))
    print()
    print(many.results_table(crowd))
    print()
    goals_text = goals.table(crowd, results, sessions, figures)
    print(goals_text)
    errors = "\n".join(
        e
        for e in (
            report.errors_text(results),
            stateful_report.errors_text(sessions),
            many.errors_text(crowd),
        )
        if e
    )
    if errors:
        print("\nErrors:\n" + errors)
    if config.out is not None:
        text = document.render(
            config,
            report.machine(load_at_start),
            workloads,
            TARGETS,
            results,
            stages,
            sessions,
            crowd,
            goals_text,
        )
        config.out.parent.mkdir(parents=True, exist_ok=True)
        config.out.write_text(text, encoding="utf-8")
        log(f"wrote {config.out}")
    else:
        log("quick run: no report written (set BENCH_OUT=path to write one)")
    log(f"bench: done in {time.monotonic() - started:.0f} s")
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
