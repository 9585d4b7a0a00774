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

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import torch

from bench import rawtorch, report
from bench.config import Config
from bench.driver import HEADERS, drive
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
RAW = "raw torch vmap + Adam"
"""The limit: ``bench.rawtorch``, all sessions' step as one vmap of grad and one Adam."""
INCLUDE = ["loss"]
"""What the bulk rows ask for, so that rendering 256 answers' tensors as JSON lists does
not dominate them (the bulk route has no b64 answers); one row asks for the full answer."""
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
    outcome.rows[RAW] = _per_step(_raw_step(), seconds, SESSIONS)
    for name in ("in-process loop", "in-process vmap", RAW):
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
                        outcome.rows["service, /v1/sessions/step, full answer"] = _many(
                            config, server, ids, MLP_BATCH, include=None
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


def _raw_step() -> Callable[[], object]:
    _, entries = _models()
    stacked = rawtorch.StackedAdam(
        rawtorch.stack([e.model.trainable() for e in entries]), lr=MLP_SESSION["optimizer"]["lr"]
    )
    # Each session its own copy of the batch, as each item of the request carries its own.
    x = X.expand(SESSIONS, *X.shape).contiguous()
    y = Y.expand(SESSIONS, *Y.shape).contiguous()
    return lambda: stacked.step(x, y)


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
    return drive(
        [f"{server.base}/v1/sessions/{sid}/step" for sid in ids],
        body,
        clients=CLIENTS,
        max_requests=config.max_requests * 2,
        seconds=config.seconds,
        server_cpu=server.cpu_seconds,
        api_cpu=server.api_cpu_seconds,
    )


def _many(
    config: Config,
    server: Server,
    ids: list[str],
    batch: dict[str, Any],
    include: list[str] | None = INCLUDE,
) -> Stats:
    """``/v1/sessions/step`` over all of ``ids``; ``include`` None: the full default answer."""
    request: dict[str, Any] = {"items": [{"session": sid, "batch": batch} for sid in ids]}
    if include is not None:
        request["include"] = include
    body = orjson.dumps(request)
    check = httpx.post(
        f"{server.base}/v1/sessions/step", content=body, headers=HEADERS, timeout=120
    )
    assert check.status_code == 200, check.text
    assert all(item["status"] == 200 for item in check.json()["items"]), check.text[:300]
    stats = drive(
        f"{server.base}/v1/sessions/step",
        body,
        clients=2,
        max_requests=max(10, config.max_requests // 20),
        seconds=config.seconds,
        server_cpu=server.cpu_seconds,
        api_cpu=server.api_cpu_seconds,
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


def section(outcome: Outcome) -> list[str]:
    return [
        "## Many sessions (same run)",
        __doc__.split("\n\n", 1)[1].strip() if __doc__ else "",
        f"Store: {outcome.notes.get('store', '–')}. Per-request rows use {CLIENTS} concurrent "
        "clients; `/v1/sessions/step` rows use 2, each request carrying 256 steps and asking "
        f"for `include` {INCLUDE} (the full-answer row asks for the default answer). "
        f"`{RAW}` is `bench/rawtorch.py`: the limit the service rows are measured against.",
        results_table(outcome),
    ]


def errors_text(outcome: Outcome) -> str:
    return "\n".join(
        f"- many {name}: {stats.errors} errors; first: {stats.first_error}"
        for name, stats in outcome.rows.items()
        if stats.errors
    )
