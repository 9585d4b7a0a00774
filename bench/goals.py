"""Issue 16's goals, each a ratio of two rows of one run, beside its target and whether met.

A ratio whose rows have errors is reported as wrong (``error``), never as a figure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bench import many, report
from bench.stateful import Outcome as Sessions
from bench.stats import Stats

FLOOR_HTTPX = "floor, httpx"
"""The seed's floor row under the async httpx driver, beside the floor under wrk."""


@dataclass(frozen=True)
class Goal:
    name: str
    top: Stats | None
    bottom: Stats | None
    measure: str
    """A ``Stats`` attribute: ``step_rate``, or a per-request CPU or time in ms."""
    at_least: bool
    bound: float


def goals(crowd: many.Outcome, results: report.Results, sessions: Sessions) -> list[Goal]:
    rows = crowd.rows
    seed = {name: results.get(("seed", name)) for name in ("service", "peer", "engine", "torch")}
    return [
        Goal(
            "`POST /v1/sessions/step`, 256 MLP sessions, durable / raw torch vmap + Adam",
            rows.get("service, /v1/sessions/step"),
            rows.get(many.RAW),
            "step_rate",
            True,
            0.25,
        ),
        Goal(
            "the engine's batched path (`run_group`) / the same raw torch",
            rows.get("in-process vmap"),
            rows.get(many.RAW),
            "step_rate",
            True,
            0.7,
        ),
        Goal(
            f"one request per step, {many.CLIENTS} connections, batching on / off",
            rows.get("service, batching on"),
            rows.get("service, batching off"),
            "step_rate",
            True,
            3.0,
        ),
        Goal(
            "stateful durable seed step (sqlite), 64 sessions / naive peer's stateless step",
            sessions.results.get(("sqlite", 64)),
            seed["peer"],
            "step_rate",
            True,
            2.0,
        ),
        Goal(
            "stateless seed `/v1/step` / naive peer",
            seed["service"],
            seed["peer"],
            "step_rate",
            True,
            1.5,
        ),
        # Time per step is the inverse rate: raw torch's rate over the engine's.
        Goal(
            "engine seed step / raw torch step (in-process), time per step",
            seed["torch"],
            seed["engine"],
            "step_rate",
            False,
            2.0,
        ),
        Goal(
            "API-process CPU per seed request / the floor's (both under wrk)",
            seed["service"],
            results.get(("seed", "floor")),
            "api_cpu_ms",
            False,
            2.0,
        ),
    ]


def _value(goal: Goal) -> tuple[str, str]:
    for stats in (goal.top, goal.bottom):
        if stats is None:
            return "–", "not measured"
        if stats.errors:
            return "error", f"wrong: {stats.first_error}"
    a, b = getattr(goal.top, goal.measure), getattr(goal.bottom, goal.measure)
    if not (a > 0 and b > 0):
        return "–", "not measured"
    value = a / b
    return f"{value:.2f}×", "yes" if (value >= goal.bound) == goal.at_least else "no"


def table(
    crowd: many.Outcome,
    results: report.Results,
    sessions: Sessions,
    gpu: dict[str, Any] | str,
) -> str:
    """Every goal's row; ``gpu``: ``bench.gpu.measure``'s figures, or why there are none."""
    body = []
    for goal in goals(crowd, results, sessions):
        value, met = _value(goal)
        body.append([goal.name, value, f"{'≥' if goal.at_least else '≤'} {goal.bound:g}×", met])
    name = "GPU: large MLP step through the service / raw torch on the same card"
    if isinstance(gpu, str):
        body.append([name, "–", "≤ 1.1×", gpu])
    else:
        ratio = gpu["ratio"]
        body.append(
            [f"{name} ({gpu['card']})", f"{ratio:.2f}×", "≤ 1.1×", "yes" if ratio <= 1.1 else "no"]
        )
    floors = [results.get(("seed", "floor")), results.get(("seed", FLOOR_HTTPX))]
    note = "; ".join(
        f"{label}: {report.num(s.rate)} req/s, driver CPU {report.num(s.driver_cpu_ms)} ms/req"
        for label, s in zip(("wrk", "async httpx"), floors, strict=True)
        if s is not None
    )
    return (
        report.table(["goal", "this run", "target", "met"], body)
        + f"\n\nThe floor (seed body) under each driver: {note}."
    )
