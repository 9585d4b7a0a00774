"""RFC 9457 problem details for every error: domain errors, validation, 404, 405, and bugs.

A problem's ``type`` is a short slug (``non-finite``, ``validation-error``, ...), a relative
URI reference; the OpenAPI document lists them all under the ``Problem`` schema.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Match
from starlette.types import Send

from service.api import validation
from service.errors import GradsvcError, problem_types

log = logging.getLogger("gradsvc")
MEDIA_TYPE = "application/problem+json"


class ProblemError(BaseModel):
    loc: list[str | int]
    msg: str
    type: str | None = None


class Problem(BaseModel):
    """An RFC 9457 problem details object."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(description="a slug naming the kind of problem, e.g. non-finite")
    title: str
    status: int
    detail: str
    errors: list[ProblemError] | None = Field(default=None, description="for validation errors")


def problem(
    status: int,
    type_: str,
    title: str,
    detail: str,
    *,
    errors: Sequence[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    body: dict[str, Any] = {"type": type_, "title": title, "status": status, "detail": detail}
    if errors is not None:
        body["errors"] = list(errors)
    return JSONResponse(body, status_code=status, headers=headers, media_type=MEDIA_TYPE)


async def send_problem(
    send: Send,
    status: int,
    type_: str,
    title: str,
    detail: str,
    headers: dict[str, str] | None = None,
) -> None:
    """A problem straight from ASGI middleware, before any route runs."""
    body = json.dumps({"type": type_, "title": title, "status": status, "detail": detail}).encode()
    raw = [(b"content-type", MEDIA_TYPE.encode()), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def problem_body(exc: GradsvcError, *prefix: str | int) -> dict[str, Any]:
    """The problem object for a domain error; ``prefix`` locates it in a larger body."""
    body: dict[str, Any] = {
        "type": exc.type,
        "title": exc.title,
        "status": exc.status,
        "detail": _clip(exc.detail, 2000),
    }
    if exc.loc:
        # Domain errors point into the body unless they say where else (query, header, path).
        where = [] if exc.loc[0] in ("query", "header", "path") else ["body", *prefix]
        loc = [*where, *(_clip(p) for p in exc.loc)]
        body["errors"] = [{"loc": loc, "msg": body["detail"], "type": exc.type}]
    return body


async def domain_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GradsvcError)
    retry_after = getattr(exc, "retry_after", None)
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse(
        problem_body(exc), status_code=exc.status, headers=headers, media_type=MEDIA_TYPE
    )


async def validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    raw = list(exc.errors())
    if any(e.get("type") == "json_invalid" for e in raw):
        ctx = raw[0].get("ctx") or {}
        return problem(
            400,
            "malformed-json",
            TITLES["malformed-json"],
            f"the body is not valid JSON: {ctx.get('error', 'parse error')}",
        )
    # No "input": it can be large, and it is the client's own data.
    errors = [
        {"loc": [_clip(p) for p in e["loc"]], "msg": _clip(e["msg"], 500), "type": e["type"]}
        for e in validation.explain(raw[:50], exc.body)
    ]
    first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
    where = ".".join(str(p) for p in first["loc"])
    detail = f"{where}: {first['msg']}" if where else str(first["msg"])
    if len(errors) > 1:
        detail += f" (and {len(errors) - 1} more)"
    return problem(422, "validation-error", TITLES["validation-error"], detail, errors=errors)


def _clip(part: Any, limit: int = 64) -> Any:
    """Keys and messages can carry what the client sent: never echo more than a little."""
    if isinstance(part, str) and len(part) > limit:
        return part[: limit - 3] + "..."
    return part


# One title per problem type, from the registry in ``service.errors`` (the document's list
# of types is generated from the same registry).
TITLES: dict[str, str] = {slug: known.title for slug, known in problem_types().items()}


def title(type_: str, status: int) -> str:
    """The title of problem type ``type_``: registered, else the status's phrase in the
    sentence case every registered title uses."""
    if type_ in TITLES:
        return TITLES[type_]
    phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Error"
    return phrase[:1] + phrase[1:].lower()


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    headers = dict(exc.headers or {})
    status = exc.status_code
    phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Error"
    detail = exc.detail if isinstance(exc.detail, str) and exc.detail != phrase else phrase
    if status == 404:
        detail = f"no resource at {request.url.path}"
    if status == 405:
        allowed = allowed_methods(request)
        headers["Allow"] = ", ".join(allowed)
        detail = (
            f"{request.method} is not allowed on {request.url.path}; allowed: {', '.join(allowed)}"
        )
    slug = phrase.lower().replace(" ", "-")
    if status == 400 and "parsing the body" in str(exc.detail):
        # FastAPI's word for a body that is not UTF-8 or nests too deep for the JSON parser.
        slug, detail = "malformed-json", "the body is not valid JSON"
    return problem(status, slug, title(slug, status), detail, headers=headers or None)


async def unhandled_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return problem(500, "internal", "Internal error", "the service failed; the error is logged")


def allowed_methods(request: Request) -> list[str]:
    """Every method some route accepts at this path (Starlette names only the first route's).

    Only the routes of the most specific template count: /v1/sessions/restore also fits
    /v1/sessions/{session_id}, but a GET there is not a GET of the restore resource."""
    matching = {
        method: [
            route
            for route in _leaves(request.app.router.routes)
            if route.matches({**request.scope, "method": method})[0] == Match.FULL
        ]
        for method in _METHODS
    }
    fewest = min((_params(r) for rs in matching.values() for r in rs), default=0)
    return [method for method, rs in matching.items() if any(_params(r) == fewest for r in rs)]


def _leaves(routes: Iterable[BaseRoute]) -> Iterator[BaseRoute]:
    """The routes themselves: FastAPI keeps an included router as one node of the app's list."""
    for route in routes:
        inner = getattr(getattr(route, "original_router", None), "routes", None)
        if inner is not None:
            yield from _leaves(inner)
        else:
            yield route


def _params(route: BaseRoute) -> int:
    return str(getattr(route, "path", "")).count("{")


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


def install(app: FastAPI) -> None:
    app.add_exception_handler(GradsvcError, domain_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unhandled_error)


_DESCRIPTIONS = {
    429: (
        "Too Many Requests: `too-many-requests` (a rate or in-flight limit: retry after "
        "`Retry-After` seconds) or `quota-exceeded` (a per-key quota on sessions, active jobs, "
        "event streams or stored bytes: no `Retry-After`, since waiting does not lift it; the "
        "detail names the limit and what to finish, close or delete)"
    ),
}


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for the problem statuses a route can return."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        out[status] = {
            "description": _DESCRIPTIONS.get(status, HTTPStatus(status).phrase),
            "content": {MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}},
        }
        if status in (429, 503):
            retry: dict[str, Any] = {"required": True, "schema": {"type": "integer"}}
            retry["description"] = "seconds"
            if status == 429:  # a quota's 429 has none: waiting does not lift it
                retry.update(required=False, description="seconds; with `too-many-requests` only")
            out[status]["headers"] = {"Retry-After": retry}
        if status == 401:
            out[status]["headers"] = {
                "WWW-Authenticate": {
                    "required": True,
                    "schema": {"type": "string"},
                    "description": 'the scheme to use: Bearer realm="gradsvc"',
                }
            }
    return out
