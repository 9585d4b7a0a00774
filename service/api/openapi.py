"""The OpenAPI document as clients and generators read it: tags, servers, operation ids, the
problem types, and the problems every route can answer before its own code runs.

FastAPI writes the document from the routes; ``install`` adds what it cannot know: the
security schemes, the list of problem types (from ``errors.problem_types()``), and the
problems that middleware answers. ``openapi/openapi.json`` is this document, pinned by a test.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute

from service.api import examples, problems
from service.api.auth import OPEN_PATHS, OPERATOR_PATHS, Keys
from service.errors import problem_types

TAGS = [
    {
        "name": "compute",
        "description": (
            "Stateless forward passes, gradients and optimizer steps: the model, loss and "
            "optimizer travel with every request, and nothing is kept between calls."
        ),
    },
    {
        "name": "sessions",
        "description": (
            "A model's parameters and optimizer state kept on the server, durably: every "
            "step is committed before it is answered, exactly once under retries "
            "(`Idempotency-Key`), and linearizable (`If-Match`)."
        ),
    },
    {
        "name": "jobs",
        "description": (
            "Long training runs on a session: epochs of mini-batch steps run by the server, "
            "each committed, followed live as Server-Sent Events."
        ),
    },
    {
        "name": "operations",
        "description": (
            "Liveness, readiness, the worker processes and Prometheus metrics, for operators "
            "and load balancers."
        ),
    },
]
SERVERS = [
    # First, so that Swagger UI's "Try it out" calls the server that serves the page.
    {"url": "/", "description": "this server: the one that served this document"},
    {"url": "http://127.0.0.1:8000", "description": "the default `gradsvc serve`"},
]


def operation_id(route: APIRoute) -> str:
    """A route's operationId when it sets none: its name in camelCase (``list_sessions`` →
    ``listSessions``), which generators turn into a method name.

    Args:
        route: the route FastAPI is documenting.

    Returns:
        The operationId.
    """
    head, *rest = route.name.split("_")
    return head + "".join(word.capitalize() for word in rest)


def install(app: FastAPI, *, keys: Keys) -> None:
    """Make ``app.openapi()`` the whole document: FastAPI's, plus the Problem schema and its
    types, the security schemes, and the problems answered before a route runs.

    Args:
        app: the application, with all its routes included.
        keys: the configured keys, which decide whether a key is required or optional.
    """
    original = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = original()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components["Problem"] = problems.Problem.model_json_schema(
                ref_template="#/components/schemas/{model}"
            )
            defs = components["Problem"].pop("$defs", {})
            components.update(defs)
            components["Problem"]["properties"]["type"] = _problem_type_schema()
            components.setdefault(
                "DType",
                {"type": "string", "enum": ["float32", "float64", "float16", "bfloat16", "int64"]},
            )
            _declare_security(schema, keys=keys)
            _problem_for_validation(schema)
            _answer_examples(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _problem_type_schema() -> dict[str, Any]:
    """The Problem's ``type``: an enum of every slug the service answers, each described."""
    kinds = problem_types().values()
    listed = "\n".join(f"- `{k.type}` ({k.status}, {k.title}): {k.description}" for k in kinds)
    return {
        "type": "string",
        "title": "Type",
        "enum": [k.type for k in kinds],
        "description": "The kind of problem, a slug (a relative URI reference):\n\n" + listed,
    }


def _declare_security(schema: dict[str, Any], *, keys: Keys) -> None:
    """Bearer keys on every route but the open ones (Swagger UI's Authorize button), and the
    problems answered before a route's own code runs: 503 (too many connections) everywhere;
    401 and 429 on every keyed route (401 and 404 on the operator routes, for a tenant's
    key); 408, 413 and 503 (the parse budget) wherever a body is read; 415 wherever the body
    is JSON.

    With keys configured the key is required; without, it is optional (the empty requirement),
    which is what the committed document, made with the default settings, says. The operator
    routes take an operator key; with none configured, a keyless server's loopback callers
    need none."""
    schema["components"]["securitySchemes"] = {
        "apiKey": {
            "type": "http",
            "scheme": "bearer",
            "description": "an API key, when the service is configured with keys",
        },
        "adminKey": {
            "type": "http",
            "scheme": "bearer",
            "description": (
                "an operator key (--admin-keys): the only key the operator routes take; "
                "a keyless server also answers them to loopback callers without one"
            ),
        },
    }
    keyed = keys.tenants is not None
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            if path in OPEN_PATHS:
                operation["responses"].setdefault("503", problems.responses(503)[503])
                continue
            if path in OPERATOR_PATHS:
                open_to_loopback = not keyed and keys.operators is None
                operation["security"] = [{"adminKey": []}] + ([{}] if open_to_loopback else [])
                extra = [401, 404, 503]
            else:
                operation["security"] = [{"apiKey": []}] if keyed else [{"apiKey": []}, {}]
                extra = [401, 429, 503]
            if method in ("post", "patch", "put"):
                extra += [408, 413]
            if "application/json" in operation.get("requestBody", {}).get("content", {}):
                extra.append(415)
            for status, entry in problems.responses(*extra).items():
                operation["responses"].setdefault(str(status), entry)


def _problem_for_validation(schema: dict[str, Any]) -> None:
    """FastAPI declares its own 422 body (HTTPValidationError, application/json) on a route
    that names none; this app answers every 422 as a problem, so the document says so."""
    for operations in schema["paths"].values():
        for operation in operations.values():
            declared = operation["responses"].get("422", {})
            if "application/json" in declared.get("content", {}):
                operation["responses"]["422"] = problems.responses(422)[422]
    text = json.dumps(schema["paths"])
    for name in ("HTTPValidationError", "ValidationError"):
        if f"#/components/schemas/{name}" not in text:
            schema["components"]["schemas"].pop(name, None)


def _answer_examples(schema: dict[str, Any]) -> None:
    """Each operation's real answers (``examples.ANSWERS``) as its success response's
    examples. Set here, on the finished document, because FastAPI drops every None from a
    route's own ``responses`` as it writes them, and an example without its ``"next": null``
    no longer fits its schema."""
    for operations in schema["paths"].values():
        for operation in operations.values():
            named = examples.ANSWERS.get(operation["operationId"])
            if named is None:
                continue
            status = min(s for s in operation["responses"] if s.startswith("2"))
            content = operation["responses"][status]["content"]["application/json"]
            content["examples"] = {name: {"value": value} for name, value in named.items()}
