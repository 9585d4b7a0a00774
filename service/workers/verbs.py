"""The training verbs on one session: ``accumulate`` a batch's gradients, ``apply`` them.

Each is one compare-and-set commit of the whole state (parameters, optimizer, scheduler and
accumulator) at version v+1, retried from a fresh read when another writer moved the
session first: linearizable like a step, with the step's Idempotency-Key and If-Match. They
run alone, never in a vmapped group (``rounds``), so no proof of exactness across sessions
is needed. An accumulate writes no history row and leaves the step counter as it is; an
apply is a step: ``step`` + 1, one history row, the scheduler stepped.

The built session is checked out of the cache while it is computed on and goes back,
stamped with the new version, only once its commit succeeded: a refused or failed verb
never leaves a cached model or accumulator that the store does not hold.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from service.engine import budget, losses, schedulers, specs, state, step
from service.engine.tensors import decode
from service.errors import (
    GradsvcError,
    NothingAccumulated,
    PreconditionFailed,
    short,
)
from service.store import Commit, HistoryRow, SessionRecord
from service.workers.cache import Built
from service.workers.jobs import Answer, Idem, etag
from service.workers.rounds import STEP_HINT, timed_out

if TYPE_CHECKING:
    from service.workers.sessions import Sessions

MAX_ATTEMPTS = 100


@dataclass
class Computed:
    """What a verb computed on a checked-out session: the record to commit, its history
    row (an apply's), and the answer's body."""

    record: SessionRecord
    history: HistoryRow | None
    body: dict[str, Any]


Verb = Callable[[SessionRecord, Built], Computed]


def run(
    sessions: Sessions,
    owner: str,
    session_id: str,
    verb: Verb,
    idem: Idem | None,
    if_match: str | None,
    deadline: float,
) -> Answer:
    """``verb`` on the session, committed at its version + 1 (retried from a fresh read if
    another writer moved it first); its 200 answer, stored under ``idem`` in the commit."""
    key = (owner, session_id)
    for _ in range(MAX_ATTEMPTS):
        if (stored := _replay(sessions, idem)) is not None:
            return stored
        record = sessions.fetch(owner, session_id)
        sessions.check_free(record)
        if if_match is not None and if_match not in (etag(record), "*"):
            raise PreconditionFailed(
                f"the session is at {etag(record)}, not {short(if_match)}: read it again"
            )
        built = sessions.checkout(record)  # back in the cache only once committed
        done = verb(record, built)
        if time.time() > deadline:  # the caller has been told 504: commit nothing
            raise timed_out()
        committed = replace(done.record, version=record.version + 1)
        answer = sessions.answer(200, done.body, committed, hint=STEP_HINT)
        outcome = sessions.store.commit(
            done.record, record.version, done.history, idem.record(answer) if idem else None
        )
        if outcome is Commit.CONFLICT and _landed(sessions, done.record, committed.version):
            outcome = Commit.OK  # a resent commit whose first try was written: it is ours
        if outcome is Commit.OK:
            sessions.cache.put(key, committed.version, built)
            if done.history is not None:
                sessions.steps += 1
            return answer
        sessions.refuse(outcome, owner, session_id)
        # CONFLICT (moved on, or the key was answered meanwhile) or BUSY: read again
    raise GradsvcError("the session kept moving; gave up")  # pragma: no cover


def _landed(sessions: Sessions, written: SessionRecord, version: int) -> bool:
    """Whether the store holds ``written`` at ``version``: a store's client may resend a
    commit whose reply was lost (redis-py retries a dropped connection), and the resent try
    is refused as moved on by the first. Running the verb again would then add its batch, or
    step, twice. The state's bytes and the time stamped with them are this verb's own."""
    held = sessions.store.get(written.owner, written.id)
    return (
        held is not None
        and held.version == version
        and held.state == written.state
        and held.updated_at == written.updated_at
    )


def _replay(sessions: Sessions, idem: Idem | None) -> Answer | None:
    from service.workers.idempotent import replay

    return replay(sessions.store, idem)


def accumulating(sessions: Sessions, request: specs.SessionAccumulateRequest) -> Verb:
    """The accumulate verb: this batch's gradients added to the accumulator."""
    b64 = request.encoding == "b64"

    def verb(record: SessionRecord, built: Built) -> Computed:
        spec, model, limits = built.spec, built.model, sessions.limits
        # Budgeted as a step: the gradients, and a new state (the accumulator's too) written.
        estimate = budget.session("step", spec, request.batch, limits, b64=b64)
        if estimate is not None:
            budget.check(estimate, limits)
        inputs = model.decode_inputs(request.batch.x, limits)
        before = built.accumulator
        count = before.count if before is not None else 0
        # The first batch of a step draws dropout as that step would: one batch applied is
        # exactly a step. Later ones draw their own masks.
        seed = spec.model.seed + record.step + count * 2**32
        with step.seeded(model, seed):
            if request.grad_outputs is None:
                loss = losses.normalise(spec.loss)
                result = step.gradients(model, loss, inputs, request.batch.y, limits=limits)
            else:  # the custom-loss path: dL/doutputs from the client, no loss
                try:
                    grad_outputs = decode(request.grad_outputs, model.dtype, limits)
                except GradsvcError as exc:
                    raise exc.at("grad_outputs") from None
                result = step.from_outputs(model, inputs, grad_outputs)
        after = step.accumulated(before, result)
        built.accumulator = after
        new = replace(
            record,
            state=state.dump(model, built.optimizer, {}, built.scheduler, after),
            updated_at=time.time(),
        )
        body = {"accumulated": after.count, **step.encode_result(result, b64)}
        return Computed(new, None, body)

    return verb


def applying(request: specs.SessionApplyRequest) -> Verb:
    """The apply verb: one optimizer step with ``scale`` times the accumulated sum."""

    def verb(record: SessionRecord, built: Built) -> Computed:
        accumulator = built.accumulator
        if accumulator is None or accumulator.count == 0:
            raise NothingAccumulated(
                f"session {record.id} has no gradients accumulated since its last apply: send "
                f"batches to POST /v1/sessions/{record.id}/accumulate first"
            )
        schedulers.check_can_step(built.scheduler)
        clip = built.spec.optimizer.clip_grad_norm
        result = step.apply(built.model, built.optimizer, accumulator, request.scale, clip)
        lr = schedulers.step(built.scheduler, built.optimizer)  # after every optimizer step
        built.accumulator = None
        now = time.time()
        new = replace(
            record,
            state=state.dump(built.model, built.optimizer, {}, built.scheduler),
            step=record.step + 1,
            updated_at=now,
        )
        assert result.grad_norm is not None
        # No loss (None, null over HTTP) when every batch came with grad_outputs.
        loss = None if result.loss is None else result.loss.item()
        history = HistoryRow(new.step, loss, result.grad_norm.item(), now, lr)
        body = step.encode_result(result, request.encoding == "b64")
        body.pop("outputs", None)
        body = {"step": new.step, "lr": lr, "applied": accumulator.count, "loss": loss, **body}
        return Computed(new, history, body)

    return verb
