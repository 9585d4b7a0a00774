"""Sessions in a worker process: create, restore, read, patch, delete, and the entry to steps.

Every function here returns an ``Answer``: the status, the JSON body as bytes and the headers,
exactly as they are stored for ``Idempotency-Key`` replays. Steps, gradients and forwards go
through ``rounds`` (chains that commit as a prefix, batched across sessions); built models
are kept by ``cache`` (trusted only at a committed version); replays are ``idempotent``'s.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import orjson
import torch
from pydantic import Field, TypeAdapter, ValidationError

from service.engine import budget, models, optimizers, schedulers, specs, state
from service.engine.limits import Limits
from service.engine.tensors import decode, encode
from service.errors import (
    GradsvcError,
    InvalidInput,
    NotFound,
    PreconditionFailed,
    SessionBusy,
    SpecError,
    Unavailable,
    short,
)
from service.store import (
    Commit,
    Cursor,
    HistoryRow,
    SessionRecord,
    SessionStore,
)
from service.workers import devices, quotas, rounds, verbs
from service.workers.cache import Built, BuiltCache, SessionKey
from service.workers.idempotent import replay
from service.workers.jobs import Answer, Idem, RunJob, etag, iso
from service.workers.watch import Watcher

MAX_ATTEMPTS = 100
_OPTIMIZER = TypeAdapter(specs.OptimizerSpec)

VIEW_HINT = "download the session with GET /v1/sessions/{id}/checkpoint instead"
CREATE_HINT = (
    "a session's answer shows its parameters as JSON, and this one's would not fit: use fewer "
    "parameters (or a server with a larger --max-answer-bytes)"
)
PAGE_HINT = (
    "ask for fewer sessions per page (limit), leave include=params out, or download each "
    "with GET /v1/sessions/{id}/checkpoint"
)
BULK_HINT = (
    'ask for less with "include" (e.g. ["loss"]) or for "encoding": "b64", or send fewer '
    "items per request"
)


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
        self.cache = BuiltCache(cache_size)
        self.batching = batching
        self.steps = 0
        """steps committed, since drain_steps() last asked"""

    def drain_steps(self) -> int:
        steps, self.steps = self.steps, 0
        return steps

    def refuse(self, outcome: Commit, owner: str, session_id: str) -> None:
        """Raise what a refused read-modify-write commit means to its caller: the session is
        gone, or the key's stored bytes are over its quota. A CONFLICT or BUSY returns: the
        caller reads the session again (a hold is then refused by ``check_free``)."""
        if outcome is Commit.GONE:
            raise NotFound(f"no session {session_id}")
        if outcome is Commit.QUOTA:
            raise quotas.stored_bytes(self.store, owner)

    @staticmethod
    def check_free(record: SessionRecord, holder: str | None = None) -> None:
        """SessionBusy unless the session's hold is ``holder``'s (or both are none). The hold
        lives in the session row, so this sees every replica's jobs; the store's
        compare-and-set checks it again at the commit."""
        if record.hold != holder:
            if record.hold is None:
                raise SessionBusy(f"training job {holder} no longer holds this session")
            raise SessionBusy.held_by(record.hold)

    # -- building ---------------------------------------------------------------------------

    def _spec(self, record: SessionRecord) -> specs.SessionSpec:
        return _parsed_spec(record.spec)

    def _build(
        self, spec: specs.SessionSpec, data: bytes | None = None, *, scheduled: bool = True
    ) -> tuple[
        models.Model, torch.optim.Optimizer, schedulers.Scheduler | None, state.Accumulator | None
    ]:
        """The session built, from ``data`` if given, with its accumulator; with
        ``scheduled`` false the scheduler starts at its step 0 rather than where ``data``
        left it (a new one)."""
        if (
            spec.device.startswith("cuda")
            and spec.device.partition(":")[2]
            and (int(spec.device.partition(":")[2]) >= devices.cuda_count())
        ):
            raise Unavailable(f"this session lives on {spec.device}, which this server lacks")
        model = models.build(spec.model, self.limits, spec.device)
        optimizer = optimizers.build(spec.optimizer, model.trainable().values())
        metadata = state.restore(model, optimizer, data) if data is not None else {}
        # After the optimizer state: torch builds a scheduler on an optimizer as it stands,
        # and what it writes into the group (lr, OneCycleLR's momentum) is then loaded over.
        scheduler = schedulers.build(spec.scheduler, optimizer)
        if scheduler is not None and scheduled and state.SCHEDULER in metadata:
            schedulers.load(scheduler, optimizer, metadata[state.SCHEDULER])
        accumulator = state.accumulator(model, data) if data is not None else None
        return model, optimizer, scheduler, accumulator

    def fetch(self, owner: str, session_id: str) -> SessionRecord:
        """The owner's session, or NotFound (another owner's is not found either)."""
        record = self.store.get(owner, session_id)
        if record is None:
            raise NotFound(f"no session {session_id}")
        return record

    # -- views ------------------------------------------------------------------------------

    def page(
        self, owner: str, limit: int, after: Cursor | None, params: bool = False
    ) -> tuple[list[dict[str, Any]], SessionRecord | None]:
        """A page of the owner's sessions as summaries (with their parameters if ``params``,
        within the answer limit), and the last one if more follow: one trip to the compute
        pool for the whole page, not one per session."""
        records = self.store.sessions(owner, limit + 1, after)
        last = records[limit - 1] if len(records) > limit else None
        items, size = [], 0
        for record in records[:limit]:
            item = summary(record)
            if params:
                item["params"] = self.view(record)["params"]
                size += len(orjson.dumps(item))
                budget.check_answer(size, self.limits, PAGE_HINT)
            items.append(item)
        return items, last

    def view(self, record: SessionRecord, b64: bool = False) -> dict[str, Any]:
        spec = json.loads(record.spec)
        tensors, metadata = state.read(record.state)
        params = {
            name[len(state.PARAM) :]: encode(t, b64)
            for name, t in tensors.items()
            if name.startswith(state.PARAM)
        }
        buffers = {
            name[len(state.BUFFER) :]: encode(t, b64)
            for name, t in tensors.items()
            if name.startswith(state.BUFFER)
        }
        return {
            "id": record.id,
            "name": record.name,
            **spec,
            "scheduler": spec.get("scheduler"),
            "lr": _lr(record, metadata),
            "step": record.step,
            "version": record.version,
            "job": record.hold,
            "params": params,
            "buffers": buffers,
            "created_at": iso(record.created_at),
            "updated_at": iso(record.updated_at),
        }

    def read(self, owner: str, session_id: str) -> Answer:
        """GET /v1/sessions/{id}: the session and its ETag."""
        record = self.fetch(owner, session_id)
        return self.answer(200, self.view(record), record)

    def answer(
        self, status: int, body: dict[str, Any], record: SessionRecord, hint: str = VIEW_HINT
    ) -> Answer:
        """The answer as stored and sent; TooLarge (with ``hint``) over the answer limit."""
        headers = {"ETag": etag(record)}
        if status == 201:
            headers["Location"] = f"/v1/sessions/{record.id}"
        data = orjson.dumps(body)
        budget.check_answer(len(data), self.limits, hint)
        return Answer(status, data, headers)

    def budget(self, job: RunJob, spec_text: str) -> None:
        """TooLarge if this step, gradients or forward on the session whose spec is
        ``spec_text`` would need more memory than one request may have (``engine.budget``)."""
        request = job.request
        estimate = budget.session_of(
            job.kind,
            spec_text,
            request.batch,
            self.limits,
            b64=request.encoding == "b64",
            include=job.include,
            explain=isinstance(request, specs.SessionGradientsRequest) and request.explain,
            quantities=request.wanted if isinstance(request, specs.Quantities) else (),
        )
        if estimate is not None:
            budget.check(estimate, self.limits)

    # -- create, restore --------------------------------------------------------------------

    def create(
        self, owner: str, session_id: str, request: specs.SessionCreate, idem: Idem | None
    ) -> Answer:
        if (stored := replay(self.store, idem)) is not None:
            return stored
        spec = specs.SessionSpec.model_validate(request.model_dump(exclude={"name"}))
        spec = spec.model_copy(update={"device": self._device(spec.device)})
        if (estimate := budget.created(spec, self.limits)) is not None:  # before building anything
            budget.check(estimate, self.limits, "this session")
            budget.check_answer(estimate.answer, self.limits, CREATE_HINT, at_most=True)
        model, optimizer, scheduler, _ = self._build(spec)
        data = state.dump(model, optimizer, {}, scheduler)
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
        if (estimate := budget.restored(spec, data, self.limits)) is not None:
            budget.check(estimate, self.limits, "restoring this checkpoint")
            budget.check_answer(estimate.answer, self.limits, CREATE_HINT, at_most=True)
        model, optimizer, scheduler, accumulator = self._build(spec, data)
        dumped = state.dump(model, optimizer, {}, scheduler, accumulator)
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
            answer = self.answer(201, self.view(record), record, CREATE_HINT)
            outcome = self.store.create(
                record, idem.record(answer) if idem else None, self.max_per_owner
            )
            if outcome is Commit.OK:
                return answer
            if outcome is Commit.FULL:
                raise quotas.sessions(self.max_per_owner)
            if outcome is Commit.QUOTA:
                raise quotas.stored_bytes(self.store, owner)
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

    def run_many(
        self,
        jobs: Sequence[RunJob],
        watcher: Watcher | None = None,
    ) -> list[Answer | GradsvcError]:
        """Jobs in arrival order, each applied exactly as ``run`` would apply it alone (see
        ``rounds``: per session a chain that commits as a prefix, batched across sessions);
        ``watcher`` hears of each as soon as it is final, and of what is computed and
        written next."""
        return rounds.run_many(self, jobs, watcher)

    def step_many(
        self, jobs: Sequence[RunJob], watcher: Watcher | None = None
    ) -> list[Answer | GradsvcError]:
        """This worker's share of a ``POST /v1/sessions/step``, budgeted as a whole before
        any of it runs (TooLarge for all of it: what one pass holds at once), then run as
        ``run_many`` runs it, from the sessions read for the budget."""
        keys = list(dict.fromkeys((job.owner, job.session_id) for job in jobs))
        read: dict[SessionKey, SessionRecord] = {
            key: record
            for key, record in zip(keys, self.store.get_many(keys), strict=True)
            if record is not None
        }
        links: dict[SessionKey, list[RunJob]] = {}
        for job in jobs:
            key = (job.owner, job.session_id)
            if key in read:
                links.setdefault(key, []).append(job)
        chains = []
        for key, chain in links.items():
            spec = self._spec(read[key])
            estimates = []
            for job in chain:
                found = budget.session_of(
                    "step",
                    read[key].spec,
                    job.request.batch,
                    self.limits,
                    b64=job.request.encoding == "b64",
                    include=job.include,
                )
                if found is not None:
                    estimates.append(found)
            size = budget.state_bytes(spec)
            if estimates:
                chains.append((estimates, size, rounds.staged_at_once(size, len(chain))))
        if chains:
            whole = budget.in_one_pass(chains)
            budget.check(whole, self.limits, "this request")
            budget.check_answer(whole.answer, self.limits, BULK_HINT, at_most=True)
        return rounds.run_many(self, jobs, watcher, read=read)

    def accumulate(
        self,
        owner: str,
        session_id: str,
        request: specs.SessionAccumulateRequest,
        idem: Idem | None,
        if_match: str | None,
        deadline: float = float("inf"),
    ) -> Answer:
        """POST /v1/sessions/{id}/accumulate (``verbs``)."""
        verb = verbs.accumulating(self, request)
        return verbs.run(self, owner, session_id, verb, idem, if_match, deadline)

    def apply(
        self,
        owner: str,
        session_id: str,
        request: specs.SessionApplyRequest,
        idem: Idem | None,
        if_match: str | None,
        deadline: float = float("inf"),
    ) -> Answer:
        """POST /v1/sessions/{id}/apply (``verbs``)."""
        verb = verbs.applying(request)
        return verbs.run(self, owner, session_id, verb, idem, if_match, deadline)

    # -- the cache of built sessions --------------------------------------------------------

    def load(self, record: SessionRecord) -> Built:
        """The session built at ``record``'s version: the cached one, or built and cached (the
        record is the store's, so its version is committed)."""
        key = (record.owner, record.id)
        cached = self.cache.get(key, record.version)
        if cached is not None:
            return cached
        built = self.rebuilt(record)
        self.cache.put(key, record.version, built)
        return built

    def checkout(self, record: SessionRecord) -> Built:
        """The session built at ``record``'s version, out of the cache: for steps, whose
        commits decide whether it goes back (``rounds``)."""
        cached = self.cache.checkout((record.owner, record.id), record.version)
        return cached if cached is not None else self.rebuilt(record)

    def rebuilt(self, record: SessionRecord) -> Built:
        """The session built anew from ``record``'s bytes (committed, or staged by a chain
        whose model a failed step may have changed), bypassing the cache."""
        spec = self._spec(record)
        model, optimizer, scheduler, accumulator = self._build(spec, record.state)
        return Built(record.version, spec, model, optimizer, scheduler, accumulator)

    def delete(self, owner: str, session_id: str) -> None:
        for _ in range(MAX_ATTEMPTS):
            self.check_free(self.fetch(owner, session_id))
            self.cache.drop((owner, session_id))
            if self.store.delete(owner, session_id):
                return
            # Refused: gone, or a job took the hold since the read; the next read says which.
        raise GradsvcError("the session kept moving; gave up")  # pragma: no cover

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
            self.check_free(record)
            if if_match is not None and if_match != etag(record) and if_match != "*":
                raise PreconditionFailed(
                    f"the session is at {etag(record)}, not {short(if_match)}: read it again"
                )
            spec = self._spec(record)
            replaced = "scheduler" in patch.model_fields_set
            if patch.optimizer is not None:
                if not replaced and spec.scheduler is not None:
                    _check_unscheduled(spec, patch.optimizer)
                spec = spec.model_copy(
                    update={"optimizer": _patched_optimizer(spec, patch.optimizer)}
                )
            if replaced:
                spec = spec.model_copy(update={"scheduler": patch.scheduler})
            model, optimizer, scheduler, accumulator = self._build(
                spec, record.state, scheduled=not replaced
            )
            if patch.params is not None:
                _set_params(model, patch.params, self.limits)
            new = replace(
                record,
                name=patch.name if "name" in patch.model_fields_set else record.name,
                spec=spec.model_dump_json(exclude_defaults=True),
                state=state.dump(model, optimizer, {}, scheduler, accumulator),
                updated_at=time.time(),
            )
            committed = replace(new, version=record.version + 1)
            answer = self.answer(200, self.view(committed), committed)  # before: it may be refused
            self.cache.drop((owner, session_id))
            outcome = self.store.commit(new, record.version)
            if outcome is Commit.OK:
                return answer
            self.refuse(outcome, owner, session_id)
            # CONFLICT or BUSY: read again (a hold is then refused by check_free)
        raise GradsvcError("the session kept moving; gave up")  # pragma: no cover


def summary(record: SessionRecord) -> dict[str, Any]:
    """A session in a listing: what it is and where it stands, not its parameters."""
    model = json.loads(record.spec)["model"]
    return {
        "id": record.id,
        "name": record.name,
        "model_type": model["type"],
        "step": record.step,
        "job": record.hold,
        "updated_at": iso(record.updated_at),
    }


class CheckpointMeta(specs.Spec):
    name: str | None = Field(default=None, max_length=200)
    step: int = Field(default=0, ge=0, lt=2**62)


_CHECKPOINT_META = TypeAdapter(CheckpointMeta)


def _lr(record: SessionRecord, metadata: dict[str, str]) -> float:
    """The lr the session's next step uses: its scheduler's, else its optimizer's."""
    if state.SCHEDULER in metadata:
        return schedulers.Saved.model_validate_json(metadata[state.SCHEDULER]).lr
    return float(specs.SessionSpec.model_validate_json(record.spec).optimizer.lr)


def _check_unscheduled(spec: specs.SessionSpec, changes: dict[str, Any]) -> None:
    """SpecError if ``changes`` sets a hyper-parameter the session's scheduler writes: the
    scheduler would go on from values it did not make (send a new scheduler with them)."""
    assert spec.scheduler is not None
    written = {"lr"}
    if spec.scheduler.type == "onecycle" and spec.scheduler.cycle_momentum:
        written |= {"momentum", "betas"}
    clash = sorted(written & set(changes))
    if clash:
        raise SpecError(
            f"the session's {spec.scheduler.type} scheduler sets {', '.join(clash)} at every "
            'step: send "scheduler" in the same PATCH (the new one starts at its step 0 from '
            'these values), or "scheduler": null to drop it',
            loc=("optimizer", clash[0]),
        )


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


@functools.lru_cache(maxsize=1024)
def _parsed_spec(text: str) -> specs.SessionSpec:
    """A stored spec, parsed once per distinct text (specs are frozen: safe to share)."""
    return specs.SessionSpec.model_validate_json(text)
