"""Sessions, executed: load → compute → commit, with the store's compare-and-set.

Every function here runs off the event loop (in the compute pool) and returns an ``Answer``:
the status, the JSON body as bytes and the headers, exactly as they are stored for
``Idempotency-Key`` replays. A commit that finds the version moved (another request, another
replica) reads again and recomputes on the newer state; one that finds its idempotency key
taken replays the stored answer instead. So each step is applied once, in some serial order.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import orjson
import torch
from pydantic import Field, TypeAdapter, ValidationError

from service.engine import models, optimizers, specs, state
from service.engine.limits import Limits
from service.engine.specs import Kind
from service.engine.step import compute, encode_result
from service.engine.tensors import decode, encode
from service.errors import (
    GradsvcError,
    InvalidInput,
    KeyReused,
    NotFound,
    PreconditionFailed,
    SpecError,
    TooManyRequests,
    short,
)
from service.store import Commit, Cursor, HistoryRow, IdempotencyRecord, SessionRecord, SessionStore

MAX_ATTEMPTS = 100
_OPTIMIZER = TypeAdapter(specs.OptimizerSpec)


@dataclass
class Answer:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    replayed: bool = False


@dataclass(frozen=True)
class Idem:
    """An ``Idempotency-Key`` and what the request was."""

    owner: str
    key: str
    fingerprint: str

    def record(self, answer: Answer) -> IdempotencyRecord:
        return IdempotencyRecord(
            self.owner,
            self.key,
            self.fingerprint,
            answer.status,
            answer.body,
            json.dumps(answer.headers),
            time.time(),
        )


def etag(record: SessionRecord) -> str:
    return f'"{record.id}:{record.version}"'


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


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


class Sessions:
    def __init__(self, store: SessionStore, limits: Limits, max_per_owner: int = 0) -> None:
        self.store = store
        self.limits = limits
        self.max_per_owner = max_per_owner

    # -- building ---------------------------------------------------------------------------

    def _spec(self, record: SessionRecord) -> specs.SessionSpec:
        return specs.SessionSpec.model_validate_json(record.spec)

    def _build(
        self, spec: specs.SessionSpec, data: bytes | None = None
    ) -> tuple[models.Model, torch.optim.Optimizer]:
        model = models.build(spec.model, self.limits)
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

    def create(self, owner: str, request: specs.SessionCreate, idem: Idem | None) -> Answer:
        if (stored := replay(self.store, idem)) is not None:
            return stored
        spec = specs.SessionSpec.model_validate(request.model_dump(exclude={"name"}))
        spec = spec.model_copy(update={"device": _device(spec.device)})
        model, optimizer = self._build(spec)
        return self._insert(owner, spec, request.name, 0, state.dump(model, optimizer, {}), idem)

    def restore(self, owner: str, data: bytes, idem: Idem | None) -> Answer:
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
        spec = spec.model_copy(update={"device": _device(spec.device)})
        model, optimizer = self._build(spec, data)
        return self._insert(
            owner, spec, meta.name, meta.step, state.dump(model, optimizer, {}), idem
        )

    def _insert(
        self,
        owner: str,
        spec: specs.SessionSpec,
        name: str | None,
        step_no: int,
        data: bytes,
        idem: Idem | None,
    ) -> Answer:
        for _ in range(MAX_ATTEMPTS):
            now = time.time()
            record = SessionRecord(
                new_id(),
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

    def run(
        self,
        kind: Kind,
        owner: str,
        session_id: str,
        request: specs.SessionBatchRequest,
        idem: Idem | None,
        if_match: str | None,
    ) -> Answer:
        for _ in range(MAX_ATTEMPTS):
            if (stored := replay(self.store, idem)) is not None:
                return stored
            record = self.fetch(owner, session_id)
            if if_match is not None and if_match != etag(record) and if_match != "*":
                raise PreconditionFailed(
                    f"the session is at {etag(record)}, not {short(if_match)}: read it again"
                )
            answer, new, history = self._compute(kind, record, request)
            if new is None:  # gradients and forward change nothing
                if idem is not None and not self.store.remember(idem.record(answer)):
                    continue
                return answer
            outcome = self.store.commit(
                new, record.version, history, idem.record(answer) if idem else None
            )
            if outcome is Commit.OK:
                return answer
            if outcome is Commit.GONE:
                raise NotFound(f"no session {session_id}")
        raise GradsvcError("the session kept moving; gave up")  # pragma: no cover

    def _compute(
        self,
        kind: Kind,
        record: SessionRecord,
        request: specs.SessionBatchRequest,
    ) -> tuple[Answer, SessionRecord | None, HistoryRow | None]:
        spec = self._spec(record)
        model, optimizer = self._build(spec, record.state)
        inputs = model.decode_inputs(request.batch.x, self.limits)
        b64 = request.encoding == "b64"
        explain = isinstance(request, specs.SessionGradientsRequest) and request.explain
        result = compute(
            kind,
            model,
            inputs,
            request.batch.y,
            loss=spec.loss,
            optimizer=optimizer,
            clip_grad_norm=spec.optimizer.clip_grad_norm,
            explain=explain,
            seed=spec.model.seed + record.step,
            limits=self.limits,
        )
        if kind != "step":
            return self._answer(200, encode_result(result, b64), record), None, None
        now = time.time()
        new = replace(
            record, state=state.dump(model, optimizer, {}), step=record.step + 1, updated_at=now
        )
        assert result.loss is not None and result.grad_norm is not None
        history = HistoryRow(new.step, result.loss.item(), result.grad_norm.item(), now)
        body = {"step": new.step, **encode_result(result, b64)}
        return self._answer(200, body, replace(new, version=record.version + 1)), new, history

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


def new_id() -> str:
    return "s_" + secrets.token_urlsafe(16)


def _device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SpecError(
                "this server has no CUDA device; use device cpu or auto", loc=("device",)
            )
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise SpecError(f"this server has no device {device}", loc=("device",))
    return device


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
