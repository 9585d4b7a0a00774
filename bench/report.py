"""Tables for the terminal and docs/benchmarks.md, from one run's measurements."""

from __future__ import annotations

import math
import os
import platform
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata

import torch

from bench.config import ROOT
from bench.stats import Stats
from bench.workloads import Workload

Results = dict[tuple[str, str], Stats]
"""(workload name, row name) -> stats; rows are the targets' names, "engine" and "torch"."""


@dataclass(frozen=True)
class Row:
    name: str
    kind: str
    summary: str


IN_PROCESS: tuple[Row, ...] = (
    Row(
        "engine",
        "in-process",
        "`service.engine.step.run` on `StepRequest.model_validate(body)` in a Python loop, one "
        "call at a time: the service's work without HTTP, JSON parsing or rendering",
    ),
    Row(
        "torch",
        "in-process",
        "the same math in raw torch (fresh parameters, forward, loss, backward, SGD step) on "
        "tensors already built, nothing decoded or encoded",
    ),
)


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown pipe table, padded so that it also reads well in a terminal."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        padded = [
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "| " + " | ".join(padded) + " |"

    rule = (
        "| " + " | ".join("-" * (w - 1) + (":" if i else "-") for i, w in enumerate(widths)) + " |"
    )
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def num(value: float) -> str:
    if math.isnan(value):
        return "–"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def ratio(top: Stats | None, bottom: Stats | None, measure: str = "rate") -> str:
    if top is None or bottom is None:
        return "–"
    a, b = getattr(top, measure), getattr(bottom, measure)
    if not (a > 0 and b > 0):  # also NaN
        return "–"
    return f"{a / b:.2f}×"


def results_table(workloads: Sequence[Workload], results: Results, rows: Sequence[Row]) -> str:
    headers = [
        *("workload", "row", "kind", "req/s", "p50 ms", "p99 ms"),
        *("CPU ms/req", "driver CPU ms/req", "n", "errors"),
    ]
    body = []
    for workload in workloads:
        for row in rows:
            stats = results.get((workload.name, row.name))
            if stats is None:
                continue
            body.append(
                [
                    workload.name,
                    row.name,
                    row.kind,
                    num(stats.rate),
                    num(stats.p50_ms),
                    num(stats.p99_ms),
                    num(stats.cpu_ms),
                    num(stats.driver_cpu_ms),
                    str(stats.ok),
                    str(stats.errors),
                ]
            )
    return table(headers, body)


RATE_PAIRS = (("service", "floor"), ("service", "peer"), ("engine", "service"), ("torch", "engine"))
"""Requests per second, first over second."""
CPU_PAIRS = (("service", "floor"), ("service", "peer"), ("service", "engine"), ("engine", "torch"))
"""CPU milliseconds per request of the serving process, first over second."""


def _pairs_table(
    workloads: Sequence[Workload], results: Results, pairs: Sequence[tuple[str, str]], measure: str
) -> str:
    body = [
        [
            w.name,
            *(ratio(results.get((w.name, a)), results.get((w.name, b)), measure) for a, b in pairs),
        ]
        for w in workloads
    ]
    return table(["workload", *(f"{a} / {b}" for a, b in pairs)], body)


def ratios_table(workloads: Sequence[Workload], results: Results) -> str:
    """Throughput: how many times as many requests per second the first serves."""
    return _pairs_table(workloads, results, RATE_PAIRS, "rate")


def cpu_ratios_table(workloads: Sequence[Workload], results: Results) -> str:
    """CPU per request: how many times the second's CPU one request costs the first (the
    serving process only; the driver's CPU is not counted)."""
    return _pairs_table(workloads, results, CPU_PAIRS, "cpu_ms")


def breakdown_table(workloads: Sequence[Workload], stages: dict[str, dict[str, float]]) -> str:
    names = list(next(iter(stages.values())))
    body = [[w.name, *(num(stages[w.name][s]) for s in names)] for w in workloads]
    return table(["workload (median ms)", *names], body)


def errors_text(results: Results) -> str:
    lines = [
        f"- {workload} / {row}: {stats.errors} errors; first: {stats.first_error}"
        for (workload, row), stats in results.items()
        if stats.errors
    ]
    return "\n".join(lines)


def load_average() -> str:
    """The 1-minute load average, or "unknown"."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "unknown"


def machine(load_at_start: str) -> dict[str, str]:
    info = {
        "cores": str(os.cpu_count()),
        "cpu": _cpu_model() or platform.processor() or "unknown",
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": f"{torch.__version__} (intra-op threads in the loops: {torch.get_num_threads()})",
    }
    for package in ("fastapi", "uvicorn", "httpx", "pydantic"):
        info[package] = metadata.version(package)
    commit = _git_commit()
    if commit:
        info["commit"] = commit
    info["load average (1 min)"] = (
        f"{load_at_start} at the start, {load_average()} at the end: other work on the "
        "machine, which moves absolute figures"
    )
    info["date"] = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return info


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=5,
        check=False,
    )
    return out.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")
