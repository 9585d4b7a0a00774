"""Running training jobs: any live worker claims a job from the store and advances it.

Between requests a worker claims a runnable job (a queued one, or one whose runner's lease
lapsed because it died), keeps the lease renewed and advances the job one mini-batch at a
time, taking turns with its other jobs. Each mini-batch is an ordinary step through the
sessions runner, committed with its history row before the next, with the job as holder
(nobody else may commit the session meanwhile) and an If-Match on the version the runner
last saw, so a runner that lost its lease cannot apply a mini-batch twice. The session's step
is therefore the truth about progress: ``steps_done = session.step - start_step``. A resumed
job recomputes where it is from that and the epoch's order from ``seed + epoch`` alone, so it
ends with exactly the parameters an uninterrupted run would have had. Cancelling sets a flag
the runner sees at its next report; the session keeps its last completed step.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import secrets
import socket
import time
from dataclasses import dataclass

import orjson
import torch
from safetensors.torch import load as load_tensors

from service.engine import specs
from service.errors import GradsvcError, NotFound, PreconditionFailed, SessionBusy
from service.store import JobRecord, Progress
from service.workers.compute import guarded
from service.workers.jobs import RunJob, etag
from service.workers.sessions import Sessions

LEASE_SECONDS = 10.0
"""A runner that has not renewed its lease for this long is presumed dead."""
RENEW_SECONDS = 3.0
REPORT_SECONDS = 0.1
"""How often a runner writes its progress (event streams show at most ten a second)."""
CLAIM_SECONDS = 0.5
"""How often a worker asks the store for a runnable job."""
MAX_RUNS = 4
"""Jobs one worker runs at once, a mini-batch each in turn."""
MAX_JOB_FAILURES = 5
"""Runs of a job that may stop on a fault of the service's (a store outage, a lost worker)
before the job is failed: the client's own errors (a non-finite loss) fail it at once, and a
drain's hand-over is no fault (``JobRecord.failures`` counts these; ``attempts`` every run)."""
log = logging.getLogger("gradsvc.worker")


@dataclass
class Run:
    """A job this worker holds the lease of, with its dataset decoded on the session's device."""

    job: JobRecord
    epochs: int
    batch_size: int
    shuffle: bool
    seed: int
    inputs: dict[str, torch.Tensor]
    y: torch.Tensor
    etag: str
    step: int
    renewed: float
    """time.monotonic() of the last lease renewal"""
    reported: float
    loss: float | None = None
    order: torch.Tensor | None = None
    order_epoch: int = -1

    @property
    def rows(self) -> int:
        return int(self.y.shape[0])

    @property
    def batches(self) -> int:
        return math.ceil(self.rows / self.batch_size)

    @property
    def total_steps(self) -> int:
        return self.epochs * self.batches

    @property
    def steps_done(self) -> int:
        return self.step - self.job.start_step

    def progress(self) -> Progress:
        epoch, batch = divmod(self.steps_done, self.batches)
        return Progress(epoch, batch, self.steps_done, self.step, self.loss)

    def next_batch(self) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The next mini-batch: the epoch's order is a function of seed and epoch alone."""
        epoch, batch = divmod(self.steps_done, self.batches)
        if self.order is None or self.order_epoch != epoch:
            if self.shuffle:
                generator = torch.Generator().manual_seed(self.seed + epoch)
                self.order = torch.randperm(self.rows, generator=generator)
            else:
                self.order = torch.arange(self.rows)
            self.order_epoch = epoch
        rows = self.order[batch * self.batch_size : (batch + 1) * self.batch_size]
        return {k: v[rows] for k, v in self.inputs.items()}, self.y[rows]


class Runner:
    """The jobs this worker holds the leases of."""

    def __init__(self, sessions: Sessions, job_ttl: float) -> None:
        self.sessions, self.job_ttl = sessions, job_ttl
        self.worker = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.runs: dict[str, Run] = {}
        self._turns = itertools.count()
        self._next_claim = 0.0
        self.finished: list[str] = []
        """how jobs ended (and ``resumed`` for each taken up again), since drain_finished()
        last asked"""
        self.handed_over = False
        """the server is draining: this worker claims no more jobs"""

    def drain_finished(self) -> list[str]:
        finished, self.finished = self.finished, []
        return finished

    @property
    def busy(self) -> bool:
        return bool(self.runs)

    def wake(self) -> None:
        """A job was just created: look for one at the next turn, not half a second on."""
        self._next_claim = 0.0

    def idle_wait(self) -> float:
        """How long an idle worker may wait for a request before it looks for a job."""
        return max(0.01, self._next_claim - time.monotonic())

    def tick(self) -> None:
        """Claim a job when it is time to look (never more than every CLAIM_SECONDS), and
        renew the leases that are due: cheap when neither is."""
        now = time.monotonic()
        for run in list(self.runs.values()):
            if now - run.renewed >= RENEW_SECONDS:
                self._report(run)
        if now >= self._next_claim and len(self.runs) < MAX_RUNS and not self.handed_over:
            self._next_claim = now + CLAIM_SECONDS
            job = self.sessions.store.claim_job(self.worker, time.time(), LEASE_SECONDS)
            if job is not None:
                self._next_claim = 0.0  # there may be more
                outcome = guarded(self._resume, job)
                if isinstance(outcome, GradsvcError):
                    if outcome.status >= 500 and job.failures + 1 < MAX_JOB_FAILURES:
                        self._let_go(job, failed=True)  # this worker cannot run it; another may
                    else:
                        self._finish(job, _reported(job), "failed", outcome)

    def _resume(self, job: JobRecord) -> None:
        """Take up a claimed job where its session is: its first run, or the next one."""
        record = self.sessions.store.get(job.owner, job.session)
        if record is None or record.hold != job.id:
            raise NotFound(f"the session {job.session} of this job is gone")
        spec = json.loads(job.spec)
        built = self.sessions.load(record)
        device = built.model.device
        tensors = load_tensors(job.dataset)
        inputs = {k[2:]: v.to(device) for k, v in tensors.items() if k.startswith("x.")}
        now = time.monotonic()
        run = Run(
            job,
            spec["epochs"],
            spec["batch_size"],
            spec["shuffle"],
            spec["seed"],
            inputs,
            tensors["y"].to(device),
            etag(record),
            record.step,
            now,
            now,
            loss=job.loss,
        )
        if job.cancel:
            self._finish(run.job, run.progress(), "cancelled")
        elif run.steps_done >= run.total_steps:  # its runner died between the last step and the end
            self._finish(run.job, run.progress(), "succeeded")
        else:
            self.runs[job.id] = run
            if job.attempts > 1:
                self.finished.append("resumed")
                log.info("resuming job %s at step %d (attempt %d)", job.id, run.step, job.attempts)

    def advance(self) -> None:
        """One mini-batch of the job whose turn it is (jobs take turns, step by step)."""
        ids = list(self.runs)
        run = self.runs[ids[next(self._turns) % len(ids)]]
        x, y = run.next_batch()
        request = specs.SessionBatchRequest.model_construct(
            batch=specs.Batch.model_construct(x=x, y=y), encoding="b64"
        )
        step = RunJob(
            "step",
            run.job.owner,
            run.job.session,
            request,
            if_match=run.etag,
            holder=run.job.id,
            include=frozenset({"loss"}),
        )
        results = guarded(self.sessions.run_many, [step])
        result = results if isinstance(results, GradsvcError) else results[0]
        if isinstance(result, PreconditionFailed):  # the session moved: where is it now?
            self._resync(run)
            return
        if isinstance(result, SessionBusy):  # the job is no longer ours to run
            del self.runs[run.job.id]
            return
        if isinstance(result, GradsvcError):
            if result.status >= 500 and run.job.failures + 1 < MAX_JOB_FAILURES:
                # Ours, not the job's: let the lease lapse; a worker resumes it from the step.
                log.warning("job %s stopped here: %s", run.job.id, result.detail)
                guarded(self._let_go, run.job, run.progress(), failed=True)
                return
            self._finish(run.job, run.progress(), "failed", result)
            return
        body = orjson.loads(result.body)
        run.step, run.loss, run.etag = body["step"], body["loss"], result.headers["ETag"]
        if run.steps_done >= run.total_steps:
            self._finish(run.job, run.progress(), "succeeded")
        elif time.monotonic() - run.reported >= REPORT_SECONDS:
            self._report(run)

    def _resync(self, run: Run) -> None:
        record = self.sessions.store.get(run.job.owner, run.job.session)
        if record is None or record.hold != run.job.id:
            del self.runs[run.job.id]
            return
        run.etag, run.step = etag(record), record.step

    def _report(self, run: Run) -> None:
        """Renew the lease and write the progress; stop if the lease is lost or a cancel came."""
        run.renewed = run.reported = time.monotonic()  # a failing store is not asked at once
        job = self.sessions.store.renew_lease(
            run.job.id, self.worker, time.time(), LEASE_SECONDS, run.progress()
        )
        if job is None:
            log.warning("lost the lease of job %s; another worker runs it", run.job.id)
            del self.runs[run.job.id]
        elif job.cancel:
            self._finish(run.job, run.progress(), "cancelled")

    def _finish(
        self, job: JobRecord, progress: Progress, status: str, error: GradsvcError | None = None
    ) -> None:
        problem = None
        if error is not None:
            problem = json.dumps(
                {
                    "type": error.type,
                    "title": error.title,
                    "status": error.status,
                    "detail": error.detail,
                }
            )
        self.runs.pop(job.id, None)
        if self.sessions.store.finish_job(
            job.id, self.worker, status, progress, problem, time.time(), self.job_ttl
        ):
            self.finished.append(status)

    def _let_go(
        self, job: JobRecord, progress: Progress | None = None, *, failed: bool = False
    ) -> None:
        """End this worker's lease now (a lease that already lapsed): any worker may claim
        the job at once. ``failed``: the run stopped on a fault of the service's, which
        counts towards ``MAX_JOB_FAILURES``; a clean stop or a hand-over does not."""
        self.runs.pop(job.id, None)
        failures = job.failures + 1 if failed else None
        self.sessions.store.renew_lease(
            job.id, self.worker, time.time(), -1.0, progress, failures=failures
        )

    def release(self) -> None:
        """On a clean stop, let the leases go: another worker takes over at once."""
        for run in list(self.runs.values()):
            guarded(self._let_go, run.job, run.progress())

    def hand_over(self) -> int:
        """The server drains: let every lease go now (a live worker elsewhere resumes each
        job from its last committed step at its next look, not after the lease lapses) and
        claim no more. Returns how many jobs were let go."""
        self.handed_over = True
        held = len(self.runs)
        self.release()
        if held:
            log.info("handed over %d training jobs: this server is draining", held)
        return held


def _reported(job: JobRecord) -> Progress:
    return Progress(job.epoch, job.batch, job.steps_done, job.step, job.loss)
