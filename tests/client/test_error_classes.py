"""Each problem type the service answers maps to the client exception that says what it is."""

from __future__ import annotations

import gradsvc_client
from gradsvc_client.errors import (
    ApiError,
    AuthenticationError,
    ComputeTimeoutError,
    ConflictError,
    InsufficientStorageError,
    InvalidInputError,
    NotFoundError,
    OutOfMemoryError,
    PayloadTooLargeError,
    PreconditionFailedError,
    QuotaExceededError,
    RateLimitedError,
    ServerError,
    UnavailableError,
    error_class,
)

from service.errors import problem_types

GENERIC = {"internal": ServerError}
"""Types with no class of their own: the client sends JSON whole, so the rest cannot
happen to it except through a proxy or a hand-made request."""
PLAIN = {"request-timeout", "unsupported-media-type", "method-not-allowed"}
EXPECTED: dict[int, type[ApiError]] = {
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
}


def test_every_problem_type_has_its_class() -> None:
    for slug, kind in problem_types().items():
        got = error_class(kind.status, slug)
        if slug in PLAIN:
            assert got is ApiError, slug
            continue
        want = {
            "quota-exceeded": QuotaExceededError,
            "out-of-memory": OutOfMemoryError,
            # A full store is no device out of memory: a smaller batch does not help.
            "insufficient-storage": InsufficientStorageError,
            **GENERIC,
        }.get(slug) or EXPECTED[kind.status]
        assert got is want, (slug, got)
    assert issubclass(InsufficientStorageError, ServerError)
    assert not issubclass(InsufficientStorageError, OutOfMemoryError)
    assert "InsufficientStorageError" in gradsvc_client.__all__
