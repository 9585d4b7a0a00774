"""Training jobs: many steps on one session, run by the session's own worker.

A job is decoded and checked when it is started (a bad dataset is a 422 then, not a failed
job later), then advanced one mini-batch at a time whenever the worker has nothing else to
do, so other sessions on the same worker keep being served. Every mini-batch is an ordinary
step through the sessions runner: committed (with its history row) before the next one, so a
crash or a cancel leaves the session at its last completed step. While a job runs it holds
its session: other steps, patches and deletes get 409 naming the job.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import orjson
import torch

from service.engine import losses, specs
from service.engine.limits import Limits
from service.errors import GradsvcError, InvalidInput, NotFound, ShapeError
from service.workers.jobs import RunJob, iso
from service.workers.sessions import Sessions

KEEP_FINISHED = 1000
"""Finished jobs remembered per worker, for GET /v1/jobs/{id} after the end."""


@dataclass
class TrainingRun:
    id: str
    owner: str
    session: str
    inputs: dict[str, torch.Tensor]
    y: torch.Tensor
    epochs: int
    batch_size: int
    shuffle: bool
    seed: int
    step: int
    rows: int
    status: str = "queued"
    epoch: int = 0
    """0-based index of the epoch under way"""
    batch: int = 0
    """0-based index of the next mini-batch in the epoch"""
    steps_done: int = 0
    loss: float | None = None
    error: dict[str, Any] | None = None
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    order: torch.Tensor | None = None

    @property
    def batches(self) -> int:
        return math.ceil(self.rows / self.batch_size)

    @property
    def total_steps(self) -> int:
        return self.epochs * self.batches

    @property
    def finished(self) -> bool:
        return self.status in ("succeeded", "failed", "cancelled")

    def view(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "session": self.session,
            "status": self.status,
            "progress": self.steps_done / self.total_steps,
            "epoch": min(self.epoch + 1, self.epochs),
            "epochs": self.epochs,
            "steps_done": self.steps_done,
            "total_steps": self.total_steps,
            "step": self.step,
            "loss": self.loss,
            "error": self.error,
            "created_at": iso(self.created_at),
            "updated_at": iso(self.updated_at),
        }

    def next_batch(self) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        if self.batch == 0 or self.order is None:
            if self.shuffle:
                generator = torch.Generator().manual_seed(self.seed + self.epoch)
                self.order = torch.randperm(self.rows, generator=generator)
            else:
                self.order = torch.arange(self.rows)
        rows = self.order[self.batch * self.batch_size : (self.batch + 1) * self.batch_size]
        return {k: v[rows] for k, v in self.inputs.items()}, self.y[rows]


class Trainer:
    def __init__(self, sessions: Sessions, limits: Limits, max_steps: int) -> None:
        self.sessions, self.limits, self.max_steps = sessions, limits, max_steps
        self.runs: OrderedDict[str, TrainingRun] = OrderedDict()
        self.active: list[str] = []
        self.finished: list[str] = []
        """how jobs ended, since drain_finished() last asked"""

    def drain_finished(self) -> list[str]:
        finished, self.finished = self.finished, []
        return finished

    @property
    def busy(self) -> bool:
        return bool(self.active)

    def start(
        self, owner: str, session_id: str, job_id: str, request: specs.TrainRequest
    ) -> dict[str, Any]:
        sessions = self.sessions
        record = sessions.fetch(owner, session_id)
        sessions.check_free(record)
        built = sessions.load(record)
        model = built.model
        try:
            inputs = model.decode_inputs(request.dataset.x, self.limits)
        except GradsvcError as exc:
            raise _into_dataset(exc) from None
        try:
            loss = losses.normalise(built.spec.loss)
            y = losses.decode_target(loss, request.dataset.y, model.dtype, self.limits)
        except GradsvcError as exc:
            raise exc.at("dataset", "y") from None
        rows = {t.shape[0] if t.ndim else None for t in inputs.values()}
        if len(rows) != 1 or None in rows or (y.shape[0] if y.ndim else None) not in rows:
            raise ShapeError(
                "dataset.x and dataset.y must hold the same number of rows along their first "
                f"dimension (x: {sorted(str(r) for r in rows)}, y: {list(y.shape)})",
                loc=("dataset",),
            )
        run = TrainingRun(
            job_id,
            owner,
            session_id,
            {k: v.to(model.device) for k, v in inputs.items()},
            y.to(model.device),
            request.epochs,
            request.batch_size,
            request.shuffle,
            request.seed,
            record.step,
            int(y.shape[0]),
        )
        if run.rows == 0:
            raise ShapeError("the dataset has no rows", loc=("dataset",))
        if run.total_steps > self.max_steps:
            raise InvalidInput(
                f"the job would take {run.total_steps} steps; one job may take "
                f"{self.max_steps}: fewer epochs or larger batches",
                loc=("epochs",),
            )
        self.runs[job_id] = run
        self.active.append(job_id)
        sessions.held[session_id] = job_id
        self._forget_old()
        return run.view()

    def advance(self) -> None:
        """One mini-batch of the job whose turn it is (jobs take turns, step by step)."""
        job_id = self.active.pop(0)
        run = self.runs[job_id]
        run.status = "running"
        x, y = run.next_batch()
        request = specs.SessionBatchRequest.model_construct(
            batch=specs.Batch.model_construct(x=x, y=y), encoding="b64"
        )
        job = RunJob(
            "step", run.owner, run.session, request, holder=job_id, include=frozenset({"loss"})
        )
        result = self.sessions.run_many([job])[0]
        run.updated_at = time.time()
        if isinstance(result, GradsvcError):
            self._end(run, "failed", result)
            return
        body = orjson.loads(result.body)
        run.step, run.loss = body["step"], body["loss"]
        run.steps_done += 1
        run.batch += 1
        if run.batch == run.batches:
            run.batch, run.epoch = 0, run.epoch + 1
        if run.steps_done == run.total_steps:
            self._end(run, "succeeded")
        else:
            self.active.append(job_id)

    def view(self, owner: str, job_id: str) -> dict[str, Any]:
        run = self.runs.get(job_id)
        if run is None or run.owner != owner:
            raise NotFound(f"no job {job_id}")
        return run.view()

    def cancel(self, owner: str, job_id: str) -> dict[str, Any]:
        """Stop after the step in progress (there is none: this runs between steps)."""
        view = self.view(owner, job_id)
        run = self.runs[job_id]
        if not run.finished:
            self.active.remove(job_id)
            self._end(run, "cancelled")
            view = run.view()
        return view

    def _end(self, run: TrainingRun, status: str, error: GradsvcError | None = None) -> None:
        run.status, run.updated_at = status, time.time()
        self.finished.append(status)
        if error is not None:
            run.error = {
                "type": error.type,
                "title": error.title,
                "status": error.status,
                "detail": error.detail,
            }
        if self.sessions.held.get(run.session) == run.id:
            del self.sessions.held[run.session]
        run.inputs, run.y, run.order = {}, run.y[:0], None  # the dataset is done with

    def _forget_old(self) -> None:
        finished = [k for k, r in self.runs.items() if r.finished]
        for key in finished[: max(0, len(finished) - KEEP_FINISHED)]:
            del self.runs[key]


def _into_dataset(exc: GradsvcError) -> GradsvcError:
    """Errors found decoding a batch say batch.x / batch.y: here they are dataset's."""
    if exc.loc[:1] == ("batch",):
        exc.loc = ("dataset", *exc.loc[1:])
    return exc
