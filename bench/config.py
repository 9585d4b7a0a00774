"""Settings of one run, from the environment.

- ``BENCH_QUICK=1``: a smoke run (short rows, few requests); it writes the report only where
  ``BENCH_OUT`` says, so that it never replaces the real figures in docs/benchmarks.md.
- ``BENCH_CLIENTS``: concurrent clients of the driver (default 4).
- ``BENCH_SECONDS``: the most seconds one HTTP row is loaded (default 8; quick 1.5).
- ``BENCH_OUT``: where to write the markdown report.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"


@dataclass(frozen=True)
class Config:
    quick: bool
    clients: int
    seconds: float
    """The most seconds of load per HTTP row (after its warm-up)."""
    max_requests: int
    """The most requests per HTTP row."""
    warmup: int
    """Requests per client before timing starts: connections, first-call costs."""
    loop_seconds: float
    """The most seconds per in-process loop."""
    loop_iterations: int
    """The most iterations per in-process loop."""
    out: Path | None
    """Where the markdown goes; None: nowhere."""

    @classmethod
    def from_env(cls) -> Config:
        quick = os.environ.get("BENCH_QUICK", "") not in ("", "0")
        out_env = os.environ.get("BENCH_OUT")
        out = Path(out_env) if out_env else (None if quick else DOC)
        return cls(
            quick=quick,
            clients=int(os.environ.get("BENCH_CLIENTS", "4")),
            seconds=float(os.environ.get("BENCH_SECONDS", "1.5" if quick else "8")),
            max_requests=200 if quick else 4000,
            warmup=1,
            loop_seconds=0.5 if quick else 3.0,
            loop_iterations=200 if quick else 5000,
            out=out,
        )
