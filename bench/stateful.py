"""The stateful rows: the seed step on sessions, each step committed to a durable store.

For each store (``bench.stores``), ``gradsvc serve --store URL`` runs with its defaults
otherwise. Per row, set-up (not timed) creates the row's sessions (1, or 64) with the seed's
model, loss and optimizer, and steps each one twice, checking every answer: 200, a finite
loss, ``step`` counting up from 1, and the first step's loss equal to the stateless seed's.
Then the driver POSTs ``{"batch": ...}`` to ``/v1/sessions/{id}/step`` under the same load as
the stateless rows, its requests taking the sessions round-robin, so that on 64 sessions all
of them are in use and on 1 session every client queues for the same one. Afterwards the
sessions' step counters must add up to the 200 answers they gave: each step committed once.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from bench.config import Config
from bench.driver import HEADERS, WrongAnswer, check_loopback, drive
from bench.servers import Server, ServerError, gradsvc_with_store, running
from bench.stats import Stats
from bench.stores import STORES, Store, Unavailable, opened
from bench.workloads import SEED_BODY

SESSION_COUNTS = (1, 64)
SESSION_BODY = {key: SEED_BODY[key] for key in ("model", "loss", "optimizer")}
STEP_RAW = json.dumps({"batch": SEED_BODY["batch"]}, separators=(",", ":")).encode()
CHECKED_STEPS = 2
"""Steps per session taken and checked during set-up, before timing."""

Key = tuple[str, int]
"""(store name, sessions)"""


@dataclass
class Outcome:
    results: dict[Key, Stats] = field(default_factory=dict)
    stores: dict[str, str] = field(default_factory=dict)
    """Store name -> what it was, or why it has no rows."""


def measure(config: Config, reference_loss: float, log: Callable[[str], None]) -> Outcome:
    """Every store's rows; a store that cannot run here gets a note instead of rows."""
    outcome = Outcome()
    for name in STORES:
        log(f"stateful {name}: starting")
        with contextlib.ExitStack() as stack:
            try:
                store = stack.enter_context(opened(name))
                target = gradsvc_with_store(f"service-{name}", store.detail, store.url)
                server = stack.enter_context(running(target))
            except Unavailable as exc:
                outcome.stores[name] = f"skipped: {exc}"
                log(f"  {outcome.stores[name]}")
                continue
            except ServerError as exc:
                outcome.stores[name] = f"did not start: {exc}"
                for count in SESSION_COUNTS:
                    outcome.results[(name, count)] = _failed(f"{name}: {exc}")
                continue
            outcome.stores[name] = store.detail
            for count in SESSION_COUNTS:
                stats = row(config, server, store, count, reference_loss)
                outcome.results[(name, count)] = stats
                log(
                    f"  {name} × {count}: {stats.rate:.1f}/s, p50 {stats.p50_ms:.2f} ms, "
                    f"p99 {stats.p99_ms:.2f} ms, CPU {stats.serving_cpu_ms:.2f} ms/req, "
                    f"n={stats.ok}, errors={stats.errors}"
                )
    return outcome


def row(config: Config, server: Server, store: Store, count: int, reference_loss: float) -> Stats:
    """One row: ``count`` new sessions, checked, loaded, then audited."""
    check_loopback(server.base)
    with httpx.Client(base_url=server.base, trust_env=False, timeout=60.0) as client:
        try:
            ids = [create(client) for _ in range(count)]
            for expected in range(1, CHECKED_STEPS + 1):
                for session in ids:
                    answer = step(client, session, expected)
                    if expected == 1 and not math.isclose(answer["loss"], reference_loss):
                        raise WrongAnswer(f"first loss {answer['loss']!r}, not {reference_loss!r}")
        except (WrongAnswer, httpx.HTTPError) as exc:
            return _failed(f"{store.name} × {count}: {exc}")
        urls = [f"{server.base}/v1/sessions/{session}/step" for session in ids]
        clients = max(config.clients, count)
        stats = drive(
            urls,
            STEP_RAW,
            clients=clients,
            max_requests=config.max_requests,
            seconds=config.seconds,
            warmup=config.warmup,
            server_cpu=server.cpu_seconds,
            api_cpu=server.api_cpu_seconds,
            store_cpu=store.cpu_seconds,
        )
        answered = count * CHECKED_STEPS + stats.untimed_ok + stats.ok
        # wrk stops with requests in flight: the server may commit them after it counted.
        slack = clients if stats.driver == "wrk" else 0
        try:
            audit(client, ids, answered if not stats.errors else None, slack)
        except (WrongAnswer, httpx.HTTPError) as exc:
            stats.error(f"{store.name} × {count}, after the row: {exc}")
    return stats


def create(client: httpx.Client) -> str:
    response = client.post("/v1/sessions", json=SESSION_BODY)
    if response.status_code != 201:
        raise WrongAnswer(f"create: HTTP {response.status_code}: {response.text[:300]}")
    session: str = response.json()["id"]
    return session


def step(client: httpx.Client, session: str, expected_step: int) -> dict[str, Any]:
    """One step, checked: 200, a finite loss, the answer complete, ``step`` as expected."""
    response = client.post(f"/v1/sessions/{session}/step", content=STEP_RAW, headers=HEADERS)
    if response.status_code != 200:
        raise WrongAnswer(f"step: HTTP {response.status_code}: {response.text[:300]}")
    answer: dict[str, Any] = response.json()
    loss = answer.get("loss")
    if not isinstance(loss, float) or not math.isfinite(loss):
        raise WrongAnswer(f"step {expected_step} of {session}: loss {loss!r}")
    if answer.get("step") != expected_step:
        raise WrongAnswer(f"{session}: step {answer.get('step')!r}, expected {expected_step}")
    if not {"grads", "params", "outputs"} <= answer.keys():
        raise WrongAnswer(f"answer lacks grads, params or outputs: {sorted(answer)}")
    return answer


def audit(client: httpx.Client, ids: list[str], answered: int | None, slack: int = 0) -> None:
    """Every session readable with finite parameters, and (where no request failed, so that
    each was answered) their step counters adding up to ``answered``, or up to ``slack``
    more (requests in flight when the driver stopped counting)."""
    total = 0
    for session in ids:
        response = client.get(f"/v1/sessions/{session}")
        if response.status_code != 200:
            raise WrongAnswer(f"GET {session}: HTTP {response.status_code}")
        view = response.json()
        if not all(math.isfinite(v) for values in view["params"].values() for v in values):
            raise WrongAnswer(f"{session}: parameters {view['params']!r}")
        total += view["step"]
    if answered is not None and not answered <= total <= answered + slack:
        raise WrongAnswer(f"the sessions took {total} steps, but {answered} step answers were 200")


def _failed(message: str) -> Stats:
    stats = Stats()
    stats.error(message)
    return stats
