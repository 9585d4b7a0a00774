"""The OpenAPI document as generators read it: one name per schema, method-like operationIds,
declared tags, described operations, real examples, and every problem type the code sends.

All of it is read from the app's own document (no server): these take well under a second.
"""

from __future__ import annotations

import ast
import importlib
import json
import pkgutil
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from openapi_spec_validator import validate

import service
from service.api import examples
from service.app import create_app
from service.errors import GradsvcError, problem_types

ROOT = Path(__file__).resolve().parents[2]
API_DIR = ROOT / "service" / "api"
METHODS = ("get", "put", "post", "patch", "delete")
# What each operation is called: a generator makes these its method names.
OPERATION_IDS = {
    ("post", "/v1/forward"): "forward",
    ("post", "/v1/gradients"): "gradients",
    ("post", "/v1/step"): "step",
    ("post", "/v1/sessions"): "createSession",
    ("get", "/v1/sessions"): "listSessions",
    ("post", "/v1/sessions/restore"): "restoreSession",
    ("post", "/v1/sessions/step"): "stepSessions",
    ("get", "/v1/sessions/{session_id}"): "getSession",
    ("patch", "/v1/sessions/{session_id}"): "updateSession",
    ("delete", "/v1/sessions/{session_id}"): "deleteSession",
    ("post", "/v1/sessions/{session_id}/step"): "stepSession",
    ("post", "/v1/sessions/{session_id}/gradients"): "sessionGradients",
    ("post", "/v1/sessions/{session_id}/accumulate"): "accumulateSession",
    ("post", "/v1/sessions/{session_id}/apply"): "applySession",
    ("post", "/v1/sessions/{session_id}/forward"): "sessionForward",
    ("get", "/v1/sessions/{session_id}/history"): "getHistory",
    ("get", "/v1/sessions/{session_id}/checkpoint"): "getCheckpoint",
    ("post", "/v1/sessions/{session_id}/train"): "trainSession",
    ("get", "/v1/jobs/{job_id}"): "getJob",
    ("delete", "/v1/jobs/{job_id}"): "cancelJob",
    ("get", "/v1/jobs/{job_id}/events"): "followJobEvents",
    ("get", "/healthz"): "health",
    ("get", "/readyz"): "ready",
    ("get", "/v1/workers"): "listWorkers",
    ("get", "/metrics"): "metrics",
}


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    return create_app().openapi()


def _operations(spec: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method, path, operation)
        for path, item in spec["paths"].items()
        for method, operation in item.items()
        if method in METHODS
    ]


def test_the_document_is_valid_openapi(spec: dict[str, Any]) -> None:
    validate(spec)


def test_no_two_schemas_share_a_name(spec: dict[str, Any]) -> None:
    """A generator names a model after its schema's title: two schemas with one title (as the
    request and answer items of POST /v1/sessions/step had) make it drop both."""
    schemas = spec["components"]["schemas"]
    titles = Counter(schema.get("title", name) for name, schema in schemas.items())
    assert [t for t, n in titles.items() if n > 1] == []
    for name, schema in schemas.items():
        assert schema.get("title", name) == name, name  # not SessionsStepItem-Output


def test_every_operation_has_a_method_like_unique_id(spec: dict[str, Any]) -> None:
    ids = {(method, path): op.get("operationId") for method, path, op in _operations(spec)}
    assert ids == OPERATION_IDS
    assert all(re.fullmatch(r"[a-z][a-zA-Z0-9]*", i) for i in ids.values())
    assert len(set(ids.values())) == len(ids)


def test_every_operation_is_tagged_summarised_and_described(spec: dict[str, Any]) -> None:
    declared = {tag["name"]: tag.get("description") for tag in spec["tags"]}
    assert all(declared.values()), declared
    for method, path, operation in _operations(spec):
        assert operation.get("tags") and set(operation["tags"]) <= set(declared), (method, path)
        assert operation.get("summary") and operation.get("description"), (method, path)


def test_the_default_server_is_declared(spec: dict[str, Any]) -> None:
    urls = {server["url"]: server.get("description") for server in spec["servers"]}
    assert "gradsvc serve" in (urls.get("http://127.0.0.1:8000") or "")
    # Swagger UI calls the first: the server that served the page, wherever it listens.
    assert spec["servers"][0]["url"] == "/"


def test_every_json_answer_has_real_examples(spec: dict[str, Any]) -> None:
    """No placeholders (Swagger UI's `"outputs": 0`, `additionalProp1`): each JSON success
    answer shows what the service answered (test_generated_client.py replays them)."""
    assert "additionalProp1" not in json.dumps(spec)
    for method, path, operation in _operations(spec):
        for status, response in operation["responses"].items():
            content = response.get("content", {}).get("application/json")
            if status.startswith("2") and content is not None:
                assert content.get("examples"), (method, path, status)
    assert set(examples.ANSWERS) <= set(OPERATION_IDS.values())
    # FastAPI drops None from a route's own responses; the document keeps the nulls.
    listing = spec["paths"]["/v1/sessions"]["get"]["responses"]["200"]
    assert listing["content"]["application/json"]["examples"]["one"]["value"]["next"] is None


def test_the_problem_schema_lists_every_problem_type(spec: dict[str, Any]) -> None:
    kind = spec["components"]["schemas"]["Problem"]["properties"]["type"]
    registry = problem_types()
    assert kind["enum"] == list(registry)
    for slug, problem in registry.items():
        assert problem.description and f"`{slug}` ({problem.status}," in kind["description"]
    # The six the document used to leave out.
    for slug in ("idempotency-key-reused", "precondition-failed", "conflict"):
        assert slug in kind["enum"]
    for slug in ("too-many-requests", "compute-timeout", "out-of-memory"):
        assert slug in kind["enum"]


def _all_error_classes() -> list[type[GradsvcError]]:
    for module in pkgutil.walk_packages(service.__path__, "service."):
        importlib.import_module(module.name)
    found, pending = [], [GradsvcError]
    while pending:
        error = pending.pop()
        found.append(error)
        pending.extend(error.__subclasses__())
    return found


def test_every_domain_error_is_a_registered_type() -> None:
    """Every GradsvcError subclass anywhere in the package, with its status and title."""
    registry = problem_types()
    for error in _all_error_classes():
        assert error.type in registry, f"{error.__name__}: add it to the tree in errors.py"
        known = registry[error.type]
        assert (known.status, known.title) == (error.status, error.title), error.__name__


def _literal_problems() -> list[tuple[str, int, str, str]]:
    """(where, status, type, title) of each problem the API layer writes by hand: the literal
    arguments of every call to ``problem`` or ``send_problem`` under service/api."""
    found = []
    for path in API_DIR.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            name = getattr(node.func, "id", getattr(node.func, "attr", None))
            args = node.args[1:] if name == "send_problem" else node.args
            if name not in ("problem", "send_problem") or len(args) < 3:
                continue
            if all(isinstance(a, ast.Constant) for a in args[:3]):
                status, slug, title = (a.value for a in args[:3])  # type: ignore[attr-defined]
                found.append((f"{path.name}:{node.lineno}", status, slug, title))
    return found


def test_every_problem_the_api_writes_is_a_registered_type() -> None:
    written = _literal_problems()
    assert len(written) >= 8  # the scan sees the calls: auth, bodylimit, connections, problems
    registry = problem_types()
    for where, status, slug, title in written:
        assert slug in registry, f"{where}: {slug} is not in errors.problem_types()"
        assert (registry[slug].status, registry[slug].title) == (status, title), where
