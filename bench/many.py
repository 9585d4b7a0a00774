"""Many sessions: what cross-session batching and ``POST /v1/sessions/step`` are for.

256 sessions of a small MLP (16→64→1, tanh, Adam, float32), 32 rows each, stepped:
- in-process, one ``engine.step.compute`` after another (the loop), and as one
  ``engine.batching.run_group`` call over all 256 (the vmap);
- through the service (SQLite, durable), one request per step from many concurrent clients,
  with batching off (``--batch-window-ms 0``) and on (the default);
- through the service, 256 steps per request on ``POST /v1/sessions/step``;
- and the notebook's seed the same way (256 seed sessions per request), against the naive
  peer's stateless seed steps measured earlier in the same run.
Rates are session-steps per second. Set-up (not timed) creates the sessions and steps each
once, checking the answers.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import torch

from bench import report
from bench.config import Config
from bench.driver import HEADERS, load
from bench.inprocess import loop
from bench.servers import Server, ServerError, gradsvc_with_store, running
from bench.stats import Stats
from bench.stores import opened
from bench.workloads import SEED_BODY, b64
from service.engine import batching, models, optimizers, specs
from service.engine.step import compute

SESSIONS = 256
ROWS, FEATURES, HIDDEN = 32, 16, 64
CLIENTS = 64
"""Concurrent clients for the per-request rows: batching needs requests that overlap."""
MLP_SESSION: dict[str, Any] = {
    "model": {
        "type": "sequential",
        "layers": [
            {"type": "linear", "in_features": FEATURES, "out_features": HIDDEN},
            {"type": "tanh"},
            {"type": "linear", "in_features": HIDDEN, "out_features": 1},
        ],
    },
    "loss": "mse",
    "optimizer": {"type": "adam", "lr": 0.001},
}
SEED_SESSION = {key: SEED_BODY[key] for key in ("model", "loss", "optimizer")}


_gen = torch.Generator().manual_seed(0)
X = torch.randn(ROWS, FEATURES, generator=_gen)
Y = torch.randn(ROWS, 1, generator=_gen)
MLP_BATCH = {"x": b64(X), "y": b64(Y)}


@dataclass
class Outcome:
    rows: dict[str, Stats] = field(default_factory=dict)
    """row name → stats; rates are session-steps per second"""
    notes: dict[str, str] = field(default_factory=dict)


def measure(config: Config, log: Callable[[str], None]) -> Outcome:
    outcome = Outcome()
    seconds = config.loop_seconds
    outcome.rows["in-process loop"] = _per_step(_loop_step(), seconds)
    outcome.rows["in-process vmap"] = _per_step(_vmap_step(), seconds, SESSIONS)
    for name in ("in-process loop", "in-process vmap"):
        log(f"  many {name}: {outcome.rows[name].step_rate:.0f} session-steps/s")
    with opened("sqlite") as store:
        for label, args in (("batching off", ("--batch-window-ms", "0")), ("batching on", ())):
            target = gradsvc_with_store(f"many-{label}", store.detail, store.url, *args)
            try:
                with running(target) as server:
                    ids = _sessions(server, MLP_SESSION, SESSIONS)
                    outcome.rows[f"service, {label}"] = _per_request(config, server, ids)
                    if label == "batching on":
                        outcome.rows["service, /v1/sessions/step"] = _many(
                            config, server, ids, MLP_BATCH
                        )
                        seeds = _sessions(server, SEED_SESSION, SESSIONS)
                        outcome.rows["service, /v1/sessions/step, seed"] = _many(
                            config, server, seeds, SEED_BODY["batch"]
                        )
            except (ServerError, httpx.HTTPError, AssertionError) as exc:
                stats = Stats()
                stats.error(f"{label}: {exc}")
                outcome.rows[f"service, {label}"] = stats
        outcome.notes["store"] = store.detail
    for name, stats in outcome.rows.items():
        log(f"  many {name}: {stats.step_rate:.0f} session-steps/s, errors={stats.errors}")
    return outcome


def _models() -> tuple[specs.SessionSpec, list[batching.Entry]]:
    spec = specs.SessionSpec.model_validate(MLP_SESSION)
    entries = []
    for i in range(SESSIONS):
        model = models.build(spec.model.model_copy(update={"seed": i}))
        optimizer = optimizers.build(spec.optimizer, model.trainable().values())
        entries.append(batching.Entry(model, optimizer, {"x": X}, MLP_BATCH["y"]))
    return spec, entries


def _loop_step() -> Callable[[], object]:
    spec, entries = _models()
    turn = iter(range(10**12))

    def step() -> object:
        entry = entries[next(turn) % SESSIONS]
        return compute(
            "step", entry.model, entry.inputs, entry.y, loss=spec.loss, optimizer=entry.optimizer
        )

    return step


def _vmap_step() -> Callable[[], object]:
    spec, entries = _models()
    return lambda: batching.run_group("step", spec, entries, models.DEFAULT_LIMITS)


def _per_step(step: Callable[[], object], seconds: float, per_call: int = 1) -> Stats:
    stats = loop(step, seconds=seconds, iterations=10**9)
    stats.steps_per_request = per_call
    return stats


def _sessions(server: Server, body: dict[str, Any], count: int) -> list[str]:
    """``count`` new sessions, each stepped once (so that its worker holds it built)."""
    with httpx.Client(base_url=server.base, timeout=60, trust_env=False) as http:
        ids = []
        for i in range(count):
            created = http.post("/v1/sessions", json={**body, "name": f"bench-{i}"})
            assert created.status_code == 201, created.text
            ids.append(created.json()["id"])
        batch = MLP_BATCH if body is MLP_SESSION else SEED_BODY["batch"]
        items = [{"session": sid, "batch": batch} for sid in ids]
        warm = http.post("/v1/sessions/step", json={"items": items, "include": []})
        assert warm.status_code == 200 and all(i["step"] == 1 for i in warm.json()["items"])
        return ids


def _per_request(config: Config, server: Server, ids: list[str]) -> Stats:
    body = orjson.dumps({"batch": MLP_BATCH, "encoding": "b64"})
    return asyncio.run(
        load(
            [f"{server.base}/v1/sessions/{sid}/step" for sid in ids],
            body,
            clients=CLIENTS,
            max_requests=config.max_requests * 2,
            seconds=config.seconds,
            server_cpu=server.cpu_seconds,
        )
    )


def _many(config: Config, server: Server, ids: list[str], batch: dict[str, Any]) -> Stats:
    body = orjson.dumps(
        {"items": [{"session": sid, "batch": batch} for sid in ids], "include": ["loss"]}
    )
    check = httpx.post(
        f"{server.base}/v1/sessions/step", content=body, headers=HEADERS, timeout=120
    )
    assert check.status_code == 200, check.text
    assert all(item["status"] == 200 for item in check.json()["items"]), check.text[:300]
    stats = asyncio.run(
        load(
            f"{server.base}/v1/sessions/step",
            body,
            clients=2,
            max_requests=max(10, config.max_requests // 20),
            seconds=config.seconds,
            server_cpu=server.cpu_seconds,
        )
    )
    stats.steps_per_request = SESSIONS
    return stats


def results_table(outcome: Outcome) -> str:
    headers = [
        "row",
        "session-steps/s",
        "p50 ms/request",
        "p99 ms/request",
        "CPU ms/step",
        "errors",
    ]
    body = [
        [
            name,
            report.num(stats.step_rate),
            report.num(stats.p50_ms),
            report.num(stats.p99_ms),
            report.num(stats.cpu_ms / stats.steps_per_request),
            str(stats.errors),
        ]
        for name, stats in outcome.rows.items()
    ]
    return report.table(headers, body)


def goals_table(outcome: Outcome, results: report.Results, stateful: Any) -> str:
    """The issue's goals, as ratios measured in this run, each beside its target."""
    rows = outcome.rows

    def rate(stats: Stats | None) -> float:
        return stats.step_rate if stats is not None and stats.ok else math.nan

    peer = rate(results.get(("seed", "peer")))
    durable = {
        f"`/v1/sessions/{{id}}/step`, sqlite × {count}": rate(stats)
        for (store, count), stats in stateful.results.items()
        if store == "sqlite"
    }
    durable["`/v1/sessions/step`, 256 seed sessions"] = rate(
        rows.get("service, /v1/sessions/step, seed")
    )
    best = max(durable, key=lambda k: -1 if math.isnan(durable[k]) else durable[k])
    b64, engine = results.get(("mlp-b64", "service")), results.get(("mlp-b64", "engine"))
    lines = [
        (
            f"durable seed steps / naive peer's stateless (best: {best})",
            durable[best] / peer,
            "≥ 1.5×",
            1.5,
            True,
        ),
        (
            "256 MLP sessions: batching on / off",
            rate(rows.get("service, batching on")) / rate(rows.get("service, batching off")),
            "≥ 3×",
            3.0,
            True,
        ),
        (
            "`/v1/sessions/step` / in-process vmap",
            rate(rows.get("service, /v1/sessions/step")) / rate(rows.get("in-process vmap")),
            "≥ 0.25×",
            0.25,
            True,
        ),
        (
            "large b64 batch: time per step, service / in-process engine",
            (engine.rate / b64.rate) if b64 and engine and b64.ok else math.nan,
            "≤ 1.3×",
            1.3,
            False,
        ),
    ]
    body = []
    for name, value, goal, bound, at_least in lines:
        met = "–" if math.isnan(value) else ("yes" if (value >= bound) == at_least else "no")
        body.append([name, "–" if math.isnan(value) else f"{value:.2f}×", goal, met])
    others = "; ".join(f"{k}: {report.num(v)}/s" for k, v in durable.items())
    table = report.table(["goal", "this run", "target", "met"], body)
    return (
        f"{table}\n\nDurable seed rows in this run: {others}; the peer: {report.num(peer)}/s. "
        "Time per step is the inverse of steps per second under the same load (the service's "
        "p50 also holds the queueing of its concurrent clients; the loop's has none)."
    )


def section(outcome: Outcome, results: report.Results, stateful: Any) -> list[str]:
    return [
        "## Goals (same run)",
        goals_table(outcome, results, stateful),
        "## Many sessions (same run)",
        __doc__.split("\n\n", 1)[1].strip() if __doc__ else "",
        f"Store: {outcome.notes.get('store', '–')}. Per-request rows use {CLIENTS} concurrent "
        "clients; `/v1/sessions/step` rows use 2, each request carrying 256 steps.",
        results_table(outcome),
    ]


def errors_text(outcome: Outcome) -> str:
    return "\n".join(
        f"- many {name}: {stats.errors} errors; first: {stats.first_error}"
        for name, stats in outcome.rows.items()
        if stats.errors
    )
