"""What the client's methods answer: frozen dataclasses, generic in the tensor type ``T``.

``T`` is ``torch.Tensor`` for a ``Client(url)`` and a numpy array for
``Client(url, tensors="numpy")``. A ``Session`` or ``Job`` remembers the client that
fetched it, so ``session.refresh()`` and ``job.wait()`` need no client argument (on an
``AsyncClient``'s: ``await session.refresh_async()``, ``await job.wait_async()``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, Self, TypeVar

from gradsvc_client.errors import ApiError

__all__ = [
    "JOB_DONE",
    "BatchItem",
    "Gradients",
    "Health",
    "HistoryItem",
    "Job",
    "JobEvent",
    "Session",
    "SessionSummary",
    "StepManyItem",
    "StepResult",
    "TraceNode",
    "Worker",
]

T = TypeVar("T")  # the tensor type of a client's answers: torch.Tensor or a numpy array

JOB_DONE = frozenset({"succeeded", "failed", "cancelled"})
"""The job statuses after which nothing changes."""


def _bound(owner: Any, want_async: bool, what: str, other: str) -> Any:
    """The client an object came from, if it is of the kind the caller's method needs."""
    if owner is None:
        raise TypeError(f"this {what} was not fetched by a client: it cannot fetch itself")
    if bool(getattr(owner, "is_async", False)) != want_async:
        raise TypeError(f"this {what} came from {type(owner).__name__}: use {other}")
    return owner


@dataclass(frozen=True)
class TraceNode(Generic[T]):
    """One node of an explained computation (``explain=True``).

    Attributes:
        node: The node's expression text or layer name.
        op: The operation.
        inputs: The names of the nodes it reads.
        value: Its value.
        grad: dL/dnode (None where the service gives none).
        local: d node / d input for each input (elementwise nodes), else None.
    """

    node: str
    op: str
    inputs: list[str]
    value: T
    grad: T | None
    local: dict[str, T] | None


@dataclass(frozen=True)
class Gradients(Generic[T]):
    """A gradients call's answer: nothing changed.

    Attributes:
        loss: The batch's loss.
        grads: dL/dθ for every trainable parameter.
        grad_norm: The gradients' total 2-norm.
        outputs: The model's outputs for the batch.
        trace: The explained computation with ``explain=True``, else None.
    """

    loss: float
    grads: dict[str, T]
    grad_norm: float
    outputs: T
    trace: list[TraceNode[T]] | None = None


@dataclass(frozen=True)
class StepResult(Gradients[T]):
    """A step's answer: the gradients, and the parameters after the update.

    Attributes:
        params: Every parameter after the update.
        step: The session's step after it (None for a stateless step).
        replayed: True when the service answered from the call's Idempotency-Key.
        etag: The session's new ETag, for ``if_match`` (None for a stateless step).
        lr: The learning rate the session's next step uses, after its scheduler stepped
            (torch's ``get_last_lr()``; None for a stateless step).
    """

    params: dict[str, T] = field(default_factory=dict)
    step: int | None = None
    lr: float | None = None
    replayed: bool = False
    etag: str | None = None


@dataclass(frozen=True)
class Accumulated(Gradients[T]):
    """An accumulate's answer: this batch's gradients, now in the session's accumulator.

    Attributes:
        accumulated: Batches accumulated since the last apply, this one included.
        replayed: True when the service answered from the call's Idempotency-Key.
        etag: The session's new ETag, for ``if_match``.
    """

    loss: float | None  # type: ignore[assignment]  # None for a batch sent with grad_outputs
    accumulated: int = 0
    replayed: bool = False
    etag: str | None = None


@dataclass(frozen=True)
class Applied(Generic[T]):
    """An apply's answer: one optimizer step with the accumulated gradients.

    Attributes:
        step: The session's step after it.
        lr: The learning rate the session's next step uses.
        applied: How many accumulated batches the step used.
        loss: The mean loss of those sent with ``y``; None when all came with
            ``grad_outputs``.
        grads: ``scale`` times their summed gradients: what the step used.
        grad_norm: Those gradients' total 2-norm, before any clipping.
        params: Every parameter after the update.
        replayed: True when the service answered from the call's Idempotency-Key.
        etag: The session's new ETag, for ``if_match``.
    """

    step: int
    lr: float
    applied: int
    loss: float | None
    grads: dict[str, T]
    grad_norm: float
    params: dict[str, T]
    replayed: bool = False
    etag: str | None = None


@dataclass(frozen=True)
class Session(Generic[T]):
    """A session as the service had it when this was fetched; ``refresh()`` fetches it again.

    Attributes:
        id: The session's id.
        name: Its name, if it was given one.
        step: Optimizer steps applied.
        version: The version its ETag names (every change adds one).
        etag: ``"<id>:<version>"``, quoted, for ``if_match``.
        params: Every parameter.
        model: The model spec, as the service stores it.
        loss: The loss spec.
        optimizer: The optimizer spec.
        device: The device it lives on.
        created_at: When it was made.
        updated_at: When it last changed.
        scheduler: The learning-rate scheduler's spec, if it has one.
        lr: The learning rate its next step uses.
        buffers: Its buffers (batch-norm's running statistics), empty for a model without.
        raw: The body as sent, for fields this client does not know yet.
    """

    id: str
    name: str | None
    step: int
    version: int
    etag: str | None
    params: dict[str, T]
    model: dict[str, Any]
    loss: str | dict[str, Any]
    optimizer: dict[str, Any]
    device: str
    created_at: datetime
    updated_at: datetime
    scheduler: dict[str, Any] | None = None
    lr: float | None = None
    buffers: dict[str, T] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    client: Any = field(default=None, repr=False, compare=False)
    """The client that fetched it (``refresh`` asks that one)."""

    def refresh(self) -> Session[T]:
        """Fetch this session again (``GET /v1/sessions/{id}``) through its ``Client``.

        Returns:
            A new ``Session``: this one stays the snapshot it was.

        Raises:
            TypeError: It came from an ``AsyncClient`` (``await refresh_async()``).
            NotFoundError: It has been deleted.
        """
        fresh: Session[T] = _bound(
            self.client, False, "Session", "await refresh_async()"
        ).get_session(self.id)
        return fresh

    async def refresh_async(self) -> Session[T]:
        """Fetch this session again through its ``AsyncClient``.

        Returns:
            A new ``Session``.

        Raises:
            TypeError: It came from a ``Client`` (``refresh()``).
            NotFoundError: It has been deleted.
        """
        fresh: Session[T] = await _bound(self.client, True, "Session", "refresh()").get_session(
            self.id
        )
        return fresh


@dataclass(frozen=True)
class SessionSummary(Generic[T]):
    """A session as ``sessions()`` lists it: its parameters only when asked for.

    Attributes:
        id: The session's id.
        name: Its name, if any.
        model_type: ``expression``, ``linear`` or ``sequential``.
        step: Optimizer steps applied.
        job: The id of the training job holding it, if one does.
        updated_at: When it last changed.
        params: Its parameters with ``with_params=True``, else None.
    """

    id: str
    name: str | None
    model_type: str
    step: int
    job: str | None
    updated_at: datetime
    params: dict[str, T] | None = None


@dataclass(frozen=True)
class HistoryItem:
    """One committed step of a session.

    Attributes:
        step: The step's number (1 for the first).
        loss: Its loss (None for an apply of batches sent with ``grad_outputs`` only).
        grad_norm: Its gradients' total 2-norm.
        at: When it was committed.
        lr: The learning rate the step after it uses (None from a service before lr).
    """

    step: int
    loss: float | None
    grad_norm: float
    at: datetime
    lr: float | None = None


@dataclass(frozen=True)
class BatchItem:
    """One item of ``step_many``: a session and its batch.

    Attributes:
        session: A session id or a ``Session``.
        x: The batch's inputs.
        y: Its targets.
        idempotency_key: This item's own key (apart from the request's).
    """

    session: str | Session[Any]
    x: Any
    y: Any = None
    idempotency_key: str | None = None


@dataclass(frozen=True)
class StepManyItem(Generic[T]):
    """One item of a ``step_many`` answer: what ``include`` named, or the item's error.

    Attributes:
        session: The session's id.
        status: 200, or the status this item's own ``/step`` would have had.
        step: The session's step after it.
        lr: The learning rate the session's next step uses.
        loss: With ``"loss"`` in ``include`` (the default).
        grad_norm: The gradients' total 2-norm.
        grads: With ``"grads"`` in ``include``.
        params: With ``"params"`` in ``include``.
        outputs: With ``"outputs"`` in ``include``.
        replayed: True when answered from the item's idempotency key.
        error: The ``ApiError`` its own ``/step`` would have raised, else None.
    """

    session: str
    status: int
    step: int | None = None
    lr: float | None = None
    loss: float | None = None
    grad_norm: float | None = None
    grads: dict[str, T] | None = None
    params: dict[str, T] | None = None
    outputs: T | None = None
    replayed: bool = False
    error: ApiError | None = None

    @property
    def ok(self) -> bool:
        """True when the item was applied (or replayed)."""
        return self.error is None and self.status < 400

    def raise_for_error(self) -> Self:
        """Raise the item's error, if it has one.

        Returns:
            This item, when it has none.

        Raises:
            ApiError: The item's error.
        """
        if self.error is not None:
            raise self.error
        return self


@dataclass(frozen=True)
class Job:
    """A training job, as last fetched; ``wait()`` waits for its end.

    Attributes:
        id: The job's id.
        status: ``queued``, ``running``, ``succeeded``, ``failed`` or ``cancelled``.
        progress: 0 to 1.
        epoch: The epoch it is in.
        step: The session's step.
        loss: The last mini-batch's loss.
        error: The problem that failed it, if it failed.
        session: The session it trains.
        raw: The body as sent (``steps_done``, ``attempts``, ...).
    """

    id: str
    status: str
    progress: float | None = None
    epoch: int | None = None
    step: int | None = None
    loss: float | None = None
    error: Any = None
    session: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)
    client: Any = field(default=None, repr=False, compare=False)
    """The client that fetched it (``wait`` asks that one)."""

    @property
    def done(self) -> bool:
        """True once the job has succeeded, failed or been cancelled."""
        return self.status in JOB_DONE

    def wait(self, timeout: float | None = None, *, poll: float = 0.5) -> Job:
        """Wait for the job's end through its ``Client`` (see ``Client.wait``).

        Args:
            timeout: Seconds to wait at most; None waits as long as it runs.
            poll: Seconds between looks.

        Returns:
            The job in its final state.

        Raises:
            TimeoutError: It still runs after ``timeout`` seconds.
            TypeError: It came from an ``AsyncClient`` (``await wait_async()``).
        """
        final: Job = _bound(self.client, False, "Job", "await wait_async()").wait(
            self, timeout, poll=poll
        )
        return final

    async def wait_async(self, timeout: float | None = None, *, poll: float = 0.5) -> Job:
        """Wait for the job's end through its ``AsyncClient`` (see ``AsyncClient.wait``).

        Args:
            timeout: Seconds to wait at most; None waits as long as it runs.
            poll: Seconds between looks.

        Returns:
            The job in its final state.

        Raises:
            TimeoutError: It still runs after ``timeout`` seconds.
            TypeError: It came from a ``Client`` (``wait()``).
        """
        final: Job = await _bound(self.client, True, "Job", "wait()").wait(self, timeout, poll=poll)
        return final


@dataclass(frozen=True)
class JobEvent:
    """One server-sent event of a job's stream.

    Attributes:
        event: The event's name (``message`` when unnamed).
        data: Its data: JSON when it parses, else the text.
        id: The last event id the stream gave.
        job: The job's state, when the data is one.
    """

    event: str
    data: Any
    id: str | None = None
    job: Job | None = None


@dataclass(frozen=True)
class Worker:
    """One worker process of the service (``workers()``).

    Attributes:
        index: Its index.
        device: ``cpu`` or ``cuda:N``.
        pid: Its process id, if it is up.
        state: ``up``, ``starting``, ...
        queue_depth: Requests waiting for it.
        sessions_held: Sessions resident on it.
        requests_done: Requests it has answered.
        restarts: Times it was restarted.
    """

    index: int
    device: str
    pid: int | None
    state: str
    queue_depth: int
    sessions_held: int
    requests_done: int
    restarts: int


@dataclass(frozen=True)
class Health:
    """``health()`` or ``ready()``: ``ready()`` answers ``ok=False`` on a 503.

    Attributes:
        ok: True for a 200.
        status: ``ok``, ``ready``, or the problem's type.
        detail: The problem's detail when not ok.
    """

    ok: bool
    status: str
    detail: str | None = None
