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
``application/problem+json`` bodies. ``loc`` points into the request body where it can.
"""

from __future__ import annotations

from collections.abc import Sequence

Loc = tuple[str | int, ...]


def short(value: object, limit: int = 64) -> str:
    """``repr`` of something a client sent, cut short: an error must not echo a megabyte."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class GradsvcError(Exception):
    status: int = 500
    type: str = "internal"
    title: str = "Internal error"

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


class TensorError(InvalidInput):
    type = "invalid-tensor"
    title = "Invalid tensor"


class ExpressionError(InvalidInput):
    type = "invalid-expression"
    title = "Invalid expression"


class SpecError(InvalidInput):
    type = "invalid-spec"
    title = "Invalid model, loss or optimizer"


class ShapeError(InvalidInput):
    type = "shape-mismatch"
    title = "Shapes do not fit"


class NonFinite(InvalidInput):
    type = "non-finite"
    title = "Result is not finite"


class TooLarge(InvalidInput):
    """The request's estimated peak memory, or its answer, is over the configured budget."""

    type = "too-large"
    title = "Request too large"


class KeyReused(InvalidInput):
    type = "idempotency-key-reused"
    title = "Idempotency-Key reused for another request"


class Conflict(GradsvcError):
    status = 409
    type = "conflict"
    title = "Conflict"


class SessionBusy(Conflict):
    type = "session-busy"
    title = "Session busy"

    @classmethod
    def held_by(cls, job_id: str) -> SessionBusy:
        return cls(
            f"training job {job_id} holds this session; wait for it to end, or cancel it with "
            f"DELETE /v1/jobs/{job_id}"
        )


class PreconditionFailed(GradsvcError):
    status = 412
    type = "precondition-failed"
    title = "Precondition failed"


class InvalidHeader(GradsvcError):
    """A request header that does not follow its grammar, e.g. an If-Match without quotes."""

    status = 400
    type = "invalid-header"
    title = "Invalid header"


class TooManyRequests(GradsvcError):
    status = 429
    type = "too-many-requests"
    title = "Too many requests"

    def __init__(self, detail: str, *, retry_after: int = 1) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


class QuotaExceeded(GradsvcError):
    """A per-key quota (jobs, streams, stored bytes, sessions) is used up. No ``Retry-After``:
    waiting does not help; finishing, closing or deleting something does."""

    status = 429
    type = "quota-exceeded"
    title = "Quota exceeded"


class RequestTimeout(GradsvcError):
    status = 408
    type = "request-timeout"
    title = "Request timeout"


class UnsupportedMediaType(GradsvcError):
    status = 415
    type = "unsupported-media-type"
    title = "Unsupported media type"


class NotFound(GradsvcError):
    status = 404
    type = "not-found"
    title = "Not found"


class Unavailable(GradsvcError):
    status = 503
    type = "unavailable"
    title = "Service unavailable"

    def __init__(self, detail: str, *, retry_after: int = 1) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


class StoreUnavailable(Unavailable):
    """The store could not be reached, stayed locked past its busy wait, or refused writes.
    Nothing was written; the same request can be sent again."""

    type = "store-unavailable"
    title = "Session store unavailable"

    def __init__(self, detail: str, *, retry_after: int = 2) -> None:
        super().__init__(detail, retry_after=retry_after)


class ComputeTimeout(GradsvcError):
    status = 504
    type = "compute-timeout"
    title = "Computation timed out"


class OutOfMemory(GradsvcError):
    status = 507
    type = "out-of-memory"
    title = "Out of device memory"


class InsufficientStorage(GradsvcError):
    """The store has no room left (a full disk, Redis at its maxmemory). Nothing was written;
    retrying helps only once an operator has made room."""

    status = 507
    type = "insufficient-storage"
    title = "Insufficient storage"
