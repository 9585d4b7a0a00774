"""The stateful rows' tables, beside the stateless seed rows of the same run, and their text
for docs/benchmarks.md."""

from __future__ import annotations

from bench import report
from bench.stateful import CHECKED_STEPS, Outcome
from bench.stats import Stats

SEED = "seed"
BASELINES = (("service", "service, stateless `/v1/step`"), ("peer", "peer, stateless"))
"""The seed workload's rows the stateful rows are compared with: (row name, label)."""


def results_table(outcome: Outcome, results: report.Results) -> str:
    headers = [
        *("row", "store", "sessions", "steps/s", "p50 ms", "p99 ms"),
        *("CPU ms/req", "store CPU ms/req", "driver CPU ms/req", "n", "errors"),
    ]
    lines: list[tuple[str, str, str, Stats | None]] = [
        (label, "–", "–", results.get((SEED, name))) for name, label in BASELINES
    ]
    lines += [
        ("service, `/v1/sessions/{id}/step`", store, str(count), stats)
        for (store, count), stats in outcome.results.items()
    ]
    body = [[label, store, count, *_figures(stats)] for label, store, count, stats in lines]
    return report.table(headers, body)


def _figures(stats: Stats | None) -> list[str]:
    if stats is None:
        return ["–"] * 8
    return [
        report.num(stats.rate),
        report.num(stats.p50_ms),
        report.num(stats.p99_ms),
        report.num(stats.cpu_ms),
        report.num(stats.store_cpu_ms),
        report.num(stats.driver_cpu_ms),
        str(stats.ok),
        str(stats.errors),
    ]


def ratios_table(outcome: Outcome, results: report.Results) -> str:
    """Stateful over stateless: steps per second, then CPU per step (service + store)."""
    bases = [results.get((SEED, name)) for name, _ in BASELINES]
    headers = [
        "store",
        "sessions",
        *(f"steps/s: stateful / {name}" for name, _ in BASELINES),
        *(f"CPU/step: stateful / {name}" for name, _ in BASELINES),
    ]
    body = [
        [
            store,
            str(count),
            *(report.ratio(stats, base) for base in bases),
            *(report.ratio(stats, base, "serving_cpu_ms") for base in bases),
        ]
        for (store, count), stats in outcome.results.items()
    ]
    return report.table(headers, body)


def errors_text(outcome: Outcome) -> str:
    return "\n".join(
        f"- stateful {store} × {count}: {stats.errors} errors; first: {stats.first_error}"
        for (store, count), stats in outcome.results.items()
        if stats.errors
    )


INTRO = """\
The seed step on sessions (`POST /v1/sessions/{id}/step` with `{"batch": {"x": 1, "y": 3}}`),
each step read from the store, computed and committed durably before its answer, measured
right after the stateless seed rows under the same driver and clients. The requests take the
row's sessions round-robin: with 1 session every client waits for the same one (steps on a
session are applied one at a time); with 64 the clients step different sessions at once."""

RATIOS = """\
- **steps/s: stateful / service**: a session step's throughput as a fraction of the stateless
  `/v1/step` on the same body (the cost of reading, writing and committing the state).
- **steps/s: stateful / peer**: against the naive peer, which keeps no state at all.
- **CPU/step**: how many times the stateless row's CPU one stateful step costs, counting the
  service and, for Redis, the redis-server process (`store CPU ms/req`); SQLite runs inside
  the service, so its cost is in `CPU ms/req`. Waiting for the disk (SQLite's fsync) is
  not CPU: it shows in the latencies and steps/s only."""

CHECKS = f"""\
Set-up, not timed: the row's sessions are created fresh and each is stepped
{CHECKED_STEPS} times, every answer checked (200, a finite loss, `step` counting up from 1, the
first loss equal to the stateless seed's 0.5). After the row, every session is read back: its
parameters finite, and the sessions' step counters adding up to the number of 200 step
answers (each step committed exactly once). The seed's w converges to 2 under SGD lr 0.1, so
thousands of steps keep the loss finite (it tends to 0)."""

STORE_NOTES = """\
Redis here runs with persistence off, so its rows measure the service's round trips to Redis
and the Lua commit, not Redis's disk; a production Redis would run with AOF
(`--appendonly yes`, `appendfsync everysec` or `always`), which would add its fsyncs."""


def section(outcome: Outcome, results: report.Results) -> list[str]:
    """The markdown blocks of the stateful section."""
    stores = "\n".join(f"- **{name}**: {detail}." for name, detail in outcome.stores.items())
    return [
        "## Stateful: the seed on sessions (same run)",
        INTRO,
        results_table(outcome, results),
        ratios_table(outcome, results),
        RATIOS,
        "Stores:\n\n" + stores,
        STORE_NOTES,
        CHECKS,
    ]
