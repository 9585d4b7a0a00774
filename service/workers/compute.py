"""One round's computation: prepared jobs in, results out; like sessions as one vmapped call.

Nothing here reads or writes the store: the caller (``rounds``) decides what is committed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

import torch

from service.engine import batching, models, specs
from service.engine.limits import Limits
from service.engine.step import Result, compute
from service.errors import GradsvcError, OutOfMemory
from service.store import SessionRecord
from service.workers.cache import Built
from service.workers.jobs import RunJob

R = TypeVar("R")
P = ParamSpec("P")
log = logging.getLogger("gradsvc.worker")
calls: list[tuple[int, float]] = []
"""This process's computations since the worker last reported them (``drain_calls``): the
items in each call (a vmapped group's size; 1 alone) and the seconds the call took."""


def drain_calls() -> list[tuple[int, float]]:
    """The computations recorded since the last call (and forgotten here)."""
    done = calls[:]
    calls.clear()
    return done


def guarded(fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R | GradsvcError:
    """``fn``'s result, or the problem its exception amounts to (``problem``)."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:
        return problem(exc)


def problem(exc: Exception) -> GradsvcError:
    """The domain error an exception amounts to: itself, 507 for a device out of memory (the
    worker stays up), 500 for a bug (logged with its traceback)."""
    if isinstance(exc, GradsvcError):
        return exc
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        torch.cuda.empty_cache()
        return OutOfMemory("the device ran out of memory for this request: send a smaller batch")
    if isinstance(exc, MemoryError):
        return OutOfMemory("the worker ran out of memory for this request: send a smaller batch")
    log.error("computation failed", exc_info=exc)
    return GradsvcError("the computation failed inside the service; this is a bug")


@dataclass
class Prepared:
    """A job ready to compute: the state it starts from, built, and its decoded inputs."""

    index: int
    job: RunJob
    record: SessionRecord
    built: Built
    inputs: models.Inputs

    @property
    def explain(self) -> bool:
        request = self.job.request
        return isinstance(request, specs.SessionGradientsRequest) and request.explain

    @property
    def quantities(self) -> specs.Quantities | None:
        """The quantities beyond the gradient it asks for, if any: such a job is computed
        alone, never in a vmapped group."""
        request = self.job.request
        return request if isinstance(request, specs.Quantities) and request.wanted else None

    def entry(self) -> batching.Entry:
        optimizer = self.built.optimizer if self.job.kind == "step" else None
        return batching.Entry(self.built.model, optimizer, self.inputs, self.job.request.batch.y)


def computed(
    ready: list[Prepared],
    limits: Limits,
    batch: bool,
    before: Callable[[list[int]], None] | None = None,
) -> Iterator[tuple[Prepared, Result | GradsvcError]]:
    """Each prepared job with its result: like jobs as one batched call, the rest alone. The
    jobs are of distinct sessions (one round), so no two share a model. ``before`` hears
    the indices of each group just before it is computed."""
    groups: dict[Hashable, list[Prepared]] = {}
    for prepared in ready:
        key = _signature(prepared) if batch and len(ready) > 1 else None
        groups.setdefault(key if key is not None else ("alone", prepared.index), []).append(
            prepared
        )
    for group in groups.values():
        if before is not None:
            before([p.index for p in group])
        start = time.perf_counter()
        if len(group) == 1:
            alone = guarded(_compute_one, group[0], limits)
            calls.append((1, time.perf_counter() - start))
            yield group[0], alone
            continue
        first = group[0]
        entries = [p.entry() for p in group]
        outcomes = guarded(batching.run_group, first.job.kind, first.built.spec, entries, limits)
        calls.append((len(group), time.perf_counter() - start))
        if isinstance(outcomes, GradsvcError):
            for prepared in group:
                yield prepared, outcomes
        else:
            yield from zip(group, outcomes, strict=True)


def _signature(prepared: Prepared) -> Hashable | None:
    if prepared.quantities is not None:
        return None
    spec = prepared.built.spec
    return batching.signature(prepared.job.kind, spec, prepared.entry(), prepared.explain)


def _compute_one(prepared: Prepared, limits: Limits) -> Result:
    job, built, record = prepared.job, prepared.built, prepared.record
    spec = built.spec
    return compute(
        job.kind,
        built.model,
        prepared.inputs,
        job.request.batch.y,
        loss=spec.loss,
        optimizer=built.optimizer,
        clip_grad_norm=spec.optimizer.clip_grad_norm,
        explain=prepared.explain,
        seed=spec.model.seed + record.step,
        limits=limits,
        wanted=prepared.quantities,
    )
