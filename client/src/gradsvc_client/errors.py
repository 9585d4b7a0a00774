"""What the client raises: every error for an answer carries its problem+json body.

::

    ClientError                         anything this package raises about a call
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
            ├── OutOfMemoryError        507       the device ran out of memory
            └── InsufficientStorageError 507      the store is full: not retried

A caller's own mistake (a NaN to send, an unknown ``tensors=``) is a ``ValueError`` or
``TypeError`` raised before anything is sent, and a missing optional dependency an
``ImportError`` raised when the client is made.
"""

from __future__ import annotations

import email.utils
import json
import time
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

import httpx

__all__ = [
    "ApiError",
    "AuthenticationError",
    "ClientError",
    "ComputeTimeoutError",
    "ConflictError",
    "InsufficientStorageError",
    "InvalidInputError",
    "NetworkError",
    "NotFoundError",
    "OutOfMemoryError",
    "PayloadTooLargeError",
    "PreconditionFailedError",
    "QuotaExceededError",
    "RateLimitedError",
    "ServerError",
    "UnavailableError",
]


class ClientError(Exception):
    """Anything this package raises about a call (other than a caller's own mistake)."""


class NetworkError(ClientError):
    """No answer: the connection failed or dropped on every try. ``__cause__`` is httpx's."""


class ApiError(ClientError):
    """A 4xx or 5xx answer, with its RFC 9457 problem+json body.

    Attributes:
        status: The HTTP status.
        type: The problem type's slug (``not-found``, ``validation-error``, ...).
        title: The problem's title.
        detail: What went wrong, and how to fix it.
        problem: The whole body as sent (``errors`` and all).
        retry_after: Seconds from a ``Retry-After`` header, if it had one.
        headers: The answer's headers.
    """

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
        """Make one from its parts; ``error_from_response`` makes one from an answer.

        Args:
            status: The HTTP status.
            type: The problem type's slug.
            title: The problem's title.
            detail: The problem's detail.
            problem: The whole problem body.
            retry_after: Seconds to wait before a retry, if the answer said.
            headers: The answer's headers.
        """
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
    """409: a request with the same Idempotency-Key is still running, or the session is busy."""


class PreconditionFailedError(ApiError):
    """412: ``If-Match`` named a version the session has moved on from."""


class PayloadTooLargeError(ApiError):
    """413: the request body is over the service's limit."""


class RateLimitedError(ApiError):
    """429: over the key's request rate or requests in flight; ``retry_after`` in seconds."""


class QuotaExceededError(RateLimitedError):
    """429 ``quota-exceeded``: a per-key quota is used up; never retried.

    The quotas are sessions, active jobs, event streams and stored bytes; the detail says
    what to finish, close or delete.
    """


class ServerError(ApiError):
    """A 5xx answer."""


class UnavailableError(ServerError):
    """503: queue full, draining, or not ready; ``retry_after`` in seconds."""


class ComputeTimeoutError(ServerError):
    """504: the computation ran over the service's time limit; nothing was changed."""


class OutOfMemoryError(ServerError):
    """507: the device ran out of memory."""


class InsufficientStorageError(ServerError):
    """507 ``insufficient-storage``: the store (its disk, or Redis' maxmemory) is full; a
    smaller request does not help, an operator freeing space (or deleting sessions) does."""


_BY_STATUS: dict[int, type[ApiError]] = {
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


def error_class(status: int, problem_type: object) -> type[ApiError]:
    """The exception class for a status and a problem type.

    Args:
        status: The HTTP status (400 or more).
        problem_type: The problem body's ``type``, whatever it is.

    Returns:
        The most specific ``ApiError`` subclass.
    """
    if status == 429 and problem_type == "quota-exceeded":
        return QuotaExceededError
    if status == 507 and problem_type == "insufficient-storage":
        return InsufficientStorageError
    return _BY_STATUS.get(status) or (ServerError if status >= 500 else ApiError)


def error_from_problem(
    status: int,
    problem: dict[str, Any],
    *,
    retry_after: float | None = None,
    headers: Mapping[str, str] | None = None,
) -> ApiError:
    """The exception for a problem body (an answer's, or a ``step_many`` item's).

    Args:
        status: The HTTP status.
        problem: The problem+json body.
        retry_after: Seconds from the answer's ``Retry-After``.
        headers: The answer's headers.

    Returns:
        An ``ApiError`` of the class ``error_class`` picks.
    """
    phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Error"
    return error_class(status, problem.get("type"))(
        status,
        str(problem.get("type", "about:blank")),
        str(problem.get("title", phrase)),
        str(problem.get("detail", "")),
        problem,
        retry_after=retry_after,
        headers=headers,
    )


def error_from_response(response: httpx.Response) -> ApiError:
    """The exception for a 4xx or 5xx answer.

    Args:
        response: The answer, read.

    Returns:
        An ``ApiError`` carrying the problem body (or, for a body that is not JSON, such as
        a proxy's HTML page, a problem made from its first 500 bytes).
    """
    status = response.status_code
    try:
        body = json.loads(response.content)
    except ValueError:
        body = None
    if isinstance(body, dict):
        problem = body
    else:
        text = response.content[:500].decode("utf-8", "replace")
        phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Error"
        problem = {"type": "about:blank", "title": phrase, "status": status, "detail": text}
    return error_from_problem(
        status,
        problem,
        retry_after=retry_after(response.headers.get("retry-after")),
        headers=response.headers,
    )


def retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header: delta-seconds or an HTTP date.

    Args:
        value: The header's value, or None when there was none.

    Returns:
        Seconds (0 or more), or None when absent or unreadable.
    """
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
