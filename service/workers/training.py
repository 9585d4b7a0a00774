"""Starting training jobs: the dataset checked at once, the job created in the store.

The session's worker decodes and checks the dataset (a bad one is a 422 before anything
starts), then creates the job in the store in one atomic step with its session's hold and
its Idempotency-Key: on every replica the session is then the job's, and one key makes one
job. Any live worker then runs it (``service.workers.runner``).
"""

from __future__ import annotations

import json
import math
import time

import orjson
import torch
from safetensors.torch import save as save_tensors

from service.engine import budget, losses, models, specs
from service.engine.limits import Limits
from service.errors import GradsvcError, InvalidInput, NotFound, ShapeError
from service.store import Commit, JobRecord, SessionRecord
from service.workers import quotas
from service.workers.idempotent import replay
from service.workers.jobs import Answer, Idem, job_view
from service.workers.runner import Runner
from service.workers.sessions import MAX_ATTEMPTS, Sessions


class Trainer:
    def __init__(
        self,
        sessions: Sessions,
        limits: Limits,
        max_steps: int,
        runner: Runner,
        max_jobs_per_key: int = 0,
    ) -> None:
        self.sessions, self.limits, self.max_steps = sessions, limits, max_steps
        self.runner, self.max_jobs_per_key = runner, max_jobs_per_key

    def start(
        self,
        owner: str,
        session_id: str,
        job_id: str,
        request: specs.TrainRequest,
        idem: Idem | None = None,
    ) -> Answer:
        """Check the dataset and create the job; under an Idempotency-Key, a retry (on any
        replica) gets the first job back."""
        store = self.sessions.store
        if (stored := replay(store, idem)) is not None:
            return stored
        record = self._free(owner, session_id, idem)
        if isinstance(record, Answer):
            return record
        inputs, y = self._dataset(record, request)
        self._check_batch_norm_rows(record, request, inputs, y)
        self._budget(record, request, inputs, y)
        total = request.epochs * math.ceil(int(y.shape[0]) / request.batch_size)
        if total > self.max_steps:
            raise InvalidInput(
                f"the job would take {total} steps; one job may take "
                f"{self.max_steps}: fewer epochs or larger batches",
                loc=("epochs",),
            )
        spec = request.model_dump(include={"epochs", "batch_size", "shuffle", "seed"})
        tensors = {f"x.{k}": v.detach().cpu().contiguous() for k, v in inputs.items()}
        tensors["y"] = y.detach().cpu().contiguous()
        now = time.time()
        job = JobRecord(
            job_id,
            owner,
            session_id,
            json.dumps({**spec, "rows": int(y.shape[0])}),
            save_tensors(tensors),
            record.step,
            now,
            now,
            step=record.step,
        )
        answer = Answer(202, orjson.dumps(job_view(job)), {"Location": f"/v1/jobs/{job_id}"})
        for _ in range(MAX_ATTEMPTS):
            outcome = store.create_job(
                job, idem.record(answer) if idem else None, self.max_jobs_per_key
            )
            if outcome is Commit.OK:
                self.runner.wake()  # this worker may well be free to run it
                return answer
            if outcome is Commit.GONE:
                raise NotFound(f"no session {session_id}")
            if outcome is Commit.FULL:
                raise quotas.jobs(self.max_jobs_per_key)
            if outcome is Commit.QUOTA:
                raise quotas.stored_bytes(store, owner)
            if outcome is Commit.BUSY:
                if isinstance(held := self._free(owner, session_id, idem), Answer):
                    return held
            elif (stored := replay(store, idem)) is not None:
                return stored
        raise GradsvcError("could not create the job")  # pragma: no cover

    def _budget(
        self,
        record: SessionRecord,
        request: specs.TrainRequest,
        inputs: dict[str, torch.Tensor],
        y: torch.Tensor,
    ) -> None:
        """TooLarge unless one mini-batch's step, with the dataset held beside it (decoded,
        and as the job's file), fits the memory budget: refused before the job starts."""
        rows = request.batch_size
        batch = specs.Batch.model_construct(x={k: v[:rows] for k, v in inputs.items()}, y=y[:rows])
        spec = self.sessions.load(record).spec
        found = budget.session("step", spec, batch, self.limits, b64=True, include=("loss",))
        if found is None:
            return
        dataset = sum(t.nbytes for t in inputs.values()) + y.nbytes
        whole = budget.Estimate(
            found.tensors + dataset,
            found.host + dataset,
            {**found.parts, "batch": found.parts.get("batch", 0) + 2 * dataset},
        )
        budget.check(
            whole,
            self.limits,
            "this job (one mini-batch, and its dataset)",
            "use a smaller batch_size, or a smaller dataset",
        )

    def _check_batch_norm_rows(
        self,
        record: SessionRecord,
        request: specs.TrainRequest,
        inputs: dict[str, torch.Tensor],
        y: torch.Tensor,
    ) -> None:
        """ShapeError if a mini-batch of the job is one batch-norm refuses in train mode (one
        value per channel: the last batch of an epoch may hold a single row). Found here, on
        the meta device, rather than by the job after it has committed steps.

        Raises:
            ShapeError: a batch-norm layer cannot train on one of the job's batch sizes.
        """
        model = self.sessions.load(record).model
        if not (model.has_batch_norm and isinstance(model.spec, specs.SequentialModel)):
            return
        rows, size = int(y.shape[0]), request.batch_size
        x = inputs["x"]
        meta = torch.nn.Sequential(
            *(
                models.layer_module(layer, model.dtype, ("layers", i), "meta")
                for i, layer in enumerate(model.spec.layers)
            )
        ).train()
        for n in sorted({min(size, rows), rows % size or size}):
            try:
                meta(torch.empty((n, *x.shape[1:]), dtype=x.dtype, device="meta"))
            except (RuntimeError, ValueError, IndexError) as exc:
                reason = str(exc).split("\n", 1)[0][:200]
                raise ShapeError(
                    f"with batch_size {size}, a mini-batch of these {rows} rows holds {n}, "
                    f"which the model's batch-norm cannot train on (torch: {reason}): choose "
                    "a batch_size that leaves no such batch at the end of an epoch",
                    loc=("batch_size",),
                ) from None

    def _free(self, owner: str, session_id: str, idem: Idem | None) -> SessionRecord | Answer:
        """The session, if no job holds it; else the answer stored under this request's key
        (the job holding it may be this very request's, started on another replica: the key
        and the hold are written together), or SessionBusy."""
        record = self.sessions.fetch(owner, session_id)
        if record.hold is not None and (stored := replay(self.sessions.store, idem)) is not None:
            return stored
        self.sessions.check_free(record)
        return record

    def _dataset(
        self, record: SessionRecord, request: specs.TrainRequest
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        built = self.sessions.load(record)
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
        if y.shape[0] == 0:
            raise ShapeError("the dataset has no rows", loc=("dataset",))
        return inputs, y


def _into_dataset(exc: GradsvcError) -> GradsvcError:
    """Errors found decoding a batch say batch.x / batch.y: here they are dataset's."""
    if exc.loc[:1] == ("batch",):
        exc.loc = ("dataset", *exc.loc[1:])
    return exc
