"""Sessions, executed in a worker process: load → compute → commit, with the store's
compare-and-set.

Every function here returns an ``Answer``: the status, the JSON body as bytes and the headers,
exactly as they are stored for ``Idempotency-Key`` replays. A commit that finds the version
moved (another request, another replica) reads again and recomputes on the newer state; one
that finds its idempotency key taken replays the stored answer instead. So each step is
applied once, in some serial order.

A worker keeps the sessions it computed built (model and optimizer, on its device), keyed by
the version it committed; it reloads one from the store only when the stored version is
newer. Steps that arrive together for sessions of one signature run as one vmapped
computation (``engine.batching``) and commit in one transaction.
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, ParamSpec, TypeVar

import orjson
import torch
from pydantic import Field, TypeAdapter, ValidationError

from service.engine import batching, models, optimizers, specs, state
from service.engine.limits import Limits
from service.engine.step import Result, compute, encode_result
from service.engine.tensors import decode, encode
from service.errors import (
    ComputeTimeout,
    Conflict,
    GradsvcError,
    InvalidInput,
    KeyReused,
    NotFound,
    OutOfMemory,
    PreconditionFailed,
    SpecError,
    TooManyRequests,
    Unavailable,
    short,
)
from service.store import (
    Commit,
    CommitItem,
    Cursor,
    HistoryRow,
    SessionRecord,
    SessionStore,
)
from service.workers import devices
from service.workers.jobs import Answer, Idem, RunJob, etag, iso

MAX_ATTEMPTS = 100
_OPTIMIZER = TypeAdapter(specs.OptimizerSpec)


def replay(store: SessionStore, idem: Idem | None) -> Answer | None:
    """The stored answer for this key, or None; KeyReused if the key named another request."""
    if idem is None:
        return None
    record = store.idempotency(idem.owner, idem.key, time.time())
    if record is None:
        return None
    if record.fingerprint != idem.fingerprint:
        raise KeyReused(
            "this Idempotency-Key was used for a different request; use a new key for a new request"
        )
    return Answer(record.status, record.body, json.loads(record.headers), replayed=True)


def remembered(store: SessionStore, idem: Idem | None, compute: Callable[[], Answer]) -> Answer:
    """An answer that changes no session, stored under its Idempotency-Key (if it has one)."""
    for _ in range(MAX_ATTEMPTS):
        if (stored := replay(store, idem)) is not None:
            return stored
        answer = compute()
        if idem is None or store.remember(idem.record(answer)):
            return answer
    raise GradsvcError("could not store the answer")  # pragma: no cover


@dataclass
class Built:
    """A session's model and optimizer, built, at the store version they stand for."""

    version: int
    spec: specs.SessionSpec
    model: models.Model
    optimizer: torch.optim.Optimizer


@dataclass
class _Prepared:
    index: int
    job: RunJob
    record: SessionRecord
    built: Built
    inputs: models.Inputs

    def entry(self) -> batching.Entry:
        optimizer = self.built.optimizer if self.job.kind == "step" else None
        return batching.Entry(self.built.model, optimizer, self.inputs, self.job.request.batch.y)


R = TypeVar("R")
P = ParamSpec("P")
log = logging.getLogger("gradsvc.worker")


def guarded(fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R | GradsvcError:
    """``fn``'s result, or the problem it amounts to: the domain error it raised, 507 for a
    device out of memory (the worker stays up), 500 for a bug (logged with its traceback)."""
    try:
        return fn(*args, **kwargs)
    except GradsvcError as exc:
        return exc
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return OutOfMemory("the device ran out of memory for this request: send a smaller batch")
    except MemoryError:
        return OutOfMemory("the worker ran out of memory for this request: send a smaller batch")
    except Exception:
        log.exception("computation failed")
        return GradsvcError("the computation failed inside the service; this is a bug")


def _timed_out() -> ComputeTimeout:
    return ComputeTimeout("the request ran past the compute timeout; nothing was changed")


class Sessions:
    def __init__(
        self,
        store: SessionStore,
        limits: Limits,
        max_per_owner: int = 0,
        *,
        device: str = "cpu",
        cache_size: int = 1024,
        batching: bool = True,
    ) -> None:
        self.store = store
        self.limits = limits
        self.max_per_owner = max_per_owner
        self.device = device
        self.cache_size = cache_size
        self.cache: OrderedDict[str, Built] = OrderedDict()
        self.batching = batching
        self.steps = 0
        """steps committed, since drain_steps() last asked"""
        self.held: dict[str, str] = {}
        """session id → the training job that holds it (in this worker)"""

    def drain_steps(self) -> int:
        steps, self.steps = self.steps, 0
        return steps

    def check_free(self, session_id: str, holder: str | None = None) -> None:
        """Conflict if a training job other than ``holder`` holds the session."""
        job = self.held.get(session_id)
        if job is not None and job != holder:
            raise Conflict(
                f"training job {job} holds this session; wait for it, or cancel it with "
                f"DELETE /v1/jobs/{job}"
            )

    # -- building ---------------------------------------------------------------------------

    def _spec(self, record: SessionRecord) -> specs.SessionSpec:
        return specs.SessionSpec.model_validate_json(record.spec)

    def _build(
        self, spec: specs.SessionSpec, data: bytes | None = None
    ) -> tuple[models.Model, torch.optim.Optimizer]:
        if (
            spec.device.startswith("cuda")
            and spec.device.partition(":")[2]
            and (int(spec.device.partition(":")[2]) >= devices.cuda_count())
        ):
            raise Unavailable(f"this session lives on {spec.device}, which this server lacks")
        model = models.build(spec.model, self.limits, spec.device)
        optimizer = optimizers.build(spec.optimizer, model.trainable().values())
        if data is not None:
            state.restore(model, optimizer, data)
        return model, optimizer

    def fetch(self, owner: str, session_id: str) -> SessionRecord:
        """The owner's session, or NotFound (another owner's is not found either)."""
        record = self.store.get(owner, session_id)
        if record is None:
            raise NotFound(f"no session {session_id}")
        return record

    # -- views ------------------------------------------------------------------------------

    def page(
        self, owner: str, limit: int, after: Cursor | None
    ) -> tuple[list[dict[str, Any]], SessionRecord | None]:
        """A page of the owner's sessions as views, and the last one if more follow: one trip
        to the compute pool for the whole page, not one per session."""
        records = self.store.sessions(owner, limit + 1, after)
        last = records[limit - 1] if len(records) > limit else None
        return [self.view(r) for r in records[:limit]], last

    def view(self, record: SessionRecord, b64: bool = False) -> dict[str, Any]:
        spec = json.loads(record.spec)
        tensors, _ = state.read(record.state)
        params = {
            name[len(state.PARAM) :]: encode(t, b64)
            for name, t in tensors.items()
            if name.startswith(state.PARAM)
        }
        return {
            "id": record.id,
            "name": record.name,
            **spec,
            "step": record.step,
            "version": record.version,
            "job": self.held.get(record.id),
            "params": params,
            "created_at": iso(record.created_at),
            "updated_at": iso(record.updated_at),
        }

    def read(self, owner: str, session_id: str) -> Answer:
        """GET /v1/sessions/{id}: the session and its ETag."""
        record = self.fetch(owner, session_id)
        return self._answer(200, self.view(record), record)

    def _answer(self, status: int, body: dict[str, Any], record: SessionRecord) -> Answer:
        headers = {"ETag": etag(record)}
        if status == 201:
            headers["Location"] = f"/v1/sessions/{record.id}"
        return Answer(status, orjson.dumps(body), headers)

    # -- create, restore --------------------------------------------------------------------

    def create(
        self, owner: str, session_id: str, request: specs.SessionCreate, idem: Idem | None
    ) -> Answer:
        if (stored := replay(self.store, idem)) is not None:
            return stored
        spec = specs.SessionSpec.model_validate(request.model_dump(exclude={"name"}))
        spec = spec.model_copy(update={"device": self._device(spec.device)})
        model, optimizer = self._build(spec)
        data = state.dump(model, optimizer, {})
        return self._insert(owner, session_id, spec, request.name, 0, data, idem)

    def restore(self, owner: str, session_id: str, data: bytes, idem: Idem | None) -> Answer:
        if (stored := replay(self.store, idem)) is not None:
            return stored
        _, metadata = state.read(data)
        try:
            spec = specs.SessionSpec.model_validate_json(metadata.get("gradsvc.spec", ""))
            meta = _CHECKPOINT_META.validate_json(metadata.get("gradsvc.session", "{}"))
        except ValidationError as exc:
            first = exc.errors()[0]
            raise InvalidInput(
                f"the checkpoint's metadata is not valid: {'.'.join(map(str, first['loc']))}: "
                f"{first['msg']}"
            ) from None
        spec = spec.model_copy(update={"device": self._device(spec.device)})
        model, optimizer = self._build(spec, data)
        dumped = state.dump(model, optimizer, {})
        return self._insert(owner, session_id, spec, meta.name, meta.step, dumped, idem)

    def _device(self, requested: str) -> str:
        return devices.session_device(requested, self.device)

    def _insert(
        self,
        owner: str,
        session_id: str,
        spec: specs.SessionSpec,
        name: str | None,
        step_no: int,
        data: bytes,
        idem: Idem | None,
    ) -> Answer:
        for _ in range(MAX_ATTEMPTS):
            now = time.time()
            record = SessionRecord(
                session_id,
                owner,
                name,
                spec.model_dump_json(exclude_defaults=True),
                data,
                step_no,
                1,
                now,
                now,
            )
            answer = self._answer(201, self.view(record), record)
            outcome = self.store.create(
                record, idem.record(answer) if idem else None, self.max_per_owner
            )
            if outcome is Commit.OK:
                return answer
            if outcome is Commit.FULL:
                raise TooManyRequests(
                    f"this key already has {self.max_per_owner} sessions, the limit: "
                    "delete some first",
                    retry_after=60,
                )
            if (stored := replay(self.store, idem)) is not None:
                return stored
        raise GradsvcError("could not create the session")  # pragma: no cover

    def checkpoint(self, owner: str, session_id: str) -> tuple[bytes, SessionRecord]:
        record = self.fetch(owner, session_id)
        meta = CheckpointMeta(name=record.name, step=record.step)
        data = state.with_metadata(
            record.state,
            {"gradsvc.spec": record.spec, "gradsvc.session": meta.model_dump_json()},
        )
        return data, record

    # -- steps ------------------------------------------------------------------------------

    def run(self, job: RunJob) -> Answer:
        """A step, gradients or forward on one session."""
        result = self.run_many([job])[0]
        if isinstance(result, GradsvcError):
            raise result
        return result

    def run_many(self, jobs: Sequence[RunJob]) -> list[Answer | GradsvcError]:
        """Jobs in arrival order, each applied exactly as ``run`` would apply it alone.

        They go in rounds: a round takes each session's earliest job not yet done, so one
        session's jobs keep their order while different sessions' jobs share a round (and,
        where their signatures match, one vmapped computation). A session's next round
        starts from the state its last round left, not yet committed; then every round's
        commits go to the store together, in order, in one transaction (a group commit), and
        only then is anything answered. A job whose commit lost a race (another replica moved
        the session) goes again, with the jobs after it on that session, on the newer state."""
        results: list[Answer | GradsvcError | None] = [None] * len(jobs)
        attempts = [0] * len(jobs)
        pending = list(range(len(jobs)))
        while pending:
            staged: dict[str, SessionRecord] = {}
            commits: list[tuple[_Prepared, Answer, CommitItem]] = []
            again: list[int] = []
            todo = pending
            while todo:
                current: list[int] = []
                later: list[int] = []
                seen: set[str] = set()
                for i in todo:
                    (later if jobs[i].session_id in seen else current).append(i)
                    seen.add(jobs[i].session_id)
                again += self._round(jobs, current, results, staged, commits)
                todo = later
            again += self._commit(commits, results)
            for i in again:
                attempts[i] += 1
                if attempts[i] >= MAX_ATTEMPTS:  # pragma: no cover
                    results[i] = GradsvcError("the session kept moving; gave up")
            pending = sorted(i for i in set(again) if results[i] is None)
        return [r if r is not None else GradsvcError("not computed") for r in results]

    def _round(
        self,
        jobs: Sequence[RunJob],
        indices: list[int],
        results: list[Answer | GradsvcError | None],
        staged: dict[str, SessionRecord],
        commits: list[tuple[_Prepared, Answer, CommitItem]],
    ) -> list[int]:
        """One job per session: prepare, compute (grouped), stage the steps' commits. The
        indices of jobs to go again (after this pass's commit) come back."""
        ready: list[_Prepared] = []
        again: list[int] = []
        for i in indices:
            job = jobs[i]
            if job.kind != "step" and job.session_id in staged:
                again.append(i)  # it must see the staged step committed: next pass
                continue
            try:
                prepared = self._prepare(i, job, staged.get(job.session_id))
            except GradsvcError as exc:
                results[i] = exc
                continue
            if isinstance(prepared, Answer):
                results[i] = prepared
            else:
                ready.append(prepared)
        for prepared, outcome in self._computed(ready):
            job = prepared.job
            if isinstance(outcome, GradsvcError):
                if job.kind == "step":
                    self._evict(job.session_id)
                    staged.pop(job.session_id, None)
                results[prepared.index] = outcome
                continue
            answer, new, history = self._answered(prepared, outcome)
            if new is None:  # gradients and forward change nothing
                if job.idem is not None and not self.store.remember(job.idem.record(answer)):
                    again.append(prepared.index)
                else:
                    results[prepared.index] = answer
                continue
            if time.time() > job.deadline:
                self._evict(job.session_id)
                staged.pop(job.session_id, None)
                results[prepared.index] = _timed_out()
                continue
            idem = job.idem.record(answer) if job.idem else None
            commits.append((prepared, answer, CommitItem(new, new.version, history, idem)))
            staged[job.session_id] = replace(new, version=new.version + 1)
            prepared.built.version = new.version + 1
        return again

    def _commit(
        self,
        commits: list[tuple[_Prepared, Answer, CommitItem]],
        results: list[Answer | GradsvcError | None],
    ) -> list[int]:
        """The pass's staged steps, in one transaction; the jobs to go again come back."""
        try:
            statuses = self.store.commit_many([c[2] for c in commits]) if commits else []
        except GradsvcError:  # store trouble: nothing committed, so no built state stands
            for prepared, _, _ in commits:
                self._evict(prepared.job.session_id)
            raise
        again: list[int] = []
        lost: set[str] = set()
        for (prepared, answer, item), status in zip(commits, statuses, strict=True):
            sid = prepared.job.session_id
            if sid in lost:  # computed on a step that did not commit
                again.append(prepared.index)
            elif status is Commit.OK:
                self.steps += 1
                self._keep(sid, item.expected_version + 1, prepared.built)
                results[prepared.index] = answer
            else:
                self._evict(sid)
                lost.add(sid)
                if status is Commit.GONE:
                    results[prepared.index] = NotFound(f"no session {sid}")
                else:
                    again.append(prepared.index)
        return again

    def _prepare(
        self, index: int, job: RunJob, staged: SessionRecord | None = None
    ) -> _Prepared | Answer:
        if time.time() > job.deadline:
            raise _timed_out()
        if (stored := replay(self.store, job.idem)) is not None:
            return stored
        record = staged or self.fetch(job.owner, job.session_id)
        if job.kind == "step":
            self.check_free(job.session_id, job.holder)
        if job.if_match is not None and job.if_match != etag(record) and job.if_match != "*":
            raise PreconditionFailed(
                f"the session is at {etag(record)}, not {short(job.if_match)}: read it again"
            )
        built = self.load(record)
        inputs = built.model.decode_inputs(job.request.batch.x, self.limits)
        return _Prepared(index, job, record, built, inputs)

    def _computed(
        self, ready: list[_Prepared]
    ) -> Iterator[tuple[_Prepared, Result | GradsvcError]]:
        """Each prepared job with its result: like jobs as one batched call, the rest alone."""
        groups: dict[Hashable, list[_Prepared]] = {}
        for prepared in ready:
            key = self._signature(prepared) if self.batching and len(ready) > 1 else None
            groups.setdefault(key if key is not None else ("alone", prepared.index), []).append(
                prepared
            )
        for group in groups.values():
            if len(group) == 1:
                yield group[0], guarded(self._compute_one, group[0])
                continue
            first = group[0]
            entries = [p.entry() for p in group]
            outcomes = guarded(
                batching.run_group, first.job.kind, first.built.spec, entries, self.limits
            )
            if isinstance(outcomes, GradsvcError):
                for prepared in group:
                    yield prepared, outcomes
            else:
                yield from zip(group, outcomes, strict=True)

    def _signature(self, prepared: _Prepared) -> Hashable | None:

        request = prepared.job.request
        explain = isinstance(request, specs.SessionGradientsRequest) and request.explain
        return batching.signature(prepared.job.kind, prepared.built.spec, prepared.entry(), explain)

    def _compute_one(self, prepared: _Prepared) -> Result:
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
            explain=isinstance(job.request, specs.SessionGradientsRequest) and job.request.explain,
            seed=spec.model.seed + record.step,
            limits=self.limits,
        )

    def _answered(
        self, prepared: _Prepared, result: Result
    ) -> tuple[Answer, SessionRecord | None, HistoryRow | None]:
        job, record, built = prepared.job, prepared.record, prepared.built
        b64 = job.request.encoding == "b64"
        if job.kind != "step":
            return self._answer(200, encode_result(result, b64, job.include), record), None, None
        now = time.time()
        data = state.dump(built.model, built.optimizer, {})
        new = replace(record, state=data, step=record.step + 1, updated_at=now)
        assert result.loss is not None and result.grad_norm is not None
        history = HistoryRow(new.step, result.loss.item(), result.grad_norm.item(), now)
        body = {"step": new.step, **encode_result(result, b64, job.include)}
        return self._answer(200, body, replace(new, version=record.version + 1)), new, history

    # -- the cache of built sessions --------------------------------------------------------

    def load(self, record: SessionRecord) -> Built:
        cached = self.cache.get(record.id)
        if cached is not None and cached.version == record.version:
            self.cache.move_to_end(record.id)
            return cached
        spec = self._spec(record)
        model, optimizer = self._build(spec, record.state)
        built = Built(record.version, spec, model, optimizer)
        self._keep(record.id, record.version, built)
        return built

    def _keep(self, session_id: str, version: int, built: Built) -> None:
        if self.cache_size <= 0:
            return
        built.version = version
        self.cache[session_id] = built
        self.cache.move_to_end(session_id)
        while len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)

    def _evict(self, session_id: str) -> None:
        self.cache.pop(session_id, None)

    def delete(self, owner: str, session_id: str) -> None:
        self.fetch(owner, session_id)
        self.check_free(session_id)
        self._evict(session_id)
        if not self.store.delete(owner, session_id):
            raise NotFound(f"no session {session_id}")

    def history(self, owner: str, session_id: str, limit: int, after: int) -> list[HistoryRow]:
        self.fetch(owner, session_id)
        return self.store.history(owner, session_id, limit, after)

    # -- patch, delete, history -------------------------------------------------------------

    def patch(
        self,
        owner: str,
        session_id: str,
        patch: specs.SessionPatch,
        if_match: str | None,
    ) -> Answer:
        for _ in range(MAX_ATTEMPTS):
            record = self.fetch(owner, session_id)
            self.check_free(session_id)
            if if_match is not None and if_match != etag(record) and if_match != "*":
                raise PreconditionFailed(
                    f"the session is at {etag(record)}, not {short(if_match)}: read it again"
                )
            spec = self._spec(record)
            if patch.optimizer is not None:
                spec = spec.model_copy(
                    update={"optimizer": _patched_optimizer(spec, patch.optimizer)}
                )
            model, optimizer = self._build(spec, record.state)
            if patch.params is not None:
                _set_params(model, patch.params, self.limits)
            new = replace(
                record,
                name=patch.name if "name" in patch.model_fields_set else record.name,
                spec=spec.model_dump_json(exclude_defaults=True),
                state=state.dump(model, optimizer, {}),
                updated_at=time.time(),
            )
            self._evict(session_id)
            outcome = self.store.commit(new, record.version)
            if outcome is Commit.OK:
                new = replace(new, version=record.version + 1)
                return self._answer(200, self.view(new), new)
            if outcome is Commit.GONE:
                raise NotFound(f"no session {session_id}")
        raise GradsvcError("the session kept moving; gave up")  # pragma: no cover


class CheckpointMeta(specs.Spec):
    name: str | None = Field(default=None, max_length=200)
    step: int = Field(default=0, ge=0, lt=2**62)


_CHECKPOINT_META = TypeAdapter(CheckpointMeta)


def _patched_optimizer(spec: specs.SessionSpec, changes: dict[str, Any]) -> Any:
    if "type" in changes and changes["type"] != spec.optimizer.type:
        raise SpecError("PATCH cannot change the optimizer's type", loc=("optimizer", "type"))
    try:
        return _OPTIMIZER.validate_python({**spec.optimizer.model_dump(), **changes})
    except ValidationError as exc:
        first = exc.errors()[0]
        raise SpecError(
            f"{'.'.join(map(str, first['loc'][1:]))}: {first['msg']}", loc=("optimizer",)
        ) from None


def _set_params(model: models.Model, values: dict[str, Any], limits: Limits) -> None:
    params = model.named_parameters()
    for name, value in values.items():
        if name not in params:
            raise SpecError(f"unknown parameter {short(name)}", loc=("params", name))
        try:
            tensor = decode(value, model.dtype, limits)
        except GradsvcError as exc:
            raise exc.at("params", name) from None
        if tensor.shape != params[name].shape:
            raise SpecError(
                f"{name} has shape {list(params[name].shape)}, not {list(tensor.shape)}",
                loc=("params", name),
            )
        with torch.no_grad():
            params[name].copy_(tensor)
