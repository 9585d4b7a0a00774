"""``AsyncClient``: ``Client``'s methods, awaited, on asyncio or trio (through anyio, httpx's
own async layer); iterators are async iterators. The docstrings are ``Client``'s."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, Literal, Self, TypeVar, overload

import anyio
import httpx
from httpx_sse import EventSource, SSEError

from gradsvc_client._answers import Page
from gradsvc_client._core import DEFAULT_URL, Call, Core, Encoding, SessionRef, Wait, job_id
from gradsvc_client.client import Client
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

__all__ = ["AsyncClient"]

T = TypeVar("T")
R = TypeVar("R")


class AsyncClient(Generic[T]):
    """The async client: ``async with AsyncClient(url) as gs: await gs.session_step(...)``.

    Its methods are ``Client``'s, awaited; ``sessions``, ``history`` and ``events`` are
    async iterators; ``create_sessions`` makes its sessions concurrently.
    """

    is_async = True

    @overload
    def __init__(
        self: AsyncClient[torch.Tensor],
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
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None: ...

    @overload
    def __init__(
        self: AsyncClient[NDArray[Any]],
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
        transport: httpx.AsyncBaseTransport | None = None,
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
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
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
        self._http = httpx.AsyncClient(
            base_url=base_url,
            headers=self._core.headers,
            timeout=self._core.timeout,
            transport=transport,
        )

    async def _send(self, call: Call[R]) -> R:
        attempt = 0
        while True:
            try:
                response = await self._http.request(
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
            await anyio.sleep(wait.seconds)
            attempt += 1

    async def _pages(self, page: Callable[[str | None], Call[Page[R]]]) -> AsyncIterator[R]:
        cursor: str | None = None
        while True:
            got = await self._send(page(cursor))
            for item in got.items:
                yield item
            if not got.next:
                return
            cursor = got.next

    async def forward(self, model: ModelSpec, x: BatchInput) -> T:
        return await self._send(self._core.forward(model, x))

    async def gradients(
        self,
        model: ModelSpec,
        loss: LossSpec,
        x: BatchInput,
        y: TensorLike,
        *,
        explain: bool = False,
    ) -> Gradients[T]:
        return await self._send(self._core.gradients(model, loss, x, y, explain))

    async def step(
        self,
        model: ModelSpec,
        loss: LossSpec,
        optimizer: OptimizerSpec,
        x: BatchInput,
        y: TensorLike,
        *,
        explain: bool = False,
    ) -> StepResult[T]:
        return await self._send(self._core.step(model, loss, optimizer, x, y, explain))

    async def create_session(
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
        call = self._core.create_session(
            model, loss, optimizer, scheduler, name, device, idempotency_key
        )
        return await self._send(call)

    async def create_sessions(
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
        made: dict[int, Session[T]] = {}

        async def one(i: int) -> None:
            made[i] = await self.create_session(
                model,
                loss,
                optimizer,
                scheduler=scheduler,
                name=None if name is None else f"{name}-{i}",
                device=device,
            )

        async with anyio.create_task_group() as group:
            for i in range(count):
                group.start_soon(one, i)
        return [made[i] for i in range(count)]

    def sessions(
        self, *, page_size: int = 50, with_params: bool = False
    ) -> AsyncIterator[SessionSummary[T]]:
        return self._pages(lambda cursor: self._core.sessions_page(page_size, cursor, with_params))

    async def get_session(self, session: SessionRef) -> Session[T]:
        return await self._send(self._core.get_session(session))

    async def patch_session(
        self,
        session: SessionRef,
        *,
        name: str | None = None,
        optimizer: OptimizerSpec | None = None,
        scheduler: SchedulerSpec | None = None,
        params: Mapping[str, TensorLike] | None = None,
        if_match: str | Session[Any] | None = None,
    ) -> Session[T]:
        call = self._core.patch_session(session, name, optimizer, scheduler, params, if_match)
        return await self._send(call)

    async def delete_session(self, session: SessionRef) -> None:
        await self._send(self._core.delete_session(session))

    async def session_step(
        self,
        session: SessionRef,
        x: BatchInput,
        y: TensorLike,
        *,
        explain: bool = False,
        if_match: str | Session[Any] | None = None,
        idempotency_key: str | None = None,
    ) -> StepResult[T]:
        call = self._core.session_step(session, x, y, explain, if_match, idempotency_key)
        return await self._send(call)

    async def accumulate(
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
        return await self._send(call)

    async def apply(
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
        return await self._send(self._core.apply(session, scale, if_match, idempotency_key))

    async def session_gradients(
        self, session: SessionRef, x: BatchInput, y: TensorLike, *, explain: bool = False
    ) -> Gradients[T]:
        return await self._send(self._core.session_gradients(session, x, y, explain))

    async def session_forward(self, session: SessionRef, x: BatchInput) -> T:
        return await self._send(self._core.session_forward(session, x))

    def history(self, session: SessionRef, *, page_size: int = 100) -> AsyncIterator[HistoryItem]:
        return self._pages(lambda cursor: self._core.history_page(session, page_size, cursor))

    async def checkpoint(self, session: SessionRef) -> bytes:
        return await self._send(self._core.checkpoint(session))

    async def restore(self, data: bytes, *, idempotency_key: str | None = None) -> Session[T]:
        return await self._send(self._core.restore(data, idempotency_key))

    async def step_many(
        self,
        items: Sequence[BatchItem | tuple[Any, ...]],
        *,
        include: Sequence[str] | None = None,
        idempotency_key: str | None = None,
    ) -> list[StepManyItem[T]]:
        return await self._send(self._core.step_many(items, include, idempotency_key))

    async def train(
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
        call = self._core.train(session, x, y, epochs, batch_size, shuffle, seed, idempotency_key)
        return await self._send(call)

    async def job(self, job: str | Job) -> Job:
        return await self._send(self._core.job(job))

    async def wait(self, job: str | Job, timeout: float | None = None, *, poll: float = 0.5) -> Job:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            state = await self.job(job)
            if state.done:
                return state
            if deadline is not None and time.monotonic() + poll > deadline:
                raise TimeoutError(f"job {state.id} is still {state.status} after {timeout} s")
            await anyio.sleep(poll)

    async def cancel(self, job: str | Job) -> Job | None:
        return await self._send(self._core.cancel(job))

    async def events(self, job: str | Job) -> AsyncIterator[JobEvent]:
        stream = EventStream(self._core, job_id(job))
        while True:
            try:
                async with self._http.stream(
                    "GET", stream.call.path, headers=stream.headers(), timeout=stream.timeout()
                ) as response:
                    if response.status_code >= 400:
                        await response.aread()
                        wait = stream.failed(response)
                    else:
                        async for sse in EventSource(response).aiter_sse():
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
            await anyio.sleep(wait)

    async def workers(self) -> list[Worker]:
        return await self._send(self._core.workers())

    async def health(self) -> Health:
        return await self._send(self._core.health())

    async def ready(self) -> Health:
        return await self._send(self._core.ready())

    async def aclose(self) -> None:
        """Close the connections."""
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


# One text per method: the async one does what the sync one does, awaited.
for _name, _sync in vars(Client).items():
    _async = vars(AsyncClient).get(_name)
    if callable(_sync) and _async is not None and not _name.startswith("_") and _sync.__doc__:
        _async.__doc__ = _async.__doc__ or _sync.__doc__
AsyncClient.__init__.__doc__ = Client.__init__.__doc__
