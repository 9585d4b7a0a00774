"""The domain errors, each of which the API answers as one RFC 9457 problem type.

::

    GradsvcError                    (500 internal)      never raised for client input
    ├── InvalidInput                (422 invalid-input)
    │   ├── TensorError             (422 invalid-tensor)     forms, dtypes, ragged arrays, sizes
    │   ├── ExpressionError         (422 invalid-expression) grammar, limits, unknown names
    │   ├── SpecError               (422 invalid-spec)       models, layers, losses, optimizers
    │   ├── ShapeError              (422 shape-mismatch)     batch does not fit the model
    │   ├── NonFinite               (422 non-finite)         a result JSON cannot carry
    │   ├── TooLarge                (422 too-large)          over the memory or answer budget
    │   └── KeyReused               (422 idempotency-key-reused)  same key, another request
    ├── NotFound                    (404 not-found)          also: another key's session
    ├── Conflict                    (409 conflict)           the same key still in flight
    │   └── SessionBusy             (409 session-busy)       a training job holds the session
    ├── PreconditionFailed          (412 precondition-failed) If-Match names an old version
    ├── InvalidHeader               (400 invalid-header)     a header outside its grammar
    ├── RequestTimeout              (408 request-timeout)    the body did not arrive in time
    ├── UnsupportedMediaType        (415 unsupported-media-type) a JSON route without JSON
    ├── TooManyRequests             (429 too-many-requests)  rate or in-flight limit; Retry-After
    ├── QuotaExceeded               (429 quota-exceeded)     a per-key quota; no Retry-After
    ├── Unavailable                 (503 unavailable)        queue full, draining, worker lost
    │   └── StoreUnavailable        (503 store-unavailable)  store unreachable, locked, read-only
    ├── ComputeTimeout              (504 compute-timeout)    over --compute-timeout; no change
    ├── OutOfMemory                 (507 out-of-memory)      the device ran out of memory
    └── InsufficientStorage         (507 insufficient-storage) the store's disk or memory is full

Store trouble is not a bug: ``store/`` turns a locked file, a full disk or an unreachable
Redis into ``StoreUnavailable`` or ``InsufficientStorage`` at its own boundary, so that the
client is told to retry (or the operator to make room) instead of seeing a 500.

``engine/`` raises these with plain messages; ``api/problems.py`` turns them into
``application/problem+json`` bodies. ``problem_types()`` is the one list of problem types:
these, with the few the API layer answers itself; the OpenAPI document's list is made from it.
``loc`` points into the request body where it can.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

Loc = tuple[str | int, ...]


def short(value: object, limit: int = 64) -> str:
    """``repr`` of something a client sent, cut short: an error must not echo a megabyte."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class GradsvcError(Exception):
    status: int = 500
    type: str = "internal"
    title: str = "Internal error"
    description: str = (
        "a bug in the service, never caused by what the client sent; it is logged, and nothing "
        "was changed"
    )

    def __init__(self, detail: str, *, loc: Sequence[str | int] = ()) -> None:
        super().__init__(detail)
        self.detail = detail
        self.loc: Loc = tuple(loc)

    def at(self, *prefix: str | int) -> GradsvcError:
        """Prefix ``loc`` with where the failing value sits in the request."""
        self.loc = (*prefix, *self.loc)
        return self


class InvalidInput(GradsvcError):
    status = 422
    type = "invalid-input"
    title = "Invalid input"
    description = (
        "a value in the body is well-formed but cannot be used; the detail says which and how "
        "to fix it"
    )


class TensorError(InvalidInput):
    type = "invalid-tensor"
    title = "Invalid tensor"
    description = (
        "a tensor is ragged, of an unknown dtype, badly encoded, or over the element limit"
    )


class ExpressionError(InvalidInput):
    type = "invalid-expression"
    title = "Invalid expression"
    description = (
        "an expression model's formula does not parse, uses a name or function outside the "
        "grammar, or is over the length or depth limit"
    )


class SpecError(InvalidInput):
    type = "invalid-spec"
    title = "Invalid model, loss or optimizer"
    description = (
        "a model, layer, loss, optimizer or scheduler spec names something unknown or takes "
        "arguments that do not fit"
    )


class ShapeError(InvalidInput):
    type = "shape-mismatch"
    title = "Shapes do not fit"
    description = (
        "the batch does not fit the model (an input's or target's shape, or a missing input)"
    )


class NonFinite(InvalidInput):
    type = "non-finite"
    title = "Result is not finite"
    description = (
        "a result (loss, gradient, new parameter) is NaN or infinite, which JSON cannot carry; "
        "in a session nothing was changed"
    )


class TooLarge(InvalidInput):
    """The request's estimated peak memory, or its answer, is over the configured budget."""

    type = "too-large"
    title = "Request too large"
    description = (
        "the request's estimated peak memory, or its answer, is over the configured budget; the"
        " detail gives the estimate (send b64, or download the checkpoint)"
    )


class KeyReused(InvalidInput):
    type = "idempotency-key-reused"
    title = "Idempotency-Key reused for another request"
    description = (
        "this Idempotency-Key was first sent with another request; use a new key for a new request"
    )


class Conflict(GradsvcError):
    status = 409
    type = "conflict"
    title = "Conflict"
    description = (
        "a request with the same Idempotency-Key is still running; retry once it has answered"
    )


class SessionBusy(Conflict):
    type = "session-busy"
    title = "Session busy"
    description = (
        "a training job holds the session; wait for it to end, or cancel it (the detail names "
        "the job)"
    )

    @classmethod
    def held_by(cls, job_id: str) -> SessionBusy:
        return cls(
            f"training job {job_id} holds this session; wait for it to end, or cancel it with "
            f"DELETE /v1/jobs/{job_id}"
        )


class NothingAccumulated(Conflict):
    type = "nothing-accumulated"
    title = "Nothing accumulated"
    description = (
        "apply was called with no gradients accumulated since the last apply; send batches "
        "to POST /v1/sessions/{id}/accumulate first"
    )


class PreconditionFailed(GradsvcError):
    status = 412
    type = "precondition-failed"
    title = "Precondition failed"
    description = "If-Match names a version the session has moved on from; read the session again"


class InvalidHeader(GradsvcError):
    """A request header that does not follow its grammar, e.g. an If-Match without quotes."""

    status = 400
    type = "invalid-header"
    title = "Invalid header"
    description = (
        "a header does not follow its grammar, e.g. an If-Match ETag without its double "
        'quotes (If-Match: "3"); nothing was looked up or changed'
    )


class TooManyRequests(GradsvcError):
    status = 429
    type = "too-many-requests"
    title = "Too many requests"
    description = (
        "over the key's request rate or in-flight limit; retry after `Retry-After` seconds"
    )

    def __init__(self, detail: str, *, retry_after: int = 1) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


class QuotaExceeded(GradsvcError):
    """A per-key quota (jobs, streams, stored bytes, sessions) is used up. No ``Retry-After``:
    waiting does not help; finishing, closing or deleting something does."""

    status = 429
    type = "quota-exceeded"
    title = "Quota exceeded"
    description = (
        "a per-key quota (sessions, active jobs, event streams, stored bytes) is used up; no "
        "`Retry-After`: finish, close or delete something first"
    )


class RequestTimeout(GradsvcError):
    status = 408
    type = "request-timeout"
    title = "Request timeout"
    description = "the request body did not arrive within the body timeout"


class UnsupportedMediaType(GradsvcError):
    status = 415
    type = "unsupported-media-type"
    title = "Unsupported media type"
    description = "a JSON route was called without `Content-Type: application/json`"


class NotFound(GradsvcError):
    status = 404
    type = "not-found"
    title = "Not found"
    description = (
        "no such resource, or one that belongs to another key; also a path that no route serves"
    )


class Unavailable(GradsvcError):
    status = 503
    type = "unavailable"
    title = "Service unavailable"
    description = (
        "the worker queue is full, the server is draining or at its connection limit, or a "
        "worker was lost; retry after `Retry-After` seconds"
    )

    def __init__(self, detail: str, *, retry_after: int = 1) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


class StoreUnavailable(Unavailable):
    """The store could not be reached, stayed locked past its busy wait, or refused writes.
    Nothing was written; the same request can be sent again."""

    type = "store-unavailable"
    title = "Session store unavailable"
    description = (
        "the store is unreachable, locked past its wait, or refuses writes; nothing was "
        "written: retry after `Retry-After` seconds"
    )

    def __init__(self, detail: str, *, retry_after: int = 2, kind: str = "unavailable") -> None:
        super().__init__(detail, retry_after=retry_after)
        self.kind = kind
        """for ``gradsvc_store_errors_total``: ``locked`` (SQLite's busy wait ran out), else
        ``unavailable``"""


class ComputeTimeout(GradsvcError):
    status = 504
    type = "compute-timeout"
    title = "Computation timed out"
    description = (
        "the computation ran past the compute timeout (or was still queued at its deadline); "
        "nothing was changed"
    )


class OutOfMemory(GradsvcError):
    status = 507
    type = "out-of-memory"
    title = "Out of device memory"
    description = "the device ran out of memory for this computation; nothing was changed"


class InsufficientStorage(GradsvcError):
    """The store has no room left (a full disk, Redis at its maxmemory). Nothing was written;
    retrying helps only once an operator has made room."""

    status = 507
    type = "insufficient-storage"
    title = "Insufficient storage"
    kind = "full"
    description = (
        "the store's disk or memory is full; nothing was written, and retrying helps once an "
        "operator has made room"
    )


@dataclass(frozen=True)
class ProblemType:
    """One kind of problem the API answers.

    Attributes:
        type: the slug in a problem body's ``type`` (a relative URI reference).
        status: the HTTP status it is always answered with.
        title: the body's ``title``: the same for every problem of this type.
        description: when it is sent, and what the client can do about it.
    """

    type: str
    status: int
    title: str
    description: str


# The problems that the API layer answers itself, around the domain: FastAPI's validation,
# the JSON parser, the key check, routing and the body-size limit.
API_PROBLEMS = (
    ProblemType(
        "validation-error",
        422,
        "Request validation failed",
        "the body, a query or a header does not match the operation's schema; `errors` lists "
        "each place (`loc`) and what is wrong there",
    ),
    ProblemType(
        "malformed-json",
        400,
        "Malformed JSON",
        "the body is not valid JSON (or not UTF-8, or nested deeper than the parser allows)",
    ),
    ProblemType(
        "unauthorized",
        401,
        "Unauthorized",
        "no API key, or one the server does not know: send `Authorization: Bearer <key>`",
    ),
    ProblemType(
        "method-not-allowed",
        405,
        "Method not allowed",
        "the path exists but not with this method; the `Allow` header lists those it takes",
    ),
    ProblemType(
        "payload-too-large",
        413,
        "Payload too large",
        "the request body is over the body-size limit; send large tensors as b64, or fewer",
    ),
)


def problem_types() -> dict[str, ProblemType]:
    """Every problem type the API answers, by slug: each domain error's (``GradsvcError``
    and its subclasses, in the order of the tree above) and the API layer's own. The
    OpenAPI document's list of problem types is made from this.

    Returns:
        The types by slug, in a stable order.

    Raises:
        ValueError: if two errors share a slug with another status or title (each type has
            one of each).
    """
    found: dict[str, ProblemType] = {}
    pending: list[type[GradsvcError]] = [GradsvcError]
    kinds: list[ProblemType] = []
    while pending:
        error = pending.pop(0)
        kinds.append(ProblemType(error.type, error.status, error.title, error.description))
        pending[:0] = error.__subclasses__()
    for kind in (*kinds, *API_PROBLEMS):
        known = found.setdefault(kind.type, kind)
        if (known.status, known.title) != (kind.status, kind.title):
            raise ValueError(f"problem type {kind.type} has two statuses or titles")
    return found
