"""The sans-I/O core both clients share: each method's arguments to a ``Call`` (method,
path, body, headers, how to read the answer, whether a resend is safe), and, for each
answer or transport error, the decision to return, raise or wait. The clients only send.

Every POST carries an ``Idempotency-Key`` (a fresh uuid4 per call, the same on each of its
retries), so a retry never applies a step twice. A call is retried, with bounded
exponential backoff and jitter, on a connection error or a dropped connection, and on 429
and 503 after their ``Retry-After``; never on a 429 ``quota-exceeded`` (waiting does not lift
a quota), nor on another 4xx. A PATCH, which the service cannot deduplicate, is retried only
where it cannot have reached the service (no connection, 429, 503).
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar
from urllib.parse import quote

import httpx

from gradsvc_client import _answers
from gradsvc_client._answers import Answers, Page
from gradsvc_client.errors import NetworkError, QuotaExceededError, error_from_response
from gradsvc_client.results import (
    Accumulated,
    Applied,
    BatchItem,
    Gradients,
    Health,
    HistoryItem,
    Job,
    Session,
    SessionSummary,
    StepManyItem,
    StepResult,
    Worker,
)
from gradsvc_client.tensors import _Encoder, decoder, model_elements

T = TypeVar("T")
R = TypeVar("R")

DEFAULT_URL = "http://127.0.0.1:8000"
USER_AGENT = "gradsvc-client/0.1"
Encoding = Literal["auto", "list", "b64"]
SessionRef = str | Session[Any]


@dataclass
class Call(Generic[R]):
    """One request, described: what to send and how to read its answer."""

    method: str
    path: str
    parse: Callable[[httpx.Response], R]
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    params: dict[str, Any] | None = None
    resend: bool = True
    """Safe to send again after it may have reached the service (GET, DELETE, and POST with
    its Idempotency-Key); otherwise only where it cannot have (no connection, 429, 503)."""
    accept: frozenset[int] = frozenset()
    """Error statuses handed to ``parse`` instead of raised."""
    accept_on_retry: frozenset[int] = frozenset()
    """Statuses that mean success on a retry (a DELETE's 404: the first try went through)."""
    retries: int | None = None


@dataclass(frozen=True)
class Wait:
    """Wait this long, then send the call again."""

    seconds: float


_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
_NEVER_RETRY = (httpx.UnsupportedProtocol, httpx.LocalProtocolError, httpx.ProxyError)


def _sid(session: SessionRef) -> str:
    return session.id if isinstance(session, Session) else session


def _seg(value: str) -> str:
    return quote(value, safe="")


def _dumps(body: Any) -> bytes:
    try:
        return json.dumps(body, allow_nan=False, separators=(",", ":")).encode()
    except ValueError as exc:
        raise ValueError(f"JSON has no NaN or Infinity: send finite numbers ({exc})") from None


def job_id(job: str | Job) -> str:
    return job.id if isinstance(job, Job) else job


class Core(Generic[T]):
    """Requests described, answers read, retries decided: everything but the sending."""

    def __init__(
        self,
        client: Any,
        *,
        tensors: str,
        api_key: str | None,
        timeout: float,
        retries: int,
        backoff: float,
        max_wait: float,
        encoding: str,
        b64_threshold: int,
        headers: Mapping[str, str] | None,
    ) -> None:
        if encoding not in ("auto", "list", "b64"):
            raise ValueError(f"encoding must be 'auto', 'list' or 'b64', not {encoding!r}")
        self.answers: Answers[T] = Answers(decoder(tensors), client)
        self.retries, self.backoff, self.max_wait = int(retries), float(backoff), float(max_wait)
        self.encoding, self.threshold = encoding, int(b64_threshold)
        self.timeout = float(timeout)
        self.headers = {"User-Agent": USER_AGENT, **dict(headers or {})}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"

    # -- retry decisions ------------------------------------------------------------------

    def on_response(self, call: Call[R], response: httpx.Response, attempt: int) -> R | Wait:
        """An answer (read): the call's result, a ``Wait`` before a retry, or raise."""
        status = response.status_code
        if status < 400 or status in call.accept or (attempt and status in call.accept_on_retry):
            return call.parse(response)
        error = error_from_response(response)
        retryable = status in (429, 503) and not isinstance(error, QuotaExceededError)
        if retryable and attempt < self._retries(call):
            after = error.retry_after
            if after is None or after <= self.max_wait:
                return Wait(max(after or 0.0, self._backoff(attempt)))
        raise error

    def on_transport_error(self, call: Call[Any], exc: httpx.TransportError, attempt: int) -> Wait:
        """No answer: a ``Wait`` before a retry, or raise ``NetworkError``."""
        retry = (
            attempt < self._retries(call)
            and not isinstance(exc, _NEVER_RETRY)
            and (call.resend or isinstance(exc, _NOT_SENT))
        )
        if not retry:
            tries = attempt + 1
            raise NetworkError(
                f"{call.method} {call.path}: {type(exc).__name__}: {exc} ({tries} tries)"
            ) from exc
        return Wait(self._backoff(attempt))

    def _retries(self, call: Call[Any]) -> int:
        return self.retries if call.retries is None else call.retries

    def _backoff(self, attempt: int) -> float:
        cap = min(self.max_wait, self.backoff * 2.0**attempt)
        return cap * random.uniform(0.5, 1.0)  # jitter: retries of many clients spread out

    # -- request building -----------------------------------------------------------------

    def _post(
        self,
        path: str,
        body: Any,
        parse: Callable[[httpx.Response], R],
        idempotency_key: str | None = None,
    ) -> Call[R]:
        headers = {
            "Content-Type": "application/json",
            "Idempotency-Key": idempotency_key or str(uuid.uuid4()),
        }
        return Call("POST", path, parse, _dumps(body), headers)

    def _encoding(self, encoder: _Encoder, expected: int = 0) -> str:
        if self.encoding != "auto":
            return self.encoding
        return "b64" if encoder.elements + expected > self.threshold else "list"

    def _computation(self, model: Any, x: Any, y: Any, extra: dict[str, Any]) -> dict[str, Any]:
        encoder = _Encoder(self.threshold)
        wire_model = encoder.spec(model)
        body = {"model": wire_model, "batch": encoder.batch(x, y)}
        body.update({k: encoder.spec(v) for k, v in extra.items() if v is not None})
        body["encoding"] = self._encoding(encoder, model_elements(wire_model))
        return body

    def forward(self, model: Any, x: Any) -> Call[T]:
        body = self._computation(model, x, None, {})
        return self._post("/v1/forward", body, self.answers.outputs)

    def gradients(self, model: Any, loss: Any, x: Any, y: Any, explain: bool) -> Call[Gradients[T]]:
        body = self._computation(model, x, y, {"loss": loss, "explain": explain or None})
        return self._post("/v1/gradients", body, self.answers.gradients)

    def step(
        self, model: Any, loss: Any, optimizer: Any, x: Any, y: Any, explain: bool
    ) -> Call[StepResult[T]]:
        extra = {"loss": loss, "optimizer": optimizer, "explain": explain or None}
        return self._post("/v1/step", self._computation(model, x, y, extra), self.answers.step)

    def create_session(
        self,
        model: Any,
        loss: Any,
        optimizer: Any,
        scheduler: Any,
        name: str | None,
        device: str | None,
        idempotency_key: str | None,
    ) -> Call[Session[T]]:
        encoder = _Encoder(self.threshold)
        body = {
            "model": encoder.spec(model),
            "loss": encoder.spec(loss),
            "optimizer": encoder.spec(optimizer),
        }
        for key, value in (("scheduler", scheduler), ("name", name), ("device", device)):
            if value is not None:
                body[key] = encoder.spec(value)
        return self._post("/v1/sessions", body, self.answers.session, idempotency_key)

    def sessions_page(
        self, page_size: int, cursor: str | None, with_params: bool
    ) -> Call[Page[SessionSummary[T]]]:
        params: dict[str, Any] = {"limit": page_size}
        if cursor is not None:
            params["cursor"] = cursor
        if with_params:
            params["include"] = "params"
        return Call("GET", "/v1/sessions", self.answers.session_page, params=params)

    def get_session(self, session: SessionRef) -> Call[Session[T]]:
        return Call("GET", f"/v1/sessions/{_seg(_sid(session))}", self.answers.session)

    def patch_session(
        self,
        session: SessionRef,
        name: str | None,
        optimizer: Any,
        scheduler: Any,
        params: Mapping[str, Any] | None,
        if_match: str | Session[Any] | None,
    ) -> Call[Session[T]]:
        encoder = _Encoder(self.threshold)
        body: dict[str, Any] = {}
        if name is not None:
            body["name"] = name
        if optimizer is not None:
            body["optimizer"] = encoder.spec(optimizer)
        if scheduler is not None:
            body["scheduler"] = encoder.spec(scheduler)
        if params is not None:
            body["params"] = {str(k): encoder.tensor(v) for k, v in params.items()}
        headers = {"Content-Type": "application/json", **self._if_match(if_match)}
        path = f"/v1/sessions/{_seg(_sid(session))}"
        return Call("PATCH", path, self.answers.session, _dumps(body), headers, resend=False)

    def delete_session(self, session: SessionRef) -> Call[None]:
        path = f"/v1/sessions/{_seg(_sid(session))}"
        return Call("DELETE", path, _answers.nothing, accept_on_retry=frozenset({404}))

    def _session_batch(
        self, session: SessionRef, x: Any, y: Any, explain: bool
    ) -> tuple[str, dict[str, Any]]:
        sid = _sid(session)
        encoder = _Encoder(self.threshold)
        body: dict[str, Any] = {"batch": encoder.batch(x, y)}
        if explain:
            body["explain"] = True
        body["encoding"] = self._encoding(encoder, self.answers.sizes.get(sid, 0))
        return f"/v1/sessions/{_seg(sid)}", body

    def session_step(
        self,
        session: SessionRef,
        x: Any,
        y: Any,
        explain: bool,
        if_match: str | Session[Any] | None,
        idempotency_key: str | None,
    ) -> Call[StepResult[T]]:
        path, body = self._session_batch(session, x, y, explain)
        call = self._post(path + "/step", body, self.answers.step, idempotency_key)
        call.headers.update(self._if_match(if_match))
        return call

    def accumulate(
        self,
        session: SessionRef,
        x: Any,
        y: Any,
        if_match: str | Session[Any] | None,
        idempotency_key: str | None,
        grad_outputs: Any = None,
    ) -> Call[Accumulated[T]]:
        path, body = self._session_batch(session, x, y, False)
        if grad_outputs is not None:  # the custom-loss path: dL/doutputs instead of y
            body["grad_outputs"] = _Encoder(self.threshold).tensor(grad_outputs)
        call = self._post(path + "/accumulate", body, self.answers.accumulated, idempotency_key)
        call.headers.update(self._if_match(if_match))
        return call

    def apply(
        self,
        session: SessionRef,
        scale: float | None,
        if_match: str | Session[Any] | None,
        idempotency_key: str | None,
    ) -> Call[Applied[T]]:
        sid = _sid(session)
        body: dict[str, Any] = {
            "encoding": self._encoding(_Encoder(self.threshold), self.answers.sizes.get(sid, 0))
        }
        if scale is not None:
            body["scale"] = scale
        path = f"/v1/sessions/{_seg(sid)}/apply"
        call = self._post(path, body, self.answers.applied, idempotency_key)
        call.headers.update(self._if_match(if_match))
        return call

    def session_gradients(
        self, session: SessionRef, x: Any, y: Any, explain: bool
    ) -> Call[Gradients[T]]:
        path, body = self._session_batch(session, x, y, explain)
        return self._post(path + "/gradients", body, self.answers.gradients)

    def session_forward(self, session: SessionRef, x: Any) -> Call[T]:
        path, body = self._session_batch(session, x, None, False)
        return self._post(path + "/forward", body, self.answers.outputs)

    def history_page(
        self, session: SessionRef, page_size: int, cursor: str | None
    ) -> Call[Page[HistoryItem]]:
        params: dict[str, Any] = {"limit": page_size}
        if cursor is not None:
            params["cursor"] = cursor
        path = f"/v1/sessions/{_seg(_sid(session))}/history"
        return Call("GET", path, _answers.history_page, params=params)

    def checkpoint(self, session: SessionRef) -> Call[bytes]:
        path = f"/v1/sessions/{_seg(_sid(session))}/checkpoint"
        return Call("GET", path, _answers.content)

    def restore(self, data: bytes, idempotency_key: str | None) -> Call[Session[T]]:
        headers = {
            "Content-Type": "application/octet-stream",
            "Idempotency-Key": idempotency_key or str(uuid.uuid4()),
        }
        return Call("POST", "/v1/sessions/restore", self.answers.session, bytes(data), headers)

    def step_many(
        self,
        items: Sequence[BatchItem | tuple[Any, ...]],
        include: Sequence[str] | None,
        idempotency_key: str | None,
    ) -> Call[list[StepManyItem[T]]]:
        encoder = _Encoder(self.threshold)
        wire: list[dict[str, Any]] = []
        expected = 0
        for item in items:
            one = item if isinstance(item, BatchItem) else BatchItem(*item)
            sid = _sid(one.session)
            entry: dict[str, Any] = {"session": sid, "batch": encoder.batch(one.x, one.y)}
            if one.idempotency_key is not None:
                entry["idempotency_key"] = one.idempotency_key
            wire.append(entry)
            expected += self.answers.sizes.get(sid, 0)
        body: dict[str, Any] = {"items": wire}
        if include is not None:
            body["include"] = list(include)
        body["encoding"] = self._encoding(encoder, expected)
        return self._post("/v1/sessions/step", body, self.answers.step_many, idempotency_key)

    def train(
        self,
        session: SessionRef,
        x: Any,
        y: Any,
        epochs: int,
        batch_size: int,
        shuffle: bool | None,
        seed: int | None,
        idempotency_key: str | None,
    ) -> Call[Job]:
        encoder = _Encoder(self.threshold)
        body: dict[str, Any] = {
            "dataset": encoder.batch(x, y),
            "epochs": epochs,
            "batch_size": batch_size,
        }
        if shuffle is not None:
            body["shuffle"] = shuffle
        if seed is not None:
            body["seed"] = seed
        path = f"/v1/sessions/{_seg(_sid(session))}/train"
        return self._post(path, body, self.answers.started_job, idempotency_key)

    def job(self, job: str | Job) -> Call[Job]:
        jid = job_id(job)
        return Call("GET", f"/v1/jobs/{_seg(jid)}", self.answers.job(jid))

    def cancel(self, job: str | Job) -> Call[Job | None]:
        jid = job_id(job)
        return Call("DELETE", f"/v1/jobs/{_seg(jid)}", self.answers.cancelled_job(jid))

    def workers(self) -> Call[list[Worker]]:
        return Call("GET", "/v1/workers", _answers.workers)

    def health(self) -> Call[Health]:
        return Call("GET", "/healthz", _answers.health, retries=0)

    def ready(self) -> Call[Health]:
        return Call("GET", "/readyz", _answers.health, accept=frozenset({503}), retries=0)

    @staticmethod
    def _if_match(value: str | Session[Any] | None) -> dict[str, str]:
        etag = value.etag if isinstance(value, Session) else value
        return {"If-Match": etag} if etag else {}
