"""What a run of session jobs tells the worker as it goes, and asks of it (no torch here: the
worker's module, which the pool imports, names it)."""

from __future__ import annotations

from service.errors import GradsvcError
from service.workers.jobs import Answer, RunJob

Outcome = Answer | GradsvcError


class Watcher:
    """What a run tells its caller as it goes, and asks of it; by default, nothing, and
    each job's own deadline."""

    def done(self, i: int, outcome: Outcome) -> None:
        """Job i's outcome is final (called once per job, as soon as it is)."""

    def progress(self, indices: list[int], writes: bool) -> None:
        """These jobs are about to be computed (``writes`` False) or written to the store."""

    def deadline(self, i: int, job: RunJob) -> float:
        """time.time() past which job i must not be computed on or committed."""
        return job.deadline
