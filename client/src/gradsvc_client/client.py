"""``Client``: the synchronous client, one ``Core`` call sent at a time by a retrying loop."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, Literal, Self, TypeVar, overload

import httpx
from httpx_sse import EventSource, SSEError

from gradsvc_client._answers import Page
from gradsvc_client._core import DEFAULT_URL, Call, Core, Encoding, SessionRef, Wait, job_id
from gradsvc_client.errors import ClientError
from gradsvc_client.events import EventStream
from gradsvc_client.results import (
    Accumulated,
    Applied,
    BatchItem,
    Gradients,
    Health,
    HistoryItem,
    Job,
    JobEvent,
    Session,
    SessionSummary,
    StepManyItem,
    StepResult,
    Worker,
)
from gradsvc_client.specs import LossSpec, ModelSpec, OptimizerSpec, SchedulerSpec
from gradsvc_client.tensors import BatchInput, TensorLike, TensorsMode

if TYPE_CHECKING:
    import torch
    from numpy.typing import NDArray

__all__ = ["Client"]

T = TypeVar("T")
R = TypeVar("R")


class Client(Generic[T]):
    """The synchronous client: ``with Client(url) as gs: gs.session_step(s, x=1, y=3)``.

    Thread-safe as httpx is. Answers hold torch tensors (``tensors="torch"``, the default,
    which needs torch installed) or numpy arrays (``tensors="numpy"``).
    """

    is_async = False

    @overload
    def __init__(
        self: Client[torch.Tensor],
        base_url: str = DEFAULT_URL,
        *,
        tensors: Literal["torch"] = "torch",
        api_key: str | None = None,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 0.25,
        max_wait: float = 30.0,
        encoding: Encoding = "auto",
        b64_threshold: int = 1024,
        headers: Mapping[str, str] | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None: ...

    @overload
    def __init__(
        self: Client[NDArray[Any]],
        base_url: str = DEFAULT_URL,
        *,
        tensors: Literal["numpy"],
        api_key: str | None = None,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 0.25,
        max_wait: float = 30.0,
        encoding: Encoding = "auto",
        b64_threshold: int = 1024,
        headers: Mapping[str, str] | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None: ...

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        tensors: TensorsMode = "torch",
        api_key: str | None = None,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 0.25,
        max_wait: float = 30.0,
        encoding: Encoding = "auto",
        b64_threshold: int = 1024,
        headers: Mapping[str, str] | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        """Make a client; nothing is sent until the first call.

        Args:
            base_url: The service's URL.
            tensors: ``"torch"`` (torch tensors) or ``"numpy"`` (numpy arrays) in answers.
            api_key: Sent as ``Authorization: Bearer <api_key>``.
            timeout: Seconds for connect, read and write.
            retries: Retries after the first try (connection errors, 429, 503).
            backoff: The first wait in seconds, doubled each retry, with jitter.
            max_wait: The most one wait may be: a longer ``Retry-After`` is raised at once.
            encoding: Answers as nested lists (``"list"``), in b64 (``"b64"``), or
                ``"auto"``: b64 when the request or the model is over ``b64_threshold``.
            b64_threshold: Elements past which a tensor goes, and answers come, as b64.
            headers: More headers for every request.
            transport: An httpx transport (a proxy's, a mock's, ...).

        Raises:
            ImportError: ``tensors="torch"`` where torch is not installed.
            ValueError: An unknown ``tensors`` or ``encoding``.
        """
        self._core: Core[T] = Core(
            self,
            tensors=tensors,
            api_key=api_key,
            timeout=timeout,
            retries=retries,
            backoff=backoff,
            max_wait=max_wait,
            encoding=encoding,
            b64_threshold=b64_threshold,
            headers=headers,
        )
        self._http = httpx.Client(
            base_url=base_url,
            headers=self._core.headers,
            timeout=self._core.timeout,
            transport=transport,
        )

    def _send(self, call: Call[R]) -> R:
        attempt = 0
        while True:
            try:
                response = self._http.request(
                    call.method,
                    call.path,
                    content=call.content,
                    headers=call.headers,
                    params=call.params,
                )
            except httpx.TransportError as exc:
                wait = self._core.on_transport_error(call, exc, attempt)
            else:
                outcome = self._core.on_response(call, response, attempt)
                if not isinstance(outcome, Wait):
                    return outcome
                wait = outcome
            time.sleep(wait.seconds)
            attempt += 1

    def _pages(self, page: Callable[[str | None], Call[Page[R]]]) -> Iterator[R]:
        cursor: str | None = None
        while True:
            got = self._send(page(cursor))
            yield from got.items
            if not got.next:
                return
            cursor = got.next

    # -- stateless --------------------------------------------------------------------------

    def forward(self, model: ModelSpec, x: BatchInput) -> T:
        """``POST /v1/forward``: the model's outputs for ``x``.

        Args:
            model: A model builder or spec dict.
            x: The inputs: a tensor, or ``{name: tensor}`` for several.

        Returns:
            The outputs.

        Raises:
            ApiError: The service's problem (``InvalidInputError`` for a bad spec, ...).
            NetworkError: No answer after every retry.
        """
        return self._send(self._core.forward(model, x))

    def gradients(
        self,
        model: ModelSpec,
        loss: LossSpec,
        x: BatchInput,
        y: TensorLike,
        *,
        explain: bool = False,
    ) -> Gradients[T]:
        """``POST /v1/gradients``: loss, dL/dθ and outputs; nothing is updated.

        Args:
            model: A model builder or spec dict.
            loss: A loss builder, name or dict.
            x: The inputs.
            y: The targets.
            explain: Add ``trace``, every node's value and dL/dnode.

        Returns:
            The ``Gradients``.

        Raises:
            ApiError: The service's problem.
            NetworkError: No answer after every retry.
        """
        return self._send(self._core.gradients(model, loss, x, y, explain))

    def step(
        self,
        model: ModelSpec,
        loss: LossSpec,
        optimizer: OptimizerSpec,
        x: BatchInput,
        y: TensorLike,
        *,
        explain: bool = False,
    ) -> StepResult[T]:
        """``POST /v1/step``: one update from fresh optimizer state; nothing is kept.

        Args:
            model: A model builder or spec dict.
            loss: A loss builder, name or dict.
            optimizer: An optimizer builder or dict.
            x: The inputs.
            y: The targets.
            explain: Add ``trace``.

        Returns:
            The ``StepResult`` (its ``step`` and ``etag`` are None).

        Raises:
            ApiError: The service's problem.
            NetworkError: No answer after every retry.
        """
        return self._send(self._core.step(model, loss, optimizer, x, y, explain))

    # -- sessions ---------------------------------------------------------------------------

    def create_session(
        self,
        model: ModelSpec,
        loss: LossSpec,
        optimizer: OptimizerSpec,
        *,
        scheduler: SchedulerSpec | None = None,
        name: str | None = None,
        device: str | None = None,
        idempotency_key: str | None = None,
    ) -> Session[T]:
        """``POST /v1/sessions``: a session that keeps parameters and optimizer state.

        Args:
            model: A model builder or spec dict.
            loss: A loss builder, name or dict.
            optimizer: An optimizer builder or dict.
            scheduler: A learning-rate scheduler builder or dict.
            name: A name for it.
            device: ``auto`` (the service's default), ``cpu``, ``cuda`` or ``cuda:N``.
            idempotency_key: This call's key (a fresh one by default).

        Returns:
            The new ``Session``.

        Raises:
            ApiError: The service's problem (``QuotaExceededError`` past the key's sessions).
            NetworkError: No answer after every retry.
        """
        call = self._core.create_session(
            model, loss, optimizer, scheduler, name, device, idempotency_key
        )
        return self._send(call)

    def create_sessions(
        self,
        count: int,
        model: ModelSpec,
        loss: LossSpec,
        optimizer: OptimizerSpec,
        *,
        scheduler: SchedulerSpec | None = None,
        name: str | None = None,
        device: str | None = None,
    ) -> list[Session[T]]:
        """``count`` sessions of one spec, one ``POST /v1/sessions`` each.

        Args:
            count: How many.
            model: A model builder or spec dict.
            loss: A loss builder, name or dict.
            optimizer: An optimizer builder or dict.
            scheduler: A learning-rate scheduler builder or dict.
            name: Named ``{name}-0``, ``{name}-1``, ... when given.
            device: As for ``create_session``.

        Returns:
            The new sessions, in order.

        Raises:
            ApiError: The first problem (the sessions made before it stay).
            NetworkError: No answer after every retry.
        """
        return [
            self.create_session(
                model,
                loss,
                optimizer,
                scheduler=scheduler,
                name=None if name is None else f"{name}-{i}",
                device=device,
            )
            for i in range(count)
        ]

    def sessions(
        self, *, page_size: int = 50, with_params: bool = False
    ) -> Iterator[SessionSummary[T]]:
        """``GET /v1/sessions``: every session of the key, following ``next`` lazily.

        Args:
            page_size: Sessions per request (``limit``).
            with_params: Add each session's parameters (``?include=params``).

        Returns:
            An iterator of ``SessionSummary``, page after page.

        Raises:
            ApiError: The service's problem, when a page is fetched.
            NetworkError: No answer after every retry.
        """
        return self._pages(lambda cursor: self._core.sessions_page(page_size, cursor, with_params))

    def get_session(self, session: SessionRef) -> Session[T]:
        """``GET /v1/sessions/{id}``.

        Args:
            session: A session id or ``Session``.

        Returns:
            The session now.

        Raises:
            NotFoundError: No such session (or another key's).
            NetworkError: No answer after every retry.
        """
        return self._send(self._core.get_session(session))

    def patch_session(
        self,
        session: SessionRef,
        *,
        name: str | None = None,
        optimizer: OptimizerSpec | None = None,
        scheduler: SchedulerSpec | None = None,
        params: Mapping[str, TensorLike] | None = None,
        if_match: str | Session[Any] | None = None,
    ) -> Session[T]:
        """``PATCH /v1/sessions/{id}``: rename, change hyper-parameters, or set parameters.

        Not retried once it may have reached the service (no key protects a PATCH).

        Args:
            session: A session id or ``Session``.
            name: A new name.
            optimizer: Hyper-parameters to change (``{"lr": 0.01}``).
            scheduler: A new scheduler.
            params: New parameter values by name.
            if_match: An ETag or a ``Session`` read earlier: 412 if it has moved on.

        Returns:
            The session after the change.

        Raises:
            PreconditionFailedError: ``if_match`` is stale.
            ApiError: The service's other problems.
            NetworkError: No answer (it may or may not have been applied).
        """
        call = self._core.patch_session(session, name, optimizer, scheduler, params, if_match)
        return self._send(call)

    def delete_session(self, session: SessionRef) -> None:
        """``DELETE /v1/sessions/{id}``.

        Args:
            session: A session id or ``Session``.

        Raises:
            NotFoundError: No such session.
            NetworkError: No answer after every retry.
        """
        self._send(self._core.delete_session(session))

    def session_step(
        self,
        session: SessionRef,
        x: BatchInput,
        y: TensorLike,
        *,
        explain: bool = False,
        if_match: str | Session[Any] | None = None,
        idempotency_key: str | None = None,
    ) -> StepResult[T]:
        """``POST /v1/sessions/{id}/step``: exactly once, however often it is retried.

        Args:
            session: A session id or ``Session``.
            x: The inputs.
            y: The targets.
            explain: Add ``trace``.
            if_match: An ETag or ``Session``: 412 if the session has moved on.
            idempotency_key: This call's key (a fresh one by default).

        Returns:
            The ``StepResult``: ``step`` and ``etag`` are the session's after it.

        Raises:
            PreconditionFailedError: ``if_match`` is stale.
            ApiError: The service's other problems (``non-finite``: nothing changed).
            NetworkError: No answer after every retry.
        """
        call = self._core.session_step(session, x, y, explain, if_match, idempotency_key)
        return self._send(call)

    def accumulate(
        self,
        session: SessionRef,
        x: BatchInput,
        y: TensorLike | None = None,
        *,
        grad_outputs: TensorLike | None = None,
        if_match: str | Session[Any] | None = None,
        idempotency_key: str | None = None,
    ) -> Accumulated[T]:
        """``POST /v1/sessions/{id}/accumulate``: this batch's gradients added to the
        session's accumulator, exactly once however often it is retried; the parameters
        and step do not move until ``apply``.

        Args:
            session: A session id or ``Session``.
            x: The inputs.
            y: The targets (the session's loss), or None with ``grad_outputs``.
            grad_outputs: dL/doutputs computed by the caller (a custom loss), instead of
                ``y``: the answer's loss is then None.
            if_match: An ETag or ``Session``: 412 if the session has moved on.
            idempotency_key: This call's key (a fresh one by default).

        Returns:
            The ``Accumulated``: this batch's gradients and how many batches are held.

        Raises:
            PreconditionFailedError: ``if_match`` is stale.
            ApiError: The service's other problems (``non-finite``: nothing changed).
            NetworkError: No answer after every retry.
        """
        call = self._core.accumulate(session, x, y, if_match, idempotency_key, grad_outputs)
        return self._send(call)

    def apply(
        self,
        session: SessionRef,
        *,
        scale: float | None = None,
        if_match: str | Session[Any] | None = None,
        idempotency_key: str | None = None,
    ) -> Applied[T]:
        """``POST /v1/sessions/{id}/apply``: one optimizer step with ``scale`` times the
        sum of the accumulated gradients (1/k: their mean over k batches); the accumulator
        is then empty. Exactly once however often it is retried.

        Args:
            session: A session id or ``Session``.
            scale: The sum's factor (the service's default is 1).
            if_match: An ETag or ``Session``: 412 if the session has moved on.
            idempotency_key: This call's key (a fresh one by default).

        Returns:
            The ``Applied``: the step, the gradients it used, the parameters after it.

        Raises:
            ConflictError: ``nothing-accumulated``: accumulate first.
            PreconditionFailedError: ``if_match`` is stale.
            ApiError: The service's other problems (``non-finite``: nothing changed).
            NetworkError: No answer after every retry.
        """
        return self._send(self._core.apply(session, scale, if_match, idempotency_key))

    def session_gradients(
        self, session: SessionRef, x: BatchInput, y: TensorLike, *, explain: bool = False
    ) -> Gradients[T]:
        """``POST /v1/sessions/{id}/gradients``: a step's gradients; nothing changes.

        Args:
            session: A session id or ``Session``.
            x: The inputs.
            y: The targets.
            explain: Add ``trace``.

        Returns:
            The ``Gradients``.

        Raises:
            ApiError: The service's problem.
            NetworkError: No answer after every retry.
        """
        return self._send(self._core.session_gradients(session, x, y, explain))

    def session_forward(self, session: SessionRef, x: BatchInput) -> T:
        """``POST /v1/sessions/{id}/forward``: outputs, in eval mode.

        Args:
            session: A session id or ``Session``.
            x: The inputs.

        Returns:
            The outputs.

        Raises:
            ApiError: The service's problem.
            NetworkError: No answer after every retry.
        """
        return self._send(self._core.session_forward(session, x))

    def history(self, session: SessionRef, *, page_size: int = 100) -> Iterator[HistoryItem]:
        """``GET /v1/sessions/{id}/history``: every step, oldest first, following ``next``.

        Args:
            session: A session id or ``Session``.
            page_size: Rows per request.

        Returns:
            An iterator of ``HistoryItem``, fetched page by page.

        Raises:
            NotFoundError: No such session, when the first page is fetched.
            NetworkError: No answer after every retry.
        """
        return self._pages(lambda cursor: self._core.history_page(session, page_size, cursor))

    def checkpoint(self, session: SessionRef) -> bytes:
        """``GET /v1/sessions/{id}/checkpoint``.

        Args:
            session: A session id or ``Session``.

        Returns:
            A safetensors file: parameters, optimizer state, and the specs.

        Raises:
            NotFoundError: No such session.
            NetworkError: No answer after every retry.
        """
        return self._send(self._core.checkpoint(session))

    def restore(self, data: bytes, *, idempotency_key: str | None = None) -> Session[T]:
        """``POST /v1/sessions/restore``: a new session from a checkpoint file.

        Args:
            data: The file's bytes (from ``checkpoint``).
            idempotency_key: This call's key (a fresh one by default).

        Returns:
            The new ``Session``.

        Raises:
            InvalidInputError: The file is not a valid checkpoint.
            NetworkError: No answer after every retry.
        """
        return self._send(self._core.restore(data, idempotency_key))

    def step_many(
        self,
        items: Sequence[BatchItem | tuple[Any, ...]],
        *,
        include: Sequence[str] | None = None,
        idempotency_key: str | None = None,
    ) -> list[StepManyItem[T]]:
        """``POST /v1/sessions/step``: many sessions stepped in one request.

        Args:
            items: ``BatchItem`` or ``(session, x, y)`` each; one session's apply in order.
            include: Of ``loss``, ``params``, ``grads``, ``outputs`` (the service's default:
                ``loss``).
            idempotency_key: The whole request's key (a fresh one by default).

        Returns:
            One ``StepManyItem`` per item, in order: applied, or with its ``error``.

        Raises:
            ApiError: A problem with the request as a whole.
            NetworkError: No answer after every retry.
        """
        return self._send(self._core.step_many(items, include, idempotency_key))

    # -- training jobs ----------------------------------------------------------------------

    def train(
        self,
        session: SessionRef,
        x: BatchInput,
        y: TensorLike,
        epochs: int,
        batch_size: int,
        *,
        shuffle: bool | None = None,
        seed: int | None = None,
        idempotency_key: str | None = None,
    ) -> Job:
        """``POST /v1/sessions/{id}/train``: start a training job over a dataset.

        Args:
            session: A session id or ``Session``.
            x: The dataset's inputs, one row per example.
            y: Its targets.
            epochs: Passes over the dataset.
            batch_size: Rows per step.
            shuffle: A new order every epoch (the service's default: true).
            seed: Seeds the shuffling.
            idempotency_key: This call's key: one key starts at most one job.

        Returns:
            The started ``Job`` (``job.wait()`` waits for its end).

        Raises:
            ApiError: The service's problem (``QuotaExceededError``: too many active jobs).
            NetworkError: No answer after every retry.
        """
        call = self._core.train(session, x, y, epochs, batch_size, shuffle, seed, idempotency_key)
        return self._send(call)

    def job(self, job: str | Job) -> Job:
        """``GET /v1/jobs/{jid}``.

        Args:
            job: A job id or ``Job``.

        Returns:
            The job now.

        Raises:
            NotFoundError: No such job.
            NetworkError: No answer after every retry.
        """
        return self._send(self._core.job(job))

    def wait(self, job: str | Job, timeout: float | None = None, *, poll: float = 0.5) -> Job:
        """Look at a job every ``poll`` seconds until it has succeeded, failed or been
        cancelled.

        Args:
            job: A job id or ``Job``.
            timeout: Seconds to wait at most; None waits as long as it runs.
            poll: Seconds between looks.

        Returns:
            The job in its final state (check ``status``: a failed job is returned too).

        Raises:
            TimeoutError: It still runs after ``timeout`` seconds.
            NotFoundError: No such job.
            NetworkError: No answer after every retry.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            state = self.job(job)
            if state.done:
                return state
            if deadline is not None and time.monotonic() + poll > deadline:
                raise TimeoutError(f"job {state.id} is still {state.status} after {timeout} s")
            time.sleep(poll)

    def cancel(self, job: str | Job) -> Job | None:
        """``DELETE /v1/jobs/{jid}``: cancel; the session keeps its last completed step.

        Args:
            job: A job id or ``Job``.

        Returns:
            The job's state if the service answers with it, else None.

        Raises:
            NotFoundError: No such job.
            NetworkError: No answer after every retry.
        """
        return self._send(self._core.cancel(job))

    def events(self, job: str | Job) -> Iterator[JobEvent]:
        """``GET /v1/jobs/{jid}/events``: each event as it comes, until the job is done.

        A dropped stream is reopened with ``Last-Event-ID``; a server that shut down while
        the job goes on elsewhere (``interrupted``) is followed to the next.

        Args:
            job: A job id or ``Job``.

        Returns:
            An iterator of ``JobEvent``.

        Raises:
            NotFoundError: No such job.
            ClientError: The answer is not an event stream.
            NetworkError: No answer after every retry.
        """
        stream = EventStream(self._core, job_id(job))
        while True:
            try:
                with self._http.stream(
                    "GET", stream.call.path, headers=stream.headers(), timeout=stream.timeout()
                ) as response:
                    if response.status_code >= 400:
                        response.read()
                        wait = stream.failed(response)
                    else:
                        for sse in EventSource(response).iter_sse():
                            event = stream.feed(sse)
                            if event is not None:
                                yield event
                                if stream.finished:
                                    return
                        if (resume := stream.ended()) is None:
                            return
                        wait = resume
            except httpx.TransportError as exc:
                wait = stream.dropped(exc)
            except SSEError as exc:
                raise ClientError(f"GET {stream.call.path}: {exc}") from exc
            time.sleep(wait)

    # -- operations -------------------------------------------------------------------------

    def workers(self) -> list[Worker]:
        """``GET /v1/workers``: an operator key's, or a loopback caller's of a keyless server.

        Returns:
            Each worker's state.

        Raises:
            NotFoundError: A tenant key.
            NetworkError: No answer after every retry.
        """
        return self._send(self._core.workers())

    def health(self) -> Health:
        """``GET /healthz``: the process is up (not retried).

        Returns:
            ``Health(ok=True, "ok")``.

        Raises:
            NetworkError: No answer.
        """
        return self._send(self._core.health())

    def ready(self) -> Health:
        """``GET /readyz``: store and workers are ready (not retried).

        Returns:
            ``Health``: ``ok`` False with the problem's detail on a 503.

        Raises:
            NetworkError: No answer.
        """
        return self._send(self._core.ready())

    def close(self) -> None:
        """Close the connections."""
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
