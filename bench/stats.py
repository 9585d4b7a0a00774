"""What one measured row yields: completed requests, errors, wall time, latencies, and the
CPU seconds spent by the process that served them and by the driver.

CPU per request moves less than wall time when neighbours load a shared machine, so it is
reported next to the rates."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class Stats:
    latencies: list[float] = field(default_factory=list)
    """Seconds per successful request (or loop iteration)."""
    errors: int = 0
    elapsed: float = 0.0
    """Wall seconds from the first timed request to the last answer."""
    first_error: str | None = None
    cpu: float = math.nan
    """CPU seconds of the serving process (the server, or this process for a loop)."""
    driver_cpu: float = math.nan
    """CPU seconds of the load generator (HTTP rows only)."""
    store_cpu: float = math.nan
    """CPU seconds of a store that runs as its own process (redis-server); NaN otherwise."""
    steps_per_request: int = 1
    """Session-steps one request (or loop call) carries: 256 for /v1/sessions/step."""
    untimed_ok: int = 0
    """Successful untimed (warm-up) requests: they change state on a stateful row too."""
    api_cpu: float = math.nan
    """CPU seconds of the server's own process, without its worker processes."""
    driver: str = "none (in-process)"
    """The load generator that drove the row (wrk, or the async httpx fallback and why)."""
    counted: int | None = None
    """Successful requests, where the driver counts them itself (wrk) instead of timing each."""
    quantiles_ms: dict[float, float] = field(default_factory=dict)
    """Latency quantiles the driver reported itself (wrk), used where ``latencies`` is empty."""

    @property
    def ok(self) -> int:
        return self.counted if self.counted is not None else len(self.latencies)

    @property
    def rate(self) -> float:
        """Successful requests per second."""
        return self.ok / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def step_rate(self) -> float:
        """Session-steps per second."""
        return self.rate * self.steps_per_request

    def per_request_ms(self, seconds: float) -> float:
        return 1000.0 * seconds / self.ok if self.ok else math.nan

    @property
    def cpu_ms(self) -> float:
        return self.per_request_ms(self.cpu)

    @property
    def api_cpu_ms(self) -> float:
        return self.per_request_ms(self.api_cpu)

    @property
    def driver_cpu_ms(self) -> float:
        return self.per_request_ms(self.driver_cpu)

    @property
    def store_cpu_ms(self) -> float:
        return self.per_request_ms(self.store_cpu)

    @property
    def serving_cpu_ms(self) -> float:
        """CPU per request of everything that serves it: the server and its store process."""
        store = 0.0 if math.isnan(self.store_cpu) else self.store_cpu
        return self.per_request_ms(self.cpu + store)

    def percentile_ms(self, q: float) -> float:
        """The nearest-rank ``q`` quantile (0 < q <= 1) of the latencies, in milliseconds."""
        if not self.latencies:
            return self.quantiles_ms.get(q, math.nan)
        ordered = sorted(self.latencies)
        rank = max(1, math.ceil(q * len(ordered)))
        return 1000.0 * ordered[rank - 1]

    @property
    def p50_ms(self) -> float:
        return self.percentile_ms(0.50)

    @property
    def p99_ms(self) -> float:
        return self.percentile_ms(0.99)

    def error(self, message: str) -> None:
        self.errors += 1
        if self.first_error is None:
            self.first_error = message[:300]
