"""docs/benchmarks.md: one run's figures, with what each row and ratio means."""

from __future__ import annotations

from collections.abc import Sequence

from bench import many, report, stateful_report
from bench.config import Config
from bench.servers import Target
from bench.stateful import Outcome
from bench.workloads import Workload

CAUTION = """\
**Only the ratios are to be trusted.** These figures come from one run on a shared machine:
absolute requests per second and milliseconds move from run to run (neighbours, CPU
frequency, the load generator sharing the same cores as the server), so compare rows of the
same run with each other, never with another run or another machine."""

RATIOS = """\
- **service / floor**: the service's throughput as a fraction of what bare HTTP (uvicorn +
  FastAPI returning a constant, body read) reaches under the same driver.
- **service / peer**: above 1×, the service serves more steps per second than the naive
  endpoint a user would write; below 1×, fewer.
- **engine / service**: steps per second of the engine in a plain loop over steps per second
  through HTTP: the cost of HTTP, JSON parsing and rendering, and the hop to a worker process
  (1× would be no overhead).
- **torch / engine**: the engine's own cost over raw torch: validation, building the model
  from its spec, decoding and checking tensors, encoding the answer."""

CPU_RATIOS = """\
The same comparisons in CPU time per request of the serving process (the server's user and
system time from /proc, all its threads; for the loops, this process's), which neighbours
disturb less than wall time. Each cell is how many times the second's CPU the first spends
on one request: **service / engine** is what HTTP and JSON add, **engine / torch** what the
engine adds over raw torch."""

CAVEATS = """\
- All three servers run side by side (idle ones cost nothing), and each workload's rows are
  measured one right after the other, so that a neighbour's burst hits a workload's rows
  alike rather than one row only. The stateful rows follow the stateless seed rows at once;
  their services (and redis-server) run only for them.
- The driver (wrk, bodies written once beforehand) runs on the same cores as the server;
  it spends microseconds per request where the old async httpx driver spent milliseconds
  (the goals section gives the floor under both). `driver CPU ms/req` shows how much.
- HTTP p50 and p99 are what a client sees with all clients in flight, queueing included; the
  in-process rows run one call at a time. The slow rows (the MLP in list form) complete few
  requests, so their p99 is close to their maximum.
- The in-process loops run with as many torch threads as each of the service's worker
  processes gets, one call at a time; the service overlaps HTTP work in its API process
  with computation in its workers, so for compute-bound rows `engine / service` can fall
  below 1×; the CPU ratio `service / engine` is the like-for-like measure of what HTTP adds."""


def render(
    config: Config,
    machine: dict[str, str],
    workloads: Sequence[Workload],
    targets: Sequence[Target],
    results: report.Results,
    stages: dict[str, dict[str, float]],
    sessions: Outcome,
    crowd: many.Outcome,
    goals_text: str,
) -> str:
    rows = [report.Row(t.name, "HTTP", t.summary) for t in targets] + list(report.IN_PROCESS)
    load = (
        f"{config.clients} concurrent connections under wrk (`bench/load.lua`; {many.CLIENTS} "
        "for the one-request-per-step rows, one per session for the 64-session row), "
        f"{config.seconds:g} s per HTTP row; where wrk cannot run, the async httpx driver "
        f"(at most {config.max_requests} requests per row after {config.warmup} untimed "
        "request per client), named in the errors; in-process loops at most "
        f"{config.loop_seconds:g} s or "
        f"{config.loop_iterations} calls"
    )
    parts = [
        "# Benchmarks",
        f"Written by `make bench` (`.venv/bin/python -m bench`) on {machine['date']}; "
        "regenerate it rather than edit it."
        + (" **Quick mode (`BENCH_QUICK=1`): smoke figures only.**" if config.quick else ""),
        CAUTION,
        "## Reproduce",
        "    make bench                                # about 5 minutes; rewrites this file\n"
        "    BENCH_QUICK=1 .venv/bin/python -m bench   # smoke run; writes only to $BENCH_OUT\n"
        "    make profile PROFILE_OUT=/tmp/profile.txt # py-spy of the API process and a worker",
        "Knobs: `BENCH_CLIENTS` (default 4), `BENCH_SECONDS` (per HTTP row, default 8), "
        "`BENCH_OUT` (report path). Every server listens on 127.0.0.1 only, on a free port, "
        "as a real uvicorn process that is started, waited for, loaded and terminated.",
        "## Machine and load",
        "\n".join(f"- {key}: {value}" for key, value in machine.items()) + f"\n- load: {load}",
        "## Ratios (throughput, same run)",
        report.ratios_table(workloads, results),
        RATIOS,
        "## Ratios (CPU per request, same run)",
        report.cpu_ratios_table(workloads, results),
        CPU_RATIOS,
        "## Goals (same run)",
        goals_text,
        *stateful_report.section(sessions, results),
        *many.section(crowd),
        "## Results",
        report.results_table(workloads, results, rows),
        "`CPU ms/req`: the serving process's CPU per request (server, or the loop's process); "
        "`driver CPU ms/req`: the load generator's, which competes for the same cores.",
    ]
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
        parts += ["Errors:", errors]
    parts += [
        "## Where a service request's time goes",
        "Each stage of one request timed on its own in this process (median): the body parsed "
        "as the service parses it (orjson, on the event loop), validated, run "
        "(build, decode, compute, encode; in a worker process), rendered (orjson). "
        "`parse (json)` is for comparison only: the standard library's parser, which FastAPI "
        "would use by default.",
        report.breakdown_table(workloads, stages),
        "## Rows",
        "\n".join(f"- **{row.name}** ({row.kind}): {row.summary}." for row in rows),
        "## Workloads",
        "\n".join(f"- **{w.name}**: {w.summary}." for w in workloads)
        + "\n\nEvery answer from the peer and the service is checked against the engine's loss "
        "for the same body before the row is loaded. The peer reads JSON lists only, as a "
        "naive endpoint does, so it has no b64 row.",
        "## Caveats",
        CAVEATS,
    ]
    return "\n\n".join(parts) + "\n"
