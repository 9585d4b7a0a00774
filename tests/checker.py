"""A linearizability checker for session steps, over real histories.

Load generators record every acknowledged (200) step answer; afterwards the checker reads
each session's history and final state from the service and checks, per session:

- the history's steps are 1..n with no gap, and are exactly the acknowledged steps: nothing
  acknowledged is missing, nothing committed is unacknowledged (no phantom step);
- two acknowledgements of one step (a replay) carry the same answer;
- each acknowledged answer's parameters before its update equal the parameters after the
  previous acknowledged step (the first: the session's initial parameters). With plain SGD
  the update is reported exactly: before = ``params`` + lr · ``grads``, compared in float64
  to 1e-12;
- the session's final parameters are the last acknowledged answer's, and its version is
  its creation's plus one per step (no change was committed that is not a step).

Clients must give every request an Idempotency-Key and retry the ambiguous outcomes (a
transport error, 503, 504, 409 in flight) with the same key until the answer is definitive,
as the service's own client does: only then is "acknowledged" the same as "committed".
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np

TOLERANCE = 1e-12
Params = dict[str, np.ndarray]


def as_params(raw: Mapping[str, Any]) -> Params:
    return {name: np.asarray(value, dtype=np.float64) for name, value in raw.items()}


@dataclass
class Ack:
    step: int
    params: Params
    grads: Params


@dataclass
class Report:
    sessions: int = 0
    acknowledged: int = 0
    committed: int = 0
    failed: int = 0
    """definitive non-2xx answers (they must have changed nothing)"""
    violations: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return (
            f"{self.sessions} sessions, {self.acknowledged} steps acknowledged, "
            f"{self.committed} committed, {self.failed} refused, "
            f"{len(self.violations)} violations"
        )


class Checker:
    """Acknowledged steps of many SGD sessions (learning rate ``lr``), thread-safe."""

    def __init__(self, lr: float) -> None:
        self.lr = lr
        self._lock = threading.Lock()
        self._initial: dict[str, Params] = {}
        self._acks: dict[str, list[Ack]] = defaultdict(list)
        self._failed = 0

    def created(self, session: str, params: Mapping[str, Any]) -> None:
        with self._lock:
            self._initial[session] = as_params(params)

    def acknowledged(self, session: str, answer: Mapping[str, Any]) -> None:
        """A 200 step answer (``/step``, or an item of ``/v1/sessions/step``)."""
        ack = Ack(answer["step"], as_params(answer["params"]), as_params(answer["grads"]))
        with self._lock:
            self._acks[session].append(ack)

    def refused(self) -> None:
        with self._lock:
            self._failed += 1

    def check(self, http: httpx.Client, headers: Mapping[str, str] | None = None) -> Report:
        """Read every session's history and state through ``http`` and check them."""
        report = Report(sessions=len(self._initial), failed=self._failed)
        for session, initial in self._initial.items():
            history = _history(http, session, headers)
            final = http.get(f"/v1/sessions/{session}", headers=headers).json()
            report.committed += len(history)
            report.acknowledged += self._check_one(
                session, initial, history, final, report.violations
            )
        return report

    def _check_one(
        self,
        session: str,
        initial: Params,
        history: list[int],
        final: Mapping[str, Any],
        violations: list[str],
    ) -> int:
        acks: dict[int, Ack] = {}
        for ack in self._acks.get(session, []):
            seen = acks.get(ack.step)
            if seen is not None and not _same(seen.params, ack.params):
                violations.append(f"{session}: step {ack.step} acknowledged twice, differently")
            acks.setdefault(ack.step, ack)
        steps = sorted(acks)
        if history != list(range(1, len(history) + 1)):
            violations.append(f"{session}: history steps are not 1..n: {history[:20]}")
        if history != steps:
            phantom = sorted(set(history) - set(steps))
            lost = sorted(set(steps) - set(history))
            violations.append(
                f"{session}: history differs from the acknowledged steps: committed but not "
                f"acknowledged {phantom[:10]}, acknowledged but not committed {lost[:10]}"
            )
        before = initial
        for step in steps:
            ack = acks[step]
            start = {n: ack.params[n] + self.lr * ack.grads[n] for n in ack.grads}
            start.update({n: v for n, v in ack.params.items() if n not in ack.grads})
            if not _same(start, before):
                violations.append(
                    f"{session}: step {step} did not start from the previous acknowledged "
                    "step's parameters"
                )
            before = ack.params
        if final["step"] != (steps[-1] if steps else 0) or not _same(
            as_params(final["params"]), before
        ):
            violations.append(f"{session}: final state is not the last acknowledged step's")
        if final["version"] != 1 + len(history):
            violations.append(f"{session}: version {final['version']} after {len(history)} steps")
        return len(steps)


def _same(a: Params, b: Params) -> bool:
    return a.keys() == b.keys() and all(
        a[n].shape == b[n].shape and np.allclose(a[n], b[n], rtol=0, atol=TOLERANCE) for n in a
    )


def _history(http: httpx.Client, session: str, headers: Mapping[str, str] | None) -> list[int]:
    steps: list[int] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 500}
        if cursor:
            params["cursor"] = cursor
        page = http.get(f"/v1/sessions/{session}/history", params=params, headers=headers)
        page.raise_for_status()
        body = page.json()
        steps += [row["step"] for row in body["items"]]
        cursor = body.get("next")
        if not cursor:
            return steps
