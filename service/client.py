"""A typed Python client for gradsvc, sync (``Client``) and async (``AsyncClient``), on httpx.

::

    from service.client import Client

    NOTEBOOK = {"type": "expression", "expression": "w * x + 1",
                "params": {"w": {"value": [1.0]}}, "dtype": "float64"}
    with Client("http://127.0.0.1:8000") as gs:
        s = gs.create_session(NOTEBOOK, "squared", {"type": "sgd", "lr": 0.1})
        gs.session_step(s, x=1, y=3).params["w"]  # tensor([1.1], dtype=torch.float64)

Tensors come back as torch tensors, or numpy arrays with ``Client(..., tensors="numpy")``;
they go out from numbers, nested lists, numpy arrays or torch tensors, as nested lists when
small and as ``{"dtype", "shape", "b64"}`` (raw little-endian bytes) past ``b64_threshold``
elements. torch is imported only when a torch tensor is made, so importing this is light.

Every POST carries an ``Idempotency-Key`` (a fresh uuid4 per call, the same on each of its
retries), so a retry never applies a step twice. A call is retried, with bounded exponential
backoff and jitter, on a connection error or a dropped connection, and on 429 and 503 after
their ``Retry-After``; never on a 429 ``quota-exceeded`` (waiting does not lift a quota), nor
on another 4xx. A PATCH, which the service cannot deduplicate,
is retried only where it cannot have reached the service (no connection, 429, 503).

Every error this module raises for an answer carries the problem+json body::

    ClientError                         anything this module raises about a call
    ├── NetworkError                    no answer after every retry (connect, read, dropped)
    └── ApiError                        a 4xx/5xx answer: status, type, title, detail, problem
        ├── InvalidInputError           400, 422  malformed JSON, validation, invalid-tensor, ...
        ├── AuthenticationError         401       no or unknown API key
        ├── NotFoundError               404       also another key's session
        ├── ConflictError               409       the same Idempotency-Key still in flight
        ├── PreconditionFailedError     412       If-Match names an old version
        ├── PayloadTooLargeError        413       request body over the limit
        ├── RateLimitedError            429       retried first; .retry_after
        │   └── QuotaExceededError      429       a per-key quota: not retried
        └── ServerError                 5xx
            ├── UnavailableError        503       retried first; .retry_after
            ├── ComputeTimeoutError     504       over the compute time limit; nothing changed
            └── OutOfMemoryError        507       the device ran out of memory

The two clients share everything but their send loops: ``_Core`` turns each method's
arguments into a ``_Call`` (method, path, body, headers, how to parse the answer, whether a
resend is safe) and decides, for each answer or transport error, to return, raise or wait.
"""

from __future__ import annotations

import base64
import email.utils
import json
import math
import random
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from http import HTTPStatus
from types import TracebackType
from typing import (
    TYPE_CHECKING,
    Any,
    Generic,
    Literal,
    Self,
    TypeAlias,
    TypedDict,
    TypeVar,
    Unpack,
    overload,
)
from urllib.parse import quote

import anyio
import httpx
import numpy as np
import orjson

if TYPE_CHECKING:
    import torch
    from numpy.typing import NDArray

    TensorLike: TypeAlias = float | int | Sequence[Any] | NDArray[Any] | torch.Tensor
    BatchInput: TypeAlias = TensorLike | Mapping[str, TensorLike]

__all__ = [
    "ApiError",
    "AsyncClient",
    "AuthenticationError",
    "BatchItem",
    "Client",
    "ClientError",
    "ComputeTimeoutError",
    "ConflictError",
    "Gradients",
    "Health",
    "HistoryItem",
    "InvalidInputError",
    "Job",
    "JobEvent",
    "NetworkError",
    "NotFoundError",
    "Options",
    "OutOfMemoryError",
    "PayloadTooLargeError",
    "PreconditionFailedError",
    "QuotaExceededError",
    "RateLimitedError",
    "ServerError",
    "Session",
    "SessionSummary",
    "StepManyItem",
    "StepResult",
    "TraceNode",
    "UnavailableError",
    "Worker",
]

DEFAULT_URL = "http://127.0.0.1:8000"
USER_AGENT = "gradsvc-client/0.1"
T = TypeVar("T")  # the tensor type of a client's answers: torch.Tensor or a numpy array
R = TypeVar("R")

# ---------------------------------------------------------------------------------------------
# Errors


class ClientError(Exception):
    """Anything this module raises about a call (other than a caller's own mistake)."""


class NetworkError(ClientError):
    """No answer: the connection failed or dropped on every try. ``__cause__`` is httpx's."""


class ApiError(ClientError):
    """A 4xx or 5xx answer. ``problem`` is its RFC 9457 body as sent (``errors`` and all)."""

    def __init__(
        self,
        status: int,
        type: str,  # noqa: A002 (the problem member's own name)
        title: str,
        detail: str,
        problem: dict[str, Any],
        *,
        retry_after: float | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(f"{status} {type}: {detail}")
        self.status, self.type, self.title, self.detail = status, type, title, detail
        self.problem = problem
        self.retry_after = retry_after
        self.headers: dict[str, str] = dict(headers or {})

    @property
    def errors(self) -> list[dict[str, Any]]:
        """A validation problem's ``errors`` (``loc``, ``msg``, ``type``); empty otherwise."""
        errors = self.problem.get("errors")
        return list(errors) if isinstance(errors, list) else []


class InvalidInputError(ApiError):
    """400 or 422: the request is malformed or invalid; ``type`` says how."""


class AuthenticationError(ApiError):
    """401: no API key, or one the service does not know."""


class NotFoundError(ApiError):
    """404: no such session or job (or it belongs to another key)."""


class ConflictError(ApiError):
    """409: a request with the same Idempotency-Key is still running."""


class PreconditionFailedError(ApiError):
    """412: ``If-Match`` named a version the session has moved on from."""


class PayloadTooLargeError(ApiError):
    """413: the request body is over the service's limit."""


class RateLimitedError(ApiError):
    """429: over the key's request rate or requests in flight; ``retry_after`` in seconds."""


class QuotaExceededError(RateLimitedError):
    """429 ``quota-exceeded``: a per-key quota (sessions, active jobs, event streams, stored
    bytes) is used up; the detail says what to finish, close or delete. Never retried."""


class ServerError(ApiError):
    """A 5xx answer."""


class UnavailableError(ServerError):
    """503: queue full, draining, or not ready; ``retry_after`` in seconds."""


class ComputeTimeoutError(ServerError):
    """504: the computation ran over the service's time limit; nothing was changed."""


class OutOfMemoryError(ServerError):
    """507: the device ran out of memory."""


_ERRORS: dict[int, type[ApiError]] = {
    400: InvalidInputError,
    401: AuthenticationError,
    404: NotFoundError,
    409: ConflictError,
    412: PreconditionFailedError,
    413: PayloadTooLargeError,
    422: InvalidInputError,
    429: RateLimitedError,
    503: UnavailableError,
    504: ComputeTimeoutError,
    507: OutOfMemoryError,
}


def _error_class(status: int, type_: object) -> type[ApiError]:
    if status == 429 and type_ == "quota-exceeded":
        return QuotaExceededError
    return _ERRORS.get(status) or (ServerError if status >= 500 else ApiError)


def _api_error(response: httpx.Response) -> ApiError:
    status = response.status_code
    phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Error"
    problem: dict[str, Any]
    try:
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        body = None
    if isinstance(body, dict):
        problem = body
    else:  # e.g. a proxy's HTML page: keep a little of it
        text = response.content[:500].decode("utf-8", "replace")
        problem = {"type": "about:blank", "title": phrase, "status": status, "detail": text}
    cls = _error_class(status, problem.get("type"))
    return cls(
        status,
        str(problem.get("type", "about:blank")),
        str(problem.get("title", phrase)),
        str(problem.get("detail", "")),
        problem,
        retry_after=_retry_after(response.headers.get("retry-after")),
        headers=response.headers,
    )


def _retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header: delta-seconds or an HTTP date."""
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


# ---------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class TraceNode(Generic[T]):
    """One node of an explained computation: its value, dL/dnode and d node / d input."""

    node: str
    op: str
    inputs: list[str]
    value: T
    grad: T | None
    local: dict[str, T] | None


@dataclass(frozen=True)
class Gradients(Generic[T]):
    loss: float
    grads: dict[str, T]
    grad_norm: float
    outputs: T
    trace: list[TraceNode[T]] | None = None


@dataclass(frozen=True)
class StepResult(Gradients[T]):
    """A step's answer. ``step`` is the session's step after it (None for a stateless step);
    ``replayed`` is true when the service answered from the call's Idempotency-Key;
    ``etag`` is the session's new ETag, for ``if_match``."""

    params: dict[str, T] = field(default_factory=dict)
    step: int | None = None
    replayed: bool = False
    etag: str | None = None


@dataclass(frozen=True)
class Session(Generic[T]):
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


@dataclass(frozen=True)
class SessionSummary(Generic[T]):
    """A session as ``list_sessions`` gives it: its parameters only when asked for."""

    id: str
    name: str | None
    model_type: str
    step: int
    job: str | None
    updated_at: datetime
    params: dict[str, T] | None = None


@dataclass(frozen=True)
class HistoryItem:
    step: int
    loss: float
    grad_norm: float
    at: datetime


@dataclass(frozen=True)
class BatchItem:
    """One item of ``step_many``: a session and its batch (``x`` alone is fine for none)."""

    session: str | Session[Any]
    x: Any
    y: Any = None
    idempotency_key: str | None = None


@dataclass(frozen=True)
class StepManyItem(Generic[T]):
    """One item of a ``step_many`` answer: ``status`` 200 and what ``include`` named, or an
    ``error`` (the problem this item's own ``/step`` would have had)."""

    session: str
    status: int
    step: int | None = None
    loss: float | None = None
    grad_norm: float | None = None
    grads: dict[str, T] | None = None
    params: dict[str, T] | None = None
    outputs: T | None = None
    replayed: bool = False
    error: ApiError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.status < 400

    def raise_for_error(self) -> Self:
        if self.error is not None:
            raise self.error
        return self


@dataclass(frozen=True)
class Job:
    """A training job: ``status`` is queued, running, succeeded, failed or cancelled.
    ``raw`` is the body as sent, for fields this client does not know yet."""

    id: str
    status: str
    progress: float | None = None
    epoch: int | None = None
    step: int | None = None
    loss: float | None = None
    error: Any = None
    session: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def done(self) -> bool:
        return self.status in JOB_DONE


JOB_DONE = frozenset({"succeeded", "failed", "cancelled"})
INTERRUPTED_WAIT = 0.5
"""Seconds before following a job again after its stream's server shut down."""


@dataclass(frozen=True)
class JobEvent:
    """One server-sent event: ``event`` (``message`` when unnamed), ``data`` (JSON when it
    parses, else the text), ``id``, and ``job`` when the data is a job's state."""

    event: str
    data: Any
    id: str | None = None
    job: Job | None = None


@dataclass(frozen=True)
class Worker:
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
    """``ok``: 200. ``ready()`` answers ``ok=False`` and the problem's detail on a 503."""

    ok: bool
    status: str
    detail: str | None = None


# ---------------------------------------------------------------------------------------------
# Tensors on the wire (service/engine/tensors.py is the other end)

_WIRE_DTYPES = {"float32": "<f4", "float64": "<f8", "float16": "<f2", "int64": "<i8"}


def _torch_or_none() -> Any:
    """torch if the caller has imported it: a value cannot be a torch tensor otherwise."""
    return sys.modules.get("torch")


def _is_torch(value: Any) -> bool:
    torch = _torch_or_none()
    return torch is not None and isinstance(value, torch.Tensor)


class _Encoder:
    """Tensors of one request to their wire forms, counting the elements it sends."""

    def __init__(self, threshold: int) -> None:
        self.threshold = threshold
        self.elements = 0

    def tensor(self, value: Any) -> Any:
        if _is_wire_form(value):
            return dict(value)
        if _is_torch(value):
            return self._torch(value)
        if isinstance(value, np.generic):
            value = value.item()
        if isinstance(value, bool | int | float) or value is None:
            self.elements += 1
            return value
        if isinstance(value, np.ndarray):
            return self._array(value)
        if isinstance(value, list | tuple):
            try:
                array = np.asarray(value) if value else np.zeros(0)
            except (ValueError, OverflowError):
                return value  # ragged: the service says what is wrong with it
            if array.dtype.kind in "biuf":
                return self._array(array)
            return value  # not numbers, or integers out of range: the same
        raise TypeError(f"not a tensor: {type(value).__name__}")

    def _torch(self, value: Any) -> Any:
        torch = _torch_or_none()
        tensor = value.detach().cpu()
        if tensor.dtype == torch.bfloat16:
            self.elements += tensor.numel()
            if tensor.numel() <= self.threshold:
                return tensor.tolist()
            raw = tensor.contiguous().view(torch.int16).numpy().astype("<i2").tobytes()
            return _b64("bfloat16", list(tensor.shape), raw)
        return self._array(tensor.numpy())

    def _array(self, array: NDArray[Any]) -> Any:
        kind = array.dtype.kind
        if kind in "biu":
            name = "int64"
        elif kind == "f" and array.dtype.itemsize in (2, 4, 8):
            name = f"float{array.dtype.itemsize * 8}"
        elif kind == "f":
            name = "float64"
        else:
            raise TypeError(f"a tensor holds numbers, not {array.dtype}")
        self.elements += array.size
        if array.size <= self.threshold:
            return array.tolist()
        raw = np.ascontiguousarray(array, dtype=_WIRE_DTYPES[name]).tobytes()
        return _b64(name, list(array.shape), raw)

    def batch(self, x: Any, y: Any = None) -> dict[str, Any]:
        wire_x = (
            {str(k): self.tensor(v) for k, v in x.items()}
            if isinstance(x, Mapping) and not _is_wire_form(x)
            else self.tensor(x)
        )
        out = {"x": wire_x}
        if y is not None:
            out["y"] = self.tensor(y)
        return out

    def spec(self, value: Any) -> Any:
        """A model, loss or optimizer spec: tensors anywhere in it (a param's ``value``)."""
        if isinstance(value, Mapping):
            return {
                str(k): self.tensor(v) if k == "value" else self.spec(v) for k, v in value.items()
            }
        if isinstance(value, list | tuple):
            return [self.spec(v) for v in value]
        if isinstance(value, np.ndarray) or _is_torch(value):
            return self.tensor(value)
        if isinstance(value, np.generic):
            return value.item()
        return value


def _is_wire_form(value: Any) -> bool:
    """A tensor already in the object form: ``{"dtype", "shape", "data" | "b64"}``."""
    return (
        isinstance(value, Mapping)
        and ("data" in value or "b64" in value)
        and set(value) <= {"dtype", "shape", "data", "b64"}
    )


def _b64(dtype: str, shape: list[int], raw: bytes) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "b64": base64.b64encode(raw).decode("ascii")}


def _model_elements(model: Mapping[str, Any]) -> int:
    """About how many parameters a model spec has: whether its answers pay for b64. A spec
    this cannot read counts 0: the service, not the client, says what is wrong with it."""
    total = 0
    try:
        for param in (model.get("params") or {}).values():
            if isinstance(param, Mapping) and isinstance(param.get("shape"), list):
                total += math.prod(int(d) for d in param["shape"])
        layers = model.get("layers") if model.get("type") == "sequential" else [model]
        for layer in layers or []:
            if isinstance(layer, Mapping) and layer.get("type") == "linear":
                total += int(layer.get("in_features", 0)) * int(layer.get("out_features", 0))
    except (AttributeError, TypeError, ValueError):
        return 0
    return total


def _to_numpy(value: Any) -> NDArray[Any]:
    if isinstance(value, dict):
        shape = [int(d) for d in value["shape"]]
        dtype = str(value.get("dtype", "float32"))
        if "data" in value:
            return np.asarray(value["data"], dtype=_WIRE_DTYPES.get(dtype)).reshape(shape)
        raw = base64.b64decode(value["b64"])
        if dtype == "bfloat16":  # numpy has none: widen to float32, which is exact
            bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
            return bits.view(np.float32).reshape(shape)
        wire = np.dtype(_WIRE_DTYPES[dtype])
        # astype: a native-order copy that owns its (writable) memory
        return np.frombuffer(raw, dtype=wire).astype(wire.newbyteorder("=")).reshape(shape)
    # JSON loses the dtype: floats read as float64 (exact for every float dtype), ints as int64
    return np.asarray(value)


def _to_torch(value: Any) -> torch.Tensor:
    import torch

    if isinstance(value, dict) and value.get("dtype") == "bfloat16" and "b64" in value:
        bits = np.frombuffer(base64.b64decode(value["b64"]), dtype="<i2").astype(np.int16)
        shape = [int(d) for d in value["shape"]]
        return torch.from_numpy(bits).view(torch.bfloat16).reshape(shape)
    array = _to_numpy(value)
    if not (array.flags.writeable and array.flags.c_contiguous):
        array = array.copy(order="C")  # not ascontiguousarray: it makes a 0-d array 1-d
    return torch.from_numpy(array)


def _decoder(mode: str) -> Callable[[Any], Any]:
    if mode == "torch":
        return _to_torch
    if mode == "numpy":
        return _to_numpy
    raise ValueError(f"tensors must be 'torch' or 'numpy', not {mode!r}")


# ---------------------------------------------------------------------------------------------
# Server-sent events


class _SSEParser:
    """``text/event-stream`` lines to events, as the WHATWG spec reads them."""

    def __init__(self) -> None:
        self.last_id: str | None = None
        self._event = ""
        self._data: list[str] = []

    def feed(self, line: str) -> tuple[str, str, str | None] | None:
        """One line (without its end); an (event, data, id) when a blank line ends one."""
        if not line:
            if not self._data:
                self._event = ""
                return None
            out = (self._event or "message", "\n".join(self._data), self.last_id)
            self._event, self._data = "", []
            return out
        if line.startswith(":"):
            return None  # a comment: keep-alive pings
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        elif name == "id" and "\0" not in value:
            self.last_id = value
        return None  # "retry" and unknown fields: this client reconnects on its own schedule


# ---------------------------------------------------------------------------------------------
# The shared core: requests described, answers parsed, retries decided


@dataclass
class _Call(Generic[R]):
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
class _Wait:
    seconds: float


@dataclass(frozen=True)
class _Page(Generic[R]):
    items: list[R]
    next: str | None


_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
_NEVER_RETRY = (httpx.UnsupportedProtocol, httpx.LocalProtocolError, httpx.ProxyError)


class Options(TypedDict, total=False):
    """What both clients take besides ``base_url`` and ``tensors``.

    - ``api_key``: sent as ``Authorization: Bearer``.
    - ``timeout``: seconds for connect, read and write (default 60).
    - ``retries``: retries after the first try (default 3); ``backoff``: the first wait, in
      seconds, doubled each retry, with jitter (default 0.25); ``max_wait``: the most one wait
      may be (default 30): a ``Retry-After`` longer than that is raised at once.
    - ``encoding``: answers as nested lists, in b64, or ``auto`` (default): b64 when the
      request or the model is over ``b64_threshold`` elements (default 1024), which is also
      where input tensors go as b64.
    - ``headers``: more headers for every request.
    """

    api_key: str | None
    timeout: float
    retries: int
    backoff: float
    max_wait: float
    encoding: Literal["auto", "list", "b64"]
    b64_threshold: int
    headers: Mapping[str, str]


SessionRef: TypeAlias = "str | Session[Any]"


def _sid(session: str | Session[Any]) -> str:
    return session.id if isinstance(session, Session) else session


def _seg(value: str) -> str:
    return quote(value, safe="")


def _json(response: httpx.Response) -> Any:
    return orjson.loads(response.content)


def _time(value: str) -> datetime:
    return datetime.fromisoformat(value)


def _replayed(response: httpx.Response) -> bool:
    value: str = response.headers.get("idempotent-replayed", "")
    return value.lower() == "true"


def _job(body: Mapping[str, Any], job_id: str | None = None) -> Job:
    def num(key: str, kind: Callable[[Any], Any]) -> Any:
        value = body.get(key)
        return kind(value) if value is not None else None

    return Job(
        id=str(body.get("id") or job_id or ""),
        status=str(body.get("status", "")),
        progress=num("progress", float),
        epoch=num("epoch", int),
        step=num("step", int),
        loss=num("loss", float),
        error=body.get("error"),
        session=body.get("session"),
        raw=dict(body),
    )


class _Core(Generic[T]):
    def __init__(self, tensors: str, options: Options) -> None:
        self.decode: Callable[[Any], T] = _decoder(tensors)
        self.retries = int(options.get("retries", 3))
        self.backoff = float(options.get("backoff", 0.25))
        self.max_wait = float(options.get("max_wait", 30.0))
        self.encoding = options.get("encoding", "auto")
        self.threshold = int(options.get("b64_threshold", 1024))
        if self.encoding not in ("auto", "list", "b64"):
            raise ValueError(f"encoding must be 'auto', 'list' or 'b64', not {self.encoding!r}")
        self.headers = {"User-Agent": USER_AGENT, **dict(options.get("headers") or {})}
        api_key = options.get("api_key")
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.timeout = float(options.get("timeout", 60.0))
        # Parameters per session, as last seen: whether its answers pay for b64.
        self._sizes: dict[str, int] = {}

    # -- retry decisions ------------------------------------------------------------------

    def on_response(self, call: _Call[R], response: httpx.Response, attempt: int) -> R | _Wait:
        status = response.status_code
        if status < 400 or status in call.accept or (attempt and status in call.accept_on_retry):
            return call.parse(response)
        error = _api_error(response)
        retryable = status in (429, 503) and not isinstance(error, QuotaExceededError)
        if retryable and attempt < self._retries(call):
            after = error.retry_after
            if after is None or after <= self.max_wait:
                return _Wait(max(after or 0.0, self._backoff(attempt)))
        raise error

    def on_transport_error(
        self, call: _Call[Any], exc: httpx.TransportError, attempt: int
    ) -> _Wait:
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
        return _Wait(self._backoff(attempt))

    def _retries(self, call: _Call[Any]) -> int:
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
    ) -> _Call[R]:
        try:
            content = json.dumps(body, allow_nan=False, separators=(",", ":")).encode()
        except ValueError as exc:
            raise ValueError(f"JSON has no NaN or Infinity: send finite numbers ({exc})") from None
        headers = {
            "Content-Type": "application/json",
            "Idempotency-Key": idempotency_key or str(uuid.uuid4()),
        }
        return _Call("POST", path, parse, content, headers)

    def _encoding(self, encoder: _Encoder, expected: int = 0) -> str:
        if self.encoding != "auto":
            return self.encoding
        return "b64" if encoder.elements + expected > self.threshold else "list"

    def _computation(
        self,
        model: Mapping[str, Any],
        x: Any,
        y: Any,
        extra: dict[str, Any],
    ) -> dict[str, Any]:
        encoder = _Encoder(self.threshold)
        body = {"model": encoder.spec(model), "batch": encoder.batch(x, y)}
        body.update({k: encoder.spec(v) for k, v in extra.items() if v is not None})
        body["encoding"] = self._encoding(encoder, _model_elements(model))
        return body

    def forward(self, model: Mapping[str, Any], x: Any) -> _Call[T]:
        return self._post("/v1/forward", self._computation(model, x, None, {}), self._outputs)

    def gradients(
        self, model: Mapping[str, Any], loss: Any, x: Any, y: Any, explain: bool
    ) -> _Call[Gradients[T]]:
        extra = {"loss": loss, "explain": explain or None}
        body = self._computation(model, x, y, extra)
        return self._post("/v1/gradients", body, self._gradients)

    def step(
        self, model: Mapping[str, Any], loss: Any, optimizer: Any, x: Any, y: Any, explain: bool
    ) -> _Call[StepResult[T]]:
        extra = {"loss": loss, "optimizer": optimizer, "explain": explain or None}
        return self._post("/v1/step", self._computation(model, x, y, extra), self._step)

    def create_session(
        self,
        model: Mapping[str, Any],
        loss: Any,
        optimizer: Any,
        name: str | None,
        device: str | None,
        idempotency_key: str | None,
    ) -> _Call[Session[T]]:
        encoder = _Encoder(self.threshold)
        body = {
            "model": encoder.spec(model),
            "loss": encoder.spec(loss),
            "optimizer": encoder.spec(optimizer),
        }
        if name is not None:
            body["name"] = name
        if device is not None:
            body["device"] = device
        return self._post("/v1/sessions", body, self._session, idempotency_key)

    def sessions_page(
        self, page_size: int, cursor: str | None, with_params: bool = False
    ) -> _Call[_Page[SessionSummary[T]]]:
        params: dict[str, Any] = {"limit": page_size}
        if cursor is not None:
            params["cursor"] = cursor
        if with_params:
            params["include"] = "params"
        return _Call("GET", "/v1/sessions", self._session_page, params=params)

    def get_session(self, session: SessionRef) -> _Call[Session[T]]:
        return _Call("GET", f"/v1/sessions/{_seg(_sid(session))}", self._session)

    def patch_session(
        self,
        session: SessionRef,
        name: str | None,
        optimizer: Mapping[str, Any] | None,
        params: Mapping[str, Any] | None,
        if_match: str | Session[Any] | None,
    ) -> _Call[Session[T]]:
        encoder = _Encoder(self.threshold)
        body: dict[str, Any] = {}
        if name is not None:
            body["name"] = name
        if optimizer is not None:
            body["optimizer"] = encoder.spec(optimizer)
        if params is not None:
            body["params"] = {str(k): encoder.tensor(v) for k, v in params.items()}
        content = json.dumps(body, allow_nan=False, separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json", **self._if_match(if_match)}
        path = f"/v1/sessions/{_seg(_sid(session))}"
        return _Call("PATCH", path, self._session, content, headers, resend=False)

    def delete_session(self, session: SessionRef) -> _Call[None]:
        path = f"/v1/sessions/{_seg(_sid(session))}"
        return _Call("DELETE", path, _nothing, accept_on_retry=frozenset({404}))

    def _session_batch(
        self, session: SessionRef, x: Any, y: Any, explain: bool
    ) -> tuple[str, dict[str, Any]]:
        sid = _sid(session)
        encoder = _Encoder(self.threshold)
        body: dict[str, Any] = {"batch": encoder.batch(x, y)}
        if explain:
            body["explain"] = True
        body["encoding"] = self._encoding(encoder, self._sizes.get(sid, 0))
        return f"/v1/sessions/{_seg(sid)}", body

    def session_step(
        self,
        session: SessionRef,
        x: Any,
        y: Any,
        explain: bool,
        if_match: str | Session[Any] | None,
        idempotency_key: str | None,
    ) -> _Call[StepResult[T]]:
        path, body = self._session_batch(session, x, y, explain)
        call = self._post(path + "/step", body, self._step, idempotency_key)
        call.headers.update(self._if_match(if_match))
        return call

    def session_gradients(
        self, session: SessionRef, x: Any, y: Any, explain: bool
    ) -> _Call[Gradients[T]]:
        path, body = self._session_batch(session, x, y, explain)
        return self._post(path + "/gradients", body, self._gradients)

    def session_forward(self, session: SessionRef, x: Any) -> _Call[T]:
        path, body = self._session_batch(session, x, None, False)
        return self._post(path + "/forward", body, self._outputs)

    def history_page(
        self, session: SessionRef, page_size: int, cursor: str | None
    ) -> _Call[_Page[HistoryItem]]:
        params: dict[str, Any] = {"limit": page_size}
        if cursor is not None:
            params["cursor"] = cursor
        path = f"/v1/sessions/{_seg(_sid(session))}/history"
        return _Call("GET", path, _history_page, params=params)

    def checkpoint(self, session: SessionRef) -> _Call[bytes]:
        path = f"/v1/sessions/{_seg(_sid(session))}/checkpoint"
        return _Call("GET", path, _content)

    def restore(self, data: bytes, idempotency_key: str | None) -> _Call[Session[T]]:
        headers = {
            "Content-Type": "application/octet-stream",
            "Idempotency-Key": idempotency_key or str(uuid.uuid4()),
        }
        return _Call("POST", "/v1/sessions/restore", self._session, bytes(data), headers)

    def step_many(
        self,
        items: Sequence[BatchItem | tuple[Any, ...]],
        include: Sequence[str] | None,
        idempotency_key: str | None,
    ) -> _Call[list[StepManyItem[T]]]:
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
            expected += self._sizes.get(sid, 0)
        body: dict[str, Any] = {"items": wire}
        if include is not None:
            body["include"] = list(include)
        body["encoding"] = self._encoding(encoder, expected)
        return self._post("/v1/sessions/step", body, self._step_many, idempotency_key)

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
    ) -> _Call[Job]:
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
        return self._post(path, body, _started_job, idempotency_key)

    def job(self, job_id: str) -> _Call[Job]:
        return _Call("GET", f"/v1/jobs/{_seg(job_id)}", lambda r: _job(_json(r), job_id))

    def cancel(self, job_id: str) -> _Call[Job | None]:
        def parse(response: httpx.Response) -> Job | None:
            body = _json(response) if response.content else None
            return _job(body, job_id) if isinstance(body, dict) else None

        return _Call("DELETE", f"/v1/jobs/{_seg(job_id)}", parse)

    def events(self, job_id: str) -> _Events:
        return _Events(self, job_id)

    def workers(self) -> _Call[list[Worker]]:
        return _Call("GET", "/v1/workers", _workers)

    def health(self) -> _Call[Health]:
        return _Call("GET", "/healthz", _health, retries=0)

    def ready(self) -> _Call[Health]:
        return _Call("GET", "/readyz", _health, accept=frozenset({503}), retries=0)

    # -- answers --------------------------------------------------------------------------

    @staticmethod
    def _if_match(value: str | Session[Any] | None) -> dict[str, str]:
        etag = value.etag if isinstance(value, Session) else value
        return {"If-Match": etag} if etag else {}

    def _tensors(self, value: Mapping[str, Any] | None) -> dict[str, T]:
        return {k: self.decode(v) for k, v in (value or {}).items()}

    def _outputs(self, response: httpx.Response) -> T:
        return self.decode(_json(response)["outputs"])

    def _trace(self, value: Any) -> list[TraceNode[T]] | None:
        if value is None:
            return None
        return [
            TraceNode(
                node=n["node"],
                op=n["op"],
                inputs=list(n["inputs"]),
                value=self.decode(n["value"]),
                grad=self.decode(n["grad"]) if n.get("grad") is not None else None,
                local=self._tensors(n["local"]) if n.get("local") is not None else None,
            )
            for n in value
        ]

    def _gradients(self, response: httpx.Response) -> Gradients[T]:
        body = _json(response)
        return Gradients(
            loss=float(body["loss"]),
            grads=self._tensors(body["grads"]),
            grad_norm=float(body["grad_norm"]),
            outputs=self.decode(body["outputs"]),
            trace=self._trace(body.get("trace")),
        )

    def _step(self, response: httpx.Response) -> StepResult[T]:
        body = _json(response)
        return StepResult(
            loss=float(body["loss"]),
            grads=self._tensors(body["grads"]),
            grad_norm=float(body["grad_norm"]),
            outputs=self.decode(body["outputs"]),
            trace=self._trace(body.get("trace")),
            params=self._tensors(body["params"]),
            step=body.get("step"),
            replayed=_replayed(response),
            etag=response.headers.get("etag"),
        )

    def _session_from(self, body: Mapping[str, Any], etag: str | None) -> Session[T]:
        params = self._tensors(body["params"])
        self._sizes[body["id"]] = sum(math.prod(getattr(p, "shape", ())) for p in params.values())
        return Session(
            id=body["id"],
            name=body.get("name"),
            step=int(body["step"]),
            version=int(body["version"]),
            etag=etag or f'"{body["id"]}:{body["version"]}"',
            params=params,
            model=body["model"],
            loss=body["loss"],
            optimizer=body["optimizer"],
            device=body["device"],
            created_at=_time(body["created_at"]),
            updated_at=_time(body["updated_at"]),
        )

    def _session(self, response: httpx.Response) -> Session[T]:
        return self._session_from(_json(response), response.headers.get("etag"))

    def _session_page(self, response: httpx.Response) -> _Page[SessionSummary[T]]:
        body = _json(response)
        items = [
            SessionSummary(
                id=s["id"],
                name=s.get("name"),
                model_type=s["model_type"],
                step=int(s["step"]),
                job=s.get("job"),
                updated_at=_time(s["updated_at"]),
                params=self._tensors(s["params"]) if "params" in s else None,
            )
            for s in body["items"]
        ]
        return _Page(items, body.get("next"))

    def _step_many(self, response: httpx.Response) -> list[StepManyItem[T]]:
        out: list[StepManyItem[T]] = []
        for item in _json(response)["items"]:
            problem = item.get("problem")
            error = None
            if isinstance(problem, dict):
                status = int(problem.get("status", item["status"]))
                error = _error_class(status, problem.get("type"))(
                    status,
                    str(problem.get("type", "about:blank")),
                    str(problem.get("title", "")),
                    str(problem.get("detail", "")),
                    problem,
                )
            out.append(
                StepManyItem(
                    session=item["session"],
                    status=int(item["status"]),
                    step=item.get("step"),
                    loss=item.get("loss"),
                    grad_norm=item.get("grad_norm"),
                    grads=self._tensors(item["grads"]) if "grads" in item else None,
                    params=self._tensors(item["params"]) if "params" in item else None,
                    outputs=self.decode(item["outputs"]) if "outputs" in item else None,
                    replayed=bool(item.get("replayed", False)),
                    error=error,
                )
            )
        return out


def _nothing(response: httpx.Response) -> None:
    return None


def _content(response: httpx.Response) -> bytes:
    return response.content


def _history_page(response: httpx.Response) -> _Page[HistoryItem]:
    body = _json(response)
    items = [
        HistoryItem(int(h["step"]), float(h["loss"]), float(h["grad_norm"]), _time(h["at"]))
        for h in body["items"]
    ]
    return _Page(items, body.get("next"))


def _started_job(response: httpx.Response) -> Job:
    location = response.headers.get("location", "")
    job_id = location.rstrip("/").rsplit("/", 1)[-1] or None
    body = _json(response) if response.content else None
    return _job({"status": "queued", **(body if isinstance(body, dict) else {})}, job_id)


def _workers(response: httpx.Response) -> list[Worker]:
    return [
        Worker(
            index=int(w["index"]),
            device=str(w["device"]),
            pid=w.get("pid"),
            state=str(w["state"]),
            queue_depth=int(w["queue_depth"]),
            sessions_held=int(w["sessions_held"]),
            requests_done=int(w["requests_done"]),
            restarts=int(w["restarts"]),
        )
        for w in _json(response)["items"]
    ]


def _health(response: httpx.Response) -> Health:
    body = _json(response)
    if response.status_code == 200:
        return Health(True, str(body.get("status", "ok")))
    return Health(False, str(body.get("type", "unavailable")), body.get("detail"))


class _Events:
    """One ``events()`` iteration: reconnects with ``Last-Event-ID`` after a dropped stream,
    or after a server that shut down ended it with ``interrupted`` (the job goes on, and the
    next server follows it); ends after the stream ends or a job's state says it is done."""

    def __init__(self, core: _Core[Any], job_id: str) -> None:
        self.core, self.job_id = core, job_id
        self.parser = _SSEParser()
        self.attempt = 0
        self.finished = False
        self.interrupted = False
        self.call: _Call[None] = _Call("GET", f"/v1/jobs/{_seg(job_id)}/events", _nothing)

    def headers(self) -> dict[str, str]:
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
        if self.parser.last_id is not None:
            headers["Last-Event-ID"] = self.parser.last_id
        return headers

    def feed(self, line: str) -> JobEvent | None:
        raw = self.parser.feed(line)
        if raw is None:
            return None
        self.attempt = 0  # events flow again: a later drop gets every retry anew
        name, text, event_id = raw
        try:
            data: Any = orjson.loads(text)
        except orjson.JSONDecodeError:
            data = text
        job = _job(data, self.job_id) if isinstance(data, dict) and "status" in data else None
        if job is not None and job.done:
            self.finished = True
        if name == "end" and job is not None and job.status == "interrupted":
            self.interrupted = True  # not the job's end: follow it on, elsewhere
            return None
        return JobEvent(name, data, event_id, job)

    def ended(self) -> float | None:
        """The stream ended: None if that is the iteration's end, else the wait before
        following the job again."""
        if not self.interrupted:
            return None
        self.interrupted = False
        return INTERRUPTED_WAIT

    def failed(self, response: httpx.Response) -> float:
        """An error answer instead of a stream: the wait before trying again, or raise."""
        outcome = self.core.on_response(self.call, response, self.attempt)
        if not isinstance(outcome, _Wait):  # an error status parse took: none does here
            raise _api_error(response)
        self.attempt += 1
        return outcome.seconds

    def dropped(self, exc: httpx.TransportError) -> float:
        wait = self.core.on_transport_error(self.call, exc, self.attempt)
        self.attempt += 1
        return wait.seconds

    def timeout(self) -> httpx.Timeout:
        # Progress comes every second or step, but a queued job may be quiet for long.
        return httpx.Timeout(self.core.timeout, read=None)


# ---------------------------------------------------------------------------------------------
# The clients: the same methods, each a _Call sent by its own loop


class Client(Generic[T]):
    """The synchronous client. ``with Client(url) as gs: ...``; thread-safe as httpx is."""

    @overload
    def __init__(
        self: Client[torch.Tensor],
        base_url: str = DEFAULT_URL,
        *,
        tensors: Literal["torch"] = "torch",
        transport: httpx.BaseTransport | None = None,
        **options: Unpack[Options],
    ) -> None: ...

    @overload
    def __init__(
        self: Client[NDArray[Any]],
        base_url: str = DEFAULT_URL,
        *,
        tensors: Literal["numpy"],
        transport: httpx.BaseTransport | None = None,
        **options: Unpack[Options],
    ) -> None: ...

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        tensors: Literal["torch", "numpy"] = "torch",
        transport: httpx.BaseTransport | None = None,
        **options: Unpack[Options],
    ) -> None:
        self._core: _Core[T] = _Core(tensors, options)
        self._http = httpx.Client(
            base_url=base_url,
            headers=self._core.headers,
            timeout=self._core.timeout,
            transport=transport,
        )

    def _send(self, call: _Call[R]) -> R:
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
                if not isinstance(outcome, _Wait):
                    return outcome
                wait = outcome
            time.sleep(wait.seconds)
            attempt += 1

    def _pages(self, page: Callable[[str | None], _Call[_Page[R]]]) -> Iterator[R]:
        cursor: str | None = None
        while True:
            got = self._send(page(cursor))
            yield from got.items
            if not got.next:
                return
            cursor = got.next

    # -- stateless --------------------------------------------------------------------------

    def forward(self, model: Mapping[str, Any], x: BatchInput) -> T:
        """``POST /v1/forward``: the model's outputs for ``x``."""
        return self._send(self._core.forward(model, x))

    def gradients(
        self,
        model: Mapping[str, Any],
        loss: str | Mapping[str, Any],
        x: BatchInput,
        y: TensorLike,
        *,
        explain: bool = False,
    ) -> Gradients[T]:
        """``POST /v1/gradients``: loss, dL/dθ and outputs; no update."""
        return self._send(self._core.gradients(model, loss, x, y, explain))

    def step(
        self,
        model: Mapping[str, Any],
        loss: str | Mapping[str, Any],
        optimizer: Mapping[str, Any],
        x: BatchInput,
        y: TensorLike,
        *,
        explain: bool = False,
    ) -> StepResult[T]:
        """``POST /v1/step``: one update from fresh optimizer state."""
        return self._send(self._core.step(model, loss, optimizer, x, y, explain))

    # -- sessions ---------------------------------------------------------------------------

    def create_session(
        self,
        model: Mapping[str, Any],
        loss: str | Mapping[str, Any],
        optimizer: Mapping[str, Any],
        *,
        name: str | None = None,
        device: str | None = None,
        idempotency_key: str | None = None,
    ) -> Session[T]:
        """``POST /v1/sessions``."""
        call = self._core.create_session(model, loss, optimizer, name, device, idempotency_key)
        return self._send(call)

    def list_sessions(
        self, *, page_size: int = 50, with_params: bool = False
    ) -> Iterator[SessionSummary[T]]:
        """``GET /v1/sessions``, every page, lazily: summaries (``with_params``: with each
        session's parameters, ``?include=params``)."""
        return self._pages(lambda cursor: self._core.sessions_page(page_size, cursor, with_params))

    def get_session(self, session: SessionRef) -> Session[T]:
        """``GET /v1/sessions/{id}``."""
        return self._send(self._core.get_session(session))

    def patch_session(
        self,
        session: SessionRef,
        *,
        name: str | None = None,
        optimizer: Mapping[str, Any] | None = None,
        params: Mapping[str, TensorLike] | None = None,
        if_match: str | Session[Any] | None = None,
    ) -> Session[T]:
        """``PATCH /v1/sessions/{id}``; ``if_match`` an ETag or a Session read earlier."""
        return self._send(self._core.patch_session(session, name, optimizer, params, if_match))

    def delete_session(self, session: SessionRef) -> None:
        """``DELETE /v1/sessions/{id}``."""
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
        """``POST /v1/sessions/{id}/step``, exactly once however often it is retried."""
        call = self._core.session_step(session, x, y, explain, if_match, idempotency_key)
        return self._send(call)

    def session_gradients(
        self, session: SessionRef, x: BatchInput, y: TensorLike, *, explain: bool = False
    ) -> Gradients[T]:
        """``POST /v1/sessions/{id}/gradients``: nothing changes."""
        return self._send(self._core.session_gradients(session, x, y, explain))

    def session_forward(self, session: SessionRef, x: BatchInput) -> T:
        """``POST /v1/sessions/{id}/forward``."""
        return self._send(self._core.session_forward(session, x))

    def history(self, session: SessionRef, *, page_size: int = 100) -> Iterator[HistoryItem]:
        """``GET /v1/sessions/{id}/history``, every page, oldest first, lazily."""
        return self._pages(lambda cursor: self._core.history_page(session, page_size, cursor))

    def checkpoint(self, session: SessionRef) -> bytes:
        """``GET /v1/sessions/{id}/checkpoint``: a safetensors file."""
        return self._send(self._core.checkpoint(session))

    def restore(self, data: bytes, *, idempotency_key: str | None = None) -> Session[T]:
        """``POST /v1/sessions/restore``: a new session from a checkpoint file."""
        return self._send(self._core.restore(data, idempotency_key))

    def step_many(
        self,
        items: Sequence[BatchItem | tuple[Any, ...]],
        *,
        include: Sequence[str] | None = None,
        idempotency_key: str | None = None,
    ) -> list[StepManyItem[T]]:
        """``POST /v1/sessions/step``: items are ``BatchItem`` or ``(session, x, y)``."""
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
        """``POST /v1/sessions/{id}/train``: starts a job (``None``: the service's default)."""
        call = self._core.train(session, x, y, epochs, batch_size, shuffle, seed, idempotency_key)
        return self._send(call)

    def job(self, job_id: str | Job) -> Job:
        """``GET /v1/jobs/{jid}``."""
        return self._send(self._core.job(_jid(job_id)))

    def cancel(self, job_id: str | Job) -> Job | None:
        """``DELETE /v1/jobs/{jid}``: the job's state if the service answers with it."""
        return self._send(self._core.cancel(_jid(job_id)))

    def events(self, job_id: str | Job) -> Iterator[JobEvent]:
        """``GET /v1/jobs/{jid}/events``: each event as it comes, until the job is done."""
        stream = self._core.events(_jid(job_id))
        while True:
            try:
                with self._http.stream(
                    "GET", stream.call.path, headers=stream.headers(), timeout=stream.timeout()
                ) as response:
                    if response.status_code >= 400:
                        response.read()
                        wait = stream.failed(response)
                    else:
                        for line in response.iter_lines():
                            event = stream.feed(line)
                            if event is not None:
                                yield event
                                if stream.finished:
                                    return
                        if (resume := stream.ended()) is None:
                            return
                        wait = resume
            except httpx.TransportError as exc:
                wait = stream.dropped(exc)
            time.sleep(wait)

    # -- operations -------------------------------------------------------------------------

    def workers(self) -> list[Worker]:
        """``GET /v1/workers``: an operator key's (``--admin-keys``), or a loopback caller's of a
        keyless server; a tenant key gets 404."""
        return self._send(self._core.workers())

    def health(self) -> Health:
        """``GET /healthz``: the process is up."""
        return self._send(self._core.health())

    def ready(self) -> Health:
        """``GET /readyz``: ``ok`` when store and workers are ready (no retries)."""
        return self._send(self._core.ready())

    def close(self) -> None:
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


class AsyncClient(Generic[T]):
    """The asyncio (or trio) client: ``async with AsyncClient(url) as gs: await gs.step(...)``.
    Its methods are ``Client``'s, awaited; iterators are async iterators."""

    @overload
    def __init__(
        self: AsyncClient[torch.Tensor],
        base_url: str = DEFAULT_URL,
        *,
        tensors: Literal["torch"] = "torch",
        transport: httpx.AsyncBaseTransport | None = None,
        **options: Unpack[Options],
    ) -> None: ...

    @overload
    def __init__(
        self: AsyncClient[NDArray[Any]],
        base_url: str = DEFAULT_URL,
        *,
        tensors: Literal["numpy"],
        transport: httpx.AsyncBaseTransport | None = None,
        **options: Unpack[Options],
    ) -> None: ...

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        tensors: Literal["torch", "numpy"] = "torch",
        transport: httpx.AsyncBaseTransport | None = None,
        **options: Unpack[Options],
    ) -> None:
        self._core: _Core[T] = _Core(tensors, options)
        self._http = httpx.AsyncClient(
            base_url=base_url,
            headers=self._core.headers,
            timeout=self._core.timeout,
            transport=transport,
        )

    async def _send(self, call: _Call[R]) -> R:
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
                if not isinstance(outcome, _Wait):
                    return outcome
                wait = outcome
            await anyio.sleep(wait.seconds)
            attempt += 1

    async def _pages(self, page: Callable[[str | None], _Call[_Page[R]]]) -> AsyncIterator[R]:
        cursor: str | None = None
        while True:
            got = await self._send(page(cursor))
            for item in got.items:
                yield item
            if not got.next:
                return
            cursor = got.next

    async def forward(self, model: Mapping[str, Any], x: BatchInput) -> T:
        return await self._send(self._core.forward(model, x))

    async def gradients(
        self,
        model: Mapping[str, Any],
        loss: str | Mapping[str, Any],
        x: BatchInput,
        y: TensorLike,
        *,
        explain: bool = False,
    ) -> Gradients[T]:
        return await self._send(self._core.gradients(model, loss, x, y, explain))

    async def step(
        self,
        model: Mapping[str, Any],
        loss: str | Mapping[str, Any],
        optimizer: Mapping[str, Any],
        x: BatchInput,
        y: TensorLike,
        *,
        explain: bool = False,
    ) -> StepResult[T]:
        return await self._send(self._core.step(model, loss, optimizer, x, y, explain))

    async def create_session(
        self,
        model: Mapping[str, Any],
        loss: str | Mapping[str, Any],
        optimizer: Mapping[str, Any],
        *,
        name: str | None = None,
        device: str | None = None,
        idempotency_key: str | None = None,
    ) -> Session[T]:
        call = self._core.create_session(model, loss, optimizer, name, device, idempotency_key)
        return await self._send(call)

    def list_sessions(
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
        optimizer: Mapping[str, Any] | None = None,
        params: Mapping[str, TensorLike] | None = None,
        if_match: str | Session[Any] | None = None,
    ) -> Session[T]:
        call = self._core.patch_session(session, name, optimizer, params, if_match)
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

    async def job(self, job_id: str | Job) -> Job:
        return await self._send(self._core.job(_jid(job_id)))

    async def cancel(self, job_id: str | Job) -> Job | None:
        return await self._send(self._core.cancel(_jid(job_id)))

    async def events(self, job_id: str | Job) -> AsyncIterator[JobEvent]:
        stream = self._core.events(_jid(job_id))
        while True:
            try:
                async with self._http.stream(
                    "GET", stream.call.path, headers=stream.headers(), timeout=stream.timeout()
                ) as response:
                    if response.status_code >= 400:
                        await response.aread()
                        wait = stream.failed(response)
                    else:
                        async for line in response.aiter_lines():
                            event = stream.feed(line)
                            if event is not None:
                                yield event
                                if stream.finished:
                                    return
                        if (resume := stream.ended()) is None:
                            return
                        wait = resume
            except httpx.TransportError as exc:
                wait = stream.dropped(exc)
            await anyio.sleep(wait)

    async def workers(self) -> list[Worker]:
        return await self._send(self._core.workers())

    async def health(self) -> Health:
        return await self._send(self._core.health())

    async def ready(self) -> Health:
        return await self._send(self._core.ready())

    async def aclose(self) -> None:
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


def _jid(job: str | Job) -> str:
    return job.id if isinstance(job, Job) else job
